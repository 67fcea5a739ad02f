//! CPU accounting of a measured span: the CPU seconds of the nats-server, of the nodes, of
//! the bench itself and of the whole machine at two instants (read from `/proc` through the
//! test kit), and what each used in between. A busy neighbour on the machine skews every
//! figure of the bench; `other_cores` shows how much.

use crate::figures::round;
use crm_testkit::proc::{cpu_seconds, machine_busy_seconds};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// CPU seconds of the server, the node(s), the bench and the whole machine at one instant.
#[derive(Clone, Copy)]
pub struct CpuSnapshot {
    at: Instant,
    nats: f64,
    node: f64,
    bench: f64,
    machine: f64,
}

/// CPU used over a span: seconds and cores busy on average.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CpuUse {
    pub wall_s: f64,
    pub nats_server_cpu_s: f64,
    pub crm_node_cpu_s: f64,
    pub bench_cpu_s: f64,
    pub nats_server_cores: f64,
    pub crm_node_cores: f64,
    pub bench_cores: f64,
    /// What the rest of the machine used meanwhile.
    pub other_cores: f64,
}

impl CpuSnapshot {
    pub fn take(nats_pid: u32, node_pid: Option<u32>) -> CpuSnapshot {
        CpuSnapshot::take_many(nats_pid, node_pid.as_slice())
    }

    /// The same with several nodes (`crm_node` sums them; a dead node counts 0 from then
    /// on, so take both ends of a span over the same live nodes).
    pub fn take_many(nats_pid: u32, node_pids: &[u32]) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            nats: cpu_seconds(&nats_pid.to_string()).unwrap_or(0.0),
            node: node_pids
                .iter()
                .filter_map(|pid| cpu_seconds(&pid.to_string()))
                .sum(),
            bench: cpu_seconds("self").unwrap_or(0.0),
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }

    /// CPU used since `self`.
    pub fn since(&self, later: &CpuSnapshot) -> CpuUse {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let (nats, node, bench) = (
            later.nats - self.nats,
            later.node - self.node,
            later.bench - self.bench,
        );
        let others = ((later.machine - self.machine) - nats - node - bench).max(0.0);
        CpuUse {
            wall_s: round(wall, 3),
            nats_server_cpu_s: round(nats, 2),
            crm_node_cpu_s: round(node, 2),
            bench_cpu_s: round(bench, 2),
            nats_server_cores: round(nats / wall, 2),
            crm_node_cores: round(node / wall, 2),
            bench_cores: round(bench / wall, 2),
            other_cores: round(others / wall, 2),
        }
    }
}
