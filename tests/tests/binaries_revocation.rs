//! Revocation across a deployment, with the real binaries: a revocation made at the CA
//! reaches every hub and edge through the sync sessions, signed so nobody can forge or
//! drop an entry; a hub enrolled later starts with it; a revoked hub loses its edges to
//! the next hub.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use tidesync_tests::procs::{connected, run, status, wait_for, Binaries, Proc};

fn ever_seen(p: &Proc, peer: &str) -> bool {
    status(p)["peers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["node_id"] == peer)
}

fn has(p: &Proc, path: &str) -> bool {
    ureq::get(&p.url(path)).call().is_ok()
}

fn metric(p: &Proc, name: &str) -> f64 {
    let text = ureq::get(&p.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// An additional hub of the deployment `d`, enrolled as `name`, peered with `peers`.
fn extra_hub(d: &Binaries, name: &str, peers: &[&Proc]) -> Proc {
    let bundle = d.path(&format!("{name}.pem"));
    let mut extra = vec!["--bundle".to_owned(), bundle];
    for p in peers {
        extra.extend(["--peer".to_owned(), p.quic.to_string()]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    d.hub_at(name, "127.0.0.1:0", &extra).unwrap()
}

/// Runs enrolled edge `name` from a fresh data directory `data`, against `hub` alone.
fn edge_from(d: &Binaries, name: &str, data: &str, hub: &Proc) -> Proc {
    Proc::start(
        "tidesync-edge",
        &[
            "run",
            "--data",
            &d.path(data),
            "--bundle",
            &d.path(&format!("{name}.pem")),
            "--api",
            "127.0.0.1:0",
            "--hub",
            &hub.quic.to_string(),
        ],
    )
    .unwrap()
}

fn revoke(d: &Binaries, name: &str) -> String {
    run(
        "tidesync-hub",
        &["revoke", "--data", &d.path("hub"), "--name", name],
    )
    .unwrap()
}

/// Revoking an edge at hub 1 cuts it off at hub 2, which it is connected to, within 2 s;
/// hub 2 keeps the list across a restart; a hub enrolled after the revocation refuses the
/// edge from its first handshake, before it ever met another hub.
#[test]
fn a_revocation_at_one_hub_reaches_the_other_and_hubs_enrolled_later() {
    let d = Binaries::init().unwrap();
    d.enroll("hub-2", "hub", &[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let hub1 = d.hub(&[]).unwrap();
    let hub2 = extra_hub(&d, "hub-2", &[&hub1]);
    let edge = d.edge("edge-1", &[&hub2], &[]).unwrap();
    ureq::put(&edge.url("/v1/docs/app/before"))
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("the write at hub 1", Duration::from_secs(10), || {
        has(&hub1, "/v1/docs/app/before")
    });
    assert!(status(&hub2)["revocation_list_number"].is_null());

    let out = revoke(&d, "edge-1");
    // The list's number, as `revoke` reports it and every node shows it.
    let number: u64 = out
        .split("revocation list number ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no list number in {out:?}"));
    let took = wait_for("hub 2 to cut the edge off", Duration::from_secs(2), || {
        !connected(&hub2, "edge-1")
    });
    println!(
        "hub 2 cut the edge off {} ms after `revoke`",
        took.as_millis()
    );
    assert_eq!(status(&hub2)["revocation_list_number"], number);
    assert_eq!(status(&hub2)["revoked_certificates"], 1);
    wait_for("hub 2 to keep the list", Duration::from_secs(2), || {
        std::path::Path::new(&d.path("hub-2/crl.pem")).exists()
    });
    wait_for("the edge told", Duration::from_secs(2), || {
        status(&edge)["revocation_list_number"] == number
    });
    ureq::put(&edge.url("/v1/docs/app/after"))
        .send_json(json!({"a": 2}))
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(!connected(&hub2, "edge-1"), "the edge came back");
    assert!(!has(&hub2, "/v1/docs/app/after"));

    // Hub 2 restarted without its crl.pem, with nobody left to tell it again (hub 1 and
    // the edge, which hold the list, are gone), still refuses the edge: it keeps the list
    // in its database too, and writes the file again.
    hub1.kill();
    edge.kill();
    let listen = hub2.quic.to_string();
    hub2.kill();
    let crl_file = std::path::PathBuf::from(d.path("hub-2/crl.pem"));
    std::fs::remove_file(&crl_file).unwrap();
    let bundle = d.path("hub-2.pem");
    let hub2 = d
        .hub_at("hub-2", &listen, &["--bundle", bundle.as_str()])
        .unwrap();
    assert_eq!(status(&hub2)["revocation_list_number"], number);
    let edge_again = edge_from(&d, "edge-1", "edge-1-again", &hub2);
    wait_for(
        "a refused handshake at hub 2",
        Duration::from_secs(5),
        || metric(&hub2, "tidesync_handshake_failures_total") >= 1.0,
    );
    assert!(!ever_seen(&hub2, "edge-1"), "a restart readmitted the edge");
    wait_for("crl.pem written again", Duration::from_secs(3), || {
        crl_file.exists()
    });

    // A damaged file while it runs: reported, and the list in force stays.
    std::fs::write(
        &crl_file,
        "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
    )
    .unwrap();
    wait_for("the damage reported", Duration::from_secs(3), || {
        status(&hub2)["revocation_list_error"].is_string()
    });
    assert_eq!(metric(&hub2, "tidesync_revocation_list_ok"), 0.0);
    let failures = metric(&hub2, "tidesync_handshake_failures_total");
    wait_for("another refused handshake", Duration::from_secs(20), || {
        metric(&hub2, "tidesync_handshake_failures_total") > failures
    });
    assert!(
        !ever_seen(&hub2, "edge-1"),
        "a damaged file readmitted the edge"
    );
    drop(edge_again);
    hub2.kill();
    // Nor does it start on a damaged list: it says what to do instead.
    let refused = run(
        "tidesync-hub",
        &[
            "run",
            "--data",
            &d.path("hub-2"),
            "--bundle",
            &bundle,
            "--listen",
            "127.0.0.1:0",
            "--api",
            "127.0.0.1:0",
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("crl.pem is not a valid revocation list"),
        "{refused}"
    );

    // A hub enrolled after the revocation starts with the list in its bundle.
    d.enroll("hub-3", "hub", &[]).unwrap();
    let hub3 = extra_hub(&d, "hub-3", &[]);
    assert_eq!(status(&hub3)["revocation_list_number"], number);
    let edge_again = edge_from(&d, "edge-1", "edge-1-third", &hub3);
    wait_for(
        "a refused handshake at hub 3",
        Duration::from_secs(5),
        || metric(&hub3, "tidesync_handshake_failures_total") >= 1.0,
    );
    assert!(!ever_seen(&hub3, "edge-1"));
    drop(edge_again);
}

/// Revoking a hub: the hub it peers with refuses it and hands it the list; the revoked
/// hub passes the list on to its edges, which drop it and fail over to the next hub.
#[test]
fn edges_drop_a_revoked_hub_and_fail_over() {
    let d = Binaries::init().unwrap();
    d.enroll("hub-2", "hub", &[]).unwrap();
    let hub1 = d.hub(&[]).unwrap();
    let hub2 = extra_hub(&d, "hub-2", &[&hub1]);
    // An edge that prefers hub 2 (its rendezvous ranking of the two).
    let name = (1..100)
        .map(|i| format!("edge-{i}"))
        .find(|n| {
            let me = tidesync::model::NodeId::new(n.as_str()).unwrap();
            tidesync::net::placement::rendezvous_order(&me, &[hub1.quic, hub2.quic])[0] == hub2.quic
        })
        .unwrap();
    d.enroll(&name, "edge", &["*=rw"]).unwrap();
    let edge = d.edge(&name, &[&hub2, &hub1], &[]).unwrap();
    wait_for("the edge at hub 2", Duration::from_secs(10), || {
        connected(&hub2, &name)
    });
    assert!(!connected(&hub1, &name));

    revoke(&d, "hub-2");
    let started = Instant::now();
    while !connected(&hub1, &name) {
        if started.elapsed() > Duration::from_secs(10) {
            panic!(
                "the edge did not fail over\nhub 1: {}\nhub 2: {}\nedge: {}",
                status(&hub1),
                status(&hub2),
                status(&edge)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = started.elapsed();
    println!(
        "the edge failed over {} ms after `revoke`",
        took.as_millis()
    );
    assert!(!connected(&hub1, "hub-2"), "hub 1 still talks to hub 2");
    assert!(status(&edge)["revocation_list_number"]
        .as_u64()
        .is_some_and(|n| n > 0));
    // It stays away from hub 2, though it ranks hub 2 first.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !connected(&hub2, &name),
        "the edge went back to the revoked hub"
    );
    ureq::put(&edge.url("/v1/docs/app/after"))
        .send_json(json!({"a": 1}))
        .unwrap();
    wait_for("a write through hub 1", Duration::from_secs(5), || {
        has(&hub1, "/v1/docs/app/after")
    });
    assert!(!has(&hub2, "/v1/docs/app/after"));
}

/// Revocations issued one after another in the directory of a running hub, which rewrites
/// `crl.pem` as it takes each list up, all end up on the list: neither writer puts an
/// older list back over a newer one. A list issued after `crl.pem` was lost still
/// outnumbers the lists before it.
#[test]
fn successive_revocations_beside_a_running_hub_are_all_kept() {
    let d = Binaries::init().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("edge-{i}")).collect();
    for n in &names {
        d.enroll(n, "edge", &["*=rw"]).unwrap();
    }
    let hub = d.hub(&[]).unwrap();
    for n in &names[..5] {
        revoke(&d, n);
    }
    wait_for("every revocation in force", Duration::from_secs(3), || {
        status(&hub)["revoked_certificates"] == 5
    });
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(status(&hub)["revoked_certificates"], 5, "one was lost");
    let before = status(&hub)["revocation_list_number"].as_u64().unwrap();

    // crl.pem lost at the CA while the hub is down: the next list still outnumbers it.
    hub.kill();
    std::fs::remove_file(d.path("hub/crl.pem")).unwrap();
    revoke(&d, &names[5]);
    let hub = d.hub(&[]).unwrap();
    let after = status(&hub)["revocation_list_number"].as_u64().unwrap();
    assert!(after > before, "{after} <= {before}");
}
