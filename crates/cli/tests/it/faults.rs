//! Kill faults at CI size: `testkit::kills` (the driver behind `cutover-faults`) SIGKILLs
//! the sending or receiving side, client or daemon, push or pull, at 20 seeded random
//! moments; every rerun must end with the destination equal to the source (rsync
//! `--checksum`), and no kill may cost more wire bytes than the stated bound.
//! `CUTOVER_FAULT_SEED=N` replays another seed.

use crate::util::*;
use std::path::PathBuf;
use testkit::kills::{self, Options};

#[test]
fn twenty_kills_at_random_moments_lose_nothing_and_resend_little() {
    let t = tmp();
    let seed = std::env::var("CUTOVER_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261124);
    let opts = Options {
        cutover: PathBuf::from(bin()),
        shared: mkdata_path().parent().unwrap().to_path_buf(),
        work: t.path().join("faults"),
        kills: 20,
        seed,
        scale: 0.002,
        big_mb: 8,
        connections: 4,
    };
    let report = kills::run(&opts, &mut |line| eprintln!("{line}")).expect("the fault driver");
    eprintln!("{}", report.summary());
    let failures = report.failures();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The faults must have happened: most kills land while the sync runs, on every side.
    let landed = report.landed();
    assert!(landed.values().sum::<usize>() >= 15, "{}", report.summary());
    assert!(landed.len() >= 3, "kills hit too few sides: {landed:?}");
}
