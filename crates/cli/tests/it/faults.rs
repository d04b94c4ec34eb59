//! Faults at CI size: `testkit::kills` (the driver behind `cutover-faults`) SIGKILLs the
//! sending or receiving side, client or daemon, push or pull, at 20 seeded random moments,
//! and resets or stalls the connections of 8 more runs; every run must end with the
//! destination equal to the source (rsync `--checksum`), and no interruption may cost more
//! wire bytes than the stated bound. `CUTOVER_FAULT_SEED=N` replays another seed.

use crate::util::*;
use std::path::PathBuf;
use testkit::kills::{self, Options, Target};

/// Run the driver over `trials` faults drawn from `targets` (seed from
/// `CUTOVER_FAULT_SEED`, else `seed`), at CI size; fails the test on any failed trial.
fn drive(trials: usize, targets: &[Target], seed: u64) -> kills::Report {
    let t = tmp();
    let seed = std::env::var("CUTOVER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);
    let opts = Options {
        cutover: PathBuf::from(bin()),
        shared: mkdata_path().parent().unwrap().to_path_buf(),
        work: t.path().join("faults"),
        kills: trials,
        targets: targets.to_vec(),
        seed,
        scale: 0.002,
        big_mb: 8,
        connections: 4,
    };
    let report = kills::run(&opts, &mut |line| eprintln!("{line}")).expect("the fault driver");
    eprintln!("{}", report.summary());
    let failures = report.failures();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    report
}

#[test]
fn twenty_kills_at_random_moments_lose_nothing_and_resend_little() {
    let report = drive(20, &Target::KILLS, 20261124);
    // The faults must have happened: most kills land while the sync runs, on every side.
    let landed = report.landed();
    assert!(landed.values().sum::<usize>() >= 15, "{}", report.summary());
    assert!(landed.len() >= 3, "kills hit too few sides: {landed:?}");
}

/// Network faults at CI size: connections reset after random amounts of data (wanem
/// `--reset-mb`) and a relay frozen past the idle timeout. No rerun is allowed: the run
/// itself must reconnect with backoff, resume, and end exact.
#[test]
fn eight_resets_and_stalls_are_ridden_out_by_reconnecting() {
    let report = drive(8, &Target::NETWORK, 20261125);
    let landed: Vec<_> = report.trials.iter().filter(|t| !t.missed).collect();
    assert!(landed.len() >= 5, "{}", report.summary());
    for t in &landed {
        assert_eq!(t.reruns, 0, "{t:?}");
        assert!(
            t.reconnects >= 1,
            "a landed fault without a reconnect: {t:?}"
        );
    }
}
