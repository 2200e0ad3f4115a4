//! The README and the operator's guide stay true: their shell blocks run as written (with
//! the fixed ports swapped for free ones), the quickstart is the two commands CI runs, and
//! every flag and metric the code has is documented, and the other way round.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tidesync_tests::procs::{self, Proc};

fn repo_file(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The ```sh blocks of a markdown text.
fn sh_blocks(md: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in md.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(b), l) => {
                b.push_str(l);
                b.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// The blocks bind fixed-looking ports; run one at a time so two never pick the same.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `n` distinct ports free for both TCP and UDP (QUIC and the API share the numbers).
fn free_ports(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    while held.len() < n {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
        let port = tcp.local_addr().expect("addr").port();
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            held.push((port, tcp, udp));
        }
    }
    held.into_iter().map(|(p, _, _)| p).collect()
}

/// Runs a block in a fresh directory with each of `fixed` ports swapped for a free one.
/// A port found free can be taken by another process before a node binds it; a block
/// that fails is run once more on other ports, so only a failure twice in a row counts.
fn run_block_on_free_ports(
    block: &str,
    fixed: &[&str],
) -> Result<(tempfile::TempDir, Vec<(String, String)>)> {
    let attempt = || {
        let dir = tempfile::tempdir()?;
        let ports: Vec<(&str, u16)> = fixed.iter().copied().zip(free_ports(fixed.len())).collect();
        let out = run_block(block, dir.path(), &ports)?;
        Ok((dir, out))
    };
    attempt().or_else(|first: anyhow::Error| {
        eprintln!("running the block failed once, trying other ports: {first:#}");
        attempt()
    })
}

/// Runs a block line by line in `dir`: `run` lines in the background (waiting for their
/// readiness line), `watch` for a second, everything else to success. Returns each
/// foreground line with its output.
fn run_block(block: &str, dir: &Path, ports: &[(&str, u16)]) -> Result<Vec<(String, String)>> {
    let bin_dir: PathBuf = procs::binary("tidesync-hub")?
        .parent()
        .context("bin dir")?
        .to_owned();
    procs::binary("tidesync-edge")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut background = Vec::new();
    let mut outputs = Vec::new();
    for line in block.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut cmd = line.to_owned();
        // The hub's default ports, made explicit so they can be swapped.
        let words: Vec<&str> = line.split_whitespace().collect();
        let client = ["run", "status", "doc", "watch"];
        if words.first() == Some(&"tidesync-hub")
            && words.get(1).is_some_and(|w| client.contains(w))
        {
            if !line.contains("--api") {
                cmd.push_str(" --api 127.0.0.1:7790");
            }
            if words[1] == "run" && !line.contains("--listen") {
                cmd.push_str(" --listen 127.0.0.1:7443");
            }
        }
        for (fixed, port) in ports {
            cmd = cmd.replace(fixed, &port.to_string());
        }
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!("exec {cmd}"))
            .current_dir(dir)
            .env("PATH", &path);
        if words.get(1) == Some(&"run") {
            background.push(Proc::spawn(command, &format!("`{line}`"))?);
        } else if words.get(1) == Some(&"watch") {
            let mut child = command
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            std::thread::sleep(Duration::from_millis(1500));
            let _ = child.kill();
            let mut out = String::new();
            child
                .stdout
                .take()
                .context("stdout")?
                .read_to_string(&mut out)?;
            let _ = child.wait();
            outputs.push((line.to_owned(), out));
        } else {
            let out = command.output()?;
            if !out.status.success() {
                bail!(
                    "`{line}` failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            outputs.push((
                line.to_owned(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
    }
    Ok(outputs)
}

fn output_of<'a>(outputs: &'a [(String, String)], starts: &str) -> &'a str {
    outputs
        .iter()
        .find(|(l, _)| l.contains(starts))
        .map(|(_, o)| o.as_str())
        .unwrap_or_else(|| panic!("no output for {starts}"))
}

#[test]
fn quickstart_is_the_demo_and_the_ci_test_command() {
    let readme = repo_file("README.md");
    let quick = &readme[readme.find("## Quickstart").expect("quickstart")..];
    let block = sh_blocks(quick).into_iter().next().expect("a block");
    let lines: Vec<&str> = block.lines().collect();
    assert_eq!(
        lines,
        [
            "cargo run --release -p tidesync-examples --example demo",
            "scripts/test"
        ]
    );
    let script = repo_file("scripts/test");
    assert_eq!(
        script.lines().last(),
        Some(r#"cargo test --workspace "$@""#),
        "scripts/test ends by running every test"
    );
    let ci = repo_file(".ci/run");
    assert_eq!(
        ci.lines().last(),
        Some(lines[1]),
        ".ci/run runs the README's test command"
    );
}

#[test]
fn readme_walk_through_runs_as_written() {
    let readme = repo_file("README.md");
    let section = &readme[readme.find("## Running a deployment").expect("section")..];
    let block = sh_blocks(section).into_iter().next().expect("a block");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, out) = run_block_on_free_ports(&block, &["7443", "7790", "7781", "7782"])
        .expect("the README's commands");
    assert!(output_of(&out, "localhost:7790/v1/docs/models/resnet").contains("canary"));
    assert!(output_of(&out, "localhost:7781/v1/docs/models/resnet").contains("canary"));
    assert_eq!(output_of(&out, "http_code").trim(), "403");
    assert!(output_of(&out, "tidesync-edge doc get").contains("version"));
    assert!(output_of(&out, "tidesync-hub status").contains("edge-2"));
    assert!(output_of(&out, "tidesync-hub watch").contains("resnet"));
}

#[test]
fn operations_guide_runs_and_names_every_flag_and_metric() {
    let ops = repo_file("docs/OPERATIONS.md");
    let block = sh_blocks(&ops)
        .into_iter()
        .find(|b| b.contains("tidesync-hub init"))
        .expect("the deployment block");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, out) = run_block_on_free_ports(&block, &["7443", "7444", "7790", "7791", "7780"])
        .expect("the guide's commands");

    // Every metric the hub exports is documented, and every documented one exists.
    let metrics = output_of(&out, "curl -sf localhost:7791/metrics");
    let exported: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(exported.len() > 10, "{metrics}");
    let documented: BTreeSet<&str> = ops
        .split('`')
        .filter(|w| w.starts_with("tidesync_") && !w.contains(' '))
        .collect();
    // Series per blob transfer exist only while a transfer is under way (this hub has
    // none): they must be documented and be in the code.
    let per_transfer = [
        "tidesync_blob_transfer_done_bytes",
        "tidesync_blob_transfer_size_bytes",
        "tidesync_blob_transfer_rate_bytes_per_second",
    ];
    let code = repo_file("engine/src/metrics.rs");
    for m in per_transfer {
        let name = m.strip_prefix("tidesync_").unwrap_or(m);
        assert!(
            code.contains(&format!("\"{name}\"")),
            "{m} is not in metrics.rs"
        );
    }
    // A hub's exports to a message bus exist only where they are configured (this hub
    // has none); their families are registered in the bridge crate.
    let per_export = [
        "tidesync_export_published_messages",
        "tidesync_export_confirmed_messages",
        "tidesync_export_failures",
        "tidesync_export_lag_feed_positions",
        "tidesync_export_lag_seconds",
        "tidesync_export_connected",
        "tidesync_import_applied_messages",
        "tidesync_import_rejected_messages",
        "tidesync_import_skipped_messages",
        "tidesync_import_connected",
    ];
    let bridge = repo_file("bridge/src/export.rs") + &repo_file("bridge/src/import.rs");
    for m in per_export {
        let name = m.strip_prefix("tidesync_").unwrap_or(m);
        assert!(
            bridge.contains(&format!("\"{name}\"")),
            "{m} is not in the bridge"
        );
    }
    let mut expected = exported.clone();
    expected.extend(per_transfer);
    expected.extend(per_export);
    assert_eq!(expected, documented);

    // Every flag of every subcommand is documented, and every documented one exists.
    let mut flags = BTreeSet::new();
    for (bin, subs) in procs::SUBCOMMANDS {
        for sub in subs {
            let help = procs::run(bin, &[sub, "--help"]).expect("help");
            // Nested subcommands (`doc put`) have flags of their own.
            let nested: Vec<&str> = help
                .split("Commands:")
                .nth(1)
                .and_then(|s| s.split("Options:").next())
                .map(|s| {
                    s.lines()
                        .filter_map(|l| l.split_whitespace().next())
                        .filter(|w| *w != "help")
                        .collect()
                })
                .unwrap_or_default();
            let mut helps = vec![help.clone()];
            for n in nested {
                helps.push(procs::run(bin, &[sub, n, "--help"]).expect("nested help"));
            }
            for word in helps.iter().flat_map(|h| h.split_whitespace()) {
                let flag = word.trim_end_matches(',');
                if flag.starts_with("--") && flag != "--help" && flag != "--version" {
                    flags.insert(flag.to_owned());
                }
            }
        }
    }
    for f in &flags {
        assert!(ops.contains(f.as_str()), "{f} is not in docs/OPERATIONS.md");
    }
    let tables = ops.lines().filter(|l| l.starts_with("| `"));
    for word in tables.flat_map(|l| l.split(|c: char| c.is_whitespace() || c == '`' || c == '|')) {
        if let Some(flag) = word.strip_prefix("--") {
            let flag = format!(
                "--{}",
                flag.trim_end_matches(|c: char| !c.is_alphanumeric())
            );
            assert!(
                flags.contains(&flag),
                "{flag} in docs/OPERATIONS.md does not exist"
            );
        }
    }
}

