//! The HTTP API and the CLI of the real binaries: bad input gets its status and changes
//! nothing; revocation through the CLI needs no restart; a kill -9 right after a write was
//! answered loses nothing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidesync_tests::procs::{
    connected, metrics, run, status, wait_for, Binaries, Proc, SUBCOMMANDS,
};

fn status_of(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match r {
        Ok(resp) => (resp.status(), resp.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

/// What a client can see of a node's documents: the listing and the whole change feed.
fn snapshot(p: &Proc, token: Option<&str>) -> Value {
    let get = |path: &str| {
        let mut req = ureq::get(&p.url(path));
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        req.call().unwrap().into_json::<Value>().unwrap()
    };
    json!({ "docs": get("/v1/docs/app"), "changes": get("/v1/changes?since=0") })
}

#[test]
fn bad_requests_get_their_status_and_change_nothing() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&["--token", "s3cret", "--max-body", "1024"]).unwrap();
    let auth = "Bearer s3cret";
    let url = |p: &str| hub.url(p);
    let (code, _) = status_of(
        ureq::put(&url("/v1/docs/app/doc"))
            .set("Authorization", auth)
            .send_json(json!({"a": 1})),
    );
    assert_eq!(code, 200);
    let before = snapshot(&hub, Some("s3cret"));
    let etag = "\"0000000000000000000000000000000000000000000000000000000000000000\"";

    let cases: Vec<(&str, u16, Result<ureq::Response, ureq::Error>)> = vec![
        (
            "malformed JSON",
            400,
            ureq::put(&url("/v1/docs/app/doc"))
                .set("Authorization", auth)
                .send_string("{\"a\": "),
        ),
        (
            "non-object root",
            400,
            ureq::put(&url("/v1/docs/app/doc"))
                .set("Authorization", auth)
                .send_json(json!([1, 2])),
        ),
        (
            "invalid namespace",
            400,
            ureq::put(&url("/v1/docs/App/doc"))
                .set("Authorization", auth)
                .send_json(json!({"a": 2})),
        ),
        (
            "invalid id",
            400,
            ureq::put(&url("/v1/docs/app/bad%20id"))
                .set("Authorization", auth)
                .send_json(json!({"a": 2})),
        ),
        (
            "body over the limit",
            413,
            ureq::put(&url("/v1/docs/app/doc"))
                .set("Authorization", auth)
                .send_json(json!({"a": "x".repeat(4096)})),
        ),
        (
            "stale If-Match",
            409,
            ureq::put(&url("/v1/docs/app/doc"))
                .set("Authorization", auth)
                .set("If-Match", etag)
                .send_json(json!({"a": 2})),
        ),
        (
            "missing token",
            401,
            ureq::put(&url("/v1/docs/app/doc")).send_json(json!({"a": 2})),
        ),
        (
            "wrong token",
            401,
            ureq::put(&url("/v1/docs/app/doc"))
                .set("Authorization", "Bearer nope")
                .send_json(json!({"a": 2})),
        ),
        (
            "garbage Automerge bytes",
            400,
            ureq::post(&url("/v1/docs/app/doc/automerge"))
                .set("Authorization", auth)
                .send_bytes(b"garbage"),
        ),
        (
            "absent document",
            404,
            ureq::get(&url("/v1/docs/app/absent"))
                .set("Authorization", auth)
                .call(),
        ),
    ];
    for (what, want, result) in cases {
        let (code, body) = status_of(result);
        assert_eq!(code, want, "{what}: {body}");
        assert!(body["error"].is_string(), "{what}: error body {body}");
    }
    assert_eq!(
        snapshot(&hub, Some("s3cret")),
        before,
        "a refused request changed something"
    );
    let (code, _) = status_of(ureq::get(&url("/v1/health")).call());
    assert_eq!(code, 200, "health needs no token");
}

#[test]
fn an_edge_may_not_write_a_namespace_it_was_not_granted_rw() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["app=ro", "notes=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let before = snapshot(&edge, None);
    for (method, path) in [
        ("PUT", "/v1/docs/app/x"),
        ("PATCH", "/v1/docs/app/x"),
        ("PUT", "/v1/docs/other/x"),
    ] {
        let (code, body) =
            status_of(ureq::request(method, &edge.url(path)).send_json(json!({"a": 1})));
        assert_eq!(code, 403, "{method} {path}: {body}");
    }
    assert_eq!(snapshot(&edge, None), before);
    let (code, _) = status_of(ureq::put(&edge.url("/v1/docs/notes/x")).send_json(json!({"a": 1})));
    assert_eq!(code, 200);
}

#[test]
fn revoking_through_the_cli_cuts_the_edge_off_without_a_restart() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    ureq::put(&edge.url("/v1/docs/app/before"))
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("the first write at the hub", Duration::from_secs(5), || {
        ureq::get(&hub.url("/v1/docs/app/before")).call().is_ok()
    });
    run(
        "tidesync-hub",
        &["revoke", "--data", &d.path("hub"), "--name", "edge-1"],
    )
    .unwrap();
    wait_for("the edge cut off", Duration::from_secs(3), || {
        let s: Value = ureq::get(&hub.url("/v1/status"))
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["connected"] == false)
    });
    let (code, _) =
        status_of(ureq::put(&edge.url("/v1/docs/app/after")).send_json(json!({"a": 2})));
    assert_eq!(code, 200, "the edge keeps accepting writes locally");
    std::thread::sleep(Duration::from_millis(800));
    let (code, _) = status_of(ureq::get(&hub.url("/v1/docs/app/after")).call());
    assert_eq!(code, 404, "a revoked edge's write reached the hub");
}

