//! The operator's dashboard in a real browser: a coordinator and two trainers run two rounds on loopback,
//! each serving its dashboard; headless Chromium (Debian's `chromium` package; `MANA_CHROMIUM` names
//! another binary) loads a trainer's page and the coordinator's, runs their script against the live
//! `/api/status`, and the test checks what the pages show: the node's id, its contributions accepted, a loss
//! curve with a point per round, the coordinator's members and commits. A screenshot of each page is kept
//! in the target directory (`CARGO_TARGET_TMPDIR`) as the test's artifact.

mod net_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mana_engine::round::RunSpec;
use mana_node::roles::common::{DataSource, load_dataset};
use mana_node::roles::conductor::{ConductorConfig, machine_config, run_conductor};
use mana_node::roles::trainer::{TrainerConfig, run_trainer};
use mana_protocol::UpdateRule;
use net_support::*;

const ROUNDS: u64 = 2;

/// The first of `names` on the PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    names.iter().find_map(|name| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// The browser: `MANA_CHROMIUM`, else Chromium on the PATH, else installed now, as the interop test installs
/// its js peer: Debian's `chromium` package (apt-get, as root or through `sudo -n`), or failing that Chrome's
/// headless shell through npm's `@puppeteer/browsers` into the target directory.
fn chromium() -> PathBuf {
    const NAMES: [&str; 4] = [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ];
    if let Some(path) = std::env::var_os("MANA_CHROMIUM") {
        return PathBuf::from(path);
    }
    if let Some(path) = on_path(&NAMES) {
        return path;
    }
    let apt = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium";
    for command in [
        format!("{apt} || (apt-get update && {apt})"),
        format!("sudo -n sh -c '{apt} || (apt-get update && {apt})'"),
    ] {
        eprintln!("installing Chromium: {command}");
        if Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status()
            .is_ok_and(|s| s.success())
            && let Some(path) = on_path(&NAMES)
        {
            return path;
        }
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("chrome");
    let npx = format!(
        "npx --yes @puppeteer/browsers install chrome-headless-shell@stable --path {} --format '{{{{path}}}}'",
        dir.display()
    );
    eprintln!("installing Chrome's headless shell: {npx}");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&npx)
        .output()
        .expect("sh runs");
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_owned();
    if out.status.success() && Path::new(&path).exists() {
        return PathBuf::from(path);
    }
    panic!(
        "no Chromium: install Debian's package (apt-get install chromium) or set MANA_CHROMIUM; npx said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loads `url` in headless Chromium, lets its script run, and returns the resulting DOM; also saves a
/// screenshot to `shot`.
fn browse(url: &str, shot: &Path, profile: &Path) -> String {
    let base = |extra: &[String]| {
        let out = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,1000",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let dom = String::from_utf8_lossy(&base(&["--dump-dom".to_owned()]).stdout).into_owned();
    base(&[format!("--screenshot={}", shot.display())]);
    assert!(
        shot.metadata().map(|m| m.len() > 10_000).unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );
    dom
}

/// The text of the element with `id` in `dom` (up to its first child tag).
fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let marker = format!("id=\"{id}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no #{id} in the page"));
    let after = &dom[start..];
    let open = after.find('>').expect("tag end") + 1;
    let close = after[open..]
        .find('<')
        .map(|i| open + i)
        .unwrap_or(after.len());
    &after[open..close]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_trainers_contributions_and_the_runs_loss_in_a_browser() {
    init_tracing();
    let dir = tempfile::tempdir().expect("temp dir");
    let bootstrap = start_bootstrap(&dir.path().join("bootstrap")).await;
    let boot = bootstrap.addrs().to_vec();
    let spec = RunSpec::tiny();
    let data = Arc::new(
        load_dataset(&DataSource {
            builtin_bytes: 256 * 1024,
            ..DataSource::default()
        })
        .expect("corpus"),
    );
    let local: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut coord_cfg = node_config(&dir.path().join("coordinator"), &boot);
    coord_cfg.sync_shards = false;
    coord_cfg.dashboard = Some(local);
    let coordinator = Arc::new(start_node(coord_cfg).await);
    let key = coordinator.public_key();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let _evaluator = start_evaluator(dir.path(), &boot, key, &spec, &data, stop_rx.clone()).await;
    let mut trainers = Vec::new();
    for i in 0..2 {
        let mut cfg = member_config(dir.path(), &boot, &format!("node-{i}"), key);
        cfg.dashboard = Some(local);
        let node = Arc::new(start_node(cfg).await);
        let task = tokio::spawn(run_trainer(
            node.clone(),
            TrainerConfig::new(spec.clone(), data.clone()),
            stopped(stop_rx.clone()),
        ));
        trainers.push((node, task));
    }
    let run = coordinator.config().net.run_id.clone();
    let mut machine = machine_config(run, &spec, UpdateRule::Sync, 1).expect("machine config");
    machine.min_members = 2;
    machine.train_ms = 8_000;
    machine.verify_ms = 8_000;
    machine.cooldown_ms = 200;
    let mut role = ConductorConfig::new(machine, spec.clone(), data.clone());
    role.rounds = Some(ROUNDS);
    tokio::time::timeout(
        Duration::from_secs(150),
        run_conductor(coordinator.clone(), role, stopped(stop_rx.clone())),
    )
    .await
    .expect("the rounds are committed in time")
    .expect("coordinator ran");
    let trainer = trainers[0].0.clone();
    wait_for(
        Duration::from_secs(60),
        "the trainer applies the last commit",
        || async {
            let t = trainer.status().await.ok()?.training?;
            (t.applied_round == Some(ROUNDS)).then_some(())
        },
    )
    .await;

    let artifacts = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let (t_url, c_url) = (
        format!(
            "http://{}/",
            trainer.dashboard_addr().expect("trainer dashboard")
        ),
        format!(
            "http://{}/",
            coordinator.dashboard_addr().expect("coordinator dashboard")
        ),
    );
    let (t_shot, c_shot) = (
        artifacts.join("dashboard-trainer.png"),
        artifacts.join("dashboard-coordinator.png"),
    );
    let (t_profile, c_profile) = (dir.path().join("chromium-t"), dir.path().join("chromium-c"));
    let (t_dom, c_dom) = tokio::task::spawn_blocking(move || {
        (
            browse(&t_url, &t_shot, &t_profile),
            browse(&c_url, &c_shot, &c_profile),
        )
    })
    .await
    .expect("browser task");

    // The trainer's page: its own id, its role, its deltas accepted and its share, a point per round.
    assert!(
        t_dom.contains("data-loaded=\"true\""),
        "the page's script did not render the status"
    );
    assert_eq!(
        element_text(&t_dom, "peer-id"),
        trainer.peer_id().to_string()
    );
    assert_eq!(element_text(&t_dom, "role"), "trainer");
    let status = trainer
        .status()
        .await
        .expect("status")
        .training
        .expect("training");
    let accepted = status.contributions.accepted;
    assert!(accepted > 0, "{status:?}");
    assert!(
        element_text(&t_dom, "contrib").starts_with(&format!("{accepted} accepted, 0 refused")),
        "{}",
        element_text(&t_dom, "contrib")
    );
    assert!(element_text(&t_dom, "share").contains("share of the run's accepted deltas"));
    assert!(
        t_dom.contains(&format!("data-points=\"{ROUNDS}\"")),
        "a loss point per round"
    );
    assert!(
        t_dom.contains("<polyline class=\"train\""),
        "the training loss is drawn"
    );
    // The coordinator's page: its members, both with accepted deltas, and its commits.
    assert_eq!(element_text(&c_dom, "role"), "coordinator");
    assert!(
        c_dom.contains("<polyline class=\"val\""),
        "the validation loss is drawn"
    );
    let members = c_dom.matches("<td>").count();
    assert!(
        members > 0 && !c_dom.contains("id=\"coordinator\" hidden"),
        "{c_dom}"
    );
    for (node, _) in &trainers {
        let key = hex::encode(node.public_key().0);
        assert!(c_dom.contains(&key[..16]), "member {key} not listed");
    }
    println!(
        "screenshots: {} and {}",
        artifacts.join("dashboard-trainer.png").display(),
        artifacts.join("dashboard-coordinator.png").display()
    );

    drop(trainer);
    let _ = stop_tx.send(true);
    for (node, task) in trainers {
        task.await.expect("trainer task").expect("trainer ran");
        Arc::try_unwrap(node)
            .ok()
            .expect("sole owner")
            .shutdown()
            .await
            .expect("shutdown");
    }
    Arc::try_unwrap(coordinator)
        .ok()
        .expect("sole owner")
        .shutdown()
        .await
        .expect("shutdown");
    bootstrap.shutdown().await;
}
