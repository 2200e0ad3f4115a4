//! The fault harness, short: two hubs and three edges as real processes, every link
//! behind an impairment proxy, each fault kind injected once or more while every node
//! writes. Every acknowledged write must be on every node, and all must converge. The
//! seed is printed; `TIDESYNC_SEED=… cargo test -p tidesync-tests --test binaries_chaos`
//! replays the schedule (the processes' timing still varies). The long run is
//! `tidesync-bench soak --minutes N`.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidesync_tests::chaos::soak::{run, SoakConfig};
use tidesync_tests::Rng;

#[test]
fn every_fault_kind_heals_with_nothing_acknowledged_lost() {
    let seed = Rng::from_env_or_time().seed();
    println!("seed {seed}");
    let cfg = SoakConfig {
        // The run injects every kind once whatever this says.
        duration: Duration::from_secs(20),
        hubs: 2,
        edges: 3,
        seed,
        converge_within: Duration::from_secs(5),
    };
    let report = run(&cfg, |line| println!("{line}")).unwrap();
    println!("{}", report.to_json(&cfg));
    assert!(report.acked > 100, "the writers barely wrote: {report:?}");
    assert_eq!(report.lost, 0, "acknowledged writes lost: {report:?}");
    assert_eq!(report.divergent, 0, "nodes disagree: {report:?}");
    // Every heal converged (the harness gives up on one after 30 s); how fast is the
    // soak's figure, not this test's, on a machine that runs other tests at once.
    assert!(report.max_converge_ms < 30_000, "{report:?}");
    assert_eq!(
        report.faults.len(),
        8,
        "every fault kind injected: {report:?}"
    );
}
