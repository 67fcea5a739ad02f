//! `ARCHITECTURE.md` stays a true map: its code map names every source file of the crates,
//! and the repository explains itself (no page points outside it).

use crm_testkit::cluster_env::repo_file;
use std::path::Path;

/// Every `.rs` file below `dir`, as paths relative to the repository root.
fn sources(dir: &Path, found: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("source directory") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let root = repo_file("");
            found.push(
                path.strip_prefix(&root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
            );
        }
    }
}

#[test]
fn the_code_map_names_every_source_file() {
    let map = std::fs::read_to_string(repo_file("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut files = Vec::new();
    for crate_dir in ["actors/src", "node/src", "testkit/src", "bench/src"] {
        sources(&repo_file(crate_dir), &mut files);
    }
    assert!(files.len() > 50, "source files not found: {files:?}");
    let unnamed: Vec<&String> = files
        .iter()
        .filter(|file| {
            let name = Path::new(file.as_str())
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            // Module roots and unit-test files are named by their folder.
            !["mod.rs", "lib.rs", "tests.rs"].contains(&name) && !map.contains(name)
        })
        .collect();
    assert!(
        unnamed.is_empty(),
        "ARCHITECTURE.md's code map does not name {unnamed:?}: say in a line what each is for"
    );
}

#[test]
fn no_page_points_outside_the_repository() {
    let mut pages = vec![repo_file("ARCHITECTURE.md"), repo_file("README.md")];
    for entry in std::fs::read_dir(repo_file("docs")).expect("docs") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    for page in pages {
        let text = std::fs::read_to_string(&page).expect("page");
        assert!(
            !text.contains("../shared") && !text.contains("DESIGN.md"),
            "{} points at design notes outside the repository; docs/design.md is the design",
            page.display()
        );
    }
}