#[test]
fn a_write_answered_before_kill_9_survives_and_reaches_the_hub() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let resp = ureq::put(&edge.url("/v1/docs/app/precious"))
        .send_json(json!({"v": 42}))
        .unwrap();
    let etag = resp.header("etag").unwrap().to_owned();
    edge.kill(); // SIGKILL right after the 200
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let resp = ureq::get(&edge.url("/v1/docs/app/precious"))
        .call()
        .unwrap();
    assert_eq!(resp.header("etag"), Some(etag.as_str()));
    wait_for("the write at the hub", Duration::from_secs(5), || {
        ureq::get(&hub.url("/v1/docs/app/precious"))
            .call()
            .is_ok_and(|r| r.header("etag") == Some(etag.as_str()))
    });
}

/// Parses Prometheus text: every sample line is `name{labels} value` with a numeric value.
fn parse_metrics(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (name.to_owned(), value)
        })
        .collect()
}

fn metric(samples: &[(String, f64)], prefix: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let scrape = || {
        let text = ureq::get(&hub.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        parse_metrics(&text)
    };
    wait_for("the edge connected", Duration::from_secs(5), || {
        metric(&scrape(), "tidesync_connected_peers") == 1.0
    });
    let before = scrape();
    // Random letters: compression may not take the bytes below what is counted.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for i in 0..20 {
        let pad: String = (0..400)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(b'a' + (seed % 26) as u8)
            })
            .collect();
        ureq::put(&edge.url(&format!("/v1/docs/app/d{i}")))
            .send_json(json!({ "pad": pad }))
            .unwrap();
    }
    wait_for("the writes at the hub", Duration::from_secs(5), || {
        metric(&scrape(), "tidesync_documents") >= 20.0
    });
    let after = scrape();
    let received = |s: &[(String, f64)]| metric(s, "tidesync_peer_received_bytes_total{");
    assert!(
        received(&after) >= received(&before) + 20.0 * 200.0,
        "byte counters did not move"
    );
    assert!(metric(&after, "tidesync_peer_changes_applied_total{") >= 20.0);
    // Synced documents share commits: the count moves, by fewer than the writes.
    let commits = |s: &[(String, f64)]| metric(s, "tidesync_commit_duration_seconds_count");
    assert!(commits(&after) > commits(&before));
    assert_eq!(metric(&after, "tidesync_peer_lag_feed_positions{"), 0.0);
}

