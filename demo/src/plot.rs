//! A small hand-written SVG line plot (no plotting dependency): the demo's `loss.svg`, train and validation
//! loss per round. It draws a frame, "nice" ticks (1, 2, 5 × 10^k) with grid lines on both axes, axis labels,
//! a title, a legend and one `<polyline>` per series (a lone point becomes a `<circle>`). Non-finite points
//! are skipped, so a diverged round cannot produce an unreadable file.

use std::fmt::Write;

/// Width and height of the image, in SVG user units (pixels).
const WIDTH: f64 = 720.0;
/// Height of the image.
const HEIGHT: f64 = 440.0;
/// Margins around the plotting area: left (tick labels + axis label), right, top (title), bottom.
const MARGIN: (f64, f64, f64, f64) = (72.0, 24.0, 40.0, 56.0);
/// Roughly how many ticks per axis.
const TICKS: usize = 6;

/// One line of the plot.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Shown in the legend.
    pub name: String,
    /// Stroke colour (any SVG colour, e.g. `#1f77b4`).
    pub color: String,
    /// The points (x, y), drawn in the order given.
    pub points: Vec<(f64, f64)>,
}

/// What the plot shows besides its lines.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// The title, above the plot.
    pub title: String,
    /// The x axis label.
    pub x: String,
    /// The y axis label.
    pub y: String,
}

/// A closed interval of an axis, with its ticks.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// An axis covering `[min, max]` extended outwards to whole tick steps; a degenerate range is widened.
    fn covering(min: f64, max: f64) -> Axis {
        let (mut min, mut max) = (min, max);
        if !(min.is_finite() && max.is_finite()) {
            (min, max) = (0.0, 1.0);
        }
        if max - min < 1e-12 * min.abs().max(1.0) {
            let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.05 };
            (min, max) = (min - pad, max + pad);
        }
        let step = nice_step((max - min) / TICKS as f64);
        let lo = (min / step).floor() * step;
        let hi = (max / step).ceil() * step;
        let count = ((hi - lo) / step).round() as usize;
        let ticks = (0..=count).map(|i| lo + i as f64 * step).collect();
        Axis { lo, hi, ticks }
    }

    /// Where `v` falls, from 0 (lo) to 1 (hi).
    fn fraction(&self, v: f64) -> f64 {
        (v - self.lo) / (self.hi - self.lo)
    }
}

/// The smallest step of the form {1, 2, 5} × 10^k that is at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = if raw.is_finite() && raw > 0.0 {
        raw
    } else {
        1.0
    };
    let magnitude = 10f64.powf(raw.log10().floor());
    let normalized = raw / magnitude;
    let nice = if normalized <= 1.0 {
        1.0
    } else if normalized <= 2.0 {
        2.0
    } else if normalized <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// A tick label: as few decimals as the axis step needs.
fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    let text = format!("{v:.decimals$}");
    // "-0" and "-0.00" read as a bug.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_owned()
    } else {
        text
    }
}

