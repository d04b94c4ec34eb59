//! V3, the final pass of a volume after 1% of its blocks were written: a `cutover serve`
//! hosts the volume (a copy of the base image as its backing) and a second daemon on
//! 127.0.0.1 receives two copies of it, `changed.img` and `full.img`, each made by a first
//! pass. Then qemu-io writes 1% of the volume's 16 KiB blocks (spread at random) through the
//! export, and two passes are timed: `cutover sync volume:bench …/changed.img` (the cutover
//! column: only the written blocks are read and sent) and `cutover sync --checksum
//! volume:bench …/full.img` (the peer's column: today's whole-device pass, which reads and
//! hashes the whole volume on both sides). Bytes read are counted on each side from
//! `/proc/PID/io` (`rchar`: every read call, the page cache included): the client's by a
//! shell that waits for it and prints its own counters (which include the child's), the
//! destination daemon's before and after. Afterwards both copies must equal the backing.

use crate::report::WorkloadResult;
use crate::tools::{self, Daemon, Env, ToolRun, Transport};
use crate::volume_io::{same_bytes, VolumeHost, VOLUME};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;

/// The volume's block size (the default of `create-md`).
const BLOCK: u64 = 16 << 10;
/// qemu-io commands per invocation.
const WRITES_PER_RUN: usize = 512;

/// Bytes a process (with the children it waited for) has read, from `/proc/PID/io` text.
fn rchar_of(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .and_then(|n| n.trim().parse().ok())
}

fn rchar(pid: i32) -> Option<u64> {
    rchar_of(&fs::read_to_string(format!("/proc/{pid}/io")).ok()?)
}

/// `count` distinct blocks of `blocks`, spread at random (a fixed seed: the same run after
/// run), in disk order.
fn chosen_blocks(blocks: u64, count: u64) -> Vec<u64> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count.min(blocks) {
        // xorshift64*: any fixed spread will do.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        picked.insert(state.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks);
    }
    picked.into_iter().collect()
}

/// Write one 16 KiB pattern into each of `blocks` through the export.
fn write_blocks(uri: &str, blocks: &[u64], logs: &Path) -> Result<()> {
    for (n, batch) in blocks.chunks(WRITES_PER_RUN).enumerate() {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw", uri]);
        for (i, b) in batch.iter().enumerate() {
            let pattern = (n * WRITES_PER_RUN + i) % 251 + 1;
            cmd.arg("-c")
                .arg(format!("write -q -P {pattern} {} {BLOCK}", b * BLOCK));
        }
        let out = cmd
            .output()
            .with_context(|| format!("cannot run qemu-io (qemu-utils) for {uri}"))?;
        if !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed") {
            let log = logs.join("qemu-io.log");
            let _ = fs::write(&log, [out.stdout, out.stderr].concat());
            bail!("qemu-io failed writing the volume; see {}", log.display());
        }
    }
    Ok(())
}

/// One pass `cutover sync --json EXTRA volume:bench URL`, timed, with the bytes read on
/// each side added to its report (`source_read_bytes`, `destination_read_bytes`).
#[allow(clippy::too_many_arguments)]
fn timed_pass(
    env: &Env,
    tool: &str,
    extra: &[&str],
    host: &VolumeHost,
    dest: &Daemon,
    url: &str,
    logs: &Path,
    log_name: &str,
) -> ToolRun {
    let mut inner = Command::new(tools::cutover_program(env));
    inner.args(["sync", "--json"]).args(extra);
    dest.client_trust(&mut inner);
    inner
        .arg("--volume-config")
        .arg(&host.config)
        .arg(format!("volume:{VOLUME}"))
        .arg(url);
    // The shell prints its counters after waiting for cutover: they then include cutover's.
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("\"$@\"; rc=$?; cat /proc/$$/io >&2; exit $rc")
        .arg("sh")
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        if let Some(v) = v {
            cmd.env(k, v);
        }
    }
    let before = dest.pid().and_then(rchar);
    let mut run = tools::cutover_timed(env, tool, &mut cmd, logs, log_name, false);
    let after = dest.pid().and_then(rchar);
    let source = run
        .logs
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "stderr"))
        .and_then(|p| fs::read_to_string(p).ok())
        .and_then(|t| rchar_of(&t));
    if let Some(serde_json::Value::Object(report)) = run.report.as_mut() {
        report.insert("source_read_bytes".into(), source.into());
        report.insert(
            "destination_read_bytes".into(),
            before.zip(after).map(|(b, a)| a.saturating_sub(b)).into(),
        );
    }
    run
}

