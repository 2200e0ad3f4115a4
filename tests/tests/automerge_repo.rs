//! automerge-repo apps on Tidesync, with the real binaries and the real npm packages:
//! clients of two nodes create, find and edit documents that sync through the deployment,
//! a JSON patch reaches them as a change with plain strings, a read-only token changes
//! nothing, ephemeral messages pass between clients, and tokens stay out of the logs.
//! The JS side is `tests/js/repo_clients.mjs`; `scripts/test` installs its packages.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tidesync_tests::procs::{binary, run, wait_for, Binaries, Proc};

const ADMIN: &str = "operator-secret-token";

fn js_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// `node`, with the test packages installed; fails with what to run when they are not.
fn node() -> Command {
    let modules = js_dir().join("node_modules/@automerge/automerge-repo");
    assert!(
        modules.exists(),
        "the npm packages of tests/js are not installed: run scripts/test (or `npm ci` in tests/js)"
    );
    let found = Command::new("node").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "node is not installed: run scripts/test, which installs it"
    );
    let mut cmd = Command::new("node");
    cmd.current_dir(js_dir());
    cmd
}

/// Whether `p` has a live connection to `peer` (asked with the operator token).
fn connected(p: &Proc, peer: &str) -> bool {
    let status: serde_json::Value = ureq::get(&p.url("/v1/status"))
        .set("authorization", &format!("Bearer {ADMIN}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["node_id"] == peer && s["connected"] == true)
}

/// Issues a scoped token at the deployment's CA.
fn token(d: &Binaries, grant: &str) -> String {
    run(
        "tidesync-hub",
        &[
            "token",
            "create",
            "--data",
            &d.path("hub"),
            "--grant",
            grant,
            "--days",
            "1",
            "--name",
            "js-test",
        ],
    )
    .unwrap()
    .trim()
    .to_owned()
}

/// Edge `name` with its log (at debug level) written to `log`.
fn edge_logging(d: &Binaries, name: &str, hub: &Proc, log: &str) -> Proc {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        "exec \"$0\" \"$@\" 2>\"$LOG\"",
        binary("tidesync-edge").unwrap().to_str().unwrap(),
        "run",
        "--data",
        &d.path(name),
        "--bundle",
        &d.path(&format!("{name}.pem")),
        "--api",
        "127.0.0.1:0",
        "--hub",
        &hub.quic.to_string(),
        "--token",
        ADMIN,
    ])
    .env("LOG", log)
    .env("TIDESYNC_LOG", "debug");
    Proc::spawn(cmd, "tidesync-edge").unwrap()
}

#[test]
fn automerge_repo_clients_sync_through_the_deployment() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&["--token", ADMIN]).unwrap();
    for e in ["edge-a", "edge-b"] {
        d.enroll(e, "edge", &["repo=rw"]).unwrap();
    }
    let log = d.path("edge-a.log");
    let a = edge_logging(&d, "edge-a", &hub, &log);
    let b = d.edge("edge-b", &[&hub], &["--token", ADMIN]).unwrap();
    for e in ["edge-a", "edge-b"] {
        wait_for(e, Duration::from_secs(10), || connected(&hub, e));
    }
    let (rw, ro) = (token(&d, "repo=rw"), token(&d, "repo=ro"));

    let out = node()
        .arg("repo_clients.mjs")
        .env("EDGE_A", a.url(""))
        .env("HUB", hub.url(""))
        .env("EDGE_B", b.url(""))
        .env("TOKEN_RW", &rw)
        .env("TOKEN_RO", &ro)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the JS clients failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("OK"), "{stdout}");

    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.is_empty(), "the edge logged nothing at debug level");
    for t in [&rw, &ro] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!logged.contains(signature), "a token is in the log");
    }
}

/// What a client without the right token gets, before any WebSocket is opened.
#[test]
fn the_endpoint_refuses_missing_wrong_and_revoked_tokens() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&["--token", ADMIN]).unwrap();
    let url = hub.url("/v1/automerge-repo");
    fn status(r: Result<ureq::Response, ureq::Error>) -> u16 {
        match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(e) => panic!("{e}"),
        }
    }
    let upgrade = |url: &str| {
        status(
            ureq::get(url)
                .set("connection", "Upgrade")
                .set("upgrade", "websocket")
                .set("sec-websocket-version", "13")
                .set("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                .call(),
        )
    };
    assert_eq!(upgrade(&url), 401, "no token");
    assert_eq!(upgrade(&format!("{url}?token=wrong")), 401);
    let other = token(&d, "models=rw");
    assert_eq!(
        upgrade(&format!("{url}?token={other}")),
        403,
        "a token without the repo namespace"
    );
    let rw = token(&d, "repo=rw");
    assert_eq!(upgrade(&format!("{url}?token={rw}")), 101);
    // A scoped token reaches documents only.
    let status_page = ureq::get(&hub.url("/v1/status"))
        .set("authorization", &format!("Bearer {rw}"))
        .call();
    assert_eq!(status(status_page), 403);
    // Revoked at the CA, it is refused within a second or so.
    run(
        "tidesync-hub",
        &["token", "revoke", "--data", &d.path("hub"), "--token", &rw],
    )
    .unwrap();
    wait_for("the revocation", Duration::from_secs(10), || {
        upgrade(&format!("{url}?token={rw}")) == 401
    });
    let doc = ureq::get(&hub.url("/v1/docs/repo/x"))
        .set("authorization", &format!("Bearer {rw}"))
        .call();
    assert_eq!(status(doc), 401);
}
