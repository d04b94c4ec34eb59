//! V1 and V2: a volume's NBD export against its backing written directly. A `cutover serve`
//! whose config has only one `[[volume]]` (a fresh sparse file as backing, metadata made by
//! `cutover volume create-md`) exports it on a Unix socket; the same `qemu-img` command runs
//! once into the export (the cutover column) and once on a second file of the same size
//! directly (the peer's column). V1 copies an image in (`qemu-img convert -n -t none`), V2
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

/// Run V1 or V2 with `image` (the base set's one file) giving the volume's size.
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
    let backing = run_dir.join("backing.img");
    let direct = run_dir.join("direct.img");
    sparse_file(&backing, size)?;
    sparse_file(&direct, size)?;
    let host = VolumeHost::start(&bin, run_dir, &backing, logs)?;
    let uri = host.uri.clone();
    let mut daemon = host.daemon;

    res.order.push("qemu-img into the export".into());
    let through: ToolRun = tools::local(
        env,
        "qemu-img into the export",
        &mut qemu_img(io, image, &uri),
        logs,
        false,
    );
    let through_ok = through.ok();
    res.cutover = Some(through);
    res.order.push("qemu-img into a file directly".into());
    res.rsync = Some(tools::local(
        env,
        "qemu-img direct",
        &mut qemu_img(io, image, &direct.display().to_string()),
        logs,
        false,
    ));
    stop_cleanly(&mut daemon, "cutover serve")?;
    res.verify = Some(if through_ok {
        same_bytes(&backing, &direct)
    } else {
        Verify::skipped("the run into the export did not finish")
    });
    Ok(())
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
