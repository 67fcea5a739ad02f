//! `crm-node` processes: start one with a config, wait until it is ready, read its log,
//! stop it with SIGTERM or kill it with SIGKILL, pause and resume it, restart it, sample its
//! memory and CPU, and never leave one behind.
//!
//! The integration tests use [`NodeProcess::start`]: the workspace's `target/<profile>/crm-node`
//! ([`crm_node_binary`]), a panic with the node's log on failure, SIGKILL on drop. The
//! benchmark uses [`NodeProcess::launch`] with a [`NodeSpec`]: its own binary, a bounded log,
//! [`LogMark`]s (log lines of interest with the instant they were read), a copy of the log
//! kept in a directory, SIGTERM on drop, and errors instead of panics. Every `crm-node`
//! started here runs without the developer's `CRM_*` settings ([`clear_developer_env`]), so
//! it is the same node on every machine.

pub use crate::paths::crm_node_binary;
use crate::spawn::{kill_child, signal_child, spawn_tied_to_test_process, stop_child};
use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The environment variables through which `crm-node` overrides its config or its NATS
/// URL. A developer may have them set for their own node; a test node must not see them (it
/// would write to their data directory, take their node id or talk to their NATS).
pub const DEVELOPER_ENV_VARS: [&str; 5] = [
    "CRM_DATA_DIR",
    "CRM_NODE_ID",
    "CRM_CONFIG",
    "CRM_IDENTITY_SECRET",
    "CRM_NATS_URL",
];

/// What a node logs once it serves.
pub const READY_LINE: &str = "crm-node ready";

/// Pause between two looks at a node's log while waiting for a line.
const LOG_POLL: Duration = Duration::from_millis(50);

/// Removes [`DEVELOPER_ENV_VARS`] from `command`'s environment; call it before adding the
/// test's own variables.
pub fn clear_developer_env(command: &mut Command) -> &mut Command {
    for name in DEVELOPER_ENV_VARS {
        command.env_remove(name);
    }
    // `CRM_<SECTION>__<FIELD>` variables set node config fields.
    for (name, _) in
        std::env::vars().filter(|(name, _)| name.starts_with("CRM_") && name.contains("__"))
    {
        command.env_remove(name);
    }
    command
}

/// Why a node did not start or did not log what was waited for. The message holds the
/// node's last log lines.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot run {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot keep the node's log in {path}: {source}")]
    KeepLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("crm-node{label} exited ({status}) before logging '{needle}':\n{log}")]
    Exited {
        label: String,
        status: ExitStatus,
        needle: String,
        log: String,
    },
    #[error("crm-node{label} did not log '{needle}' within {timeout:?}:\n{log}")]
    Timeout {
        label: String,
        needle: String,
        timeout: Duration,
        log: String,
    },
}

/// How to run a node (see [`NodeProcess::launch`]); [`NodeSpec::new`] gives what the tests
/// use.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// The `crm-node` binary.
    pub binary: PathBuf,
    /// `crm-node run --config <config>`.
    pub config: PathBuf,
    /// `--nats-url`.
    pub nats_url: String,
    /// Extra environment variables (after the developer's `CRM_*` ones are removed).
    pub env: Vec<(String, String)>,
    /// `RUST_LOG` of the node.
    pub rust_log: String,
    /// The node's name in messages and in the kept log's file name (its node id); may be empty.
    pub label: String,
    /// Keep the whole log in `<dir>/crm-node-<label>-<pid>.log`.
    pub keep_log_dir: Option<PathBuf>,
    /// Keep only the last this many lines in memory (`None`: every line).
    pub log_lines_max: Option<usize>,
    /// Log lines containing one of these are kept as [`LogMark`]s with their arrival instant.
    pub marks: &'static [&'static str],
    /// At most this many marks are kept.
    pub marks_max: usize,
    /// On drop: `None` SIGKILL (a test's node), `Some(grace)` SIGTERM then SIGKILL after
    /// `grace` (a bench node, which should flush and release its leases).
    pub stop_on_drop: Option<Duration>,
}

