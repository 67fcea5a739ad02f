//! A private cluster of `nats-server` processes with JetStream, for tests that need
//! replicated streams or a server that fails while the others carry on.
//!
//! [`NatsCluster::start`] writes one config file per server into one temporary directory
//! (its own store, a unique `server_name`, one cluster name, free client and route ports on
//! 127.0.0.1, routes to every other server), starts the servers and waits until JetStream
//! works in cluster mode: an R`n` stream can be created, and every server still runs (one
//! whose port another process took meanwhile exits; the whole start is then retried on new
//! ports, a few times). A test can kill (SIGKILL), stop
//! (SIGTERM) and restart (same ports, same store) any server by its index `0..n`. Like
//! [`crate::NatsServer`], servers are killed on `Drop` and are started through
//! [`crate::spawn::spawn_tied_to_test_process`], so they die with the test process however it dies.
//! Clients connect with [`NatsCluster::urls`]; async-nats 0.51 does not split a
//! comma-separated string (see there). Nothing here knows the CRM.

use crate::nats_server::{
    launch_logged, log_tail_of, Launch, LOG_TAIL_LINES, NATS_READY_TIMEOUT,
    NATS_START_ATTEMPTS_MAX, NATS_STOP_TIMEOUT,
};
use crate::paths::nats_server_binary;
use crate::ports::distinct_free_ports;
use crate::spawn::{kill_child, stop_child};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// How long a started cluster may take until JetStream accepts a replicated stream.
const CLUSTER_JETSTREAM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The cluster name every server shares.
const CLUSTER_NAME: &str = "crm-test";
/// The stream created (then deleted) to prove that JetStream works in cluster mode.
const READY_PROBE_STREAM: &str = "CLUSTER_READY_PROBE";

/// One server of a [`NatsCluster`].
struct ClusterServer {
    /// `nats-<index>`, the `server_name` (what JetStream reports as a stream's leader).
    name: String,
    client_port: u16,
    route_port: u16,
    /// Directory of this server: `server.conf`, `server.log` and `store/`.
    dir: PathBuf,
    child: Option<Child>,
}

impl ClusterServer {
    fn config_path(&self) -> PathBuf {
        self.dir.join("server.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.client_port)
    }

    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(crate::spawn::is_running)
    }

    /// Spawns the process with its config file and waits until it accepts clients, logged
    /// that it is ready and still runs; kills it on failure.
    fn launch(&mut self, binary: &Path) -> Result<(), String> {
        debug_assert!(self.child.is_none());
        let mut command = Command::new(binary);
        command.arg("-c").arg(self.config_path());
        match launch_logged(command, binary, &self.log_path(), self.client_port) {
            Ok(child) => {
                self.child = Some(child);
                Ok(())
            }
            Err(Launch::Failed(problem)) => Err(problem),
            Err(Launch::Exited(status)) => Err(format!(
                "{} exited with {status} (client port {}, route port {}); its log:\n{}",
                self.name,
                self.client_port,
                self.route_port,
                self.log_tail()
            )),
            Err(Launch::NotReady) => Err(format!(
                "{} did not accept clients on port {} within {NATS_READY_TIMEOUT:?}; its log:\n{}",
                self.name,
                self.client_port,
                self.log_tail()
            )),
        }
    }

    /// SIGTERM, then SIGKILL after [`NATS_STOP_TIMEOUT`]; waits for the process.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, NATS_STOP_TIMEOUT);
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    fn log_tail(&self) -> String {
        log_tail_of(&self.log_path(), LOG_TAIL_LINES)
    }
}

/// A private cluster of `n` `nats-server` processes with JetStream, for one test.
pub struct NatsCluster {
    binary: PathBuf,
    /// Holds every server's directory; removed on drop (after the servers are killed).
    root: tempfile::TempDir,
    servers: Vec<ClusterServer>,
}

