//! The files operators and API clients take from the repository are true to the code:
//! the alert rules load in Prometheus's own checker and pass their unit tests, every
//! metric the alerts and the Grafana dashboard query is one a node exports, the systemd
//! units run the real commands, and `docs/openapi.yaml` lists exactly the API's routes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tidesync_tests::procs::{wait_for, Binaries};

fn repo_file(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo_file(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo_file("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is not installed ({e}): run scripts/test, which installs Debian's prometheus package")
        });
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// Every `tidesync_…` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tidesync_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The sample names a scrape shows, from its `# TYPE` lines.
fn exported(scrape: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{s}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

#[test]
fn alerts_and_dashboard_query_only_exported_metrics() {
    // A hub and an edge that synced: the per-peer families exist on both.
    let (_d, hub, edge) = Binaries::hub_and_edge("edge").unwrap();
    ureq::put(&hub.url("/v1/docs/app/x"))
        .send_string(r#"{"a":1}"#)
        .unwrap();
    wait_for("the document at the edge", Duration::from_secs(10), || {
        ureq::get(&edge.url("/v1/docs/app/x")).call().is_ok()
    });
    // The progress gauges are set by the connection's first reading.
    std::thread::sleep(Duration::from_millis(1500));
    let mut names = BTreeSet::new();
    for p in [&hub, &edge] {
        let scrape = ureq::get(&p.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        names.extend(exported(&scrape));
    }
    // Per blob being fetched: these exist only while a transfer runs.
    let during_transfers = [
        "tidesync_blob_transfer_done_bytes",
        "tidesync_blob_transfer_size_bytes",
        "tidesync_blob_transfer_rate_bytes_per_second",
    ];
    let code = read("engine/src/metrics.rs");
    for n in during_transfers {
        assert!(code.contains(&format!("\"{}\"", &n["tidesync_".len()..])));
        names.insert(n.to_owned());
    }
    // A hub's exports to a message bus: only where configured (these nodes have none).
    let bridge = read("bridge/src/export.rs");
    for (family, kind) in [
        ("export_published_messages", "counter"),
        ("export_confirmed_messages", "counter"),
        ("export_failures", "counter"),
        ("export_lag_feed_positions", "gauge"),
        ("export_lag_seconds", "gauge"),
        ("export_connected", "gauge"),
    ] {
        assert!(bridge.contains(&format!("\"{family}\"")), "{family}");
        let suffix = if kind == "counter" { "_total" } else { "" };
        names.insert(format!("tidesync_{family}{suffix}"));
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tidesync.json")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(
        exprs.len() > 20,
        "the dashboard has {} queries",
        exprs.len()
    );
    let alerts = read("deploy/prometheus/alerts.yml");
    for (what, text) in [("the dashboard", exprs.join("\n")), ("the alerts", alerts)] {
        let used = metric_names(&text);
        assert!(!used.is_empty());
        let unknown: Vec<&String> = used.difference(&names).collect();
        assert!(
            unknown.is_empty(),
            "{what} query metrics no node exports: {unknown:?}"
        );
    }
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_systemd_units_run_the_real_commands() {
    for (unit, bin) in [
        ("deploy/systemd/tidesync-hub.service", "tidesync-hub"),
        ("deploy/systemd/tidesync-edge.service", "tidesync-edge"),
    ] {
        let text = read(unit);
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{unit} has no ExecStart"));
        let args: Vec<&str> = exec.split_whitespace().skip(1).collect();
        assert!(exec.contains(bin), "{unit}: {exec}");
        // The binary accepts the unit's arguments (checked against its own parser).
        let mut check: Vec<&str> = args.clone();
        check.push("--help");
        let out = Command::new(tidesync_tests::procs::binary(bin).unwrap())
            .args(&check)
            .output()
            .unwrap();
        assert!(out.status.success(), "{unit}: {bin} {args:?} is refused");
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ] {
            assert!(text.contains(hardening), "{unit} lacks {hardening}");
        }
    }
}

/// `(METHOD, /path/{param})` pairs of the OpenAPI document.
fn spec_routes() -> BTreeSet<(String, String)> {
    let spec = read("docs/openapi.yaml");
    let mut out = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in spec.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = Some(format!("/{}", p.trim_end_matches(':')));
        } else if let (Some(m), Some(p)) = (line.strip_prefix("    "), &path) {
            let m = m.trim_end_matches(':');
            if ["get", "put", "post", "patch", "delete", "head", "options"].contains(&m) {
                out.insert((m.to_uppercase(), p.clone()));
            }
        }
    }
    out
}

/// `(METHOD, path)` pairs the router declares, read from its source.
fn router_routes() -> BTreeSet<(String, String)> {
    let code = read("engine/src/api/mod.rs");
    let start = code.find("pub fn router(").unwrap();
    let body = &code[start..start + code[start..].find("\n}\n").unwrap()];
    let mut out = BTreeSet::new();
    for part in body.split(".route(").skip(1) {
        let part = part.split(".route_layer(").next().unwrap();
        let path = if let Some(rest) = part.trim_start().strip_prefix('"') {
            rest.split('"').next().unwrap().to_owned()
        } else if part.trim_start().starts_with("access::REPO_PATH") {
            "/v1/automerge-repo".to_owned()
        } else {
            panic!("a route whose path this test cannot read: {part}");
        };
        for (call, method) in [
            ("get(", "GET"),
            ("put(", "PUT"),
            ("post(", "POST"),
            ("patch(", "PATCH"),
            ("delete(", "DELETE"),
        ] {
            if part.contains(call) {
                out.insert((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_openapi_document_lists_exactly_the_routes() {
    let spec = spec_routes();
    let router = router_routes();
    assert!(router.len() >= 18, "{router:?}");
    assert_eq!(
        spec.difference(&router).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not routed"
    );
    assert_eq!(
        router.difference(&spec).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed but not documented"
    );
    // And a running node answers each documented route (no 404 "no such endpoint" and no
    // 405), so the source reading above matches what is served.
    let (_d, hub, _edge) = Binaries::hub_and_edge("edge").unwrap();
    for (method, path) in &spec {
        let concrete = path
            .replace("{ns}", "app")
            .replace("{id}", "x")
            .replace("{hash}", &"0".repeat(64));
        let answer = ureq::request(method, &hub.url(&concrete))
            .timeout(Duration::from_secs(5))
            .call();
        let (code, body) = match answer {
            Ok(r) => (r.status(), String::new()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => panic!("{method} {concrete}: {e}"),
        };
        assert_ne!(code, 405, "{method} {concrete}");
        assert!(
            !(code == 404 && body.contains("no such endpoint")),
            "{method} {concrete} is not served"
        );
    }
}
