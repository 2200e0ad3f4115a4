//! Kill -9 at random moments loses nothing that was acknowledged.
//!
//! A child process writes in a loop and prints each write once it is acknowledged; the test
//! kills it with SIGKILL after a random delay, reopens the store and checks that every
//! acknowledged write is there, then starts the child again on the same file. The seed is
//! printed; `TIDESYNC_SEED=… cargo test -p tidesync-tests --test durability` replays it.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidesync::model::{DocId, Namespace};
use tidesync::store::{Store, StoreConfig};
use tidesync_tests::Rng;

const KILLS: u64 = 24;

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_write() {
    let mut rng = Rng::from_env_or_time();
    println!("seed {}", rng.seed());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let ns = Namespace::new("crash").unwrap();
    let mut acked: BTreeSet<(String, String)> = BTreeSet::new();

    for run in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tidesync-crash-writer"))
            .arg(&path)
            .arg((run * 1_000_000).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(rng.range(5, 400));
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut r = BufReader::new(stdout);
            let mut buf = Vec::new();
            // Reads until the pipe closes; a line cut by the kill has no newline and is dropped.
            while r.read_until(b'\n', &mut buf).unwrap_or(0) > 0 {
                if buf.ends_with(b"\n") {
                    lines.push(String::from_utf8_lossy(&buf).trim().to_owned());
                }
                buf.clear();
            }
            lines
        });
        let started = Instant::now();
        std::thread::sleep(kill_after);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = acked.len();
        for line in &lines {
            let mut parts = line.split_whitespace();
            assert_eq!(parts.next(), Some("ack"), "unexpected output {line:?}");
            let doc = parts.next().unwrap().to_owned();
            let field = parts.next().unwrap().to_owned();
            acked.insert((doc, field));
        }
        println!(
            "run {run}: killed after {:?}, {} new acknowledged writes",
            started.elapsed(),
            acked.len() - before
        );

        let store = Store::open(&path, StoreConfig::default())
            .unwrap_or_else(|e| panic!("run {run}: store does not reopen after SIGKILL: {e}"));
        let mut by_doc: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (doc, field) in &acked {
            by_doc.entry(doc).or_default().push(field);
        }
        for (doc, fields) in by_doc {
            let content = store
                .get(&ns, &DocId::new(doc).unwrap())
                .unwrap()
                .unwrap_or_else(|| panic!("run {run}: acknowledged document {doc} is missing"))
                .content;
            for field in fields {
                assert!(
                    content.contains_key(field),
                    "run {run} (seed {}): acknowledged write {doc}.{field} is missing",
                    rng.seed()
                );
            }
        }
    }
    assert!(
        acked.len() > 100,
        "the writer made too few writes to mean anything"
    );
}