impl NatsCluster {
    /// Starts `n` clustered servers and waits until JetStream accepts an R`n` stream (at
    /// most 5, JetStream's largest replica count). Panics with every server's log tail when
    /// the cluster does not come up.
    pub fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a NATS cluster needs at least one server");
        let root = tempfile::Builder::new()
            .prefix("crm-nats-cluster-")
            .tempdir()
            .expect("cannot create a temporary directory for the NATS cluster");
        let mut cluster = NatsCluster {
            binary: nats_server_binary(),
            root,
            servers: Vec::with_capacity(n),
        };
        let replicas = n.min(5);
        for attempt in 1..=NATS_START_ATTEMPTS_MAX {
            // New ports and fresh directories on every attempt: a port may have been taken
            // meanwhile, and the stores must not remember the peers of a failed attempt.
            cluster.kill_all();
            for server in &cluster.servers {
                let _ = std::fs::remove_dir_all(&server.dir);
            }
            let ports = distinct_free_ports(2 * n);
            cluster.servers = (0..n)
                .map(|index| {
                    let name = format!("nats-{index}");
                    ClusterServer {
                        dir: cluster.root.path().join(&name),
                        name,
                        client_port: ports[2 * index],
                        route_port: ports[2 * index + 1],
                        child: None,
                    }
                })
                .collect();
            let problem = match cluster.launch_all() {
                Err(problem) => problem,
                Ok(()) => {
                    let jetstream = cluster.wait_for_jetstream(replicas);
                    // Checked after readiness: a server whose route port another process
                    // took exits after its client port answered.
                    let exited = cluster.exited_servers();
                    match jetstream {
                        Ok(()) if exited.is_empty() => return cluster,
                        Err(problem) if exited.is_empty() => {
                            let logs = cluster.log_tails();
                            cluster.kill_all();
                            panic!(
                                "the NATS cluster's JetStream did not accept an R{replicas} \
                                 stream within {CLUSTER_JETSTREAM_READY_TIMEOUT:?} ({problem}); \
                                 server logs:\n{logs}"
                            );
                        }
                        _ => format!(
                            "{} exited after the start; server logs:\n{}",
                            exited.join(", "),
                            cluster.log_tails()
                        ),
                    }
                }
            };
            if attempt == NATS_START_ATTEMPTS_MAX {
                cluster.kill_all();
                panic!("{problem}");
            }
            eprintln!("NATS cluster start failed ({problem}); retrying on other ports");
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no server (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The client URLs of every server, for `async_nats::connect` or
    /// `ConnectOptions::connect` (both take `Vec<String>`: any server that answers is used,
    /// and the client fails over to the others).
    ///
    /// A `Vec`, not one string: async-nats 0.51 parses a `&str` as a single `ServerAddr`
    /// (`impl ToServerAddrs for str`), so `"nats://a:4222,nats://b:4223"` is rejected as an
    /// invalid URL; only slices and `Vec`s of strings are lists.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(ClusterServer::url).collect()
    }

    /// `nats://127.0.0.1:<client port>` of server `index`.
    pub fn url(&self, index: usize) -> String {
        self.server(index).url()
    }

    /// The `server_name` of server `index` (`nats-<index>`), as JetStream reports leaders
    /// and replicas.
    pub fn server_name(&self, index: usize) -> &str {
        &self.server(index).name
    }

    /// The index of the server called `name`, if it is one of this cluster's.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|server| server.name == name)
    }

    /// The JetStream store directory of server `index` (kept across restarts).
    pub fn store_dir(&self, index: usize) -> PathBuf {
        self.server(index).store_dir()
    }

    /// Whether server `index` is running.
    pub fn is_running(&mut self, index: usize) -> bool {
        self.server_mut(index).is_running()
    }

    /// Kills server `index` at once (SIGKILL), as a crash would, and waits for it.
    pub fn kill(&mut self, index: usize) {
        self.server_mut(index).kill();
    }

    /// Stops server `index` gracefully (SIGTERM, then SIGKILL after a bound) and waits for it.
    pub fn stop(&mut self, index: usize) {
        self.server_mut(index).stop();
    }

