#!/usr/bin/env python3
"""The traffic figure of docs/training.md: loss gap to the full model against bytes per token, one curve per
method, measured with `mana simulate` (the network's engine, codec and routing in one process).

    python3 docs/figures/traffic.py run  --mana target/release/mana --corpus kjv.txt.gz --out kjv.jsonl
    python3 docs/figures/traffic.py plot kjv.jsonl --svg docs/figures/traffic-kjv.svg
    python3 docs/figures/traffic.py table kjv.jsonl

`run` appends one JSON line per setting (its method, H, density and `mana simulate --json`'s report) and
skips settings already in the file, so an interrupted sweep goes on where it stopped. The first setting runs
the two single-node baselines; the others reuse its full-model loss (the baseline depends only on the
tokens, the seed and the corpus). `plot` draws the gap against the all-reduce ratio, log scale, with the
issue's two goals (1000x within 3%, 4000x within 5%) marked. Standard library only.
"""
import argparse
import json
import math
import os
import subprocess
import sys

# (method, H, extra flags): the grid of the figure. Methods are the curves; points along a curve differ in
# H (dense) or density (sparse).
DENSE = "diloco dense FP8"
INT2 = "diloco int2 per-block top-k, H={}"
SPARSE = ["--top-k-per-block", "--pow2-scales"]


def int2(h, density):
    return (INT2.format(h), h, ["--rule", "diloco", "--top-k", density, "--values", "int2"] + SPARSE)


# The most telling settings first (a sweep cut short still draws the main curves).
GRID = [
    (DENSE, 50, ["--rule", "diloco"]),
    int2(50, "0.03"),
    int2(50, "0.01"),
    (DENSE, 15, ["--rule", "diloco"]),
    int2(15, "0.03"),
    int2(15, "0.01"),
    int2(25, "0.03"),
    ("sync dense FP8", 1, ["--rule", "sync"]),
    ("diloco int4 per-block top-k, H=50", 50,
     ["--rule", "diloco", "--top-k", "0.03", "--values", "int4"] + SPARSE),
    (DENSE, 150, ["--rule", "diloco"]),
    int2(50, "0.05"),
    int2(150, "0.03"),
    (DENSE, 5, ["--rule", "diloco"]),
]


def key(method, h, flags, seed):
    return f"{method}|{h}|{' '.join(flags)}|{seed}"