#[test]
fn the_cli_reads_writes_and_shows_status() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    let (ea, ha) = (edge.api.to_string(), hub.api.to_string());
    let out = run(
        "tidesync-edge",
        &[
            "doc",
            "put",
            "app",
            "cfg",
            r#"{"mode":"fast"}"#,
            "--api",
            &ea,
        ],
    )
    .unwrap();
    assert!(out.starts_with("ok"), "{out}");
    run(
        "tidesync-edge",
        &["doc", "patch", "app", "cfg", r#"{"level":2}"#, "--api", &ea],
    )
    .unwrap();
    let got: Value = serde_json::from_str(
        &run("tidesync-edge", &["doc", "get", "app", "cfg", "--api", &ea]).unwrap(),
    )
    .unwrap();
    assert_eq!(got, json!({"mode": "fast", "level": 2}));
    wait_for("the doc at the hub", Duration::from_secs(5), || {
        run("tidesync-hub", &["doc", "ls", "app", "--api", &ha]).is_ok_and(|o| o.contains("cfg"))
    });
    let table = run("tidesync-hub", &["status", "--api", &ha]).unwrap();
    assert!(
        table.contains("LAG") && table.contains("edge-1") && table.contains("up"),
        "{table}"
    );
    let status: Value =
        serde_json::from_str(&run("tidesync-hub", &["status", "--json", "--api", &ha]).unwrap())
            .unwrap();
    assert_eq!(status["peers"][0]["node_id"], "edge-1");
    run("tidesync-edge", &["doc", "rm", "app", "cfg", "--api", &ea]).unwrap();
    let err = run("tidesync-edge", &["doc", "get", "app", "cfg", "--api", &ea]).unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    let err = run(
        "tidesync-edge",
        &["doc", "put", "app", "x", "not json", "--api", &ea],
    )
    .unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
}

#[test]
fn every_flag_of_every_subcommand_is_explained() {
    for (bin, subs) in SUBCOMMANDS {
        for sub in subs {
            let help = run(bin, &[sub, "--help"]).unwrap();
            let lines: Vec<&str> = help.lines().map(str::trim).collect();
            for (i, line) in lines
                .iter()
                .enumerate()
                .filter(|(_, l)| l.starts_with("--"))
            {
                // The description follows on the same line, or (long help) on the next.
                let same_line = line.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
                let next_line = lines
                    .get(i + 1)
                    .is_some_and(|n| !n.is_empty() && !n.starts_with('-'));
                assert!(
                    same_line || next_line,
                    "{bin} {sub}: flag without a description: {line:?}\n{help}"
                );
            }
        }
        let run_help = run(bin, &["run", "--help"]).unwrap();
        assert!(
            run_help.contains("[default: 127.0.0.1:"),
            "{bin} run: defaults not shown"
        );
    }
}

#[test]
fn nodes_run_from_toml_config_files() {
    let d = Binaries::init().unwrap();
    let bundle = d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let hub_toml = d.path("hub.toml");
    std::fs::write(
        &hub_toml,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\napi = \"127.0.0.1:0\"\ntoken = \"from-file\"\n",
            d.path("hub")
        ),
    )
    .unwrap();
    let hub = Proc::start("tidesync-hub", &["run", "--config", &hub_toml]).unwrap();
    let edge_toml = d.path("edge.toml");
    std::fs::write(
        &edge_toml,
        format!(
            "data = {:?}\nbundle = {:?}\nhubs = [\"{}\"]\napi = \"127.0.0.1:0\"\n",
            d.path("edge-1"),
            bundle,
            hub.quic
        ),
    )
    .unwrap();
    // A flag wins over the file: this edge's API needs a token the file does not set.
    let edge = Proc::start(
        "tidesync-edge",
        &["run", "--config", &edge_toml, "--token", "from-flag"],
    )
    .unwrap();
    let (code, _) = status_of(ureq::put(&edge.url("/v1/docs/app/x")).send_json(json!({"a": 1})));
    assert_eq!(code, 401);
    ureq::put(&edge.url("/v1/docs/app/x"))
        .set("Authorization", "Bearer from-flag")
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("the write at the hub", Duration::from_secs(5), || {
        ureq::get(&hub.url("/v1/docs/app/x"))
            .set("Authorization", "Bearer from-file")
            .call()
            .is_ok()
    });
    std::fs::write(&edge_toml, "dta = \"typo\"\n").unwrap();
    let err = run("tidesync-edge", &["run", "--config", &edge_toml]).unwrap_err();
    assert!(err.to_string().contains("dta"), "{err}");
}

/// `cmd args` under a shell with umask 022, the usual default: files it makes without an
/// explicit mode would be readable by every local user.
fn umask_022(name: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask 022; exec \"$0\" \"$@\""])
        .arg(tidesync_tests::procs::binary(name).unwrap())
        .args(args);
    cmd
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
fn chmod(path: &std::path::Path, m: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
}

