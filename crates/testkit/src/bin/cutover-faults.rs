//! `cutover-faults`: the kill driver as one command (see `testkit::kills`). Prints a line per
//! trial and a summary, writes `WORK/faults.json`, and exits 1 if any trial failed.

use clap::Parser;
use std::path::PathBuf;
use testkit::kills::{self, Options, Target};
use testkit::{replication, FaultError};

#[derive(Parser)]
#[command(
    about = "Kill cutover syncs and daemons, reset and stall their connections at random moments; check every run ends exact"
)]
struct Args {
    /// Trials, each with one fault at a random moment.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Which faults: kill (SIGKILL of client or daemon, push or pull), network (connections
    /// reset after random amounts of data; the path frozen past the idle timeout), all (both),
    /// or replication (SIGKILL of either daemon of a replicated volume during its initial
    /// sync, streaming or a resync; needs qemu-io).
    #[arg(long, default_value = "kill", value_parser = ["kill", "network", "all", "replication"])]
    faults: String,
    /// Seed of the kill moments, targets and edits (same seed, same trials).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// mkdata `mixed --scale` of the source tree.
    #[arg(long, default_value_t = 0.002)]
    scale: f64,
    /// A large file of this many MiB joins the tree (0 for none).
    #[arg(long, default_value_t = 8)]
    big_mb: u64,
    /// The replicated volume's size in MiB (--faults replication).
    #[arg(long, default_value_t = 256)]
    volume_mb: u64,
    /// The writer writes within the first this many MiB of it (0: a quarter).
    #[arg(long, default_value_t = 0)]
    write_mb: u64,
    /// Data connections of every sync (of the replication link).
    #[arg(short = 'j', long, default_value_t = 4)]
    connections: usize,
    /// Scratch directory (emptied first).
    #[arg(long, default_value = "/tmp/cutover-faults")]
    work: PathBuf,
    /// The cutover binary under test.
    #[arg(long, default_value = "target/release/cutover")]
    cutover: PathBuf,
    /// Directory with mkdata.py and wanem.py.
    #[arg(long, default_value = "../shared")]
    shared: PathBuf,
}

fn main() {
    let a = Args::parse();
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    if a.faults == "replication" {
        let opts = replication::Options {
            cutover: abs(a.cutover),
            work: abs(a.work),
            trials: a.kills,
            seed: a.seed,
            volume_mb: a.volume_mb,
            write_mb: a.write_mb,
            connections: a.connections,
            faults: replication::ALL.to_vec(),
        };
        let report = replication::run(&opts, &mut |line| eprintln!("{line}"));
        finish(report, &opts.work, |r| (r.summary(), r.failures()));
    }
    let opts = Options {
        cutover: abs(a.cutover),
        shared: abs(a.shared),
        work: abs(a.work),
        kills: a.kills,
        targets: match a.faults.as_str() {
            "kill" => Target::KILLS.to_vec(),
            "network" => Target::NETWORK.to_vec(),
            _ => [Target::KILLS, Target::NETWORK].concat(),
        },
        seed: a.seed,
        scale: a.scale,
        big_mb: a.big_mb,
        connections: a.connections,
    };
    let report = kills::run(&opts, &mut |line| eprintln!("{line}"));
    finish(report, &opts.work, |r| (r.summary(), r.failures()));
}

/// Write `WORK/faults.json`, print the summary and the failures, and exit: 0 when no trial
/// failed, 1 when one did, 2 when the driver itself could not run.
fn finish<R: serde::Serialize>(
    report: Result<R, FaultError>,
    work: &std::path::Path,
    what: impl Fn(&R) -> (String, Vec<String>),
) -> ! {
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover-faults: {e}");
            std::process::exit(2);
        }
    };
    let json = work.join("faults.json");
    match serde_json::to_string_pretty(&report) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&json, text) {
                eprintln!("cutover-faults: {}: {e}", json.display());
            }
        }
        Err(e) => eprintln!("cutover-faults: {e}"),
    }
    let (summary, failures) = what(&report);
    println!("{summary}");
    for f in &failures {
        println!("FAILED {f}");
    }
    std::process::exit(if failures.is_empty() { 0 } else { 1 });
}
