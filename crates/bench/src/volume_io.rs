//! V1 and V2: a volume's NBD export against its backing written directly. A `cutover serve`
//! whose config has only one `[[volume]]` (a fresh sparse file as backing, metadata made by
//! `cutover volume create-md`) exports it on a Unix socket; the same `qemu-img` command runs
//! into the export (the cutover column) and on a second file of the same size directly (the
//! peer's column), in several rounds for V1 (the medians are compared). V1 copies an image in (`qemu-img convert -n -t none`), V2
//! writes 4 KiB blocks 32 deep (`qemu-img bench -w -t none -s 4096 -d 32`). Afterwards the
//! backing must hold exactly what the direct run wrote.

use crate::proc::{describe, stdout_of, Background};
use crate::report::WorkloadResult;
use crate::tools::{self, Env, ToolRun, Verify};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// What the `qemu-img` command does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeIo {
    /// `qemu-img convert` of the base image into the target (V1).
    Convert,
    /// `qemu-img bench -w` of `count` 4 KiB writes (V2).
    Writes { count: u64 },
}

/// Name of the volume, and of its NBD export.
pub const VOLUME: &str = "bench";

/// The `qemu-img` command for `io` writing into `target` (a file or an NBD URI).
fn qemu_img(io: VolumeIo, image: &Path, target: &str) -> Command {
    let mut cmd = Command::new("qemu-img");
    match io {
        VolumeIo::Convert => {
            cmd.args(["convert", "-n", "-t", "none", "-f", "raw", "-O", "raw"])
                .arg(image)
                .arg(target);
        }
        VolumeIo::Writes { count } => {
            cmd.args([
                "bench", "-w", "-t", "none", "-s", "4096", "-d", "32", "-f", "raw",
            ])
            .arg("-c")
            .arg(count.to_string())
            .arg(target);
        }
    }
    cmd
}

/// A `cutover serve` hosting one volume, `bench`, on `backing` (its metadata made by
/// `cutover volume create-md`), exported on a Unix socket.
pub struct VolumeHost {
    pub daemon: Background,
    /// The daemon's config (for `--volume-config`).
    pub config: std::path::PathBuf,
    /// `nbd+unix:///bench?socket=…`.
    pub uri: String,
}

impl VolumeHost {
    /// Write the config into `run_dir`, make the metadata and start the daemon; returns once
    /// the export is up.
    pub fn start(bin: &Path, run_dir: &Path, backing: &Path, logs: &Path) -> Result<VolumeHost> {
        let state = run_dir.join("state");
        fs::create_dir_all(&state)?;
        let config = run_dir.join("serve.toml");
        fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\n[[volume]]\nname = \"{VOLUME}\"\nbacking = {:?}\n",
                state.display().to_string(),
                backing.display().to_string()
            ),
        )?;
        create_md(bin, &config, VOLUME)?;
        let (daemon, _) = serve(
            bin,
            &config,
            &run_dir.join("serve.port"),
            &logs.join("serve.log"),
        )?;
        Ok(VolumeHost {
            daemon,
            config,
            uri: export_uri(&state),
        })
    }
}

/// `nbd+unix:///bench?socket=STATE/bench.sock`: the export of a daemon whose state_dir is
/// `state`.
pub fn export_uri(state: &Path) -> String {
    format!(
        "nbd+unix:///{VOLUME}?socket={}",
        state.join(format!("{VOLUME}.sock")).display()
    )
}

/// `cutover volume create-md NAME --config CONFIG`.
pub fn create_md(bin: &Path, config: &Path, name: &str) -> Result<()> {
    let mut create = Command::new(bin);
    create
        .args(["volume", "create-md", name, "--config"])
        .arg(config);
    stdout_of(&mut create).map(drop)
}

/// `cutover serve --config CONFIG --port-file PORT_FILE`, returned once it listens (its
/// volumes are served before the listener binds, so the port means the exports are up).
pub fn serve(bin: &Path, config: &Path, port_file: &Path, log: &Path) -> Result<(Background, u16)> {
    // A port left by an earlier daemon in the same directory must not be taken for ours.
    let _ = fs::remove_file(port_file);
    let mut daemon = Background::spawn(
        "cutover serve",
        Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .arg("--port-file")
            .arg(port_file),
        log,
    )?;
    let port = daemon.wait_port_file(port_file, Duration::from_secs(30))?;
    Ok((daemon, port))
}

/// SIGTERM to a daemon; an error unless it stopped by itself within 15 s, cleanly.
pub fn stop_cleanly(daemon: &mut Background, who: &str) -> Result<()> {
    let (status, killed) = daemon.stop(Duration::from_secs(15))?;
    if killed
        || !(status.success()
            || std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGTERM))
    {
        bail!("{who} did not stop cleanly ({status})");
    }
    Ok(())
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("size {}", path.display()))
}

/// Rounds of V1: one direct write varies by a third between runs on a virtual disk, so the
/// row compares the medians of several (V2's many small writes average out in one run).
const V1_ROUNDS: usize = 5;