/// Escapes text for an SVG text node or attribute.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Renders the series as a standalone SVG document.
pub fn line_plot(labels: &Labels, series: &[Series]) -> String {
    let finite = |s: &Series| {
        s.points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect::<Vec<_>>()
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(finite).collect();
    let (x_min, x_max) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y_min, y_max) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (x_axis, y_axis) = (Axis::covering(x_min, x_max), Axis::covering(y_min, y_max));
    let (left, right, top, bottom) = MARGIN;
    let (plot_w, plot_h) = (WIDTH - left - right, HEIGHT - top - bottom);
    let px = |x: f64| left + x_axis.fraction(x) * plot_w;
    let py = |y: f64| top + (1.0 - y_axis.fraction(y)) * plot_h;

    let mut svg = String::new();
    // Writing to a String cannot fail; `let _ =` keeps the code free of unwraps.
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
        left + plot_w / 2.0,
        escape(&labels.title)
    );
    // Grid and tick labels.
    let x_step = x_axis.ticks.get(1).map_or(1.0, |t| t - x_axis.lo);
    for &t in &x_axis.ticks {
        let x = px(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 16.0,
            tick_label(t, x_step)
        );
    }
    let y_step = y_axis.ticks.get(1).map_or(1.0, |t| t - y_axis.lo);
    for &t in &y_axis.ticks {
        let y = py(t);
        let _ = writeln!(
            svg,
            r##"<line x1="{left:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            y + 4.0,
            tick_label(t, y_step)
        );
    }
    // Frame and axis labels.
    let _ = writeln!(
        svg,
        r#"<rect x="{left:.1}" y="{top:.1}" width="{plot_w:.1}" height="{plot_h:.1}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        HEIGHT - 14.0,
        escape(&labels.x)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(&labels.y)
    );
    // The lines, then the legend (top right, inside the frame).
    for s in series {
        let points = finite(s);
        let color = escape(&s.color);
        match points.as_slice() {
            [] => {}
            [(x, y)] => {
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                    px(*x),
                    py(*y)
                );
            }
            _ => {
                let coords: Vec<String> = points
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
                    .collect();
                let _ = writeln!(
                    svg,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                    coords.join(" ")
                );
            }
        }
    }
    for (i, s) in series.iter().enumerate() {
        let y = top + 16.0 + 18.0 * i as f64;
        let x = left + plot_w - 150.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"/><text x="{:.1}" y="{y:.1}">{}</text>"#,
            y - 4.0,
            x + 24.0,
            y - 4.0,
            escape(&s.color),
            x + 30.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Labels {
        Labels {
            title: "loss <per> round & \"more\"".into(),
            x: "round".into(),
            y: "loss (nats)".into(),
        }
    }

    fn series(name: &str, points: &[(f64, f64)]) -> Series {
        Series {
            name: name.into(),
            color: "#1f77b4".into(),
            points: points.to_vec(),
        }
    }

    /// Checks that every element opens and closes in order (self-closing tags included): the structure an
    /// XML parser would demand, enough to catch a missing `/` or `>`.
    fn assert_well_formed(svg: &str) {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').expect("every tag closes") + start;
            let tag = &rest[start + 1..end];
            assert!(!tag.contains('<'), "nested '<' in tag {tag:?}");
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(
                    stack.pop().as_deref(),
                    Some(name.trim()),
                    "mismatched closing tag"
                );
            } else if !tag.ends_with('/') {
                stack.push(
                    tag.split_whitespace()
                        .next()
                        .expect("tag has a name")
                        .to_owned(),
                );
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed elements {stack:?}");
        assert_eq!(svg.matches('"').count() % 2, 0, "unbalanced quotes");
    }

    /// The coordinates of the first polyline.
    fn polyline_points(svg: &str) -> Vec<(f64, f64)> {
        let line = svg
            .lines()
            .find(|l| l.starts_with("<polyline"))
            .expect("a polyline");
        let attr = line.split("points=\"").nth(1).expect("points attribute");
        let attr = &attr[..attr.find('"').expect("closing quote")];
        attr.split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').expect("x,y");
                (x.parse().expect("x number"), y.parse().expect("y number"))
            })
            .collect()
    }

    #[test]
    fn draws_one_polyline_per_series_inside_the_frame() {
        let train = series("train", &[(1.0, 5.5), (2.0, 4.0), (3.0, 3.1), (4.0, 2.6)]);
        let val = Series {
            name: "validation".into(),
            color: "#d62728".into(),
            ..series("", &[(1.0, 5.4), (4.0, 2.8)])
        };
        let svg = line_plot(&labels(), &[train, val]);
        assert_well_formed(&svg);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(svg.matches("<polyline").count(), 2);
        let pts = polyline_points(&svg);
        assert_eq!(pts.len(), 4);
        let (left, right, top, bottom) = MARGIN;
        for &(x, y) in &pts {
            assert!(
                (left..=WIDTH - right).contains(&x),
                "x {x} outside the frame"
            );
            assert!(
                (top..=HEIGHT - bottom).contains(&y),
                "y {y} outside the frame"
            );
        }
        // x grows to the right; a falling loss goes down the page as y grows (SVG y points down).
        assert!(
            pts.windows(2).all(|w| w[1].0 > w[0].0 && w[1].1 > w[0].1),
            "{pts:?}"
        );
        assert!(svg.contains(">train</text>") && svg.contains(">validation</text>"));
        assert!(svg.contains(">round</text>") && svg.contains(">loss (nats)</text>"));
    }

    #[test]
    fn escapes_text() {
        let svg = line_plot(&labels(), &[series("a<b", &[(0.0, 1.0), (1.0, 2.0)])]);
        assert_well_formed(&svg);
        assert!(svg.contains("loss &lt;per&gt; round &amp; &quot;more&quot;"));
        assert!(svg.contains(">a&lt;b</text>"));
    }

    #[test]
    fn skips_non_finite_points_and_handles_degenerate_input() {
        let svg = line_plot(
            &labels(),
            &[series(
                "s",
                &[
                    (1.0, 2.0),
                    (2.0, f64::NAN),
                    (3.0, f64::INFINITY),
                    (4.0, 1.0),
                ],
            )],
        );
        assert_well_formed(&svg);
        assert_eq!(polyline_points(&svg).len(), 2);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));

        // One point: a circle, no polyline. Constant values: a widened axis. No points at all: an empty frame.
        let one = line_plot(&labels(), &[series("s", &[(1.0, 3.0)])]);
        assert_well_formed(&one);
        assert_eq!(
            (
                one.matches("<circle").count(),
                one.matches("<polyline").count()
            ),
            (1, 0)
        );
        let flat = line_plot(&labels(), &[series("s", &[(1.0, 3.0), (2.0, 3.0)])]);
        assert_well_formed(&flat);
        assert!(polyline_points(&flat).iter().all(|&(_, y)| y.is_finite()));
        let empty = line_plot(&labels(), &[series("s", &[])]);
        assert_well_formed(&empty);
        assert!(!empty.contains("NaN"));
    }

    #[test]
    fn ticks_are_nice_and_cover_the_data() {
        assert_eq!(nice_step(0.37), 0.5);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.2), 2.0);
        assert_eq!(nice_step(730.0), 1000.0);
        let axis = Axis::covering(2.31, 5.52);
        assert!(axis.lo <= 2.31 && axis.hi >= 5.52);
        assert_eq!(axis.ticks.first(), Some(&axis.lo));
        assert!((axis.ticks.last().expect("ticks") - axis.hi).abs() < 1e-9);
        assert!(
            axis.ticks.len() >= 3 && axis.ticks.len() <= 2 * TICKS + 1,
            "{:?}",
            axis.ticks
        );
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(-0.0001, 0.5), "0.0");
        assert_eq!(tick_label(20.0, 5.0), "20");
    }
}
