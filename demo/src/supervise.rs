//! The demo's child processes: each one is started with its stdout and stderr going to its own log file,
//! its stdout lines also handed to the demo (to read the addresses and keys children print), and in a
//! process group of its own, so that a Ctrl-C at the terminal reaches only the demo, which then stops them in
//! order. [`Supervisor`]'s `Drop` stops every child still running (SIGTERM, a grace period, then SIGKILL,
//! then `wait`), so an error, an early return or a panic in the demo never leaves a process behind.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::DemoError;

/// How long children get to exit after SIGTERM before they are killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often a waiting loop looks at the children.
const POLL: Duration = Duration::from_millis(50);
/// How many bytes of the end of a log an error message quotes.
const LOG_TAIL_BYTES: u64 = 1500;

/// Has the kernel send SIGTERM to the child when the demo dies, however it dies: a SIGKILL of the demo runs
/// no `Drop`, and the children sit in process groups of their own, so nothing else would stop them. The
/// signal follows the thread that spawned the child, which for the demo is its main thread, alive until it
/// exits. A child whose demo died before the setting took hold exits at once.
#[cfg(target_os = "linux")]
fn die_with_the_demo(cmd: &mut Command) {
    use nix::sys::signal::Signal;
    use std::os::unix::process::CommandExt;
    let demo = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec and only makes two system calls (prctl,
    // getppid), both async-signal-safe; it allocates nothing and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            if nix::unistd::getppid() != demo {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

/// Names one child of a [`Supervisor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildId(usize);

/// One supervised process.
#[derive(Debug)]
struct Supervised {
    /// Short name used in messages and as the log file's name (`node-2`).
    name: String,
    /// The process; `None` once it has been reaped.
    child: Option<Child>,
    /// Its process id (kept after reaping, for messages).
    pid: u32,
    /// Where its stdout and stderr go.
    log: PathBuf,
    /// Its stdout, line by line (the reader thread also copies each line to the log).
    lines: Receiver<String>,
    /// How it ended, once it has.
    exit: Option<ExitStatus>,
    /// Whether exiting (with success) is its normal end, rather than a failure.
    may_exit: bool,
    /// How to start it again ([`Supervisor::restart`]); `None` for a child started once.
    recipe: Option<Recipe>,
    /// Killed on purpose ([`Supervisor::kill`]) and not restarted yet: not a death.
    down: bool,
}

/// Builds a child's command again, for a restart.
struct Recipe(Box<dyn Fn() -> Command>);

impl std::fmt::Debug for Recipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Recipe")
    }
}

/// A started process: the child, its pid and its stdout lines.
struct Started {
    child: Child,
    pid: u32,
    lines: Receiver<String>,
}

/// A child that ended although it should not have, or ended badly.
#[derive(Debug, Clone, PartialEq)]
pub struct Death {
    /// Which child.
    pub id: ChildId,
    /// Its name.
    pub name: String,
    /// Its process id.
    pub pid: u32,
    /// How it ended.
    pub status: String,
    /// Its log file.
    pub log: PathBuf,
    /// The end of its log.
    pub log_tail: String,
}

impl std::fmt::Display for Death {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (pid {}) {}; its log is {}",
            self.name,
            self.pid,
            self.status,
            self.log.display()
        )?;
        if !self.log_tail.is_empty() {
            write!(
                f,
                "\n--- end of {} ---\n{}",
                self.log.display(),
                self.log_tail.trim_end()
            )?;
        }
        Ok(())
    }
}

/// Starts, watches and stops the demo's child processes.
#[derive(Debug)]
pub struct Supervisor {
    /// Where the log files go.
    logs: PathBuf,
    /// Every child started, in start order.
    children: Vec<Supervised>,
    /// Set (by a signal handler) when the demo should give up waiting.
    cancel: Arc<AtomicBool>,
}

