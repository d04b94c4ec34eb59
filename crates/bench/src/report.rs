//! Results: the machine description, the raw JSON (`results.json`) and the Markdown report
//! (`BENCH.md`) with the side-by-side table, notes and per-workload details.

use crate::calib::Calibration;
use crate::data::TreeStats;
use crate::tls_cost::TlsCost;
use crate::tools::{Link, ToolRun, Verify};
use crate::workloads::cutover_peak_kb;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub cpu: String,
    pub kernel: String,
    pub work_fs: String,
    /// Free space in the work directory's filesystem at the start, GB.
    pub work_free_gb: f64,
    pub rsync: String,
    pub python: String,
    pub ssh: String,
    pub cutover_binary: String,
    pub cutover_git: String,
}

fn first_line(cmd: &mut Command) -> String {
    match cmd.output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        }
        Err(_) => "not found".into(),
    }
}

/// Filesystem type of the mount holding `path`, from /proc/mounts (longest prefix).
fn fs_type(path: &Path) -> String {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    let p = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(mnt), Some(ty)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if p.starts_with(mnt) && best.as_ref().is_none_or(|(l, _)| mnt.len() > *l) {
            best = Some((mnt.len(), ty.to_string()));
        }
    }
    best.map(|(_, t)| t).unwrap_or_else(|| "unknown".into())
}

/// Bytes available to this user in the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain old data; zeroed is a valid value for it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

impl Machine {
    pub fn probe(work: &Path, repo: &Path, cutover: &Result<PathBuf, String>) -> Self {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kb: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let rev = first_line(Command::new("git").arg("-C").arg(repo).args([
            "rev-parse",
            "--short",
            "HEAD",
        ]));
        let dirty = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["status", "--porcelain", "--untracked-files=no"])
            .output()
            .map(|o| !o.stdout.is_empty())
            .unwrap_or(false);
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            mem_total_mib: mem_kb / 1024,
            cpu,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            work_fs: fs_type(work),
            work_free_gb: free_bytes(work).unwrap_or(0) as f64 / 1e9,
            rsync: first_line(Command::new("rsync").arg("--version")),
            python: first_line(Command::new("python3").arg("--version")),
            ssh: first_line(Command::new("ssh").arg("-V")),
            cutover_binary: match cutover {
                Ok(p) => p.display().to_string(),
                Err(_) => "(missing)".into(),
            },
            cutover_git: format!(
                "{rev}{}",
                if dirty {
                    " (with uncommitted changes)"
                } else {
                    ""
                }
            ),
        }
    }
}

/// One row's full record.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    pub id: String,
    pub work: String,
    pub place: String,
    /// The mkdata command that made the base set, and whether it was cached.
    pub generate: String,
    pub base_cached: bool,
    pub edit: Option<String>,
    pub source: TreeStats,
    /// The order the tools ran in.
    pub order: Vec<String>,
    pub cutover: Option<ToolRun>,
    pub rsync: Option<ToolRun>,
    pub cp: Option<ToolRun>,
    /// T1's repeated runs of both variants (T1 has no single cutover run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cost: Option<TlsCost>,
    pub verify: Option<Verify>,
    pub target: String,
    pub met: Option<bool>,
    pub judged: String,
    /// A failure setting the workload up (data, copies).
    pub error: Option<String>,
}

impl WorkloadResult {
    /// Every tool run of the row.
    pub fn runs(&self) -> impl Iterator<Item = &ToolRun> {
        [&self.cutover, &self.rsync, &self.cp]
            .into_iter()
            .flatten()
            .chain(self.tls_cost.iter().flat_map(TlsCost::runs))
    }

    /// Every verification of the row.
    pub fn verifies(&self) -> impl Iterator<Item = &Verify> {
        self.verify
            .iter()
            .chain(self.tls_cost.iter().flat_map(TlsCost::verifies))
    }

