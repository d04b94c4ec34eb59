//! `cutover volume …`: the operator's side of the block volumes a `cutover serve` hosts, as
//! `drbdadm` is DRBD's. `create-md` works on the files directly (no daemon needed); `status`
//! and `mark` ask the running daemon over its control socket (`state_dir/control.sock`).

use crate::exit;
use crate::print::{errln, outln};
use clap::Subcommand;
use daemon::control::{self, Reply, Request, VolumeStatus};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Make a volume's metadata file (its superblock, activity log and dirty bitmap), sized for its backing. Run once, before `cutover serve` exports the volume.
    CreateMd {
        /// The volume's name in the config's [[volume]] sections.
        name: String,
        /// The daemon's configuration file (as for `cutover serve --config`).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Replace existing metadata (its dirty bitmap is lost: peers then need a full resync).
        #[arg(long)]
        force: bool,
        /// Bitmap granularity: bytes, or with K/M (4K to 1M, a power of two; default 16K).
        #[arg(long, value_name = "SIZE", value_parser = parse_block_size)]
        block_size: Option<u32>,
    },
    /// Show the volumes of the running daemon (or one): role, size, dirty bytes, writes, activity log, clean flag.
    Status {
        /// One volume; all when omitted.
        name: Option<String>,
        /// The daemon's configuration file, to find its state_dir (default: the state directory `cutover serve` uses without one).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON: {"volumes": [...]}.
        #[arg(long)]
        json: bool,
    },
    /// Start a new generation of a volume: prints the old and new generation ids and the bytes that were dirty; the dirty bitmap starts empty.
    Mark {
        name: String,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: VolumeCommand) -> u8 {
    // Everything here blocks briefly on files or the control socket.
    tokio::task::spawn_blocking(move || match command {
        VolumeCommand::CreateMd {
            name,
            config,
            force,
            block_size,
        } => create_md(&name, &config, force, block_size),
        VolumeCommand::Status { name, config, json } => status(name, config.as_deref(), json),
        VolumeCommand::Mark { name, config, json } => mark(name, config.as_deref(), json),
    })
    .await
    .unwrap_or(exit::FATAL)
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: u32 = digits
        .parse()
        .map_err(|_| format!("{text:?}: give bytes, or a number with K or M"))?;
    let mult = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KIB" | "KB" => 1024,
        "M" | "MIB" | "MB" => 1 << 20,
        _ => return Err(format!("{text:?}: the unit must be K or M")),
    };
    let size = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    let (min, max) = (volume::MIN_BLOCK_SIZE, volume::MAX_BLOCK_SIZE);
    if !size.is_power_of_two() || size < min || size > max {
        return Err(format!(
            "{text:?}: must be a power of two from {}K to {}K",
            min / 1024,
            max / 1024
        ));
    }
    Ok(size)
}

fn load(config: &Path, cmd: &str) -> Option<daemon::Config> {
    match daemon::Config::load(config) {
        Ok(c) => Some(c),
        Err(e) => {
            errln!("cutover volume {cmd}: {e}");
            None
        }
    }
}

fn create_md(name: &str, config: &Path, force: bool, block_size: Option<u32>) -> u8 {
    let Some(cfg) = load(config, "create-md") else {
        return exit::FATAL;
    };
    let v = match cfg.volume(name) {
        Ok(v) => v,
        Err(e) => {
            errln!("cutover volume create-md: {}: {e}", config.display());
            return exit::FATAL;
        }
    };
    let Some(meta) = cfg.volume_meta(v) else {
        errln!(
            "cutover volume create-md: {}: set state_dir or the volume's meta (no HOME for a default)",
            config.display()
        );
        return exit::FATAL;
    };
    let size = match nbd::FileBackend::open(&v.backing, true) {
        Ok(b) => nbd::Backend::size(&b),
        Err(e) => {
            errln!(
                "cutover volume create-md: volume {name:?}: backing {}: {e}; check `backing` in {}",
                v.backing.display(),
                config.display()
            );
            return exit::FATAL;
        }
    };
    if let Some(dir) = meta.parent() {
        if let Err(e) = std::fs::create_dir_all(dir) {
            errln!("cutover volume create-md: {}: {e}", dir.display());
            return exit::FATAL;
        }
    }
    let block_size = block_size.unwrap_or(volume::DEFAULT_BLOCK_SIZE);
    match volume::Meta::create(&meta, size, block_size, force) {
        Ok(info) => {
            outln!(
                "volume {name}: metadata {} created: volume id {}, {size} bytes in blocks of {} KiB, generation {:016x}",
                meta.display(),
                info.volume_id,
                info.block_size / 1024,
                info.current_gen
            );
            exit::OK
        }
        Err(e) => {
            errln!("cutover volume create-md: volume {name:?}: {e}");
            exit::FATAL
        }
    }
}

