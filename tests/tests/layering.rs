//! The layers hold because the compiler holds them: the sans-IO core has no I/O crate in
//! its dependency tree, and the library an app embeds has none of the binaries' crates.
//! A `use` of tokio in the core, or of clap in the library, fails here, not in review.

use std::collections::BTreeSet;
use std::process::Command;

/// The crates in the normal (non-dev, non-build) dependency tree of `package`.
fn normal_tree(package: &str) -> BTreeSet<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let out = Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "tree", "--locked", "-e", "normal", "-p", package, "--prefix", "none", "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_absent(package: &str, forbidden: &[&str]) {
    let tree = normal_tree(package);
    assert!(
        tree.contains(package),
        "{package} is not in its own tree: {tree:?}"
    );
    let found: Vec<&&str> = forbidden.iter().filter(|c| tree.contains(**c)).collect();
    assert!(found.is_empty(), "{package} depends on {found:?}");
}

#[test]
fn the_core_has_no_io_in_its_tree() {
    assert_absent(
        "tidesync-core",
        &[
            "tokio", "quinn", "redb", "rustls", "axum", "hyper", "tidesync",
        ],
    );
}

#[test]
fn the_library_has_none_of_the_binaries_crates() {
    assert_absent("tidesync", &["clap", "tracing-subscriber", "tidesync-cli"]);
    // The listing is real: what the library does need is in it.
    let tree = normal_tree("tidesync");
    for needed in ["tidesync-core", "tokio", "quinn", "redb", "axum"] {
        assert!(tree.contains(needed), "{needed} missing from {tree:?}");
    }
}
