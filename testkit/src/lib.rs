//! The test kit: the one implementation of every process the integration tests (`tests/`
//! of the `crm-tests` package) and the benchmark (`crm-bench`) start, and of the client
//! helpers the integration tests share.
//!
//! Process plumbing, which knows nothing of the CRM: [`spawn`] (children tied to this
//! process, so that none outlives it, and signalling them), [`ports`] (free ports, "does a
//! NATS server answer here"), [`scratch`] (temporary directories), [`paths`] (the repository
//! root and the `nats-server` / `crm-node` binaries), [`proc`] (RSS and CPU time of a pid from
//! `/proc`), [`nats_server`] (one private `nats-server -js`, ready once it logs "Server is
//! ready" and answers), [`nats_cluster`] (a cluster of them) and [`tcp_proxy`] (a proxy whose
//! connections a test can cut). [`node_process`] runs `crm-node` processes (start, SIGTERM,
//! SIGKILL, pause/resume, restart, log reading and timed log marks).
//!
//! Helpers of the integration tests, which do know the CRM: [`cluster_env`] (one node on a
//! private server, traffic, publishing, draining, querying), [`multi_node`] (several nodes,
//! cluster status, the apply audit) [`test_support`] (actor events and dead letters read
//! back) and [`schemas`] (real JSON validated against the published schemas). They panic with a message on failure, as a test should; the process plumbing also
//! has `try_` forms returning errors for the benchmark, which must report and carry on.

pub mod cluster_env;
pub mod multi_node;
pub mod nats_cluster;
pub mod nats_server;
pub mod node_process;
pub mod paths;
pub mod ports;
pub mod proc;
pub mod schemas;
pub mod scratch;
pub mod spawn;
pub mod tcp_proxy;
pub mod test_support;

pub use nats_server::NatsServer;
pub use paths::nats_server_binary;
pub use ports::free_port;
pub use scratch::create_dir_all;
pub use spawn::spawn_tied_to_test_process;
