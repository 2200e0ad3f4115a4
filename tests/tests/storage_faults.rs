//! Storage faults with the real binaries: an edge whose disk fills up answers writes with
//! 507 and says why in `/v1/health`, and once space is freed the next write succeeds,
//! without a restart. The data directory is a small tmpfs this test mounts (root needed).
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
// Letters that do not compress: Automerge would store a repeated letter in a few bytes.
use tidesync_tests::bench::hostile::noise;
use tidesync_tests::procs::{wait_for, Binaries};

/// A tmpfs of `mb` MiB mounted at `dir` until dropped.
struct Tmpfs(String);

impl Tmpfs {
    fn mount(dir: &str, mb: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m"),
                "tidesync-test",
                dir,
            ])
            .output()
            .expect("running mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }

    /// Bytes free.
    fn avail(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1", &self.0])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).status();
    }
}

fn put(url: &str, body: &Value) -> (u16, Value) {
    match ureq::put(url).send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

fn health(url: &str) -> (u16, Value) {
    match ureq::get(url).call() {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("transport error: {e}"),
    }
}

#[test]
fn a_full_disk_answers_507_and_the_first_write_after_freeing_space_succeeds() {
    let d = Binaries::init().unwrap();
    let hub = d.hub(&[]).unwrap();
    d.enroll("edge-1", "edge", &["*=rw"]).unwrap();
    let fs = Tmpfs::mount(&d.path("edge-1"), 24);
    let edge = d.edge("edge-1", &[&hub], &[]).unwrap();
    assert_eq!(
        put(
            &edge.url("/v1/docs/app/first"),
            &json!({"pad": noise(64 << 10, 0)})
        )
        .0,
        200
    );

    // Leave about 2 MiB free, then write until the disk is full.
    let filler = format!("{}/filler", d.path("edge-1"));
    let fill = fs.avail().saturating_sub(2 << 20);
    std::fs::write(&filler, vec![7u8; fill as usize]).unwrap();
    let mut full = None;
    for i in 0..400 {
        let pad = noise(64 << 10, i + 1);
        let (status, body) = put(
            &edge.url(&format!("/v1/docs/app/d{i}")),
            &json!({"pad": pad}),
        );
        if status != 200 {
            full = Some((i, status, body));
            break;
        }
    }
    let (written, status, body) = full.expect("the disk never filled up");
    println!("full after {written} writes: {status} {body}");
    assert_eq!(status, 507, "{body}");
    let (h, why) = health(&edge.url("/v1/health"));
    assert_eq!(h, 503, "{why}");
    assert_eq!(why["no_space"], true, "{why}");
    // Whatever room is left goes too: then no write fits, of any size.
    let filler2 = format!("{}/filler-2", d.path("edge-1"));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler2).unwrap();
        while f.write_all(&[7u8; 4096]).is_ok() {}
        let _ = f.sync_all();
    }
    // Reads go on. (A write may still fit in pages redb frees inside its file; the
    // first one that needs the file to grow is refused like the one above.)
    assert!(ureq::get(&edge.url("/v1/docs/app/first")).call().is_ok());

    // Space comes back: the next write succeeds, no restart.
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&filler2).unwrap();
    let (status, body) = put(&edge.url("/v1/docs/app/after"), &json!({"a": 2}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(health(&edge.url("/v1/health")).0, 200);
    // What was acknowledged before is all there, and syncs on.
    for i in 0..written {
        assert!(ureq::get(&edge.url(&format!("/v1/docs/app/d{i}")))
            .call()
            .is_ok());
    }
    wait_for(
        "the later write at the hub",
        Duration::from_secs(10),
        || ureq::get(&hub.url("/v1/docs/app/after")).call().is_ok(),
    );
    edge.kill();
    drop(fs);
}