def run(args):
    done = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            for line in f:
                row = json.loads(line)
                done[row["key"]] = row
    for seed in args.seeds:
        full = next((r["report"]["full"]["val_loss"] for r in done.values()
                     if r["seed"] == seed and r["report"].get("full")), None)
        for method, h, flags in GRID[:args.only]:
            k = key(method, h, flags, seed)
            if k in done:
                continue
            cmd = [args.mana, "simulate", "--seed", str(seed), "--tokens",
                   str(args.tokens), "--inner-steps", str(h), "--eval-batches", "16", "--eval-every", "0",
                   "--json"] + flags + (["--corpus", args.corpus] if args.corpus else [])
            if full is not None:
                cmd.append("--no-baselines")
            print(" ".join(cmd), file=sys.stderr, flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            report = json.loads(out.strip().splitlines()[-1])
            if report.get("full"):
                full = report["full"]["val_loss"]
            row = {"key": k, "method": method, "h": h, "flags": flags, "seed": seed, "full_val_loss": full,
                   "report": report}
            done[k] = row
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


def points(files):
    """Per (method, H, flags): mean gap (%) and mean all-reduce ratio over the seeds measured."""
    rows = {}
    for path in files:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                gap = 100.0 * (r["report"]["val_loss"] - r["full_val_loss"]) / r["full_val_loss"]
                k = (r["method"], r["h"], " ".join(r["flags"]))
                rows.setdefault(k, []).append((r["report"]["traffic_ratio"], gap))
    curves = {}
    for (method, h, flags), v in rows.items():
        ratio = sum(x for x, _ in v) / len(v)
        gap = sum(g for _, g in v) / len(v)
        label = f"H={h}" if "top-k" not in flags else flags.split("--top-k ")[1].split()[0]
        curves.setdefault(method, []).append((ratio, gap, label))
    for c in curves.values():
        c.sort()
    return curves


def plot(args):
    curves = points(args.files)
    W, H, L, R, T, B = 760, 460, 70, 250, 30, 50
    xs = [p[0] for c in curves.values() for p in c] + [1000, 4000]
    ys = [p[1] for c in curves.values() for p in c] + [0, 3, 5]
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs)))
    y0, y1 = min(0.0, min(ys)), max(ys) * 1.1
    sx = lambda x: L + (math.log10(x) - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>']
    for e in range(x0, x1 + 1):
        x = sx(10 ** e)
        out.append(f'<line x1="{x:.1f}" y1="{T}" x2="{x:.1f}" y2="{H - B}" stroke="#ddd"/>'
                   f'<text x="{x:.1f}" y="{H - B + 16}" text-anchor="middle">{10 ** e}x</text>')
    step = 5 if y1 - y0 > 25 else 2
    y = math.ceil(y0 / step) * step
    while y <= y1:
        out.append(f'<line x1="{L}" y1="{sy(y):.1f}" x2="{W - R}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:+g}%</text>')
        y += step
    out.append(f'<text x="{(L + W - R) / 2}" y="{H - 12}" text-anchor="middle">less traffic than an f32 ring '
               f'all-reduce (x, log scale)</text>')
    out.append(f'<text x="16" y="{(T + H - B) / 2}" transform="rotate(-90 16 {(T + H - B) / 2})" '
               f'text-anchor="middle">validation loss gap to the full model</text>')
    for gx, gy in ((1000, 3), (4000, 5)):
        out.append(f'<rect x="{sx(gx):.1f}" y="{sy(gy):.1f}" width="{W - R - sx(gx):.1f}" '
                   f'height="{sy(y0) - sy(gy):.1f}" fill="#2ca02c" fill-opacity="0.07" stroke="#2ca02c" '
                   f'stroke-dasharray="4 3"/><text x="{sx(gx) + 4:.1f}" y="{sy(gy) - 4:.1f}" fill="#2ca02c">'
                   f'goal: {gx}x within {gy}%</text>')
    for i, (method, pts) in enumerate(sorted(curves.items())):
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in pts)
        out.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y, label in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{c}"/>'
                       f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" font-size="10" fill="{c}">{label}</text>')
        ly = T + 10 + 18 * i
        out.append(f'<line x1="{W - R + 12}" y1="{ly}" x2="{W - R + 32}" y2="{ly}" stroke="{c}" '
                   f'stroke-width="2"/><text x="{W - R + 38}" y="{ly + 4}">{method}</text>')
    out.append("</svg>")
    with open(args.svg, "w") as f:
        f.write("\n".join(out) + "\n")
    for method, pts in sorted(curves.items()):
        for x, y, label in pts:
            print(f"{method:40s} {label:>6s} {x:8.0f}x {y:+6.1f}%")


def table(args):
    """The sweep as a markdown table: one row per setting, means over the seeds measured."""
    rows = {}
    for path in args.files:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                rep = r["report"]
                k = (r["method"], r["h"], " ".join(r["flags"]))
                rows.setdefault(k, []).append((rep["val_loss"], r["full_val_loss"], rep["wire_bytes_per_token"],
                                               rep["traffic_ratio"], rep.get("imbalance")))
    print("| method | H | flags | seeds | val loss | full model | gap | wire B/token | all-reduce / wire |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (method, h, flags), v in sorted(rows.items(), key=lambda kv: kv[1][0][3]):
        n = len(v)
        mean = lambda i: sum(x[i] for x in v) / n
        gap = 100.0 * sum((x[0] - x[1]) / x[1] for x in v) / n
        extra = " ".join(f for f in flags.split() if f not in ("--rule", "sync", "diloco"))
        extra = f"`{extra}`" if extra else "(dense)"
        print(f"| {method} | {h} | {extra} | {n} | {mean(0):.4f} | {mean(1):.4f} | {gap:+.1f}% | "
              f"{mean(2):.2f} | {mean(3):.0f}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the sweep, appending to --out")
    r.add_argument("--mana", default="target/release/mana")
    r.add_argument("--corpus", help="text to train on (default: the built-in corpus)")
    r.add_argument("--tokens", type=int, default=4194304)
    r.add_argument("--seeds", type=int, nargs="+", default=[1])
    r.add_argument("--out", required=True)
    r.add_argument("--only", type=int, default=len(GRID), help="run only the first N settings of the grid")
    q = sub.add_parser("plot", help="draw the SVG from sweep files")
    q.add_argument("files", nargs="+")
    q.add_argument("--svg", required=True)
    t = sub.add_parser("table", help="print the sweep as a markdown table")
    t.add_argument("files", nargs="+")
    args = p.parse_args()
    {"run": run, "plot": plot, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
