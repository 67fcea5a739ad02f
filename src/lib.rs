//! Test harness of the integration tests in `tests/`: a private `nats-server` per test, and
//! (below) helpers for `crm-node` processes and the client-side helpers the tests share.
//!
//! [`NatsServer::start`] launches `nats-server -js` on a free port of 127.0.0.1 with its own
//! store directory in a temporary directory, and waits until it accepts clients: until the
//! port answers *and* the server logs that it listens, because a free port can be taken by
//! another test's server in between (ours then exits and the start retries elsewhere). A test can
//! stop, kill and restart it (same port, same store) to exercise NATS outages. Processes never
//! outlive the test: they are killed on `Drop`, and every child is started with
//! `PR_SET_PDEATHSIG = SIGKILL` from a harness thread that lives as long as the test process,
//! so even a test binary killed with SIGKILL takes its servers with it.
//! [`nats_cluster::NatsCluster`] does the same for a cluster of servers (replicated streams,
//! one server failing while the others carry on).
//! Nothing here knows the CRM; it is plain process plumbing.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a started server may take to accept clients.
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopped server may take to exit after SIGTERM before it gets SIGKILL.
const NATS_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts to start a server when its port was taken in between (see [`free_port`]).
const NATS_START_ATTEMPTS_MAX: u32 = 5;
/// What nats-server logs once it listens for clients. An answer on the port alone does not
/// prove that: another test's server may hold the port, ours exiting with "address already
/// in use" only after that answer (it binds the port after starting JetStream).
const NATS_READY_LOG_LINE: &str = "Server is ready";

/// A free TCP port on 127.0.0.1 (bound then released; another process could take it before
/// it is used, which [`NatsServer::start`] handles by retrying on another port).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("no free TCP port on 127.0.0.1");
    listener
        .local_addr()
        .expect("a bound listener has an address")
        .port()
}

/// The `nats-server` binary: `$NATS_SERVER_BIN`, then `PATH`, then `/usr/sbin`,
/// `/usr/local/sbin`, `/usr/local/bin` (sbin directories are not on every user's `PATH`).
/// Panics naming the fix when there is none.
pub fn nats_server_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let fallbacks = ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from);
    path_dirs
        .iter()
        .chain(fallbacks.iter())
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server not found on PATH, in /usr/sbin, /usr/local/sbin or /usr/local/bin: \
                 run scripts/setup \
                 (or `apt-get install -y nats-server`), or set NATS_SERVER_BIN to its path"
            )
        })
}

/// Spawns `command` so that the child gets SIGKILL when this test process dies, however it
/// dies. The spawn happens on a harness thread that lives until the process exits, because
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child ends.
pub fn spawn_tied_to_test_process(mut command: Command) -> std::io::Result<Child> {
    type Request = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (sender, requests) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("test-process-spawner".to_string())
            .spawn(move || {
                for (mut command, reply) in requests {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("the harness spawner thread could not start");
        Mutex::new(sender)
    });
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-
    // safe functions (prctl, getppid).
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl.
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("test process exited during spawn"));
            }
            Ok(())
        });
    }
    let (reply, result) = mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the harness spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| std::io::Error::other("the harness spawner thread is gone"))?
}

/// A private `nats-server` with JetStream, for one test.
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    /// Holds the store directory and the log file; removed on drop.
    root: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts `nats-server -js -a 127.0.0.1 -p <free port> -sd <tempdir>/store` and waits until
    /// it accepts clients. Panics with the server's log if it does not.
    pub fn start() -> NatsServer {
        let root = tempfile::Builder::new()
            .prefix("crm-nats-")
            .tempdir()
            .expect("cannot create a temporary directory for nats-server");
        let mut server = NatsServer {
            binary: nats_server_binary(),
            port: 0,
            root,
            child: None,
        };
        for attempt in 1..=NATS_START_ATTEMPTS_MAX {
            server.port = free_port();
            match server.launch() {
                Ok(()) => return server,
                Err(problem) if attempt < NATS_START_ATTEMPTS_MAX => {
                    eprintln!(
                        "nats-server on port {} failed ({problem}); retrying",
                        server.port
                    );
                }
                Err(problem) => panic!("{problem}"),
            }
        }
        unreachable!("the last attempt panics")
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
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after a bound) and waits for it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + NATS_STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the server at once (SIGKILL), as a crash would, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
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
        // The log is appended across restarts: only what this process writes counts.
        let log_start = log_len(&self.log_path());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", self.log_path().display()))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = spawn_tied_to_test_process(command).map_err(|e| {
            format!(
                "cannot run {}: {e}; run scripts/setup (or `apt-get install -y nats-server`)",
                self.binary.display()
            )
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            let ready =
                logged_ready_since(&self.log_path(), log_start) && accepts_clients(self.port);
            // Checked after readiness: a server that lost its port to another one exits.
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "nats-server exited with {status} on port {}; its log:\n{}",
                        self.port,
                        self.log_tail()
                    ));
                }
            }
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "nats-server did not accept clients on port {} within {:?}; its log:\n{}",
                    self.port,
                    NATS_READY_TIMEOUT,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a NATS server on 127.0.0.1:`port` sends its `INFO` greeting.
fn accepts_clients(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO")
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

/// Creates `path` and its parents; a convenience for tests that write config files.
pub fn create_dir_all(path: &Path) {
    std::fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}

pub mod nats_cluster;

// ---------------------------------------------------------------------------------------
// crm-node processes (added by the lead: starting nodes with a config, readiness, SIGTERM /
// SIGKILL). Keep the NATS harness above generic; put node helpers below this line.
// ---------------------------------------------------------------------------------------

pub mod cluster_env;
pub mod multi_node;
pub mod node_process;
pub mod tcp_proxy;
pub mod test_support;