impl Supervisor {
    /// A supervisor writing child logs into `logs` (created if missing).
    pub fn new(logs: impl Into<PathBuf>) -> Result<Supervisor, DemoError> {
        let logs = logs.into();
        std::fs::create_dir_all(&logs)
            .map_err(|e| DemoError::io(format!("creating {}", logs.display()), e))?;
        Ok(Supervisor {
            logs,
            children: Vec::new(),
            cancel: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Makes the waits give up as soon as `cancel` is set.
    pub fn set_cancel(&mut self, cancel: Arc<AtomicBool>) {
        self.cancel = cancel;
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Starts `cmd` as the child `name`, its output in `<logs>/<name>.log`.
    pub fn spawn(&mut self, name: &str, cmd: Command) -> Result<ChildId, DemoError> {
        self.add(name, cmd, None)
    }

    /// Starts the child `name` from `make`, which can build its command again: [`Supervisor::restart`] starts
    /// it anew after a [`Supervisor::kill`], its output appended to the same log.
    pub fn spawn_restartable(
        &mut self,
        name: &str,
        make: impl Fn() -> Command + 'static,
    ) -> Result<ChildId, DemoError> {
        let cmd = make();
        self.add(name, cmd, Some(Recipe(Box::new(make))))
    }

    fn add(
        &mut self,
        name: &str,
        cmd: Command,
        recipe: Option<Recipe>,
    ) -> Result<ChildId, DemoError> {
        let log = self.logs.join(format!("{name}.log"));
        let started = start(name, cmd, &log, false)?;
        self.children.push(Supervised {
            name: name.to_owned(),
            child: Some(started.child),
            pid: started.pid,
            log,
            lines: started.lines,
            exit: None,
            may_exit: false,
            recipe,
            down: false,
        });
        Ok(ChildId(self.children.len() - 1))
    }

    /// Kills the child at once (SIGKILL to its process group, as a crash would) and reaps it; it is not
    /// reported as a death, and [`Supervisor::is_down`] says so until [`Supervisor::restart`]. Returns its
    /// pid, or `None` if it was not running.
    pub fn kill(&mut self, id: ChildId) -> Option<u32> {
        let c = &mut self.children[id.0];
        let mut child = c.child.take()?;
        signal_group(&mut child, Signal::Kill);
        c.exit = child.wait().ok();
        c.down = true;
        Some(c.pid)
    }

    /// Whether the child was killed on purpose and not restarted yet.
    pub fn is_down(&self, id: ChildId) -> bool {
        self.get(id).down
    }

    /// Starts a killed (or ended) restartable child again with the same command and log. Returns its new pid.
    pub fn restart(&mut self, id: ChildId) -> Result<u32, DemoError> {
        self.reap();
        let c = &self.children[id.0];
        if c.child.is_some() {
            return Ok(c.pid);
        }
        let Some(recipe) = &c.recipe else {
            return Err(DemoError::Config(format!("{} cannot be restarted", c.name)));
        };
        let started = start(&c.name, (recipe.0)(), &c.log, true)?;
        let c = &mut self.children[id.0];
        c.child = Some(started.child);
        c.pid = started.pid;
        c.lines = started.lines;
        c.exit = None;
        c.down = false;
        Ok(c.pid)
    }

    fn get(&self, id: ChildId) -> &Supervised {
        &self.children[id.0]
    }

    /// The child's name.
    pub fn name(&self, id: ChildId) -> &str {
        &self.get(id).name
    }

    /// The child's log file.
    pub fn log(&self, id: ChildId) -> &Path {
        &self.get(id).log
    }

    /// The process ids of the children still running.
    #[cfg(test)]
    pub fn running_pids(&mut self) -> Vec<u32> {
        self.reap();
        self.children
            .iter()
            .filter(|c| c.exit.is_none())
            .map(|c| c.pid)
            .collect()
    }

    /// Marks a successful exit of the child as its normal end (the coordinator, after its last round).
    pub fn allow_exit(&mut self, id: ChildId) {
        self.children[id.0].may_exit = true;
    }

    /// Reaps the children that have ended (without blocking).
    fn reap(&mut self) {
        for c in &mut self.children {
            let ended = match c.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(status) = ended {
                c.exit = Some(status);
                c.child = None;
            }
        }
    }

    /// How the child ended, if it has.
    pub fn exit_status(&mut self, id: ChildId) -> Option<ExitStatus> {
        self.reap();
        self.get(id).exit
    }

    /// The children that ended unexpectedly (any end, unless allowed; a failed end even if allowed), each
    /// reported once.
    pub fn deaths(&mut self, reported: &mut Vec<ChildId>) -> Vec<Death> {
        self.reap();
        let mut out = Vec::new();
        for (i, c) in self.children.iter().enumerate() {
            let id = ChildId(i);
            let Some(status) = c.exit else { continue };
            if c.down || reported.contains(&id) || (c.may_exit && status.success()) {
                continue;
            }
            reported.push(id);
            out.push(self.death(id, status));
        }
        out
    }

    fn death(&self, id: ChildId, status: ExitStatus) -> Death {
        let c = self.get(id);
        Death {
            id,
            name: c.name.clone(),
            pid: c.pid,
            status: describe(status),
            log: c.log.clone(),
            log_tail: log_tail(&c.log).unwrap_or_default(),
        }
    }

    /// Waits for the child to print a stdout line that `pick` accepts, and returns what `pick` made of it.
    /// Fails, naming the child and its log, if it ends first or `timeout` passes.
    pub fn wait_line<T>(
        &mut self,
        id: ChildId,
        timeout: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.cancelled() {
                return Err(DemoError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DemoError::StartupTimeout {
                    name: self.name(id).to_owned(),
                    secs: timeout.as_secs(),
                    log: self.log(id).to_path_buf(),
                });
            }
            match self.get(id).lines.recv_timeout(left.min(POLL * 4)) {
                Ok(line) => {
                    if let Some(found) = pick(line.trim()) {
                        return Ok(found);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Its stdout closed: it has ended (or is about to).
                    let started = Instant::now();
                    while started.elapsed() < Duration::from_secs(2)
                        && self.exit_status(id).is_none()
                    {
                        std::thread::sleep(POLL);
                    }
                    let status = self.exit_status(id);
                    return Err(match status {
                        Some(status) => DemoError::ChildEnded(Box::new(self.death(id, status))),
                        None => DemoError::StdoutClosed {
                            name: self.name(id).to_owned(),
                            log: self.log(id).to_path_buf(),
                        },
                    });
                }
            }
        }
    }

    /// Waits up to `timeout` for the child to end; true if it has (false also when cancelled).
    #[cfg(test)]
    pub fn wait_exit(&mut self, id: ChildId, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.exit_status(id).is_none() {
            if Instant::now() >= deadline || self.cancelled() {
                return false;
            }
            std::thread::sleep(POLL);
        }
        true
    }

    /// Asks one child to stop (SIGTERM on Unix; a kill elsewhere).
    pub fn terminate(&mut self, id: ChildId) {
        if let Some(child) = self.children[id.0].child.as_mut() {
            signal_group(child, Signal::Term);
        }
    }

    /// Stops every running child: SIGTERM to all (newest first, so nodes go before the bootstrap), up to
    /// `grace` for them to exit, then SIGKILL, then reaps them all. Safe to call more than once.
    pub fn stop_all(&mut self, grace: Duration) {
        self.reap();
        for c in self.children.iter_mut().rev() {
            if let Some(child) = c.child.as_mut() {
                signal_group(child, Signal::Term);
            }
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.children.iter().any(|c| c.child.is_some()) {
            std::thread::sleep(POLL);
            self.reap();
        }
        for c in &mut self.children {
            if let Some(mut child) = c.child.take() {
                signal_group(&mut child, Signal::Kill);
                c.exit = child.wait().ok();
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop_all(STOP_GRACE);
    }
}

/// The two ways of stopping a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// SIGTERM: the children shut down cleanly on it.
    Term,
    /// SIGKILL.
    Kill,
}

/// Signals the child's process group (it leads its own, so anything it started goes too). Where there are no
/// signals, both kill the child.
fn signal_group(child: &mut Child, signal: Signal) {
    #[cfg(unix)]
    {
        use nix::sys::signal::{self as sig, killpg};
        use nix::unistd::Pid;
        let which = match signal {
            Signal::Term => sig::Signal::SIGTERM,
            Signal::Kill => sig::Signal::SIGKILL,
        };
        let sent = i32::try_from(child.id())
            .ok()
            .is_some_and(|pid| killpg(Pid::from_raw(pid), which).is_ok());
        if !sent && signal == Signal::Kill {
            let _ = child.kill();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = signal;
        let _ = child.kill();
    }
}

/// Copies the child's stdout into its log file and hands each line to the demo (until either end closes;
/// lines after the demo stops listening still go to the log).
fn copy_lines(stdout: impl Read, mut log: File, tx: mpsc::Sender<String>) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let _ = log.write_all(line.as_bytes());
                let _ = tx.send(line.trim_end().to_owned());
            }
        }
    }
}

/// How a process ended, in words.
fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return format!("was killed by signal {signal}");
        }
    }
    match status.code() {
        Some(0) => "exited (status 0)".into(),
        Some(code) => format!("exited with status {code}"),
        None => "ended".into(),
    }
}