/// Run V3 with `image` (the base set's one file) as the volume's first content.
pub fn run(
    env: &Env,
    image: &Path,
    run_dir: &Path,
    logs: &Path,
    res: &mut WorkloadResult,
) -> Result<()> {
    let bin = tools::cutover_bin(env)?;
    let backing = run_dir.join("backing.img");
    eprintln!("  copying the image to the volume's backing");
    fs::copy(image, &backing).with_context(|| format!("copy to {}", backing.display()))?;
    let size = fs::metadata(&backing)?.len();
    let host = VolumeHost::start(&bin, &run_dir.join("host"), &backing, logs)?;
    let dst = run_dir.join("dst");
    fs::create_dir_all(&dst)?;
    let dest = Daemon::start(
        &bin,
        &run_dir.join("dest"),
        &dst,
        Transport::Tls,
        &logs.join("dest-serve.log"),
    )?;
    let url = |name: &str| format!("cutover://127.0.0.1:{}/bench/{name}", dest.port);

    // First passes: each destination gets the whole volume (untimed).
    for name in ["changed.img", "full.img"] {
        let first = timed_pass(
            env,
            &format!("first pass to {name}"),
            &[],
            &host,
            &dest,
            &url(name),
            logs,
            &format!("first-{name}"),
        );
        if !first.ok() {
            bail!(
                "the first pass to {name} failed: {}",
                first.error.unwrap_or_default()
            );
        }
    }
    let blocks = chosen_blocks(size.div_ceil(BLOCK), size.div_ceil(BLOCK) / 100);
    eprintln!(
        "  writing {} blocks of 16 KiB (1% of the volume) through the export",
        blocks.len()
    );
    write_blocks(&host.uri, &blocks, logs)?;
    res.edit = Some(format!(
        "qemu-io: {} random 16 KiB blocks ({} bytes) written through the export",
        blocks.len(),
        blocks.len() as u64 * BLOCK
    ));

    res.order.push("cutover changed-block pass".into());
    res.cutover = Some(timed_pass(
        env,
        "cutover changed-block pass",
        &[],
        &host,
        &dest,
        &url("changed.img"),
        logs,
        "cutover-changed",
    ));
    res.order
        .push("cutover whole-device pass (--checksum)".into());
    res.rsync = Some(timed_pass(
        env,
        "cutover whole-device pass",
        &["--checksum"],
        &host,
        &dest,
        &url("full.img"),
        logs,
        "cutover-full",
    ));
    if let Some(serde_json::Value::Object(r)) = res.cutover.as_mut().and_then(|c| c.report.as_mut())
    {
        r.insert("dirty_bytes".into(), (blocks.len() as u64 * BLOCK).into());
    }
    let mut daemon = host.daemon;
    let stopped = daemon.stop(std::time::Duration::from_secs(15));
    dest.stop().context("the destination daemon")?;
    stopped.context("the volume's daemon")?;
    let changed = same_bytes(&backing, &dst.join("changed.img"));
    let full = same_bytes(&backing, &dst.join("full.img"));
    res.verify = Some(match (changed.differing_lines, full.differing_lines) {
        (Some(0), Some(0)) => changed,
        (Some(0), _) => full,
        _ => changed,
    });
    if res
        .verify
        .as_ref()
        .is_some_and(|v| v.differing_lines != Some(0))
    {
        eprintln!("  a copy differs from the backing");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_blocks_are_distinct_spread_and_the_same_every_time() {
        let a = chosen_blocks(262_144, 2621);
        assert_eq!(a.len(), 2621);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!(a[0] < 2000 && *a.last().unwrap() > 260_000);
        assert_eq!(a, chosen_blocks(262_144, 2621));
        assert_eq!(chosen_blocks(10, 20).len(), 10);
    }

    #[test]
    fn rchar_is_read_from_proc_io_text() {
        let text = "rchar: 1234\nwchar: 5\nsyscr: 1\n";
        assert_eq!(rchar_of(text), Some(1234));
        assert_eq!(rchar_of("wchar: 5\n"), None);
    }
}
