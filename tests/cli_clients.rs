//! The client subcommands as a user runs them: `send` (the reference adapter, from JSON
//! text and from a file), `watch` (live actor events), `query --customer-id` and `stats`.

use crm_testkit::cluster_env::{wait_drained, NodeOptions, TestEnv};
use crm_testkit::node_process::{clear_developer_env, crm_node_binary, run_cli};
use crm_testkit::spawn_tied_to_test_process;
use serde_json::Value;
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const PURCHASE: &str = r#"{"v": 1, "event_id": "cli-1", "type": "purchase", "occurred_at": "2026-05-01T10:00:00Z",
 "identity": {"email": "cli@example.com"}, "order_id": "o-cli-1", "amount": 30.00, "currency": "EUR"}"#;
/// How long `crm-node watch` may take to start and connect to NATS.
const WATCH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between the connection and the first event: `watch` prints nothing once it is
/// subscribed, and its SUB follows the connection handshake from the same task.
const WATCH_SUBSCRIBE_SETTLE: Duration = Duration::from_millis(200);
/// How long `watch` may take to print the expected events once they were published, and to
/// exit after its `--count`.
const WATCH_OUTPUT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `crm-node watch`: its stdout lines arrive on a channel (read on a thread, so a
/// silent `watch` fails the test at a deadline instead of blocking it), and it is killed and
/// reaped on drop (a failed assert must not leave it reconnecting to a NATS that is gone).
struct WatchProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl WatchProcess {
    fn start(url: &str, args: &[&str]) -> WatchProcess {
        let mut command = Command::new(crm_node_binary());
        clear_developer_env(&mut command)
            .args(["--nats-url", url, "watch"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = spawn_tied_to_test_process(command).expect("crm-node watch starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        WatchProcess { child, lines }
    }

    /// Waits until the process holds a TCP connection to NATS on 127.0.0.1:`port` (it
    /// subscribes right after connecting), then [`WATCH_SUBSCRIBE_SETTLE`].
    fn wait_connected(&mut self, port: u16) {
        let deadline = Instant::now() + WATCH_CONNECT_TIMEOUT;
        while !connected_to(self.child.id(), port) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("crm-node watch exited ({status}) before it connected to NATS");
            }
            assert!(
                Instant::now() < deadline,
                "crm-node watch did not connect to NATS on port {port} within {WATCH_CONNECT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(WATCH_SUBSCRIBE_SETTLE);
    }

    /// The next `count` lines of its stdout; panics with what it printed so far when they do
    /// not come within [`WATCH_OUTPUT_TIMEOUT`].
    fn next_lines(&self, count: usize) -> Vec<String> {
        let deadline = Instant::now() + WATCH_OUTPUT_TIMEOUT;
        let mut lines = Vec::with_capacity(count);
        while lines.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(_) => panic!(
                    "crm-node watch printed {} of {count} lines within {WATCH_OUTPUT_TIMEOUT:?} \
                     (or closed its output): {lines:?}",
                    lines.len()
                ),
            }
        }
        lines
    }

    /// Waits until it exits; panics after [`WATCH_OUTPUT_TIMEOUT`].
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WATCH_OUTPUT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("watch's status") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "crm-node watch did not exit within {WATCH_OUTPUT_TIMEOUT:?} after its --count"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` has an established TCP connection to 127.0.0.1:`port`: one of its
/// socket inodes (`/proc/<pid>/fd`) in state 01 towards that address in `/proc/<pid>/net/tcp`.
fn connected_to(pid: u32, port: u16) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    let sockets: HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    // Columns: sl, local address, remote address, state, queues, timers, retransmits, uid,
    // timeout, inode; addresses are little-endian hex IPv4 and big-endian hex port.
    let remote = format!("0100007F:{port:04X}");
    table.lines().skip(1).any(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        columns.len() > 9
            && columns[2] == remote
            && columns[3] == "01"
            && sockets.contains(columns[9])
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_watch_query_and_stats_work_from_the_command_line() {
    let env = TestEnv::start(NodeOptions::default());
    let url = env.nats.url();
    let client = env.client().await;

    // `watch --count 2 --json` prints the first two actor events and exits.
    let mut watch = WatchProcess::start(&url, &["--json", "--count", "2"]);
    tokio::task::block_in_place(|| watch.wait_connected(env.nats.port()));

    let (ok, out, err) = run_cli(&[
        "--nats-url",
        &url,
        "send",
        "--channel",
        "web",
        "--json",
        PURCHASE,
    ]);
    assert!(ok, "send failed: {err}");
    let ack: Value = serde_json::from_str(out.trim()).expect("send prints the ack as JSON");
    assert_eq!(ack["stream"], "CRM_INGEST");
    assert_eq!(ack["duplicate"], false);

    // The same event again, from a file: JetStream drops it as a duplicate.
    let file = env.dir.path().join("event.json");
    std::fs::write(&file, PURCHASE).expect("event file");
    let (ok, out, _) = run_cli(&[
        "--nats-url",
        &url,
        "send",
        "--channel",
        "web",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(ok);
    let ack: Value = serde_json::from_str(out.trim()).expect("ack");
    assert_eq!(ack["duplicate"], true);

    wait_drained(&client, env.options.shards, Duration::from_secs(60)).await;
    let (printed, status) =
        tokio::task::block_in_place(|| (watch.next_lines(2), watch.wait_exit()));
    assert!(status.success(), "watch exited with {status}: {printed:?}");
    let lines: Vec<Value> = printed
        .iter()
        .map(|l| serde_json::from_str(l).expect("watch --json prints JSON lines"))
        .collect();
    let types: Vec<&str> = lines.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types,
        vec!["customer.created", "points.earned"],
        "{lines:?}"
    );
    let customer_id = lines[0]["customer_id"]
        .as_str()
        .expect("customer id")
        .to_string();

    let (ok, out, _) = run_cli(&[
        "--nats-url",
        &url,
        "query",
        "--customer-id",
        &customer_id,
        "--json",
    ]);
    assert!(ok);
    let view: Value = serde_json::from_str(out.trim()).expect("query --json prints the reply");
    assert_eq!(view["purchases"]["count"], 1);
    let (ok, out, _) = run_cli(&["--nats-url", &url, "query", "--email", "CLI@example.com"]);
    assert!(ok);
    assert!(
        out.contains(&customer_id) && out.contains("1 orders"),
        "{out}"
    );

    let (ok, out, _) = run_cli(&["--nats-url", &url, "stats"]);
    assert!(ok);
    let stats: Value = serde_json::from_str(out.trim()).expect("stats JSON");
    assert_eq!(stats["metrics"]["ingest_routed"], 1);
    assert_eq!(stats["metrics"]["stored_customers"], 1);
}