/// The last few lines of a log file.
fn log_tail(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    // Drop a partial first line.
    let text = if len > LOG_TAIL_BYTES {
        text.split_once('\n')
            .map_or("", |(_, rest)| rest)
            .to_owned()
    } else {
        text.into_owned()
    };
    Ok(text)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    fn alive(pid: u32) -> bool {
        // A reaped child's /proc entry is gone; a zombie would still count as a leak here.
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn reads_printed_lines_and_logs_both_streams() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sup = Supervisor::new(dir.path().join("logs")).expect("supervisor");
        let id = sup
            .spawn(
                "talker",
                sh("echo hello >&2; echo 'addr /ip4/127.0.0.1/tcp/5'; exec sleep 30"),
            )
            .expect("spawn");
        let addr = sup
            .wait_line(id, Duration::from_secs(10), |l| {
                l.strip_prefix("addr ").map(str::to_owned)
            })
            .expect("addr line");
        assert_eq!(addr, "/ip4/127.0.0.1/tcp/5");
        let log = std::fs::read_to_string(sup.log(id)).expect("log");
        assert!(
            log.contains("hello") && log.contains("addr /ip4"),
            "{log:?}"
        );
        assert!(sup.deaths(&mut Vec::new()).is_empty());
    }

    #[test]
    fn reports_a_child_that_dies_with_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sup = Supervisor::new(dir.path()).expect("supervisor");
        let id = sup
            .spawn("crasher", sh("echo 'something broke' >&2; exit 3"))
            .expect("spawn");
        let err = sup
            .wait_line(id, Duration::from_secs(10), |_| Some(()))
            .expect_err("it prints nothing");
        let text = format!("{err:#}");
        assert!(
            text.contains("crasher")
                && text.contains("status 3")
                && text.contains("something broke"),
            "{text}"
        );
        assert!(text.contains(&sup.log(id).display().to_string()), "{text}");
        let mut reported = Vec::new();
        let deaths = sup.deaths(&mut reported);
        assert_eq!(deaths.len(), 1);
        assert!(
            sup.deaths(&mut reported).is_empty(),
            "each death is reported once"
        );
    }

    #[test]
    fn an_allowed_clean_exit_is_not_a_death_but_a_failure_is() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sup = Supervisor::new(dir.path()).expect("supervisor");
        let ok = sup.spawn("done", sh("exit 0")).expect("spawn");
        let bad = sup.spawn("failed", sh("exit 2")).expect("spawn");
        sup.allow_exit(ok);
        sup.allow_exit(bad);
        assert!(
            sup.wait_exit(ok, Duration::from_secs(10))
                && sup.wait_exit(bad, Duration::from_secs(10))
        );
        let deaths = sup.deaths(&mut Vec::new());
        assert_eq!(
            deaths.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            ["failed"]
        );
    }

    #[test]
    fn drop_stops_every_child_even_one_ignoring_sigterm() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sup = Supervisor::new(dir.path()).expect("supervisor");
        let a = sup.spawn("polite", sh("exec sleep 60")).expect("spawn");
        let b = sup
            .spawn(
                "stubborn",
                sh("trap '' TERM; echo ready; while true; do sleep 0.1; done"),
            )
            .expect("spawn");
        sup.wait_line(b, Duration::from_secs(10), |l| (l == "ready").then_some(()))
            .expect("trap installed");
        let pids = sup.running_pids();
        assert_eq!(pids.len(), 2);
        assert!(pids.iter().all(|&p| alive(p)));
        let _ = a;
        let started = Instant::now();
        drop(sup);
        assert!(pids.iter().all(|&p| !alive(p)), "children left behind");
        assert!(started.elapsed() < STOP_GRACE + Duration::from_secs(3));
    }
}

