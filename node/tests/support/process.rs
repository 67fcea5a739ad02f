//! Running the built `crm-node` binary as a process in the node crate's integration tests:
//! in a fresh working directory, without the environment variables that would change what
//! it reads or prints, with its output captured, killed (and the test failed) if it has
//! not exited within a bound.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Environment variables that would change what the node reads or prints; removed for every
/// run (the backtrace ones only keep failure output short).
const NODE_ENV: [&str; 8] = [
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "CRM_IDENTITY_SECRET",
    "CRM_NATS_URL",
    "CRM_CONFIG",
    "CRM_DATA_DIR",
    "CRM_NODE_ID",
    "RUST_LOG",
];

/// A process that exited, with what it printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Everything the process said, for failure messages.
    #[allow(dead_code)] // not every test file prints it
    pub fn output(&self) -> String {
        format!(
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `crm-node <args>` and waits for it to exit; kills it and panics if it is still
/// running after `timeout`.
pub fn run_crm_node(args: &[&str], timeout: Duration) -> Finished {
    run_crm_node_with_env(args, timeout, &[])
}

/// As [`run_crm_node`], with extra environment variables.
#[allow(dead_code)] // not every test file sets any
pub fn run_crm_node_with_env(args: &[&str], timeout: Duration, env: &[(&str, &str)]) -> Finished {
    let workdir = tempfile::tempdir().expect("temporary working directory");
    let mut command = Command::new(env!("CARGO_BIN_EXE_crm-node"));
    command
        .args(args)
        .current_dir(workdir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for key in NODE_ENV {
        command.env_remove(key);
    }
    // `CRM_<SECTION>__<FIELD>` variables set config fields.
    for (key, _) in
        std::env::vars().filter(|(key, _)| key.starts_with("CRM_") && key.contains("__"))
    {
        command.env_remove(key);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("crm-node could not be started");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("crm-node status") {
            Some(status) => break Some(status),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "crm-node {args:?} was still running after {timeout:?} (killed); it should \
             have exited at once.\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        );
    };
    Finished {
        status,
        stdout,
        stderr,
    }
}
