//! T1, what TLS costs: one `cutover serve` on 127.0.0.1 with TLS and one with
//! `insecure_plaintext = true`, the same `cutover sync -j 8` against each, alternated over
//! several repetitions into fresh destinations; the medians give the cost.

use crate::data;
use crate::report::free_bytes;
use crate::tools::{self, Daemon, Env, ToolRun, Transport, Verify};
use crate::workloads::TLS_COST_CONNECTIONS;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs;
use std::path::{Path, PathBuf};

/// tmpfs, so that neither variant waits for a disk and only the transport differs.
const TMPFS: &str = "/dev/shm";

/// One variant's repetitions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Variant {
    pub runs: Vec<ToolRun>,
    /// Median seconds of the runs that succeeded.
    pub median_s: Option<f64>,
    /// `rsync --checksum` of the last run's destination.
    pub verify: Option<Verify>,
    /// `cutover serve` peak RSS over all its runs.
    pub server_rss_kb: Option<u64>,
}

/// T1's record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TlsCost {
    /// Where the source and the destinations were.
    pub data_dir: String,
    /// Runs asked for per variant.
    pub repetitions: usize,
    pub tls: Variant,
    pub plaintext: Variant,
    /// 1 − plaintext's median ÷ TLS's median: the share of plaintext's throughput TLS loses.
    pub cost: Option<f64>,
}

impl TlsCost {
    /// Medians of the runs that succeeded, and the cost from them.
    pub fn summarise(&mut self) {
        for v in [&mut self.tls, &mut self.plaintext] {
            v.median_s = median(v.runs.iter().filter(|r| r.ok()).filter_map(|r| r.seconds));
        }
        self.cost = match (self.tls.median_s, self.plaintext.median_s) {
            (Some(tls), Some(plain)) if tls > 0.0 => Some(1.0 - plain / tls),
            _ => None,
        };
    }

    /// Every run of both variants.
    pub fn runs(&self) -> impl Iterator<Item = &ToolRun> {
        self.tls.runs.iter().chain(&self.plaintext.runs)
    }

    /// Both variants' verifications.
    pub fn verifies(&self) -> impl Iterator<Item = &Verify> {
        [&self.tls.verify, &self.plaintext.verify]
            .into_iter()
            .flatten()
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// A directory removed when dropped (unless kept).
struct Scratch {
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("  keeping {}", self.path.display());
        } else if let Err(e) = data::remove_tree(&self.path) {
            eprintln!("  warning: {e:#}");
        }
    }
}

/// Where the source copy and one destination at a time fit: tmpfs when it has room for both
/// with a margin, else `run_dir` (on the work dir's filesystem).
fn scratch_dir(run_dir: &Path, source_bytes: u64, keep: bool) -> Result<Scratch> {
    let need = source_bytes.saturating_mul(2) + (256 << 20);
    let tmpfs = Path::new(TMPFS);
    let path = match free_bytes(tmpfs) {
        Some(free) if free >= need => {
            tmpfs.join(format!("cutover-bench-T1-{}", std::process::id()))
        }
        free => {
            eprintln!(
                "  {TMPFS} has {:.1} GB free, {:.1} GB needed: data stay in the work dir",
                free.unwrap_or(0) as f64 / 1e9,
                need as f64 / 1e9
            );
            run_dir.join("data")
        }
    };
    data::remove_tree(&path)?;
    fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
    Ok(Scratch { path, keep })
}

/// One variant's daemon, destination, logs and record.
struct Side<'a> {
    name: &'static str,
    daemon: Daemon,
    dst: PathBuf,
    logs: PathBuf,
    record: &'a mut Variant,
}

/// Run T1 on the data set `base`, `cost.repetitions` runs per variant, filling `cost` as it
/// goes (so a failure keeps what was measured before it).
pub fn run(
    env: &Env,
    base: &Path,
    source_bytes: u64,
    run_dir: &Path,
    logs: &Path,
    keep: bool,
    cost: &mut TlsCost,
) -> Result<()> {
    let repetitions = cost.repetitions;
    let bin = tools::cutover_bin(env)?;
    let scratch = scratch_dir(run_dir, source_bytes, keep)?;
    cost.data_dir = scratch.path.display().to_string();
    let src = if scratch.path.starts_with(TMPFS) {
        let src = scratch.path.join("src");
        eprintln!("  copying the base to {}", src.display());
        data::copy(base, &src, &logs.join("copy-src.log"))?;
        src
    } else {
        base.to_path_buf()
    };

    let TlsCost { tls, plaintext, .. } = cost;
    let mut sides = Vec::new();
    for (name, transport, record) in [
        ("TLS", Transport::Tls, tls),
        ("plaintext", Transport::Plaintext, plaintext),
    ] {
        let key = name.to_ascii_lowercase();
        let dst = scratch.path.join(format!("dst-{key}"));
        fs::create_dir_all(&dst)?;
        let side_logs = logs.join(&key);
        fs::create_dir_all(&side_logs)?;
        let daemon = Daemon::start(
            &bin,
            &run_dir.join(format!("serve-{key}")),
            &dst,
            transport,
            &side_logs.join("cutover-serve.log"),
        )?;
        sides.push(Side {
            name,
            daemon,
            dst,
            logs: side_logs,
            record,
        });
    }

    // Alternated, so that a slow spell of the machine (other work, thermal) falls on both.
    for rep in 1..=repetitions {
        for side in &mut sides {
            let tool = format!("cutover {} #{rep}", side.name);
            let run = tools::cutover_to_daemon(
                env,
                &tool,
                &side.daemon,
                TLS_COST_CONNECTIONS,
                &src,
                &side.logs,
                &format!("cutover-{rep}"),
            );
            eprintln!("  -> {}: {}", run.tool, crate::describe_run(&run));
            side.record.runs.push(run);
            if rep == repetitions {
                let what = format!("the {} destination", side.name);
                side.record.verify = Some(tools::verify(env, &what, &src, &side.dst, &side.logs));
            }
            // Fresh destination for the next run; the daemon resolves the module root per
            // session, so replacing the directory is safe while it runs.
            data::remove_tree(&side.dst)?;
            fs::create_dir_all(&side.dst)?;
        }
    }

    for side in sides {
        side.record.server_rss_kb = side.daemon.vm_hwm_kb();
        side.daemon
            .stop()
            .with_context(|| format!("the {} daemon", side.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(seconds: f64) -> ToolRun {
        ToolRun {
            seconds: Some(seconds),
            ..Default::default()
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
        assert_eq!(median(std::iter::empty()), None);
    }

    #[test]
    fn cost_is_the_throughput_tls_loses() {
        // BENCH.md's hand measurement: medians 1.90 s (TLS) and 1.66 s (plaintext) = ~13%.
        let mut c = TlsCost::default();
        c.tls.runs = vec![run_of(1.90)];
        c.plaintext.runs = vec![run_of(1.66)];
        c.summarise();
        let cost = c.cost.expect("both medians exist");
        assert!((cost - (1.0 - 1.66 / 1.90)).abs() < 1e-12);
    }

    #[test]
    fn failed_runs_are_left_out_of_the_median() {
        let mut c = TlsCost::default();
        let mut failed = run_of(100.0);
        failed.error = Some("boom".into());
        c.tls.runs = vec![run_of(2.0), failed];
        c.summarise();
        assert_eq!(c.tls.median_s, Some(2.0));
        assert_eq!(c.cost, None);
    }
}