    /// Whether the tools crossed the emulated link, so wire bytes were counted.
    fn over_wan(&self) -> bool {
        matches!(self.place.as_str(), "wan" | "wan-ssh" | "wan-replica")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub date: String,
    pub command: String,
    pub scale: f64,
    pub link: Link,
    pub machine: Machine,
    pub calibration: Option<Calibration>,
    pub calibration_error: Option<String>,
    pub workloads: Vec<WorkloadResult>,
}

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn f_s(x: Option<f64>) -> String {
    match x {
        Some(s) if s >= 100.0 => format!("{s:.0}"),
        Some(s) if s >= 10.0 => format!("{s:.1}"),
        Some(s) => format!("{s:.2}"),
        None => "—".into(),
    }
}

fn f_mb(b: Option<u64>) -> String {
    match b {
        Some(b) => {
            let mb = b as f64 / 1e6;
            if mb >= 100.0 {
                format!("{mb:.0}")
            } else if mb >= 1.0 {
                format!("{mb:.1}")
            } else {
                format!("{mb:.3}")
            }
        }
        None => "—".into(),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "—".into(),
    }
}

fn ok_secs(r: &Option<ToolRun>) -> Option<f64> {
    r.as_ref().filter(|r| r.ok()).and_then(|r| r.seconds)
}

fn ok_wire(r: &Option<ToolRun>) -> Option<u64> {
    r.as_ref().filter(|r| r.ok()).and_then(|r| r.wire_bytes)
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn verified(w: &WorkloadResult) -> String {
    if let Some(t) = &w.tls_cost {
        let (tls, plain) = (verdict(&t.tls.verify), verdict(&t.plaintext.verify));
        return if tls == plain {
            tls
        } else {
            format!("TLS {tls}, plaintext {plain}")
        };
    }
    verdict(&w.verify)
}

fn verdict(v: &Option<Verify>) -> String {
    match v {
        Some(v) if v.ok() => "verified".into(),
        Some(v) => match (v.differing_lines, &v.error) {
            (_, Some(e)) if v.command.is_empty() => format!("not run ({e})"),
            (_, Some(_)) => "verify failed".into(),
            (Some(n), None) => format!("{n} differing lines"),
            (None, None) => "—".into(),
        },
        None => "—".into(),
    }
}

fn row(w: &WorkloadResult) -> String {
    let c_s = ok_secs(&w.cutover);
    let r_s = ok_secs(&w.rsync);
    let cp_s = ok_secs(&w.cp);
    let (peer_s, peer_ratio) = if let Some(t) = &w.tls_cost {
        (
            format!("plaintext {}", f_s(t.plaintext.median_s)),
            ratio(t.tls.median_s, t.plaintext.median_s),
        )
    } else if w.cp.is_some() {
        (
            format!("rsync {} / cp {}", f_s(r_s), f_s(cp_s)),
            format!("{} / {}", ratio(c_s, r_s), ratio(c_s, cp_s)),
        )
    } else {
        (f_s(r_s), ratio(c_s, r_s))
    };
    let (cw, rw, wr) = if w.over_wan() {
        let c = ok_wire(&w.cutover);
        let r = ok_wire(&w.rsync);
        (
            f_mb(c),
            f_mb(r),
            ratio(c.map(|x| x as f64), r.map(|x| x as f64)),
        )
    } else {
        ("—".into(), "—".into(), "—".into())
    };
    let cut_cell = match (&w.cutover, &w.tls_cost) {
        (_, Some(t)) if t.tls.median_s.is_some() => format!("TLS {}", f_s(t.tls.median_s)),
        (Some(r), _) if r.ok() => f_s(r.seconds),
        (Some(_), _) => "failed".into(),
        (None, Some(t)) if t.runs().next().is_some() => "failed".into(),
        (None, _) if w.error.is_some() => "setup failed".into(),
        (None, _) => "—".into(),
    };
    let met = match w.met {
        // R1–R5's and R7's figure is not a time ratio: the verdict carries it.
        Some(true) if w.place == "wan-replica" => format!("yes ({})", w.judged),
        Some(true) => "yes".into(),
        Some(false) => format!("**no** ({})", w.judged),
        None => "—".into(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        w.id,
        cell(&w.work),
        cut_cell,
        peer_s,
        peer_ratio,
        cw,
        rw,
        wr,
        cell(&w.target),
        cell(&met),
        cell(&verified(w)),
    )
}

fn tool_detail(out: &mut String, r: &ToolRun) {
    let _ = write!(out, "- {}: `{}`", r.tool, r.command);
    if let Some(s) = r.seconds {
        let _ = write!(out, " — {} s", f_s(Some(s)));
    }
    if let Some(b) = r.wire_bytes {
        let _ = write!(out, ", {} MB on the wire", f_mb(Some(b)));
    }
    if let Some(c) = r.connections {
        let _ = write!(out, " over {c} TCP connection(s)");
    }
    if let Some(kb) = r.max_rss_kb {
        let _ = write!(out, ", peak RSS (wait4) {:.1} MB", kb as f64 * 1024.0 / 1e6);
        if r.server_rss_kb.is_some() {
            out.push_str(" (client)");
        }
    }
    if let Some(kb) = r.server_rss_kb {
        let _ = write!(
            out,
            ", `cutover serve` peak RSS {:.1} MB",
            kb as f64 * 1024.0 / 1e6
        );
    }
    if let Some(row) = &r.measured_in {
        let _ = write!(
            out,
            " (measured in {row}: the same command on the same data)"
        );
    }
    out.push('\n');
    if !r.process_peaks.is_empty() {
        let list = r
            .process_peaks
            .iter()
            .map(|p| {
                format!(
                    "{} (pid {}) {:.1} MB",
                    p.name,
                    p.pid,
                    p.vm_hwm_kb as f64 * 1024.0 / 1e6
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(out, "  - sampled peak RSS per process: {list}");
    }
    if let Some(rep) = &r.report {
        let _ = writeln!(out, "  - reported: `{rep}`");
    }
    if let Some(e) = &r.error {
        let e: String = e.chars().take(1500).collect();
        let _ = writeln!(out, "  - **error**: {}", e.replace('\n', " ⏎ "));
    }
}

fn verify_detail(out: &mut String, label: &str, v: &Verify) {
    match (&v.error, v.differing_lines) {
        (Some(e), _) => {
            let _ = writeln!(out, "- {label}: {e}");
        }
        (None, Some(0)) => {
            let _ = writeln!(
                out,
                "- {label}: `{}` printed nothing ({} s)",
                v.command,
                f_s(v.seconds)
            );
        }
        (None, n) => {
            let _ = writeln!(
                out,
                "- {label}: `{}` printed {} lines, first: `{}`",
                v.command,
                n.unwrap_or(0),
                v.sample.join("`, `")
            );
        }
    }
}

/// T1: each variant's median, daemon and runs, then the cost.
fn tls_cost_detail(out: &mut String, t: &TlsCost) {
    let _ = writeln!(out, "- source and destinations in `{}`", t.data_dir);
    for (name, v) in [("TLS", &t.tls), ("plaintext", &t.plaintext)] {
        let succeeded = v.runs.iter().filter(|r| r.ok()).count();
        let _ = write!(
            out,
            "- {name}: median {} s of {succeeded} successful run(s) ({} asked for)",
            f_s(v.median_s),
            t.repetitions
        );
        if let Some(kb) = v.server_rss_kb {
            let _ = write!(
                out,
                ", `cutover serve` peak RSS {:.1} MB",
                kb as f64 * 1024.0 / 1e6
            );
        }
        out.push('\n');
        for r in &v.runs {
            tool_detail(out, r);
        }
        if let Some(verify) = &v.verify {
            verify_detail(out, &format!("verify ({name}, last run)"), verify);
        }
    }
    if let Some(cost) = t.cost {
        let _ = writeln!(
            out,
            "- TLS costs {:.1}% of throughput (1 − {} s ÷ {} s)",
            cost * 100.0,
            f_s(t.plaintext.median_s),
            f_s(t.tls.median_s)
        );
    }
}

pub fn markdown(r: &Results, repro: &str, work: &Path) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# cutover benchmarks\n");
    let _ = writeln!(
        o,
        "Run {} at scale {} on {} CPUs ({}), {:.1} GiB RAM, Linux {}, work dir on {} ({:.0} GB free).  ",
        r.date,
        r.scale,
        m.nproc,
        m.cpu,
        m.mem_total_mib as f64 / 1024.0,
        m.kernel,
        m.work_fs,
        m.work_free_gb
    );
    let _ = writeln!(
        o,
        "cutover {} at `{}`; {}; {}; {}.\n",
        m.cutover_git, m.cutover_binary, m.rsync, m.ssh, m.python
    );
    let _ = writeln!(o, "Reproduce:\n\n```sh\n{repro}\n```\n");
    if r.scale != 1.0 {
        let _ = writeln!(
            o,
            "> **Scale {}**: data sizes and file counts are {}× those of the table the targets \
             were set for, so fixed costs (start-up, handshakes, RTTs) weigh more; \
             the verdicts below are indicative only.\n",
            r.scale, r.scale
        );
    }
    let _ = writeln!(
        o,
        "WAN link (W*): `wanem.py {}` (MB = 10^6 bytes).\n",
        crate::tools::shell_words(&r.link.args())
    );
    let _ = writeln!(
        o,
        "| id | work | cutover s | rsync s (or cp s; T1: plaintext s; P1: full pass s) | ratio | cutover wire MB | rsync wire MB | ratio | target | met? | verified |"
    );
    let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|");
    for w in &r.workloads {
        let _ = writeln!(o, "{}", row(w));
    }
    o.push('\n');
    if let Some(c) = &r.calibration {
        let _ = writeln!(
            o,
            "Link calibration (wanem alone, zero bytes from an in-process source to an in-process sink): \
             1 flow carried {:.2} MB/s; {} flows carried {:.1} MB/s = {:.0}% of the {} MB/s link. \
             Link targets above are measured against the nominal link, not this figure.\n",
            c.single.mb_per_s,
            c.parallel.flows,
            c.parallel.mb_per_s,
            c.parallel.mb_per_s / r.link.total_mbps * 100.0,
            r.link.total_mbps
        );
    } else if let Some(e) = &r.calibration_error {
        let _ = writeln!(o, "Link calibration failed: {e}\n");
    }
    let _ = writeln!(o, "## How it was measured\n");
    let notes = [
        "Ratios are cutover ÷ peer (below 1 is better for cutover). Times are wall-clock seconds of the transfer command alone: for cutover over the WAN, `cutover sync` with `cutover serve` and wanem already listening; for rsync, the seconds `peers.sh` reports around its `rsync` command (its sshd and wanem start before the clock).",
        "Wire bytes are wanem's `bytes_total` (both directions, as relayed; ssh's or cutover's own framing and encryption included). rsync runs as `peers.sh` runs it: `rsync -aHX --delete` over ssh to a private loopback sshd through wanem; cutover gets `--delete -H -X` to match. Local runs use plain `rsync -a` and `cutover sync` with no options.",
        "Link throughput = bytes of the source's regular files ÷ cutover's seconds.",
        "Each tool runs once, without warm-up, in a fixed order (WAN and M1: cutover first, then rsync; L1: `cp -a`, then rsync, then cutover), except V1: five rounds of both `qemu-img` commands, each on fresh sparse files and a fresh daemon, which goes first alternating; its cells are each side's median, every round's seconds in the details (`rounds_s`). The page cache is not dropped between runs (it cannot be on every machine); the source was written or copied just before, so it is usually cached for every tool alike. Before each timed run (untimed) `sync(2)` writes back whatever earlier steps left dirty, so no tool pays for another's writes; a tool's own writeback is its own business (`cp -a` and rsync do not sync; cutover by default ends with one filesystem sync, see `cutover sync --help`, `--fsync`).",
        "W1s moves W1's data with cutover over ssh: `cutover sync --json --delete -H -X -e 'ssh -p RELAY -i KEY -o …' --remote-cutover BIN SRC/ root@127.0.0.1:DST/`, through a wanem relay in front of the private loopback sshd of `peers.sh sshd`, with the client key and ssh options peers.sh gives rsync; every cutover connection is one ssh process and one TCP flow across the emulated link, as rsync's one is. Its rsync figures are W1's run (the same command on the same data) when W1 ran in the same invocation, else measured anew; its target is W1's.",
        "T1 measures what TLS costs, without the emulator: two `cutover serve` on 127.0.0.1, one with TLS (the default) and one with `insecure_plaintext = true`; `cutover sync --json -j 8 SRC/ cutover://127.0.0.1:PORT/bench/` (with `--insecure-plaintext` for the second) runs against each in turn, `--t1-repetitions` times each (TLS first in every pair), every run into an empty destination, source and destination on /dev/shm when it has room for both (else the work dir). Client and daemon share this machine's cores. Its cells: cutover s = TLS's median, the peer = plaintext's median, ratio = TLS ÷ plaintext; TLS's cost = 1 − plaintext's median ÷ TLS's median, the share of throughput it loses. Each variant's last destination is verified.",
        "First copies (W1, W1s, W2, L1, T1) start from empty destinations. Re-syncs (W3, W4, W5, M1) start from destinations made with `cp -a` of the cached base set (same mtimes); the edit is applied to a fresh `cp -a` copy of the base, which is the source (W3 and M1 have no edit and use the base itself).",
        "Base sets are made by `mkdata.py` (fixed seed) and cached under the work dir by their exact arguments, so W3 and L1b share one; destinations and edited sources are made anew every run and removed afterwards.",
        "Verification: `rsync -anHAX --delete --checksum --itemize-changes SRC/ DST/` on cutover's destination; every line it prints is one difference (content, size, time, mode, owner, ACL, xattr, missing or extra entry), so \"verified\" means none.",
        "mkdata's edits only touch files of 8 MiB or more, so W4 and W5 never go below 8 MiB at small scales; the edits themselves (1% of blocks, 100 inserts of 1–512 bytes) are not scaled.",
        "L1's two targets (≤ 1.2× `cp -a`, ≤ rsync's time) are applied to both halves, large files (L1a) and small files (L1b).",
        "P1's data is M1's layout (`mkdata.py tree`, 100 files to a directory). The destination and the source start as `cp -a` copies of the base. Timed first, in the peer's column: `cutover sync --json --delete BASE/ DST/`, a full pass with nothing to change. Then `mkdata.py edit DIR --mode files --pct 5` runs in 0.1% of the source's directories (evenly spread), and `cutover sync --json --delete --files-from LIST SRC/ DST/` is timed with LIST naming exactly those directories. Verification compares the whole source with the whole destination, so a change the list missed would show.",
        "M1's data is `mkdata.py tree --min-kb 1 --max-kb 1`: every file is exactly 1 KiB, the smallest non-empty size mkdata makes (about 1 GB of data but 4 GB on disk per copy with 4 KiB blocks; three copies exist during the run). Entries counted = files + directories.",
        "R1–R5 replicate a volume between two `cutover serve` on 127.0.0.1 (`replication.rs` says how): the primary dials the secondary through wanem with 40 data connections; the initial full sync runs untimed over direct loopback first. cutover s is the timed phase (R1, R2: from `cutover volume connect` to the peer in step; R3: the writer's run; R4: the sum of the FUA writes' latencies; R5: from the restart after kill -9 to the peer in step); the peer's column is raw TCP through a wanem of its own (R1: the same bytes over 40 flows; R4: as many 4 KiB round trips); wire bytes: R1, R2 and R5 the timed phase's alone (a fresh relay on the same port), R3 and R4 all since the primary was routed through the relay (its reconnection, the run, the drain after it). Verification: `cmp` of the two backings at the end.",
        "R7 runs three `cutover serve` (`replication_three.rs` says how): alpha the primary and beta its partner in protocol C over direct loopback, gamma in protocol A, the links alpha→gamma and beta→gamma each through a wanem of its own; the initial full syncs run untimed. A paced writer at half the link writes into alpha, alpha is killed with `kill -9` while it writes, beta is promoted with `cutover volume primary` and 1 MiB writes at distinct offsets in random order go into beta's export. cutover s is from the promotion until gamma is in step with beta, drained and UpToDate; the figure is `bytes_up` of beta's relay (beta→gamma, since the relay started) against the bytes written after the failover; wire bytes are that relay's `bytes_total`. Verification: `cmp` of beta's and gamma's backings.",
        "Peak RSS is `ru_maxrss` from `wait4` on the tool's top process. The kernel reports the largest of that process and every descendant it waited for, so rsync's figure is the largest of its sender, receiver and generator (not their sum). Each process's VmHWM is also sampled every 100 ms from /proc and listed in the details. A local cutover sync is one process holding both sides, so its figure bounds each side.",
    ];
    for n in notes {
        let _ = writeln!(o, "- {n}");
    }
    let _ = writeln!(
        o,
        "- Raw results: `{}`; logs of every command: `{}`.\n",
        work.join("results.json").display(),
        work.join("logs").display()
    );
    let _ = writeln!(o, "## Details\n");
    for w in &r.workloads {
        let _ = writeln!(o, "### {} — {}\n", w.id, w.work);
        let _ = writeln!(
            o,
            "- data: `{}`{} — files: {}, directories: {}, entries: {}, bytes: {} MB",
            w.generate,
            if w.base_cached { " (cached)" } else { "" },
            w.source.files,
            w.source.dirs,
            w.source.entries(),
            f_mb(Some(w.source.bytes))
        );
        if let Some(e) = &w.edit {
            let _ = writeln!(o, "- edit: `{e}`");
        }
        if let Some(e) = &w.error {
            let _ = writeln!(o, "- **setup error**: {}", e.replace('\n', " ⏎ "));
        }
        for r in [&w.cutover, &w.rsync, &w.cp].into_iter().flatten() {
            tool_detail(&mut o, r);
        }
        if let Some(t) = &w.tls_cost {
            tls_cost_detail(&mut o, t);
        }
        if let Some(c) = &w.cutover {
            if w.place == "local" {
                if let Some(kb) = cutover_peak_kb(c) {
                    let _ = writeln!(o, "- cutover peak RSS: {:.1} MB", kb as f64 * 1024.0 / 1e6);
                }
            }
        }
        if let Some(v) = &w.verify {
            verify_detail(&mut o, "verify", v);
        }
        let verdict = match w.met {
            Some(true) => "met",
            Some(false) => "**not met**",
            None => "cannot tell",
        };
        let _ = writeln!(o, "- target {}: {verdict} ({})\n", w.target, w.judged);
    }
    o
}

pub fn write(r: &Results, repro: &str, work: &Path, out: &Path) -> Result<()> {
    let json = work.join("results.json");
    fs::write(&json, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("write {}", json.display()))?;
    if let Some(d) = out.parent() {
        if !d.as_os_str().is_empty() {
            fs::create_dir_all(d)?;
        }
    }
    fs::write(out, markdown(r, repro, work)).with_context(|| format!("write {}", out.display()))
}