/// Regression: under umask 022 the data directory was created 0755 and the database 0644
/// (the documents readable by every local user), and a key file that existed before kept
/// its wider mode when `enroll` wrote over it. Every data directory is 0700 now, and the
/// database and every key file 0600, also when they existed before with wider modes.
#[cfg(unix)]
#[test]
fn data_directories_and_key_files_are_owner_only_under_umask_022() {
    let root = tempfile::tempdir().unwrap();
    let p = |s: &str| root.path().join(s);
    let s = |s: &str| p(s).to_string_lossy().into_owned();
    std::fs::create_dir(p("hub")).unwrap();
    chmod(&p("hub"), 0o755);
    let ok = |mut c: std::process::Command| assert!(c.status().unwrap().success());
    ok(umask_022("tidesync-hub", &["init", "--data", &s("hub")]));
    std::fs::write(p("edge-1.pem"), "an old bundle").unwrap();
    chmod(&p("edge-1.pem"), 0o644);
    for name in ["edge-1", "edge-9"] {
        let out = s(&format!("{name}.pem"));
        ok(umask_022(
            "tidesync-hub",
            &[
                "enroll",
                "--data",
                &s("hub"),
                "--name",
                name,
                "--role",
                "edge",
                "--out",
                &out,
            ],
        ));
    }
    ok(umask_022(
        "tidesync-hub",
        &["revoke", "--data", &s("hub"), "--name", "edge-9"],
    ));
    let run_hub = || {
        Proc::spawn(
            umask_022(
                "tidesync-hub",
                &[
                    "run",
                    "--data",
                    &s("hub"),
                    "--listen",
                    "127.0.0.1:0",
                    "--api",
                    "127.0.0.1:0",
                ],
            ),
            "hub",
        )
        .unwrap()
    };
    let hub = run_hub();
    std::fs::create_dir(p("edge-1")).unwrap();
    chmod(&p("edge-1"), 0o755);
    let edge = Proc::spawn(
        umask_022(
            "tidesync-edge",
            &[
                "run",
                "--data",
                &s("edge-1"),
                "--bundle",
                &s("edge-1.pem"),
                "--api",
                "127.0.0.1:0",
                "--hub",
                &hub.quic.to_string(),
            ],
        ),
        "edge",
    )
    .unwrap();
    // The edge is handed the revocation list and keeps it.
    wait_for(
        "the edge's copy of the list",
        Duration::from_secs(10),
        || p("edge-1/crl.pem").exists(),
    );
    let expected = [
        ("hub", 0o700),
        ("hub/issued", 0o600),
        ("hub/crl.pem", 0o600),
        ("edge-1/crl.pem", 0o600),
        ("hub/ca.pem", 0o600),
        ("hub/ca-key.pem", 0o600),
        ("hub/bundle.pem", 0o600),
        ("hub/revoked", 0o600),
        ("hub/node.redb", 0o600),
        ("edge-1.pem", 0o600),
        ("edge-1", 0o700),
        ("edge-1/node.redb", 0o600),
    ];
    for (file, want) in expected {
        assert_eq!(mode(&p(file)), want, "{file}: {:o}", mode(&p(file)));
    }
    // A database widened by hand is narrowed again at the next start.
    hub.kill();
    chmod(&p("hub/node.redb"), 0o644);
    let _hub = run_hub();
    assert_eq!(mode(&p("hub/node.redb")), 0o600);
    drop(edge);
}

fn peer<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node_id"] == id)
        .unwrap_or_else(|| panic!("no peer {id} in {status}"))
}

