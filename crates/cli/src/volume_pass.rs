//! `volume:NAME` as the source of a sync (or of a plan's `volume` task): a pass of a volume
//! the local `cutover serve` hosts. The daemon marks (writes from then on belong to the
//! next pass) and says what this destination lacks: the blocks written since its last
//! pass, sent alone (`Need::Changed`: nothing else is read on either side), or, for the
//! first pass to a destination, everything, compared by the usual positional delta. The
//! sync reads the volume's backing directly; the pass's outcome goes back to the daemon,
//! which owes the blocks again if it failed.

use crate::endpoint::Endpoint;
use crate::sync::SyncJob;
use daemon::control::{self, PassClient, Request};
use engine::{ChangedBlocks, Event, Events, Stats, Summary};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What names a volume source.
pub const PREFIX: &str = "volume:";

/// `NAME` of `volume:NAME`, or `None` for any other source.
pub fn name_of(src: &str) -> Option<&str> {
    src.strip_prefix(PREFIX)
}

/// A started pass: the job to run (its source is the volume's backing) and the daemon's
/// connection to report the outcome on.
pub struct Started {
    client: PassClient,
    pub job: SyncJob,
}

impl Started {
    /// One line for the log: what this pass sends and why.
    pub fn describe(&self, destination: &str) -> String {
        let s = &self.client.start;
        match &s.why_full {
            None => format!(
                "volume {}: changed-block pass to {destination}: {} byte(s) written since its last pass",
                s.name, s.changed_bytes
            ),
            Some(why) => format!(
                "volume {}: full pass to {destination} (compares all {} bytes: {why})",
                s.name, s.size
            ),
        }
    }

    /// Tell the daemon how the pass went (a failed pass owes its blocks again).
    pub fn finish(self, ok: bool) -> Result<(), String> {
        let name = self.client.start.name.clone();
        self.client
            .finish(ok)
            .map_err(|e| format!("volume {name}: the daemon did not take the pass's end: {e}"))
    }
}

/// A `volume:NAME` source: the daemon starts the pass (what to send), the sync runs on
/// the volume's backing, and the outcome goes back to the daemon. A dry run only reads:
/// it compares the backing with the destination and starts no pass.
pub async fn run(
    job: &SyncJob,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<(Summary, u64), String> {
    let j = job.clone();
    let started = tokio::task::spawn_blocking(move || {
        if j.options.dry_run {
            backing_job(&j).map(|job| (job, None))
        } else {
            begin(&j).map(|s| {
                let s = s.expect("a volume: source");
                (s.job.clone(), Some(s))
            })
        }
    })
    .await
    .map_err(|e| format!("{}: {e}", job.src))??;
    let (resolved, pass) = started;
    if let Some(p) = &pass {
        events.event(Event::Note {
            message: p.describe(&job.dst),
        });
    }
    let result = crate::sync::run_resolved(&resolved, events, stats).await;
    let Some(pass) = pass else {
        return result;
    };
    let ok = result
        .as_ref()
        .is_ok_and(|(s, _)| s.errors.is_empty() && s.changed.is_empty());
    let told = tokio::task::spawn_blocking(move || pass.finish(ok))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match (result, told) {
        (Ok(r), Ok(())) => Ok(r),
        (Ok(_), Err(e)) => Err(e),
        (Err(e), _) => Err(e),
    }
}

/// Start the pass `job` names, if its source is `volume:NAME`: ask the daemon (found
/// through `job.volume_config`, else the default state directory) and rewrite the job.
/// Blocking.
pub fn begin(job: &SyncJob) -> Result<Option<Started>, String> {
    let Some(name) = name_of(&job.src) else {
        return Ok(None);
    };
    let what = &job.src;
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "{what}: name a volume of the local `cutover serve`, as in its config's [[volume]] name"
        ));
    }
    if job.files_from.is_some() {
        return Err(format!(
            "{what}: --files-from does not apply to a volume (its pass sends the blocks written since the last one)"
        ));
    }
    let socket =
        control_socket(job.volume_config.as_deref()).map_err(|e| format!("{what}: {e}"))?;
    let backing = backing_of(&socket, name).map_err(|e| format!("{what}: {e}"))?;
    let destination = destination_key(job, &backing)?;
    // --checksum asks to compare everything, as for files.
    let full = job.options.checksum;
    let client = match PassClient::begin(&socket, name, &destination, full) {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => return Err(format!("{what}: {why}")),
        Err(e) => return Err(format!("{what}: {e}")),
    };
    let mut rewritten = job.clone();
    rewritten.src = client.start.backing.to_string_lossy().into_owned();
    rewritten.changed = match &client.bits {
        Some(bits) => Some(Arc::new(
            ChangedBlocks::new(client.start.size, client.start.block_size, bits.clone())
                .map_err(|e| format!("{what}: the daemon's bitmap: {e}"))?,
        )),
        None => None,
    };
    // A volume is written in place, never through a partial file and a rename.
    rewritten.options.inplace = true;
    Ok(Some(Started {
        client,
        job: rewritten,
    }))
}

