//! The `crm-tests` package exists for the integration tests in `tests/` (the cluster run as
//! real `nats-server` and `crm-node` processes); it has no code of its own. What the tests
//! share (starting servers and nodes, publishing, reading back) is the `crm-testkit` crate
//! (`testkit/`).
