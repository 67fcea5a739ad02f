//! One private `nats-server -js` for a test or a benchmark step.
//!
//! [`NatsServer::start`] launches `nats-server -js` on a free port of 127.0.0.1 with its own
//! store directory in a temporary directory, and waits until it accepts clients: until the
//! port answers *and* the server logs that it listens, because a free port can be taken by
//! another test's server in between (ours then exits and the start retries elsewhere). A test can
//! stop, kill and restart it (same port, same store) to exercise NATS outages. Processes never
//! outlive their owner: they are killed on `Drop`, and are started through
//! [`crate::spawn::spawn_tied_to_test_process`], so even a test binary killed with SIGKILL
//! takes its servers with it. [`NatsServer::try_start`] is the same start with another binary
//! or extra arguments, returning an error instead of panicking (the benchmark).
//! [`crate::nats_cluster::NatsCluster`] does the same for a cluster of servers.
//! Nothing here knows the CRM; it is plain process plumbing.

use crate::paths::{nats_server_binary, try_nats_server_binary};
use crate::ports::{accepts_clients, try_free_port};
use crate::spawn::{kill_child, spawn_tied_to_test_process, stop_child};
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a started server may take to accept clients.
pub(crate) const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped server may take to exit after SIGTERM before it gets SIGKILL.
pub(crate) const NATS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to start a server when its port was taken in between (see [`crate::ports::free_port`]).
pub(crate) const NATS_START_ATTEMPTS_MAX: u32 = 5;
/// What nats-server logs once it listens for clients. An answer on the port alone does not
/// prove that: another test's server may hold the port, ours exiting with "address already
/// in use" only after that answer (it binds the port after starting JetStream).
pub(crate) const NATS_READY_LOG_LINE: &str = "Server is ready";

/// How a [`NatsServer`] is started: which binary, with which extra arguments.
#[derive(Debug, Clone, Default)]
pub struct NatsOptions {
    /// The `nats-server` binary [default: [`crate::paths::nats_server_binary`]].
    pub binary: Option<PathBuf>,
    /// Arguments added to the command line (e.g. `--profile 6061`).
    pub extra_args: Vec<OsString>,
}