/// Run V1 or V2 with `image` (the base set's one file) giving the volume's size: `rounds`
/// of both commands, each round on fresh sparse files and a fresh daemon, the order
/// alternating between rounds. The row's two runs are each side's median; every round's
/// seconds are kept in their reports, and every round's backing must equal its direct file.
pub fn run(
    env: &Env,
    io: VolumeIo,
    image: &Path,
    run_dir: &Path,
    logs: &Path,
    res: &mut WorkloadResult,
) -> Result<()> {
    let bin = tools::cutover_bin(env)?;
    let size = fs::metadata(image)
        .with_context(|| format!("stat {}", image.display()))?
        .len();
    let rounds = match io {
        VolumeIo::Convert => V1_ROUNDS,
        VolumeIo::Writes { .. } => 1,
    };
    let backing = run_dir.join("backing.img");
    let direct = run_dir.join("direct.img");
    let (mut through, mut straight) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let named = |tool: &str| {
            if rounds == 1 {
                tool.to_string()
            } else {
                format!("{tool} (round {round})")
            }
        };
        sparse_file(&backing, size)?;
        sparse_file(&direct, size)?;
        let state = run_dir.join("state");
        let _ = fs::remove_dir_all(&state);
        let host = VolumeHost::start(&bin, run_dir, &backing, logs)?;
        let mut daemon = host.daemon;
        let into_export = || {
            tools::local(
                env,
                &named("qemu-img into the export"),
                &mut qemu_img(io, image, &host.uri),
                logs,
                false,
            )
        };
        let into_file = || {
            tools::local(
                env,
                &named("qemu-img direct"),
                &mut qemu_img(io, image, &direct.display().to_string()),
                logs,
                false,
            )
        };
        // Odd rounds write into the export first, even rounds into the file first.
        let (t, d) = if round % 2 == 1 {
            let t = into_export();
            (t, into_file())
        } else {
            let d = into_file();
            (into_export(), d)
        };
        stop_cleanly(&mut daemon, "cutover serve")?;
        let ok = t.ok();
        through.push(t);
        straight.push(d);
        let verify = if ok {
            same_bytes(&backing, &direct)
        } else {
            Verify::skipped("the run into the export did not finish")
        };
        let differs = verify.differing_lines != Some(0);
        res.verify = Some(verify);
        if differs {
            break;
        }
    }
    res.order = vec![
        format!("qemu-img into the export and into a file directly, {rounds} round(s), alternating which goes first"),
    ];
    res.cutover = median_run(through, "qemu-img into the export");
    res.rsync = median_run(straight, "qemu-img direct");
    Ok(())
}

/// The run of median seconds among `runs` (the lower middle for an even count; a failed run
/// if any failed), named `tool`, with every run's seconds in its report as `rounds_s`.
fn median_run(runs: Vec<ToolRun>, tool: &str) -> Option<ToolRun> {
    let rounds: Vec<Option<f64>> = runs.iter().map(|r| r.seconds).collect();
    let mut pick = match runs.iter().position(|r| !r.ok()) {
        Some(failed) => runs.into_iter().nth(failed)?,
        None => {
            let mut runs = runs;
            runs.sort_by(|a, b| {
                a.seconds
                    .partial_cmp(&b.seconds)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
            let middle = runs.len().checked_sub(1)? / 2;
            runs.into_iter().nth(middle)?
        }
    };
    pick.tool = tool.to_string();
    if rounds.len() > 1 {
        pick.report = Some(serde_json::json!({ "rounds_s": rounds }));
    }
    Some(pick)
}

/// `cmp` of the backing against the file written directly: one differing line when they
/// differ, none when equal.
pub fn same_bytes(backing: &Path, direct: &Path) -> Verify {
    eprintln!("  comparing the backing with the file written directly");
    let mut cmd = Command::new("cmp");
    cmd.arg(backing).arg(direct);
    let mut v = Verify {
        command: describe(&cmd),
        ..Default::default()
    };
    match cmd.output() {
        Ok(out) if out.status.success() => v.differing_lines = Some(0),
        Ok(out) if out.status.code() == Some(1) => {
            v.differing_lines = Some(1);
            v.sample = vec![String::from_utf8_lossy(&out.stdout).trim().to_string()];
        }
        Ok(out) => v.error = Some(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => v.error = Some(format!("cannot run cmp: {e}")),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_of(seconds: Option<f64>) -> ToolRun {
        ToolRun {
            tool: "x".into(),
            seconds,
            error: seconds.is_none().then(|| "failed".to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn the_median_run_stands_for_the_rounds_and_a_failure_is_not_hidden() {
        let runs = [4.0, 3.0, 5.0, 3.5, 9.0].map(|s| run_of(Some(s))).to_vec();
        let m = median_run(runs, "qemu-img direct").expect("a run");
        assert_eq!((m.seconds, m.tool.as_str()), (Some(4.0), "qemu-img direct"));
        assert_eq!(
            m.report.expect("report")["rounds_s"],
            serde_json::json!([4.0, 3.0, 5.0, 3.5, 9.0])
        );
        let even = [2.0, 1.0, 4.0, 3.0].map(|s| run_of(Some(s))).to_vec();
        assert_eq!(median_run(even, "t").and_then(|r| r.seconds), Some(2.0));
        let failed = vec![run_of(Some(1.0)), run_of(None), run_of(Some(2.0))];
        assert!(!median_run(failed, "t").expect("a run").ok());
        assert!(median_run(Vec::new(), "t").is_none());
        // One round: no list.
        let one = median_run(vec![run_of(Some(1.5))], "t").expect("a run");
        assert!(one.report.is_none());
    }
}
