//! Scratch directories: temporary directories removed on drop (after the processes that
//! use them are stopped: a holder declares the directory after its processes, or stops them
//! in its own `Drop`). Nothing here knows the CRM.

use std::path::Path;

/// A new temporary directory named `crm-<label>-…` under the system temporary directory,
/// removed when the returned value is dropped.
pub fn try_scratch_dir(label: &str) -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("crm-{label}-"))
        .tempdir()
}

/// [`try_scratch_dir`] for tests: panics when the directory cannot be created.
pub fn scratch_dir(label: &str) -> tempfile::TempDir {
    try_scratch_dir(label)
        .unwrap_or_else(|e| panic!("cannot create a temporary directory for {label}: {e}"))
}

/// Creates `path` and its parents; a convenience for tests that write config files.
pub fn create_dir_all(path: &Path) {
    std::fs::create_dir_all(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
}
