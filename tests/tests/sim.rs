//! Randomized multi-node histories over the sans-IO sessions: random writes, frame drops,
//! duplicates, reordering, disconnects, restarts from the store, and nodes killed between
//! a write's early notice and its commit; after healing, every node has the same documents
//! and every acknowledged write.
//!
//! A failure prints its seed; `TIDESYNC_SEED=<seed> TIDESYNC_SIM_HISTORIES=1 cargo test -p
//! tidesync-tests --test sim` replays exactly that history.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Result;
use tidesync::sync::Role;
use tidesync_tests::sim::Net;
use tidesync_tests::Rng;

/// Links between `n` nodes, and each node's role: edges only where a node has one link,
/// as an edge talks to one hub at a time.
fn topology(rng: &mut Rng, n: usize) -> (Vec<Role>, Vec<(usize, usize)>) {
    let links: Vec<(usize, usize)> = match rng.range(0, 5) {
        0 => (1..n).map(|i| (i - 1, i)).collect(),       // line
        1 => (1..n).map(|i| (0, i)).collect(),           // star
        2 => (0..n).map(|i| (i, (i + 1) % n)).collect(), // ring
        3 => (0..n)
            .flat_map(|a| (a + 1..n).map(move |b| (a, b)))
            .collect(), // mesh
        // two linked hubs, each node after them on one of the two
        _ => std::iter::once((0, 1))
            .chain((2..n).map(|i| (rng.range(0, 2) as usize, i)))
            .collect(),
    };
    let roles = (0..n)
        .map(|i| {
            let degree = links.iter().filter(|(a, b)| *a == i || *b == i).count();
            if degree == 1 && i > 0 && rng.range(0, 4) > 0 {
                Role::Edge
            } else {
                Role::Hub
            }
        })
        .collect();
    (roles, links)
}

/// What one history exercised.
struct Exercised {
    frames: u64,
    early: u64,
    killed: u64,
    restored: u64,
    found: u64,
}

fn run_history(seed: u64) -> Result<Exercised> {
    let mut rng = Rng::new(seed);
    let n = rng.range(3, 6) as usize;
    let (roles, links) = topology(&mut rng, n);
    let mut net = Net::new(&roles, &links)?;
    for _ in 0..rng.range(20, 120) {
        if rng.range(0, 3) == 0 {
            let node = rng.range(0, n as u64) as usize;
            match rng.range(0, 100) {
                0..=7 => net.crash_during_write(node, &mut rng)?,
                8..=13 => net.copy_file(node)?,
                14..=17 => net.restore_copy(node)?,
                18..=19 => net.restore_after_catch_up(node, &mut rng)?,
                _ => net.write(node, &mut rng)?,
            }
        } else {
            net.step(&mut rng, true)?;
        }
    }
    net.heal()?;
    net.check_converged()?;
    Ok(Exercised {
        frames: net.delivered,
        early: net.early_sent,
        killed: net.killed_in_commit,
        restored: net.restored,
        found: net.went_back_found,
    })
}

#[test]
fn random_histories_converge() {
    let base = Rng::from_env_or_time().seed();
    let histories: u64 = std::env::var("TIDESYNC_SIM_HISTORIES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let frames = AtomicU64::new(0);
    let early = AtomicU64::new(0);
    let killed = AtomicU64::new(0);
    let restored = AtomicU64::new(0);
    let found = AtomicU64::new(0);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    // Histories are independent and each is deterministic in its seed: share them out.
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let h = next.fetch_add(1, Ordering::Relaxed);
                if h >= histories {
                    break;
                }
                let seed = base.wrapping_add(h);
                match run_history(seed) {
                    Ok(x) => {
                        frames.fetch_add(x.frames, Ordering::Relaxed);
                        early.fetch_add(x.early, Ordering::Relaxed);
                        killed.fetch_add(x.killed, Ordering::Relaxed);
                        restored.fetch_add(x.restored, Ordering::Relaxed);
                        found.fetch_add(x.found, Ordering::Relaxed);
                    }
                    Err(e) => panic!(
                        "history {h} failed: {e:#}\nreplay: TIDESYNC_SEED={seed} \
                         TIDESYNC_SIM_HISTORIES=1 cargo test -p tidesync-tests --test sim"
                    ),
                }
            });
        }
    });
    let (frames, early, killed) = (
        frames.load(Ordering::Relaxed),
        early.load(Ordering::Relaxed),
        killed.load(Ordering::Relaxed),
    );
    let (restored, found) = (
        restored.load(Ordering::Relaxed),
        found.load(Ordering::Relaxed),
    );
    println!(
        "{histories} histories from seed {base}, {frames} frames ({early} sent ahead of \
         their commit), {killed} nodes killed between notice and commit, {restored} \
         restored from an old copy ({found} found by a peer's cursor past the feed's end), \
         in {:?}",
        started.elapsed()
    );
    // The histories must exercise the early path and the kills, or they say nothing.
    assert!(early > 0, "no change was sent ahead of its commit");
    assert!(
        histories < 100 || (killed > 0 && restored > 0 && found > 0),
        "kills {killed}, restores {restored}, found gone back {found}: a fault not exercised"
    );
}