impl NodeSpec {
    /// The workspace's `crm-node` with `config` against `nats_url`, logging at
    /// `$CRM_TEST_LOG` (default `info`), every line kept, killed on drop.
    pub fn new(config: &Path, nats_url: &str) -> NodeSpec {
        NodeSpec {
            binary: crm_node_binary(),
            config: config.to_path_buf(),
            nats_url: nats_url.to_string(),
            env: Vec::new(),
            rust_log: std::env::var("CRM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            label: String::new(),
            keep_log_dir: None,
            log_lines_max: None,
            marks: &[],
            marks_max: 0,
            stop_on_drop: None,
        }
    }
}

/// A node log line of interest (see [`NodeSpec::marks`]) and when it was read.
#[derive(Debug, Clone)]
pub struct LogMark {
    pub at: Instant,
    /// The line without terminal colour sequences.
    pub line: String,
}

/// A running `crm-node run` process; killed (or stopped, see [`NodeSpec::stop_on_drop`]) on
/// drop.
pub struct NodeProcess {
    child: Option<Child>,
    /// The pid of the last process started (kept after it exits, for messages).
    pid: u32,
    log: Arc<Mutex<Vec<String>>>,
    marks: Arc<Mutex<Vec<LogMark>>>,
    /// How many times the node logged [`READY_LINE`] (across restarts).
    ready: Arc<AtomicUsize>,
    kept_log: Option<PathBuf>,
    spec: NodeSpec,
    pub config: PathBuf,
    pub nats_url: String,
}

impl NodeProcess {
    /// Starts `crm-node run --config <config>` against `nats_url` and waits until it logs
    /// `crm-node ready` (panics with its log after `timeout`).
    pub fn start(config: &Path, nats_url: &str, timeout: Duration) -> NodeProcess {
        Self::start_with_env(config, nats_url, timeout, Vec::new())
    }

    /// As [`NodeProcess::start`], with extra environment variables.
    pub fn start_with_env(
        config: &Path,
        nats_url: &str,
        timeout: Duration,
        extra_env: Vec<(String, String)>,
    ) -> NodeProcess {
        let spec = NodeSpec {
            env: extra_env,
            ..NodeSpec::new(config, nats_url)
        };
        let mut node = NodeProcess::launch(spec).unwrap_or_else(|e| panic!("{e}"));
        node.wait_for_log(READY_LINE, timeout);
        node
    }

