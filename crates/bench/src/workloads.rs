//! The workloads of the benchmark table (W1–W5 and W1s over the emulated WAN, L1, M1 and P1
//! local, T1 on loopback): their data, edits, where they run, and the target each must meet.

use crate::tools::ToolRun;

/// Where the tools run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Through wanem: cutover serve + wanem, rsync via peers.sh.
    Wan,
    /// Through wanem, both over ssh: cutover to peers.sh's sshd + wanem, rsync via peers.sh.
    WanSsh,
    /// On this machine, no emulator.
    Local,
    /// cutover to a `cutover serve` on 127.0.0.1, no emulator: TLS against plaintext (T1).
    Loopback,
    /// On this machine: a pass over only the listed (changed) directories against a full
    /// pass over the unchanged tree (P1).
    Listed,
    /// On this machine: `qemu-img convert` into a volume's NBD export against into a file (V1).
    VolumeConvert,
    /// On this machine: `qemu-img bench -w -c count` into a volume's NBD export against a
    /// file (V2).
    VolumeWrites { count: u64 },
    /// On this machine: a volume's changed-block pass against a whole-device pass, after 1%
    /// of its blocks were written (V3).
    VolumePass,
    /// `cutover serve` daemons replicating a volume through wanem (R1–R5, `replication.rs`;
    /// R7, three of them, `replication_three.rs`).
    Replication(crate::replication::Row),
}

impl Place {
    /// Whether the tools cross the emulated link (so wire bytes are counted and the link is
    /// calibrated first).
    pub fn is_wan(self) -> bool {
        matches!(self, Place::Wan | Place::WanSsh)
    }

    /// The name in results.json.
    pub fn label(self) -> &'static str {
        match self {
            Place::Wan => "wan",
            Place::WanSsh => "wan-ssh",
            Place::Local => "local",
            Place::Loopback => "loopback",
            Place::Listed => "local-listed",
            Place::VolumeConvert | Place::VolumeWrites { .. } | Place::VolumePass => "local-volume",
            Place::Replication(_) => "wan-replica",
        }
    }
}

/// What a workload must achieve.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// cutover's throughput (source bytes / seconds) at least `frac` of the link.
    LinkShare { frac: f64 },
    /// As `LinkShare`, and at least `speedup` times faster than rsync.
    LinkShareAndSpeedup { frac: f64, speedup: f64 },
    /// cutover's time at most `max` times rsync's.
    TimeRatio { max: f64 },
    /// Wire bytes and time both at most rsync's.
    WireAndTime,
    /// Wire bytes at most `max` times rsync's.
    WireRatio { max: f64 },
    /// Time at most `cp_max` times `cp -a`'s and at most `rsync_max` times rsync's.
    LocalCopy { cp_max: f64, rsync_max: f64 },
    /// Time at most rsync's, and every cutover process's peak RSS at most `rss_mb` MB.
    ResyncRss { rss_mb: f64 },
    /// TLS costs at most `max` of plaintext's throughput (1 − plaintext's median time ÷
    /// TLS's).
    TlsCost { max: f64 },
    /// The listed pass takes at most `max` of a full no-change pass's time (P1; the full
    /// pass stands in the peer's slot).
    ListedPass { max: f64 },
    /// V3: time ≤ `time_max` of the whole-device pass's, and bytes read on each side ≤
    /// `reads_max` × the dirty bytes.
    VolumePass { time_max: f64, reads_max: f64 },
    /// The run through cutover's export does the same work at least `min` as fast as the
    /// run on a file directly (V1, V2; the direct run stands in the peer's slot).
    ThroughputShare { min: f64 },
    /// R1–R5 and R7: judged by `replication.rs`, which puts its verdict in cutover's report.
    Replication(crate::replication::Row),
}

/// Inputs to judging a target.
pub struct Outcome<'a> {
    pub source_bytes: u64,
    pub link_mbps: f64,
    /// cutover's run (none in T1, whose runs are repeated).
    pub cutover: Option<&'a ToolRun>,
    pub rsync: Option<&'a ToolRun>,
    pub cp: Option<&'a ToolRun>,
    /// The share of throughput TLS costs (T1).
    pub tls_cost: Option<f64>,
}