/// Starts `cmd` as the child `name` writing into `log` (appended to when `append`, else truncated): stdin
/// closed, stdout read line by line (and copied to the log), stderr into the log, in a process group of its
/// own, and (on Linux) stopped by the kernel if the demo dies.
fn start(name: &str, mut cmd: Command, log: &Path, append: bool) -> Result<Started, DemoError> {
    let file = OpenOptions::new()
        .create(true)
        .append(append)
        .truncate(!append)
        .write(true)
        .open(log)
        .map_err(|e| DemoError::io(format!("creating {}", log.display()), e))?;
    // Both streams append to the same file; the stdout copy goes through the reader thread.
    let stderr = file
        .try_clone()
        .map_err(|e| DemoError::io(format!("opening {} twice", log.display()), e))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    #[cfg(target_os = "linux")]
    die_with_the_demo(&mut cmd);
    let mut child = cmd.spawn().map_err(|source| DemoError::Spawn {
        name: name.to_owned(),
        program: format!("{:?}", cmd.get_program()),
        source,
    })?;
    let pid = child.id();
    let Some(stdout) = child.stdout.take() else {
        // Cannot happen (it was piped just above); reported rather than unwrapped all the same.
        let _ = child.kill();
        let _ = child.wait();
        return Err(DemoError::StdoutClosed {
            name: name.to_owned(),
            log: log.to_path_buf(),
        });
    };
    let (tx, lines) = mpsc::channel();
    std::thread::Builder::new()
        .name(format!("{name}-stdout"))
        .spawn(move || copy_lines(stdout, file, tx))
        .map_err(|e| DemoError::io("starting a log thread", e))?;
    Ok(Started { child, pid, lines })
}