/// A dry run of `volume:NAME`: the job on the volume's backing (asked of the daemon), with
/// no pass started, so it compares everything and changes no record. Blocking.
pub fn backing_job(job: &SyncJob) -> Result<SyncJob, String> {
    let what = &job.src;
    let name = name_of(what).unwrap_or_default();
    let socket =
        control_socket(job.volume_config.as_deref()).map_err(|e| format!("{what}: {e}"))?;
    let backing = backing_of(&socket, name).map_err(|e| format!("{what}: {e}"))?;
    let mut rewritten = job.clone();
    rewritten.src = backing.to_string_lossy().into_owned();
    rewritten.options.inplace = true;
    Ok(rewritten)
}

/// The backing of volume `name`, as the daemon at `socket` has it.
fn backing_of(socket: &Path, name: &str) -> Result<PathBuf, String> {
    let req = Request::Status {
        name: Some(name.to_string()),
    };
    let reply = control::call(socket, &req).map_err(|e| e.to_string())?;
    match (reply.ok, reply.volumes.unwrap_or_default().pop()) {
        (true, Some(v)) => Ok(v.backing),
        _ => Err(reply
            .error
            .unwrap_or_else(|| "the daemon does not say".into())),
    }
}

/// The daemon's control socket: in the given config's state directory, else in the default
/// one `cutover serve` uses without `state_dir`.
fn control_socket(config: Option<&Path>) -> Result<PathBuf, String> {
    match config {
        Some(c) => {
            let cfg = daemon::Config::load(c).map_err(|e| e.to_string())?;
            cfg.control_socket().ok_or_else(|| {
                format!(
                    "{}: set state_dir (the control socket lives there)",
                    c.display()
                )
            })
        }
        None => daemon::config::default_state_dir()
            .map(|d| d.join(daemon::config::CONTROL_SOCKET))
            .ok_or_else(|| {
                "no state directory to find the daemon in (no HOME); pass --volume-config".into()
            }),
    }
}

/// How the daemon knows a destination again from pass to pass: the daemon's address,
/// module, path and pinned fingerprint; the ssh host and path; or the local file the
/// volume is written to, made absolute (in a directory, the backing's name in it, as the
/// sync places it). A destination named differently is another destination (its first
/// pass compares everything), which is the safe side.
fn destination_key(job: &SyncJob, backing: &Path) -> Result<String, String> {
    let dst = Endpoint::parse(&job.dst).map_err(|e| format!("destination {e}"))?;
    let name = backing
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A path ending in a slash is a directory the volume goes into.
    let into = |path: String| {
        if path.ends_with('/') {
            format!("{path}{name}")
        } else {
            path
        }
    };
    Ok(match dst {
        Endpoint::Daemon { addr, module, path } => {
            let pinned = job
                .security
                .server_fingerprint
                .as_ref()
                .map(|f| format!(" ({f})"))
                .unwrap_or_default();
            format!("cutover://{addr}/{module}/{}{pinned}", into(path))
        }
        Endpoint::Ssh { dest, path } => format!("{dest}:{}", into(path)),
        Endpoint::Local {
            path,
            trailing_slash,
        } => {
            let abs = absolute(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            if trailing_slash || abs.is_dir() {
                abs.join(&name).display().to_string()
            } else {
                abs.display().to_string()
            }
        }
    })
}

/// `path` made absolute with the links on its way resolved, but not the last component:
/// the destination is the name given (a symlink there is replaced, never followed).
fn absolute(path: &Path) -> std::io::Result<PathBuf> {
    let name = path.file_name().filter(|_| !path.ends_with(".."));
    let parent = match (name, path.parent()) {
        (Some(_), Some(p)) if !p.as_os_str().is_empty() => p.canonicalize()?,
        (Some(_), _) => std::env::current_dir()?,
        // ".", "..", "/": a directory, resolved whole.
        (None, _) => return path.canonicalize(),
    };
    Ok(match name {
        Some(n) => parent.join(n),
        None => parent,
    })
}
