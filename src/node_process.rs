//! `crm-node` processes for integration tests: start one with a config, wait until it is
//! ready, stop it with SIGTERM or kill it with SIGKILL, and never leave one behind.
//!
//! The binary is the workspace's `target/<profile>/crm-node` (built by
//! `cargo test --workspace`, whose `crm-node` integration tests require it, or by
//! `scripts/test`). A missing binary is a clear panic naming the fix; a stale one a warning.
//! Every `crm-node` started here runs without the developer's `CRM_*` settings
//! ([`clear_developer_env`]), so a test gets the same node on every machine.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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

/// Path of the `crm-node` binary next to this test binary's profile directory.
pub fn crm_node_binary() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    // Test binaries live in target/<profile>/deps; prefer the same profile.
    let profile = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.file_name().map(|n| n.to_owned()))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("debug"));
    let binary = target.join(profile).join("crm-node");
    assert!(
        binary.exists(),
        "{} is missing: build it with `cargo build -p crm-node` (scripts/test does)",
        binary.display()
    );
    let built = modified(&binary);
    let newest_source = ["node/src", "actors/src"]
        .iter()
        .flat_map(|dir| {
            std::fs::read_dir(root.join(dir))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|entry| modified(&entry.path()))
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    if built < newest_source {
        eprintln!(
            "warning: {} is older than the sources: rebuild with `cargo build -p crm-node`",
            binary.display()
        );
    }
    binary
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// A running `crm-node run` process; killed on drop.
pub struct NodeProcess {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
    pub config: PathBuf,
    pub nats_url: String,
    extra_env: Vec<(String, String)>,
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
        let mut node = NodeProcess {
            child: None,
            log: Arc::new(Mutex::new(Vec::new())),
            config: config.to_path_buf(),
            nats_url: nats_url.to_string(),
            extra_env,
        };
        node.spawn();
        node.wait_for_log("crm-node ready", timeout);
        node
    }

    fn spawn(&mut self) {
        let mut command = Command::new(crm_node_binary());
        clear_developer_env(&mut command)
            .args(["--nats-url", &self.nats_url, "run", "--config"])
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("CRM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        let mut child =
            crate::spawn_tied_to_test_process(command).expect("crm-node could not be started");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("CRM_TEST_ECHO").is_some() {
                    eprintln!("[crm-node] {line}");
                }
                if let Ok(mut log) = log.lock() {
                    log.push(line);
                }
            }
        });
        self.child = Some(child);
    }

    /// Waits until a log line contains `needle`. Panics with the log tail on timeout.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        wait_for_log_line(&mut self.child, &self.log, needle, timeout);
    }

    /// All log lines so far.
    pub fn log_lines(&self) -> Vec<String> {
        log_lines(&self.log)
    }

    /// The last `n` log lines, joined.
    pub fn log_tail(&self, n: usize) -> String {
        log_tail(&self.log, n)
    }

    /// SIGKILL: no chance to flush or ack.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) with the pid of a child this handle still owns (not yet waited for).
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} not sent to crm-node {pid}");
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
        let before = self.log_lines().len();
        self.spawn();
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log_lines();
            if lines[before.min(lines.len())..]
                .iter()
                .any(|l| l.contains("crm-node ready"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "crm-node did not become ready after restart:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to `child`, then waits up to `timeout` for it to exit (SIGKILL after that);
/// returns whether it exited with success.
pub fn terminate_child(mut child: Child, timeout: Duration) -> bool {
    // SAFETY: plain libc call with a pid we own (the child is not reaped yet).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
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
