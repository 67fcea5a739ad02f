//! Where things are: the repository root, files in it, and the `nats-server` and `crm-node`
//! binaries the kit runs. Test-facing functions panic naming the fix; the `try_` forms
//! return the same message as an error for the benchmark.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The repository root (the workspace directory; this crate is `<root>/testkit`).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Path of a file at the repository root (`cluster-config/rules.toml`, `docs/…`).
pub fn repo_file(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

/// Path of a file in `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name)
}

/// The `nats-server` binary: `$NATS_SERVER_BIN`, then `PATH`, then `/usr/sbin`,
/// `/usr/local/sbin`, `/usr/local/bin` (sbin directories are not on every user's `PATH`);
/// or a message naming the fix when there is none.
pub fn try_nats_server_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(path));
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
        .ok_or_else(|| {
            "nats-server not found on PATH, in /usr/sbin, /usr/local/sbin or /usr/local/bin: \
             run scripts/setup (or `apt-get install -y nats-server`), or set NATS_SERVER_BIN to \
             its path"
                .to_string()
        })
}

/// [`try_nats_server_binary`] for tests: panics naming the fix when there is none.
pub fn nats_server_binary() -> PathBuf {
    try_nats_server_binary().unwrap_or_else(|problem| panic!("{problem}"))
}

/// Path of the `crm-node` binary of the profile this test binary was built with
/// (`target/<profile>/crm-node`). Panics naming the fix when it is missing; warns when it
/// is older than the sources.
pub fn crm_node_binary() -> PathBuf {
    let root = repo_root();
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