/// The control socket: in the config's state_dir, else in the daemon's default state
/// directory.
fn socket(config: Option<&Path>, cmd: &str) -> Option<PathBuf> {
    let found = match config {
        Some(c) => load(c, cmd)?.control_socket(),
        None => daemon::config::default_state_dir().map(|d| d.join(daemon::config::CONTROL_SOCKET)),
    };
    if found.is_none() {
        errln!("cutover volume {cmd}: no state directory to find the control socket in (no HOME); pass --config");
    }
    found
}

/// Ask the daemon; a failure (no daemon, refused, an error reply) is one line on stderr.
fn ask(config: Option<&Path>, cmd: &str, req: &Request) -> Option<Reply> {
    let sock = socket(config, cmd)?;
    match control::call(&sock, req) {
        Ok(r) if r.ok => Some(r),
        Ok(r) => {
            errln!(
                "cutover volume {cmd}: {}",
                r.error.as_deref().unwrap_or("the daemon refused")
            );
            None
        }
        Err(e) => {
            errln!("cutover volume {cmd}: {e}");
            None
        }
    }
}

fn status(name: Option<String>, config: Option<&Path>, json: bool) -> u8 {
    let Some(reply) = ask(config, "status", &Request::Status { name }) else {
        return exit::FATAL;
    };
    let volumes = reply.volumes.unwrap_or_default();
    if json {
        outln!("{}", serde_json::json!({ "volumes": volumes }));
    } else {
        for v in &volumes {
            show(v);
        }
    }
    exit::OK
}

fn show(v: &VolumeStatus) {
    let al = &v.activity_log;
    outln!(
        "{}: {}, {} bytes, {} bytes dirty ({} block(s) of {} KiB), {} write(s), {} flush(es)",
        v.name,
        v.role,
        v.size,
        v.dirty_bytes,
        v.dirty_blocks,
        v.block_size / 1024,
        v.writes,
        v.flushes
    );
    outln!("  export {}", v.export);
    outln!(
        "  backing {}, metadata {}",
        v.backing.display(),
        v.meta.display()
    );
    outln!(
        "  volume id {}, generation {}, {} mark(s)",
        v.volume_id,
        v.current_gen,
        v.marks
    );
    outln!(
        "  activity log: {}/{} hot extent(s), {} with writes in flight, {} transaction(s), {} eviction(s)",
        al.hot_extents,
        al.capacity,
        al.pinned,
        al.transactions,
        al.evictions
    );
    outln!(
        "  metadata: clean flag {} (set at shutdown), last shutdown {}, {} bitmap page(s) to write",
        if v.clean_flag { "set" } else { "clear" },
        if v.last_shutdown_clean {
            "clean"
        } else {
            "unclean (recovered from the activity log)"
        },
        v.unpersisted_pages
    );
    for d in &v.destinations {
        outln!(
            "  sync destination {}: {} byte(s) owed to it, {}",
            d.destination,
            d.owed_bytes,
            match (d.running, d.confirmed) {
                (true, _) => "pass running",
                (false, true) => "its next pass sends only what changed",
                (false, false) => "its next pass compares everything",
            }
        );
    }
    if let Some(why) = &v.failed {
        outln!("  FAILED: {why}");
    }
}

fn mark(name: String, config: Option<&Path>, json: bool) -> u8 {
    let Some(reply) = ask(config, "mark", &Request::Mark { name }) else {
        return exit::FATAL;
    };
    let Some(m) = reply.mark else {
        errln!("cutover volume mark: the daemon's reply has no result; use the same cutover version for both");
        return exit::FATAL;
    };
    if json {
        outln!("{}", serde_json::json!(m));
    } else {
        outln!(
            "{}: marked: generation {} -> {}; {} bytes ({} block(s)) were dirty",
            m.name,
            m.from_gen,
            m.to_gen,
            m.dirty_bytes,
            m.dirty_blocks
        );
    }
    exit::OK
}