    /// Starts the process of `spec` without waiting for it to be ready (see
    /// [`NodeProcess::wait_ready`]).
    pub fn launch(spec: NodeSpec) -> Result<NodeProcess, NodeError> {
        let mut node = NodeProcess {
            child: None,
            pid: 0,
            log: Arc::new(Mutex::new(Vec::new())),
            marks: Arc::new(Mutex::new(Vec::new())),
            ready: Arc::new(AtomicUsize::new(0)),
            kept_log: None,
            config: spec.config.clone(),
            nats_url: spec.nats_url.clone(),
            spec,
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<(), NodeError> {
        let spec = &self.spec;
        let mut command = Command::new(&spec.binary);
        clear_developer_env(&mut command)
            .args(["--nats-url", &spec.nats_url, "run", "--config"])
            .arg(&spec.config)
            .env("RUST_LOG", &spec.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &spec.env {
            command.env(key, value);
        }
        let mut child = spawn_tied_to_test_process(command).map_err(|source| NodeError::Spawn {
            binary: spec.binary.clone(),
            source,
        })?;
        self.pid = child.id();
        let keep = match &spec.keep_log_dir {
            Some(dir) => {
                let path = dir.join(format!("crm-node-{}-{}.log", spec.label, child.id()));
                let file = std::fs::create_dir_all(dir)
                    .and_then(|()| std::fs::File::create(&path))
                    .map_err(|source| NodeError::KeepLog {
                        path: path.clone(),
                        source,
                    });
                let file = match file {
                    Ok(file) => file,
                    Err(error) => {
                        kill_child(&mut child);
                        return Err(error);
                    }
                };
                self.kept_log = Some(path);
                Some(file)
            }
            None => None,
        };
        if let Some(stderr) = child.stderr.take() {
            let reader = LogReader {
                log: self.log.clone(),
                marks: self.marks.clone(),
                ready: self.ready.clone(),
                keep,
                log_lines_max: spec.log_lines_max,
                mark_needles: spec.marks,
                marks_max: spec.marks_max,
            };
            std::thread::spawn(move || reader.run(stderr));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Waits until a log line contains `needle`. Panics with the log tail on timeout.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        wait_for_log_line(&mut self.child, &self.log, needle, timeout);
    }

    /// Waits until the node has logged `crm-node ready` once more than `before` times (the
    /// count of [`NodeProcess::ready_count`] before a start); an error with the log tail
    /// when it exits first or `timeout` passes.
    pub fn wait_ready_after(&mut self, before: usize, timeout: Duration) -> Result<(), NodeError> {
        let deadline = Instant::now() + timeout;
        while self.ready_count() <= before {
            if let Some(status) = self.exit_status() {
                return Err(NodeError::Exited {
                    label: self.label(),
                    status,
                    needle: READY_LINE.to_string(),
                    log: self.log_tail(40),
                });
            }
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout {
                    label: self.label(),
                    needle: READY_LINE.to_string(),
                    timeout,
                    log: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// Waits until a node just [`NodeProcess::launch`]ed is ready.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), NodeError> {
        self.wait_ready_after(0, timeout)
    }

    /// How many times the node logged `crm-node ready` (once per start).
    pub fn ready_count(&self) -> usize {
        self.ready.load(Ordering::Acquire)
    }

    /// The exit status when the process has exited (`None` while it runs or after `kill`).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// All log lines so far (the last [`NodeSpec::log_lines_max`] when bounded).
    pub fn log_lines(&self) -> Vec<String> {
        log_lines(&self.log)
    }

    /// The last `n` log lines, joined.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// The marked log lines (see [`NodeSpec::marks`]) read at or after `since`.
    pub fn marks_since(&self, since: Instant) -> Vec<LogMark> {
        lock(&self.marks)
            .iter()
            .filter(|m| m.at >= since)
            .cloned()
            .collect()
    }

    /// Where the whole log is kept (see [`NodeSpec::keep_log_dir`]).
    pub fn kept_log(&self) -> Option<&Path> {
        self.kept_log.as_deref()
    }

    /// The pid of the process last started (also after it exited).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The node's resident memory (`VmRSS`) in MiB, while it runs.
    pub fn rss_mib(&self) -> Option<f64> {
        crate::proc::status_mib(self.pid, "VmRSS")
    }

    /// The node's peak resident memory (`VmHWM`) in MiB, while it runs.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        crate::proc::status_mib(self.pid, "VmHWM")
    }

    /// User + system CPU seconds the node used so far, while it runs.
    pub fn cpu_seconds(&self) -> Option<f64> {
        crate::proc::cpu_seconds(&self.pid.to_string())
    }

    /// SIGKILL: no chance to flush or ack.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// SIGSTOP: the process is frozen as a whole (a long GC-like pause, a stalled VM); its
    /// connections stay open and its clocks run on. [`NodeProcess::resume`] continues it.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`NodeProcess::pause`].
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&mut self, signal: libc::c_int) {
        let child = self.child.as_ref().expect("the node is running");
        if let Err(error) = signal_child(child, signal) {
            panic!(
                "signal {signal} not sent to crm-node {}: {error}",
                child.id()
            );
        }
    }

    /// SIGTERM and wait for a graceful exit; returns whether it exited with success.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        self.child
            .take()
            .is_some_and(|child| terminate_child(child, timeout))
    }

    /// Starts the same node again (after `kill` or `terminate`) and waits until ready.
    pub fn restart(&mut self, timeout: Duration) {
        self.kill();
        let before = self.ready_count();
        if let Err(error) = self.spawn() {
            panic!("crm-node could not be restarted: {error}");
        }
        if let Err(error) = self.wait_ready_after(before, timeout) {
            panic!("crm-node did not become ready after restart: {error}");
        }
    }

    /// Whether the process was started and not yet killed, terminated or reaped by this
    /// handle (it may have exited on its own: see [`NodeProcess::exit_status`]).
    pub fn has_child(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM without waiting: a caller stopping several nodes signals them all first,
    /// then drops them (the drop waits for each exit).
    pub fn begin_terminate(&self) {
        if let Some(child) = self.child.as_ref() {
            let _ = signal_child(child, libc::SIGTERM);
        }
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(crate::spawn::is_running)
    }

    /// Warnings and errors among the kept log lines.
    pub fn problems(&self) -> Vec<String> {
        lock(&self.log)
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }

    /// ` <label>` for messages (empty without a label).
    fn label(&self) -> String {
        if self.spec.label.is_empty() {
            String::new()
        } else {
            format!(" {}", self.spec.label)
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        match (self.spec.stop_on_drop, self.child.take()) {
            (Some(grace), Some(mut child)) => {
                stop_child(&mut child, grace);
            }
            (None, Some(mut child)) => kill_child(&mut child),
            (_, None) => {}
        }
    }
}

/// The thread that reads a node's stderr into its log, marks and ready count.
struct LogReader {
    log: Arc<Mutex<Vec<String>>>,
    marks: Arc<Mutex<Vec<LogMark>>>,
    ready: Arc<AtomicUsize>,
    keep: Option<std::fs::File>,
    log_lines_max: Option<usize>,
    mark_needles: &'static [&'static str],
    marks_max: usize,
}

impl LogReader {
    fn run(mut self, stderr: impl std::io::Read) {
        let echo = std::env::var_os("CRM_TEST_ECHO").is_some();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let at = Instant::now();
            if echo {
                eprintln!("[crm-node] {line}");
            }
            if let Some(file) = self.keep.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            if line.contains(READY_LINE) {
                self.ready.fetch_add(1, Ordering::AcqRel);
            }
            if self.mark_needles.iter().any(|mark| line.contains(mark)) {
                let mut marks = lock(&self.marks);
                if marks.len() < self.marks_max {
                    marks.push(LogMark {
                        at,
                        line: strip_ansi(&line),
                    });
                }
            }
            let mut log = lock(&self.log);
            if let Some(max) = self.log_lines_max {
                if log.len() >= max.max(1) {
                    log.remove(0);
                }
            }
            log.push(line);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `line` without terminal colour sequences (`ESC [ ... letter`).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// All lines collected so far from a node's stderr.
pub fn log_lines(log: &Mutex<Vec<String>>) -> Vec<String> {
    log.lock().map(|l| l.clone()).unwrap_or_default()
}

/// The last `n` collected lines of a node's stderr, joined.
pub fn log_tail(log: &Mutex<Vec<String>>, n: usize) -> String {
    let lines = log_lines(log);
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Waits until a line collected in `log` contains `needle`. Panics with the last 40 lines if
/// `child` (the node writing the log) exits first or `timeout` passes.
pub fn wait_for_log_line(
    child: &mut Option<Child>,
    log: &Mutex<Vec<String>>,
    needle: &str,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if log_lines(log).iter().any(|l| l.contains(needle)) {
            return;
        }
        if let Some(child) = child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "crm-node exited ({status}) before logging '{needle}':\n{}",
                    log_tail(log, 40)
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "crm-node did not log '{needle}' within {timeout:?}:\n{}",
            log_tail(log, 40)
        );
        std::thread::sleep(LOG_POLL);
    }
}

/// SIGTERM to `child`, then waits up to `timeout` for it to exit (SIGKILL after that);
/// returns whether it exited with success.
pub fn terminate_child(mut child: Child, timeout: Duration) -> bool {
    stop_child(&mut child, timeout).is_some_and(|status| status.success())
}

/// Runs `crm-node <args>` to completion and returns (exit success, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (bool, String, String) {
    let output = clear_developer_env(&mut Command::new(crm_node_binary()))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("crm-node could not be run");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
