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
        /// The backing already holds a copy of this peer's data (a disk shipped, or `cutover sync` of the image): the first sync compares checksums and sends only blocks that differ.
        #[arg(long, value_name = "PEER")]
        seeded_from: Option<String>,
    },
    /// Show the volumes of the running daemon (or one): role, size, dirty bytes, writes, activity log, clean flag, peers. With --watch, keep showing them.
    Status {
        /// One volume; all when omitted.
        name: Option<String>,
        /// The daemon's configuration file, to find its state_dir (default: the state directory `cutover serve` uses without one).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print JSON: {"volumes": [...]} (with --watch: one such document per line, with its "time").
        #[arg(long)]
        json: bool,
        /// Keep showing the status, as watch(1) does: on a terminal the screen is redrawn every interval; otherwise each state that differs from the last one printed is printed as a block after a blank line (with --json, as one line). Stops on Ctrl-C (exit 0); exits 1 when the daemon goes away.
        #[arg(long)]
        watch: bool,
        /// Seconds between looks with --watch (default 1; at least 0.1).
        #[arg(long, value_name = "SECS", requires = "watch", value_parser = crate::volume_watch::parse_interval)]
        interval: Option<std::time::Duration>,
    },
    /// Make this node the volume's primary: it exports read-write and replicates to its peers. Refused when its data is inconsistent, unless --force.
    Primary {
        name: String,
        /// Promote even with inconsistent data: this node's data becomes the good copy (the first primary of a new volume; its peers then take a full sync).
        #[arg(long)]
        force: bool,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Make this node a secondary: it takes the primary's writes and refuses its own. Refused while NBD clients are attached.
    Secondary {
        name: String,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Re-enable the link to a peer (all peers when omitted) after `disconnect`.
    Connect {
        name: String,
        peer: Option<String>,
        /// Settle a split brain: this node (a secondary) takes the peer's data, and what
        /// it wrote since the split is overwritten.
        #[arg(long)]
        discard_my_data: bool,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Stream state changes (role, disk, each peer's connection, replication, role, disk, errors, verify) as JSON lines until interrupted; the first lines are the states as they are.
    Events {
        /// One volume; all when omitted.
        name: Option<String>,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Compare every block with a connected peer's (all peers when omitted) by checksums, on the primary; blocks that differ are resent. Progress in `status`.
    Verify {
        name: String,
        peer: Option<String>,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Stop the link to a peer (all peers when omitted) until `connect`; the peer's bitmap keeps what it misses.
    Disconnect {
        name: String,
        peer: Option<String>,
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// One control request as JSON on stdin, the daemon's reply as JSON on stdout (how a plan's `replica` task drives a daemon on another host, through ssh); exit 0 when the daemon said ok.
    #[command(hide = true)]
    Request {
        /// The daemon's configuration file, to find its state_dir.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
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
    // Watching waits on Ctrl-C between looks: it stays on the runtime.
    if let VolumeCommand::Status {
        name,
        config,
        json,
        watch: true,
        interval,
    } = command
    {
        let Some(sock) = socket(config.as_deref(), "status") else {
            return exit::FATAL;
        };
        let every = interval.unwrap_or(crate::volume_watch::DEFAULT_INTERVAL);
        return crate::volume_watch::watch(sock, name, json, every).await;
    }
    // Everything here blocks briefly on files or the control socket.
    tokio::task::spawn_blocking(move || match command {
        VolumeCommand::CreateMd {
            name,
            config,
            force,
            block_size,
            seeded_from,
        } => create_md(&name, &config, force, block_size, seeded_from.as_deref()),
        VolumeCommand::Status {
            name, config, json, ..
        } => status(name, config.as_deref(), json),
        VolumeCommand::Mark { name, config, json } => mark(name, config.as_deref(), json),
        VolumeCommand::Primary {
            name,
            force,
            config,
        } => said(
            config.as_deref(),
            "primary",
            &Request::Primary { name, force },
        ),
        VolumeCommand::Secondary { name, config } => {
            said(config.as_deref(), "secondary", &Request::Secondary { name })
        }
        VolumeCommand::Connect {
            name,
            peer,
            discard_my_data,
            config,
        } => said(
            config.as_deref(),
            "connect",
            &Request::Connect {
                name,
                peer,
                discard_my_data,
            },
        ),
        VolumeCommand::Events { name, config } => events(name, config.as_deref()),
        VolumeCommand::Request { config } => request(config.as_deref()),
        VolumeCommand::Verify { name, peer, config } => {
            said(config.as_deref(), "verify", &Request::Verify { name, peer })
        }
        VolumeCommand::Disconnect { name, peer, config } => said(
            config.as_deref(),
            "disconnect",
            &Request::Disconnect { name, peer },
        ),
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

fn create_md(
    name: &str,
    config: &Path,
    force: bool,
    block_size: Option<u32>,
    seeded_from: Option<&str>,
) -> u8 {
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
    if let Some(peer) = seeded_from {
        if !v.peers.iter().any(|p| p.name == peer) {
            let names: Vec<&str> = v.peers.iter().map(|p| p.name.as_str()).collect();
            errln!(
                "cutover volume create-md: --seeded-from {peer}: volume {name:?} has no such peer in {} (it has: {})",
                config.display(),
                if names.is_empty() { "none".to_string() } else { names.join(", ") }
            );
            return exit::FATAL;
        }
    }
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
    let opts = volume::CreateOptions {
        block_size: block_size.unwrap_or(volume::DEFAULT_BLOCK_SIZE),
        force,
        // Slot 0 for marks, one per configured peer and a spare (at least two): adding a
        // peer later should not mean re-creating the metadata.
        peer_slots: (v.peers.len() as u32 + 2).clamp(3, volume::MAX_PEER_SLOTS),
        // With peers, new metadata holds nothing known: a peer's data, or this node's
        // after `primary --force`, makes it consistent.
        inconsistent: !v.peers.is_empty(),
        seeded: seeded_from.is_some(),
        ..volume::CreateOptions::new(size)
    };
    match volume::Meta::create_with(&meta, &opts) {
        Ok(info) => {
            outln!(
                "volume {name}: metadata {} created: volume id {}, {size} bytes in blocks of {} KiB, generation {:016x}",
                meta.display(),
                info.volume_id,
                info.block_size / 1024,
                info.current_gen
            );
            if let Some(peer) = seeded_from {
                outln!("volume {name}: seeded from {peer}: its first sync compares checksums and sends only the blocks that differ");
            }
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
pub(crate) fn socket(config: Option<&Path>, cmd: &str) -> Option<PathBuf> {
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
        crate::print::out_text(&render(&volumes));
    }
    exit::OK
}

/// The volumes as `status` shows them, one line per item (`--watch` redraws this).
pub(crate) fn render(volumes: &[VolumeStatus]) -> String {
    let mut out = String::new();
    for v in volumes {
        show(v, &mut out);
    }
    out
}

fn show(v: &VolumeStatus, out: &mut String) {
    use std::fmt::Write;
    let al = &v.activity_log;
    // The data's state matters only where a peer could hold another copy.
    let role = if v.peers.is_empty() {
        v.role.clone()
    } else {
        format!("{} ({})", v.role, v.disk)
    };
    let _ = writeln!(
        out,
        "{}: {}, {} bytes, {} bytes dirty ({} block(s) of {} KiB), {} write(s), {} flush(es)",
        v.name,
        role,
        v.size,
        v.dirty_bytes,
        v.dirty_blocks,
        v.block_size / 1024,
        v.writes,
        v.flushes
    );
    let _ = writeln!(out, "  export {}", v.export);
    let _ = writeln!(
        out,
        "  backing {}, metadata {}",
        v.backing.display(),
        v.meta.display()
    );
    let _ = writeln!(
        out,
        "  volume id {}, generation {}, {} mark(s)",
        v.volume_id, v.current_gen, v.marks
    );
    let _ = writeln!(
        out,
        "  activity log: {}/{} hot extent(s), {} with writes in flight, {} transaction(s), {} eviction(s)",
        al.hot_extents,
        al.capacity,
        al.pinned,
        al.transactions,
        al.evictions
    );
    let _ = writeln!(
        out,
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
        let _ = writeln!(
            out,
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
    for p in &v.peers {
        show_peer(p, out);
    }
    if let Some(why) = &v.failed {
        let _ = writeln!(out, "  FAILED: {why}");
    }
}

fn show_peer(p: &daemon::roles::PeerStatus, out: &mut String) {
    use std::fmt::Write;
    let mut line = format!(
        "  peer {} ({}, protocol {}): {}",
        p.name,
        if p.dials { "dialled" } else { "dials in" },
        p.protocol,
        p.connection
    );
    if p.connection == "connected" {
        line.push_str(&format!(
            ", {} ({} connection(s)), peer {} and {}",
            p.replication, p.connections, p.peer_role, p.peer_disk
        ));
    }
    line.push_str(&format!(
        ", {} byte(s) out of sync, lag {} byte(s) ({:.1} s)",
        p.out_of_sync_bytes, p.lag_bytes, p.lag_secs
    ));
    if p.resync_rate > 0 {
        line.push_str(&format!(", resync {}/s", p.resync_rate));
        if let Some(eta) = p.eta_secs {
            line.push_str(&format!(", {eta} s left"));
        }
    }
    if let Some(at) = p.verify_position {
        line.push_str(&format!(", verify at byte {at}"));
    }
    if p.mismatched_blocks > 0 {
        line.push_str(&format!(
            ", {} block(s) found different and resent",
            p.mismatched_blocks
        ));
    }
    if p.discard_my_data {
        line.push_str(", discarding this node's data on connect");
    }
    let _ = writeln!(out, "{line}");
    if let (Some(e), false) = (&p.last_error, p.connection == "connected") {
        let _ = writeln!(out, "    last error: {e}");
    }
}

/// Print the daemon's event lines as they come (stops quietly when stdout closes).
fn events(name: Option<String>, config: Option<&Path>) -> u8 {
    use std::io::Write;
    let Some(sock) = socket(config, "events") else {
        return exit::FATAL;
    };
    let mut out = std::io::stdout().lock();
    let r = daemon::events::follow(&sock, name, |line| {
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    });
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            errln!("cutover volume events: {e}");
            exit::FATAL
        }
    }
}

/// `request`: one JSON request from stdin to the daemon, its JSON reply to stdout.
fn request(config: Option<&Path>) -> u8 {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut line) {
        errln!("cutover volume request: stdin: {e}");
        return exit::FATAL;
    }
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            errln!("cutover volume request: not a control request: {e}; use the same cutover version on both hosts");
            return exit::FATAL;
        }
    };
    let Some(sock) = socket(config, "request") else {
        return exit::FATAL;
    };
    match control::call(&sock, &req) {
        Ok(r) => {
            outln!("{}", serde_json::json!(r));
            if r.ok {
                exit::OK
            } else {
                exit::FATAL
            }
        }
        Err(e) => {
            errln!("cutover volume request: {e}");
            exit::FATAL
        }
    }
}

/// A request whose answer is one line.
fn said(config: Option<&Path>, cmd: &str, req: &Request) -> u8 {
    let Some(reply) = ask(config, cmd, req) else {
        return exit::FATAL;
    };
    outln!("{}", reply.message.as_deref().unwrap_or("done"));
    exit::OK
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