/// A UDP port free right now, for a hub that must come back on the same address.
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `enroll --renew` on a running edge's bundle: the edge takes the new certificate up
/// without a restart, its next connection presents it, and it resumes from its cursor
/// instead of syncing everything again.
#[test]
fn a_renewed_certificate_is_taken_up_by_a_running_edge_without_a_resync() {
    let d = Binaries::init().unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let hub = d.hub_at("hub", &listen, &[]).unwrap();
    let bundle = d.path("edge-1.pem");
    run(
        "tidesync-hub",
        &[
            "enroll",
            "--data",
            &d.path("hub"),
            "--name",
            "edge-1",
            "--role",
            "edge",
            "--grant",
            "*=rw",
            "--days",
            "2",
            "--out",
            &bundle,
        ],
    )
    .unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    for i in 0..40 {
        ureq::put(&edge.url(&format!("/v1/docs/app/d{i}")))
            .send_json(json!({"i": i}))
            .unwrap();
    }
    wait_for("the writes at the hub", Duration::from_secs(10), || {
        ureq::get(&hub.url("/v1/docs/app/d39")).call().is_ok()
    });
    let days = |v: &Value| v.as_i64().unwrap_or(-1);
    assert_eq!(days(&status(&edge)["cert_days_left"]), 1);
    assert_eq!(days(&peer(&status(&hub), "edge-1")["cert_days_left"]), 1);
    let loaded_before = peer(&status(&edge), "hub")["docs_loaded"].as_u64().unwrap();
    // The hub records its cursor once the edge has said the writes are durable there.
    let cursor = |hub: &Proc| peer(&status(hub), "edge-1")["cursor"].as_u64().unwrap();
    wait_for(
        "the hub's cursor past the writes",
        Duration::from_secs(5),
        || cursor(&hub) >= 40,
    );
    let cursor_before = cursor(&hub);

    let out = run(
        "tidesync-hub",
        &[
            "enroll",
            "--renew",
            "--data",
            &d.path("hub"),
            "--out",
            &bundle,
        ],
    )
    .unwrap();
    assert!(out.contains("renewed edge-1"), "{out}");
    wait_for(
        "the edge to take up its new certificate",
        Duration::from_secs(5),
        || days(&status(&edge)["cert_days_left"]) >= 364,
    );

    // The hub restarts on the same address; the edge's next handshake shows the new
    // certificate, and it resumes from its cursor.
    hub.kill();
    let hub = d.hub_at("hub", &listen, &[]).unwrap();
    wait_for(
        "the edge back with its new certificate",
        Duration::from_secs(30),
        || {
            let s = status(&hub);
            s["peers"].as_array().unwrap().iter().any(|p| {
                p["node_id"] == "edge-1"
                    && p["connected"] == true
                    && days(&p["cert_days_left"]) >= 364
            })
        },
    );
    ureq::put(&edge.url("/v1/docs/app/after"))
        .send_json(json!({"after": "renewal"}))
        .unwrap();
    wait_for("a write after the renewal", Duration::from_secs(5), || {
        ureq::get(&hub.url("/v1/docs/app/after")).call().is_ok()
    });
    let loaded_after = peer(&status(&edge), "hub")["docs_loaded"].as_u64().unwrap();
    let cursor_after = peer(&status(&hub), "edge-1")["cursor"].as_u64().unwrap();
    assert!(
        cursor_after >= cursor_before,
        "the hub's cursor of the edge went back"
    );
    println!("documents loaded for the hub: {loaded_before} before, {loaded_after} after");
    assert!(
        loaded_after - loaded_before < 40,
        "the edge synced everything again ({loaded_before} -> {loaded_after})"
    );
}

/// Regression: the hub re-read its revocation file every 250 ms and took a missing file
/// for an empty list, and skipped lines it could not read: deleting or damaging the file
/// readmitted every revoked node. Now the last good list stays, and the hub says so.
#[test]
fn a_deleted_or_damaged_revocation_list_readmits_nobody() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    wait_for("the edge connected", Duration::from_secs(10), || {
        connected(&hub, "edge-1")
    });
    run(
        "tidesync-hub",
        &["revoke", "--data", &d.path("hub"), "--name", "edge-1"],
    )
    .unwrap();
    wait_for("the edge cut off", Duration::from_secs(3), || {
        !connected(&hub, "edge-1")
    });
    let list = std::path::PathBuf::from(d.path("hub/revoked"));
    for (what, damage) in [
        ("deleted", None),
        ("damaged", Some("edge-1\u{0}\u{7f}garbage\n")),
        (
            "truncated to nothing but a bad line",
            Some("not a node id!\n"),
        ),
    ] {
        match damage {
            None => std::fs::remove_file(&list).unwrap(),
            Some(text) => std::fs::write(&list, text).unwrap(),
        }
        wait_for("the hub to report the list", Duration::from_secs(3), || {
            status(&hub)["revocation_list_error"].is_string()
        });
        // The edge redials every few seconds; give it the time to try.
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !connected(&hub, "edge-1"),
            "{what} list readmitted the edge"
        );
        let (code, _) =
            status_of(ureq::put(&edge.url("/v1/docs/app/x")).send_json(json!({"a": 1})));
        assert_eq!(code, 200);
        assert_eq!(
            status_of(ureq::get(&hub.url("/v1/docs/app/x")).call()).0,
            404,
            "{what}"
        );
    }
    let metrics = metrics(&hub);
    assert!(
        metrics.contains("tidesync_revocation_list_ok 0"),
        "{metrics}"
    );
    std::fs::write(&list, "edge-1\n").unwrap();
    wait_for("the list readable again", Duration::from_secs(3), || {
        status(&hub)["revocation_list_error"].is_null()
    });
    assert!(!connected(&hub, "edge-1"));
}

