//! `cutover-faults`: the kill driver as one command (see `testkit::kills`). Prints a line per
//! trial and a summary, writes `WORK/faults.json`, and exits 1 if any trial failed.

use clap::Parser;
use std::path::PathBuf;
use testkit::kills::{self, Options, Target};

#[derive(Parser)]
#[command(
    about = "Kill cutover syncs and daemons, reset and stall their connections at random moments; check every run ends exact"
)]
struct Args {
    /// Trials, each with one fault at a random moment.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// Which faults: kill (SIGKILL of client or daemon, push or pull), network (connections
    /// reset after random amounts of data; the path frozen past the idle timeout), or all.
    #[arg(long, default_value = "kill", value_parser = ["kill", "network", "all"])]
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
    /// Data connections of every sync.
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
    let report = match kills::run(&opts, &mut |line| eprintln!("{line}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cutover-faults: {e}");
            std::process::exit(2);
        }
    };
    let json = opts.work.join("faults.json");
    match serde_json::to_string_pretty(&report) {
        Ok(text) => {
            if let Err(e) = std::fs::write(&json, text) {
                eprintln!("cutover-faults: {}: {e}", json.display());
            }
        }
        Err(e) => eprintln!("cutover-faults: {e}"),
    }
    println!("{}", report.summary());
    let failures = report.failures();
    for f in &failures {
        println!("FAILED {f}");
    }
    std::process::exit(if failures.is_empty() { 0 } else { 1 });
}