/// A private `nats-server` with JetStream, for one test.
pub struct NatsServer {
    binary: PathBuf,
    extra_args: Vec<OsString>,
    port: u16,
    /// Holds the store directory and the log file; removed on drop.
    root: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js -a 127.0.0.1 -p <free port> -sd <tempdir>/store` and waits until
    /// it accepts clients. Panics with the server's log if it does not.
    pub fn start() -> NatsServer {
        let options = NatsOptions {
            binary: Some(nats_server_binary()),
            ..NatsOptions::default()
        };
        NatsServer::try_start(&options).unwrap_or_else(|problem| panic!("{problem}"))
    }

    /// [`NatsServer::start`] with `options`; the last problem (with the server's log) when
    /// the server did not come up after a few ports.
    pub fn try_start(options: &NatsOptions) -> Result<NatsServer, String> {
        let binary = match &options.binary {
            Some(binary) => binary.clone(),
            None => try_nats_server_binary()?,
        };
        let root = tempfile::Builder::new()
            .prefix("crm-nats-")
            .tempdir()
            .map_err(|e| format!("cannot create a temporary directory for nats-server: {e}"))?;
        let mut server = NatsServer {
            binary,
            extra_args: options.extra_args.clone(),
            port: 0,
            root,
            child: None,
        };
        for attempt in 1..=NATS_START_ATTEMPTS_MAX {
            server.port =
                try_free_port().map_err(|e| format!("no free TCP port on 127.0.0.1: {e}"))?;
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(problem) if attempt < NATS_START_ATTEMPTS_MAX => {
                    eprintln!(
                        "nats-server on port {} failed ({problem}); retrying",
                        server.port
                    );
                }
                Err(problem) => return Err(problem),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.root.path().join("store")
    }

    /// The server's log file (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("nats-server.log")
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(crate::spawn::is_running)
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after a bound) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, NATS_STOP_TIMEOUT);
        }
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Starts the server again on the same port with the same store (stopping it first if it
    /// runs). Panics with the server's log if it does not come back.
    pub fn restart(&mut self) {
        self.stop();
        // The port may be in use for a moment after the old process exits.
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            match self.launch() {
                Ok(()) => {
                    // `launch` checked this already; a restart cannot move to another port,
                    // so say plainly if the server on this port is not ours after all.
                    assert!(
                        self.is_running(),
                        "nats-server restarted on port {} exited right after it became ready \
                         (is another process using the port?); its log:\n{}",
                        self.port,
                        self.log_tail()
                    );
                    return;
                }
                Err(problem) if Instant::now() < deadline => {
                    eprintln!(
                        "nats-server restart on port {} failed ({problem}); retrying",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(problem) => panic!("{problem}"),
            }
        }
    }

    /// Spawns the process on `self.port` and waits until it answers, logged that it is ready
    /// and still runs; kills it on failure.
    fn launch(&mut self) -> Result<(), String> {
        debug_assert!(self.child.is_none());
        let mut command = Command::new(&self.binary);
        command
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .args(&self.extra_args);
        match launch_logged(command, &self.binary, &self.log_path(), self.port) {
            Ok(child) => {
                self.child = Some(child);
                Ok(())
            }
            Err(Launch::Failed(problem)) => Err(problem),
            Err(Launch::Exited(status)) => Err(format!(
                "nats-server exited with {status} on port {}; its log:\n{}",
                self.port,
                self.log_tail()
            )),
            Err(Launch::NotReady) => Err(format!(
                "nats-server did not accept clients on port {} within {:?}; its log:\n{}",
                self.port,
                NATS_READY_TIMEOUT,
                self.log_tail()
            )),
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        log_tail_of(&self.log_path(), LOG_TAIL_LINES)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines of a server's log shown when something fails.
pub(crate) const LOG_TAIL_LINES: usize = 30;

/// Why [`launch_logged`] did not give a ready server.
pub(crate) enum Launch {
    /// The log could not be opened or the binary not run (the message says which).
    Failed(String),
    /// The server exited before it was ready (its port taken, say).
    Exited(std::process::ExitStatus),
    /// Not ready within [`NATS_READY_TIMEOUT`]; the server was killed.
    NotReady,
}

/// Spawns the nats-server `command` with its output appended to `log_path`, and waits until
/// it logged that it is ready (since this start) and answers on `port` while still running.
pub(crate) fn launch_logged(
    mut command: Command,
    binary: &Path,
    log_path: &Path,
    port: u16,
) -> Result<Child, Launch> {
    // The log is appended across restarts: only what this process writes counts.
    let log_start = log_len(log_path);
    let cannot_open =
        |e: std::io::Error| Launch::Failed(format!("cannot open {}: {e}", log_path.display()));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(cannot_open)?;
    let log_err = log.try_clone().map_err(cannot_open)?;
    command.stdin(Stdio::null()).stdout(log).stderr(log_err);
    let mut child = spawn_tied_to_test_process(command).map_err(|e| {
        Launch::Failed(format!(
            "cannot run {}: {e}; run scripts/setup (or `apt-get install -y nats-server`)",
            binary.display()
        ))
    })?;
    let deadline = Instant::now() + NATS_READY_TIMEOUT;
    loop {
        let ready = logged_ready_since(log_path, log_start) && accepts_clients(port);
        // Checked after readiness: a server that lost its port to another one exits.
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Launch::Exited(status));
        }
        if ready {
            return Ok(child);
        }
        if Instant::now() >= deadline {
            kill_child(&mut child);
            return Err(Launch::NotReady);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The last `lines` lines of the log at `path` (empty when it cannot be read).
pub(crate) fn log_tail_of(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The length of the file at `path` in bytes; 0 when it does not exist yet.
fn log_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |metadata| metadata.len())
}

/// Whether the nats-server log at `path`, from byte `offset` on, has the line it writes once
/// it listens for clients ([`NATS_READY_LOG_LINE`]).
fn logged_ready_since(path: &Path, offset: u64) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut written = Vec::new();
    if file.seek(SeekFrom::Start(offset)).is_err() || file.read_to_end(&mut written).is_err() {
        return false;
    }
    String::from_utf8_lossy(&written).contains(NATS_READY_LOG_LINE)
}