/// `init --ca-dir` keeps the CA key out of the hub's directory: the hub runs with its own
/// bundle alone, and nodes are enrolled from the CA directory.
#[test]
fn the_ca_key_can_stay_offline() {
    let root = tempfile::tempdir().unwrap();
    let p = |s: &str| root.path().join(s).to_string_lossy().into_owned();
    run(
        "tidesync-hub",
        &["init", "--data", &p("hub"), "--ca-dir", &p("offline-ca")],
    )
    .unwrap();
    assert!(!root.path().join("hub/ca-key.pem").exists());
    assert!(root.path().join("offline-ca/ca-key.pem").exists());
    let hub = Proc::start(
        "tidesync-hub",
        &[
            "run",
            "--data",
            &p("hub"),
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ],
    )
    .unwrap();
    run(
        "tidesync-hub",
        &[
            "enroll",
            "--data",
            &p("offline-ca"),
            "--name",
            "edge-1",
            "--role",
            "edge",
            "--grant",
            "*=rw",
            "--out",
            &p("edge-1.pem"),
        ],
    )
    .unwrap();
    let edge = Proc::start(
        "tidesync-edge",
        &[
            "run",
            "--data",
            &p("edge-1"),
            "--bundle",
            &p("edge-1.pem"),
            "--api",
            "127.0.0.1:0",
            "--hub",
            &hub.quic.to_string(),
        ],
    )
    .unwrap();
    ureq::put(&edge.url("/v1/docs/app/a"))
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("the write at the hub", Duration::from_secs(10), || {
        ureq::get(&hub.url("/v1/docs/app/a")).call().is_ok()
    });
    // Enrolling from the hub's directory fails: there is no CA there.
    let e = run(
        "tidesync-hub",
        &[
            "enroll",
            "--data",
            &p("hub"),
            "--name",
            "edge-2",
            "--role",
            "edge",
            "--out",
            &p("edge-2.pem"),
        ],
    );
    assert!(e.is_err());
}

/// Regression: endpoints were built with quinn's random stateless-reset key, so a hub
/// killed and restarted on the same port could not reset its edges' old connections, and
/// they waited out the idle timeout (19.5 s measured) before dialing again. With the key
/// derived from the node's own key, the restarted hub resets them at their next packet:
/// at once when the edge has something to send, within a keep-alive (5 s) when idle.
#[test]
fn edges_reconnect_at_once_to_a_hub_killed_and_restarted_on_its_port() {
    let d = Binaries::init().unwrap();
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let hub = d.hub_at("hub", &listen, &[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    d.enroll("edge-2", "edge", &["*=rw"]).unwrap();
    let busy = d.edge("edge-1", &[&hub], &[]).unwrap();
    let idle = d.edge("edge-2", &[&hub], &[]).unwrap();
    wait_for("both edges connected", Duration::from_secs(10), || {
        connected(&hub, "edge-1") && connected(&hub, "edge-2")
    });

    hub.kill();
    let hub = d.hub_at("hub", &listen, &[]).unwrap();
    let restarted = Instant::now();
    // edge-1 writes: its next packet meets the new hub, which resets the old connection.
    ureq::put(&busy.url("/v1/docs/app/after-restart"))
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("the busy edge back", Duration::from_secs(2), || {
        connected(&hub, "edge-1")
    });
    let busy_back = restarted.elapsed();
    wait_for("its write at the hub", Duration::from_secs(2), || {
        ureq::get(&hub.url("/v1/docs/app/after-restart"))
            .call()
            .is_ok()
    });
    // edge-2 is idle: its next keep-alive (every 5 s) is reset.
    wait_for("the idle edge back", Duration::from_secs(8), || {
        connected(&hub, "edge-2")
    });
    println!(
        "after the restart: busy edge back in {} ms, idle edge in {} ms",
        busy_back.as_millis(),
        restarted.elapsed().as_millis()
    );
    drop(idle);
}