    /// Starts server `index` again with the same ports and store (stopping it first if it
    /// runs) and waits until it accepts clients. It catches up with the cluster afterwards;
    /// a test that needs its replicas current waits for that itself. Panics with its log if
    /// it does not come back.
    pub fn restart(&mut self, index: usize) {
        let binary = self.binary.clone();
        let server = self.server_mut(index);
        server.stop();
        // The ports may be in use for a moment after the old process exits.
        let deadline = Instant::now() + NATS_READY_TIMEOUT;
        loop {
            match server.launch(&binary) {
                Ok(()) => {
                    // `launch` checked this already; a restart cannot move to other ports,
                    // so say plainly if the server on them is not ours after all.
                    assert!(
                        server.is_running(),
                        "{} restarted on client port {} exited right after it became ready \
                         (is another process using its ports?); its log:\n{}",
                        server.name,
                        server.client_port,
                        server.log_tail()
                    );
                    return;
                }
                Err(problem) if Instant::now() < deadline => {
                    eprintln!("{} restart failed ({problem}); retrying", server.name);
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(problem) => panic!("{problem}"),
            }
        }
    }

    /// The last lines of server `index`'s log (appended across restarts).
    pub fn log_tail(&self, index: usize) -> String {
        self.server(index).log_tail()
    }

    /// Every server's log tail, headed by its name: for panic messages.
    pub fn log_tails(&self) -> String {
        self.servers
            .iter()
            .map(|server| {
                format!(
                    "--- {} ({}) ---\n{}",
                    server.name,
                    server.url(),
                    server.log_tail()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn server(&self, index: usize) -> &ClusterServer {
        let count = self.servers.len();
        self.servers.get(index).unwrap_or_else(|| {
            panic!("server index {index} is out of range: the cluster has {count}")
        })
    }

    fn server_mut(&mut self, index: usize) -> &mut ClusterServer {
        let count = self.servers.len();
        self.servers.get_mut(index).unwrap_or_else(|| {
            panic!("server index {index} is out of range: the cluster has {count}")
        })
    }

    /// Writes every server's config file and starts every server.
    fn launch_all(&mut self) -> Result<(), String> {
        let route_ports: Vec<u16> = self.servers.iter().map(|s| s.route_port).collect();
        for server in &self.servers {
            std::fs::create_dir_all(server.store_dir())
                .map_err(|e| format!("cannot create {}: {e}", server.store_dir().display()))?;
            let config = server_config(server, &route_ports);
            std::fs::write(server.config_path(), config)
                .map_err(|e| format!("cannot write {}: {e}", server.config_path().display()))?;
        }
        for server in &mut self.servers {
            server.launch(&self.binary)?;
        }
        Ok(())
    }

    fn kill_all(&mut self) {
        for server in &mut self.servers {
            server.kill();
        }
    }

    /// The names of the servers whose process is no longer running.
    fn exited_servers(&mut self) -> Vec<String> {
        self.servers
            .iter_mut()
            .filter_map(|server| (!server.is_running()).then(|| server.name.clone()))
            .collect()
    }

    /// Retries creating an R`replicas` stream until JetStream accepts it (the servers found
    /// each other and elected a meta leader), then deletes it. Returns the last problem after
    /// [`CLUSTER_JETSTREAM_READY_TIMEOUT`].
    fn wait_for_jetstream(&self, replicas: usize) -> Result<(), String> {
        let urls = self.urls();
        // The probe runs on its own thread and runtime, so `start` can be called from a
        // synchronous test as well as from inside a tokio runtime.
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("cannot build a tokio runtime: {e}"))?
                .block_on(probe_jetstream(urls, replicas))
        })
        .join()
        .unwrap_or_else(|_| Err("the JetStream probe thread panicked".to_string()))
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// The nats-server config file of `server`, with routes to every port of `route_ports`
/// but its own.
fn server_config(server: &ClusterServer, route_ports: &[u16]) -> String {
    let routes: String = route_ports
        .iter()
        .filter(|&&port| port != server.route_port)
        .map(|port| format!("        \"nats-route://127.0.0.1:{port}\"\n"))
        .collect();
    format!(
        "server_name: \"{name}\"\n\
         listen: \"127.0.0.1:{client_port}\"\n\
         jetstream {{\n    store_dir: \"{store}\"\n}}\n\
         cluster {{\n    name: \"{CLUSTER_NAME}\"\n    listen: \"127.0.0.1:{route_port}\"\n    \
         routes: [\n{routes}    ]\n}}\n",
        name = server.name,
        client_port = server.client_port,
        store = server.store_dir().display(),
        route_port = server.route_port,
    )
}

/// Connects to `urls` and creates (then deletes) an R`replicas` stream, retrying until
/// [`CLUSTER_JETSTREAM_READY_TIMEOUT`]. Returns the last problem on timeout.
async fn probe_jetstream(urls: Vec<String>, replicas: usize) -> Result<(), String> {
    use async_nats::jetstream::stream;
    let deadline = tokio::time::Instant::now() + CLUSTER_JETSTREAM_READY_TIMEOUT;
    let client = loop {
        match async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(urls.clone())
            .await
        {
            Ok(client) => break client,
            Err(error) if tokio::time::Instant::now() < deadline => {
                eprintln!("NATS cluster: no server accepts a client yet ({error}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(format!("no server of {urls:?} accepts a client: {error}")),
        }
    };
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(Duration::from_secs(2));
    let config = stream::Config {
        name: READY_PROBE_STREAM.to_string(),
        subjects: vec![format!("{}.probe", READY_PROBE_STREAM.to_lowercase())],
        num_replicas: replicas,
        storage: stream::StorageType::Memory,
        ..Default::default()
    };
    loop {
        let problem = match js.get_or_create_stream(config.clone()).await {
            Ok(_) => match js.delete_stream(READY_PROBE_STREAM).await {
                Ok(_) => return Ok(()),
                Err(error) => format!("cannot delete the probe stream: {error}"),
            },
            Err(error) => format!("cannot create an R{replicas} stream: {error}"),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(problem);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use async_nats::ToServerAddrs;

    #[test]
    fn a_comma_separated_string_is_not_a_server_list_for_async_nats() {
        // Why `NatsCluster::urls` returns a Vec (and why a `nats.url` with commas cannot
        // reach `ConnectOptions::connect(&str)` as a list).
        let joined = "nats://127.0.0.1:4222,nats://127.0.0.1:4223";
        assert!(joined.to_server_addrs().is_err());
        let list = vec!["nats://127.0.0.1:4222", "nats://127.0.0.1:4223"];
        assert_eq!(list.to_server_addrs().map(Iterator::count).ok(), Some(2));
    }
}