fn secs(r: Option<&ToolRun>) -> Option<f64> {
    r.filter(|r| r.ok()).and_then(|r| r.seconds)
}

fn wire(r: Option<&ToolRun>) -> Option<u64> {
    r.filter(|r| r.ok()).and_then(|r| r.wire_bytes)
}

/// Peak RSS of cutover in KiB: the larger of wait4's figure and any sampled process.
pub fn cutover_peak_kb(r: &ToolRun) -> Option<u64> {
    let sampled = r.process_peaks.iter().map(|p| p.vm_hwm_kb).max();
    match (r.max_rss_kb, sampled) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Target {
    pub fn describe(&self, link_mbps: f64) -> String {
        match *self {
            Target::LinkShare { frac } => {
                format!("≥ {:.0}% of the {link_mbps} MB/s link", frac * 100.0)
            }
            Target::LinkShareAndSpeedup { frac, speedup } => format!(
                "≥ {:.0}% of the link, ≥ {speedup}× rsync's speed",
                frac * 100.0
            ),
            Target::TimeRatio { max } if (max - 1.0 / 3.0).abs() < 1e-9 => {
                "time ≤ 1/3 of rsync's".into()
            }
            Target::TimeRatio { max } => format!("time ≤ {max:.2}× rsync's"),
            Target::WireAndTime => "wire ≤ rsync's, time ≤ rsync's".into(),
            Target::WireRatio { max } => format!("wire ≤ {max}× rsync's"),
            Target::LocalCopy { cp_max, rsync_max } => {
                let rsync = if rsync_max == 1.0 {
                    "rsync's".to_string()
                } else {
                    format!("{rsync_max}× rsync's")
                };
                format!("time ≤ {cp_max}× `cp -a`'s, ≤ {rsync}")
            }
            Target::ResyncRss { rss_mb } => {
                format!("time ≤ rsync's; peak RSS ≤ {rss_mb} MB")
            }
            Target::TlsCost { max } => {
                format!("TLS costs ≤ {:.0}% of throughput", max * 100.0)
            }
            Target::ListedPass { max } => {
                format!("listed pass ≤ 1/{:.0} of a full no-change pass", 1.0 / max)
            }
            Target::ThroughputShare { min } => {
                format!("≥ {:.0}% of the direct run's throughput", min * 100.0)
            }
            Target::VolumePass { time_max, reads_max } => format!(
                "reads ≤ {reads_max}× the dirty bytes on each side; time ≤ 1/{:.0} of a whole-device pass",
                1.0 / time_max
            ),
            Target::Replication(row) => row.target(link_mbps),
        }
    }

    /// Whether the target was met (None: cannot tell), and the figures behind the verdict.
    pub fn judge(&self, o: &Outcome) -> (Option<bool>, String) {
        let c_s = secs(o.cutover);
        let r_s = secs(o.rsync);
        let link = o.link_mbps * 1e6;
        let share = c_s.map(|s| o.source_bytes as f64 / s.max(1e-9) / link);
        let all = |parts: Vec<(Option<bool>, String)>| {
            let verdict = if parts.iter().any(|(v, _)| *v == Some(false)) {
                Some(false)
            } else if parts.iter().all(|(v, _)| *v == Some(true)) {
                Some(true)
            } else {
                None
            };
            let text = parts
                .into_iter()
                .map(|(_, t)| t)
                .collect::<Vec<_>>()
                .join("; ");
            (verdict, text)
        };
        let share_part = |frac: f64| match share {
            Some(sh) => (
                Some(sh >= frac),
                format!("{:.1} MB/s = {:.0}% of link", sh * o.link_mbps, sh * 100.0),
            ),
            None => (None, "no cutover time".into()),
        };
        let ratio_part = |name: &str, c: Option<f64>, p: Option<f64>, max: f64| match (c, p) {
            (Some(c), Some(p)) if p > 0.0 => {
                let r = c / p;
                (Some(r <= max), format!("{name} ratio {r:.3} (≤ {max:.2})"))
            }
            _ => (None, format!("no {name} ratio")),
        };
        match *self {
            Target::LinkShare { frac } => all(vec![share_part(frac)]),
            Target::LinkShareAndSpeedup { frac, speedup } => all(vec![
                share_part(frac),
                ratio_part("time", c_s, r_s, 1.0 / speedup),
            ]),
            Target::TimeRatio { max } => all(vec![ratio_part("time", c_s, r_s, max)]),
            Target::WireAndTime => all(vec![
                ratio_part(
                    "wire",
                    wire(o.cutover).map(|x| x as f64),
                    wire(o.rsync).map(|x| x as f64),
                    1.0,
                ),
                ratio_part("time", c_s, r_s, 1.0),
            ]),
            Target::WireRatio { max } => all(vec![ratio_part(
                "wire",
                wire(o.cutover).map(|x| x as f64),
                wire(o.rsync).map(|x| x as f64),
                max,
            )]),
            Target::LocalCopy { cp_max, rsync_max } => all(vec![
                ratio_part("cp time", c_s, secs(o.cp), cp_max),
                ratio_part("rsync time", c_s, r_s, rsync_max),
            ]),
            Target::ResyncRss { rss_mb } => {
                let rss = match o.cutover.filter(|c| c.ok()).and_then(cutover_peak_kb) {
                    Some(kb) => {
                        let mb = kb as f64 * 1024.0 / 1e6;
                        (
                            Some(mb <= rss_mb),
                            format!("cutover peak RSS {mb:.1} MB (≤ {rss_mb} MB)"),
                        )
                    }
                    None => (None, "no cutover RSS".into()),
                };
                all(vec![ratio_part("time", c_s, r_s, 1.0), rss])
            }
            Target::ListedPass { max } => all(vec![ratio_part("time", c_s, r_s, max)]),
            Target::VolumePass {
                time_max,
                reads_max,
            } => {
                let report = o.cutover.and_then(|c| c.report.as_ref());
                let field = |k: &str| report.and_then(|r| r[k].as_u64());
                let dirty = field("dirty_bytes").unwrap_or(0) as f64;
                let reads = |side: &str, key: &str| match field(key) {
                    Some(n) if dirty > 0.0 => {
                        let r = n as f64 / dirty;
                        (
                            Some(r <= reads_max),
                            format!("{side} read {r:.2}× the dirty bytes (≤ {reads_max})"),
                        )
                    }
                    _ => (None, format!("no {side} read count")),
                };
                all(vec![
                    reads("source", "source_read_bytes"),
                    reads("destination", "destination_read_bytes"),
                    ratio_part("time", c_s, r_s, time_max),
                ])
            }
            Target::ThroughputShare { min } => match (c_s, r_s) {
                (Some(c), Some(r)) if c > 0.0 => {
                    let share = r / c;
                    (
                        Some(share >= min),
                        format!("{:.0}% of the direct run's throughput", share * 100.0),
                    )
                }
                _ => (None, "no throughput share".into()),
            },
            Target::Replication(_) => crate::replication::judge(o.cutover),
            Target::TlsCost { max } => match o.tls_cost {
                Some(cost) => (
                    Some(cost <= max),
                    format!(
                        "TLS costs {:.1}% of throughput (≤ {:.0}%)",
                        cost * 100.0,
                        max * 100.0
                    ),
                ),
                None => (None, "no median for both variants".into()),
            },
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Spec {
    pub id: &'static str,
    /// The table id it belongs to (L1a and L1b are both L1), for `--only`.
    pub family: &'static str,
    pub work: String,
    /// `mkdata.py` arguments making the base set (the directory left out).
    pub generate: Vec<String>,
    /// `mkdata.py edit` arguments applied to a fresh copy of the base (the directory left out).
    pub edit: Option<Vec<String>>,
    /// Whether destinations start as `cp -a` copies of the base (a re-sync), or empty.
    pub resync: bool,
    pub place: Place,
    /// Also time `cp -a SRC DST` (local first copies).
    pub with_cp: bool,
    /// Sample every process's peak RSS (M1).
    pub sample_rss: bool,
    /// The row whose rsync run is this row's too (same command on the same data, from the same
    /// start): reused when that row ran earlier in the same invocation, so a slow rsync is not
    /// timed twice.
    pub rsync_as_in: Option<&'static str>,
    pub target: Target,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Directories holding files in `mkdata.py tree --files n`: 100 files to a directory.
pub fn leaf_dirs(n: u64) -> u64 {
    n.div_ceil(100)
}

/// P1's changed directories: 0.1% of them, at least one.
pub fn listed_dirs(n: u64) -> u64 {
    (leaf_dirs(n) / 1000).max(1)
}

/// `n * scale`, rounded, at least 1.
pub fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

fn tree(files: u64, min_kb: u64, max_kb: u64) -> Vec<String> {
    let mut v = s(&["tree", "--files"]);
    v.extend([
        files.to_string(),
        "--min-kb".into(),
        min_kb.to_string(),
        "--max-kb".into(),
        max_kb.to_string(),
        "--seed".into(),
        "1".into(),
    ]);
    v
}

pub(crate) fn big(count: u64, mb: u64, text: bool) -> Vec<String> {
    let mut v = s(&["big", "--count"]);
    v.extend([count.to_string(), "--mb".into(), mb.to_string()]);
    if text {
        v.push("--text".into());
    }
    v.extend(["--seed".into(), "1".into()]);
    v
}

pub(crate) fn mib(mb: u64) -> String {
    if mb >= 1024 {
        format!("{} GiB", crate::tools::fmt_num(mb as f64 / 1024.0))
    } else {
        format!("{mb} MiB")
    }
}

/// Data connections of T1's client (`-j`): fixed, so both variants move the same way.
pub const TLS_COST_CONNECTIONS: usize = 8;

/// mkdata's edits touch only files of 8 MiB or more.
const EDIT_MIN_MB: u64 = 8;

/// Every workload at `scale` (1.0 = the sizes of the table).
pub fn all(scale: f64) -> Vec<Spec> {
    let w1_mb = scaled(256, scale);
    // T1 moves W1's data set (1 GiB in 4 files), so the base is generated and cached once.
    let t1_mb = w1_mb;
    let w2_n = scaled(20_000, scale);
    let w3_n = scaled(200_000, scale);
    let w4_mb = scaled(1024, scale).max(EDIT_MIN_MB);
    let w5_mb = scaled(1024, scale).max(EDIT_MIN_MB);
    let l1_mb = scaled(1024, scale);
    let l1_n = scaled(200_000, scale);
    let m1_n = scaled(1_000_000, scale);
    let p1_n = scaled(1_000_000, scale);
    let v1_mb = scaled(1024, scale);
    let v2_writes = scaled(200_000, scale);
    let v3_mb = scaled(4096, scale);
    vec![
        Spec {
            id: "W1",
            family: "W1",
            work: format!("{} in 4 random files, first copy", mib(4 * w1_mb)),
            generate: big(4, w1_mb, false),
            edit: None,
            resync: false,
            place: Place::Wan,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::LinkShare { frac: 0.85 },
        },
        Spec {
            id: "W1s",
            family: "W1s",
            work: format!(
                "{} in 4 random files, first copy, cutover over ssh",
                mib(4 * w1_mb)
            ),
            generate: big(4, w1_mb, false),
            edit: None,
            resync: false,
            place: Place::WanSsh,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: Some("W1"),
            target: Target::LinkShare { frac: 0.85 },
        },
        Spec {
            id: "W2",
            family: "W2",
            work: format!("{w2_n} files of 1–64 KiB, first copy"),
            generate: tree(w2_n, 1, 64),
            edit: None,
            resync: false,
            place: Place::Wan,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::LinkShareAndSpeedup {
                frac: 0.70,
                speedup: 10.0,
            },
        },
        Spec {
            id: "W3",
            family: "W3",
            work: format!("{w3_n} files of 1–64 KiB, nothing changed, re-sync"),
            generate: tree(w3_n, 1, 64),
            edit: None,
            resync: true,
            place: Place::Wan,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::TimeRatio { max: 1.0 / 3.0 },
        },
        Spec {
            id: "W4",
            family: "W4",
            work: format!(
                "{} random file, 1% of its 4 KiB blocks rewritten",
                mib(w4_mb)
            ),
            generate: big(1, w4_mb, false),
            edit: Some(s(&["--mode", "blocks", "--pct", "1", "--seed", "1"])),
            resync: true,
            place: Place::Wan,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::WireAndTime,
        },
        Spec {
            id: "W5",
            family: "W5",
            work: format!("{} text-like file, 100 short inserts", mib(w5_mb)),
            generate: big(1, w5_mb, true),
            edit: Some(s(&["--mode", "insert", "--count", "100", "--seed", "1"])),
            resync: true,
            place: Place::Wan,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::WireRatio { max: 1.5 },
        },
        Spec {
            id: "L1a",
            family: "L1",
            work: format!("local first copy, {} in 4 random files", mib(4 * l1_mb)),
            generate: big(4, l1_mb, false),
            edit: None,
            resync: false,
            place: Place::Local,
            with_cp: true,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::LocalCopy {
                cp_max: 1.2,
                rsync_max: 1.0,
            },
        },
        Spec {
            id: "L1b",
            family: "L1",
            work: format!("local first copy, {l1_n} files of 1–64 KiB"),
            generate: tree(l1_n, 1, 64),
            edit: None,
            resync: false,
            place: Place::Local,
            with_cp: true,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::LocalCopy {
                cp_max: 1.2,
                rsync_max: 1.0,
            },
        },
        Spec {
            id: "M1",
            family: "M1",
            work: format!("{m1_n} files of 1 KiB, nothing changed, local re-sync"),
            generate: tree(m1_n, 1, 1),
            edit: None,
            resync: true,
            place: Place::Local,
            with_cp: false,
            sample_rss: true,
            rsync_as_in: None,
            target: Target::ResyncRss { rss_mb: 64.0 },
        },
        Spec {
            id: "P1",
            family: "P1",
            work: format!(
                "{p1_n} files of 1 KiB in {} directories, {} of them changed, pass over a list of the changed ones",
                leaf_dirs(p1_n),
                listed_dirs(p1_n)
            ),
            generate: tree(p1_n, 1, 1),
            // Applied to each changed directory: rewrites, deletes, adds and renames files.
            edit: Some(vec!["--mode".into(), "files".into(), "--pct".into(), "5".into()]),
            resync: true,
            place: Place::Listed,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::ListedPass { max: 1.0 / 20.0 },
        },
        Spec {
            id: "V1",
            family: "V1",
            work: format!(
                "`qemu-img convert -n -t none` of a {} random image into a volume's NBD export",
                mib(v1_mb)
            ),
            generate: big(1, v1_mb, false),
            edit: None,
            resync: false,
            place: Place::VolumeConvert,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::ThroughputShare { min: 0.8 },
        },
        Spec {
            id: "V2",
            family: "V2",
            work: format!(
                "`qemu-img bench -w -t none -s 4096 -d 32 -c {v2_writes}` into a {} volume's NBD export",
                mib(v1_mb)
            ),
            generate: big(1, v1_mb, false),
            edit: None,
            resync: false,
            place: Place::VolumeWrites { count: v2_writes },
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::ThroughputShare { min: 0.5 },
        },
        Spec {
            id: "V3",
            family: "V3",
            work: format!(
                "the pass after 1% of a {} volume's 16 KiB blocks were written, to a loopback daemon",
                mib(v3_mb)
            ),
            generate: big(1, v3_mb, false),
            edit: None,
            resync: true,
            place: Place::VolumePass,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::VolumePass {
                time_max: 1.0 / 20.0,
                reads_max: 2.0,
            },
        },
        Spec {
            id: "T1",
            family: "T1",
            work: format!(
                "TLS vs plaintext, loopback daemon, {TLS_COST_CONNECTIONS} connections, {} in 4 random files",
                mib(4 * t1_mb)
            ),
            generate: big(4, t1_mb, false),
            edit: None,
            resync: false,
            place: Place::Loopback,
            with_cp: false,
            sample_rss: false,
            rsync_as_in: None,
            target: Target::TlsCost { max: 0.15 },
        },
    ]
}