/// Every path in `text` that starts with `prefix`, up to the first character that cannot
/// be part of a path.
fn paths_after(text: &str, prefix: &str) -> BTreeSet<String> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || "/{}_.-".contains(*c))
                .collect::<String>()
                .trim_end_matches(['.', '-'])
                .to_owned()
        })
        .collect()
}

/// Whether a concrete path (`/v1/docs/config/sensor-7`) fits a route (`/v1/docs/{ns}/{id}`).
fn fits(path: &str, route: &str) -> bool {
    let (p, r): (Vec<&str>, Vec<&str>) = (path.split('/').collect(), route.split('/').collect());
    p.len() == r.len()
        && p.iter()
            .zip(&r)
            .all(|(a, b)| a == b || (b.starts_with('{') && !a.is_empty()))
}

#[test]
fn docs_name_every_endpoint_and_toml_key_and_nothing_else() {
    let api = repo_file("engine/src/api/mod.rs");
    let routes: BTreeSet<String> = api
        .match_indices(".route(")
        .filter_map(|(i, _)| api[i..].split('"').nth(1).map(str::to_owned))
        .collect();
    assert!(routes.len() >= 8, "{routes:?}");
    let readme = repo_file("README.md");
    for r in &routes {
        assert!(
            readme.contains(r.as_str()),
            "endpoint {r} is not in README.md"
        );
    }
    for doc in [
        "README.md",
        "docs/OPERATIONS.md",
        "docs/ARCHITECTURE.md",
        "docs/SECURITY.md",
    ] {
        let text = repo_file(doc);
        for path in paths_after(&text, "/v1/").into_iter().chain(
            paths_after(&text, "/metrics")
                .into_iter()
                .filter(|p| p == "/metrics"),
        ) {
            assert!(
                routes.iter().any(|r| fits(&path, r)),
                "{path} in {doc} is no endpoint"
            );
        }
    }

    // TOML keys: the fields of the config file's struct, and the TOML column of the guide.
    let config = repo_file("engine/cli/src/config.rs");
    let body = config
        .split("pub struct RunFile {")
        .nth(1)
        .and_then(|s| s.split("\n}").next())
        .expect("RunFile");
    let mut keys: BTreeSet<&str> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split(':').next())
        .collect();
    let ops = repo_file("docs/OPERATIONS.md");
    // A table of settings has no flag; the guide shows it in an example.
    for table in ["namespace", "class", "export", "import"] {
        assert!(keys.remove(table), "no [[{table}]] in RunFile");
        assert!(
            ops.contains(&format!("[[{table}]]")),
            "[[{table}]] is not in docs/OPERATIONS.md"
        );
    }
    let documented: BTreeSet<&str> = ops
        .lines()
        .filter(|l| l.starts_with("| `run --"))
        .filter_map(|l| l.split('|').nth(2))
        .filter_map(|cell| cell.split('`').nth(1))
        .collect();
    assert_eq!(
        keys, documented,
        "TOML keys in the code vs docs/OPERATIONS.md"
    );
}
