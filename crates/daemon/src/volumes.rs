//! The block volumes a `cutover serve` hosts (`[[volume]]`): for each, open its metadata
//! (taking its lock), export its backing over NBD with the metadata's tracker as the write
//! observer and the `cutover:dirty` context, persist the dirty bitmap every few seconds, and
//! on shutdown stop serving and close the metadata (which sets its clean flag). The control
//! socket (`control.rs`) reads and marks them while they run.
//!
//! This is "Volumes 1/3": every volume is primary and nothing is replicated yet.

use crate::config::{Config, ExportAddr};
use crate::control;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

/// How often each volume's changed bitmap pages are written. Crash safety does not depend
/// on it (the activity log covers what the on-disk bitmap lacks); it keeps the recovery
/// after a crash close to the truth and persists what a mark cleared.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a stopping daemon waits for NBD clients to disconnect (they are answered
/// NBD_ESHUTDOWN meanwhile) before it closes the metadata anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {name:?}: backing {}: {source}; check `backing` in the config", path.display())]
    Backing {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "volume {name:?}: metadata file {} does not exist; create it with `cutover volume create-md {name} --config {}`",
        path.display(),
        config.display()
    )]
    NoMeta {
        name: String,
        path: PathBuf,
        config: PathBuf,
    },
    #[error("volume {name:?}: {source}")]
    Meta {
        name: String,
        #[source]
        source: volume::Error,
    },
    #[error("volume {name:?}: cannot listen on {addr}: {source}")]
    Listen {
        name: String,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("control socket {}: {source}", path.display())]
    Control {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("volumes need a state directory: set state_dir in the config (no HOME)")]
    NoStateDir,
}

/// One running volume, shared with the control socket.
pub struct Hosted {
    pub name: String,
    pub backing: PathBuf,
    pub export: ExportAddr,
    /// `None` once closed. Status and mark take it for reading; close for writing, so a
    /// close waits for a mark in progress.
    pub(crate) meta: RwLock<Option<volume::Meta>>,
    /// The destinations of changed-block passes (`passes.rs`).
    pub(crate) passes: crate::passes::Passes,
    /// The backing, shared by the export and the replication links.
    pub(crate) backend: Arc<dyn nbd::Backend>,
    /// The configured peers and their slots in the metadata.
    pub(crate) peer_slots: Vec<(crate::config::Peer, u32)>,
    /// Their links, once started (`Volumes::start_peers`).
    pub(crate) peers: std::sync::OnceLock<Vec<Arc<crate::peering::PeerLink>>>,
    /// The NBD server (how many clients are attached).
    pub(crate) server: nbd::Server,
    /// The export's write latencies, for the metrics.
    pub(crate) write_latency: Arc<nbd::LatencyHistogram>,
}

impl Hosted {
    /// Run `f` on the open metadata, or say that the volume is closed.
    pub(crate) fn with_meta<T>(&self, f: impl FnOnce(&volume::Meta) -> T) -> Result<T, String> {
        let guard = self.meta.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(m) => Ok(f(m)),
            None => Err(format!("volume {:?} is shutting down", self.name)),
        }
    }
}

/// The node's running volumes and the tasks serving them.
pub struct Volumes {
    hosted: Arc<[Arc<Hosted>]>,
    tasks: Vec<JoinHandle<()>>,
    /// Socket files we made, removed at shutdown so a stale one does not suggest a
    /// running daemon.
    sockets: Vec<PathBuf>,
    /// Each volume's NBD server, drained at shutdown.
    servers: Vec<(String, nbd::Server)>,
    /// Where peer links relayed over ssh come in (`peer_ssh.rs`), when a volume has peers.
    peer_socket: Option<PathBuf>,
}

impl Volumes {
    /// Open and export every `[[volume]]` of `config`, start the periodic bitmap flush and
    /// the control socket. `config_path` is only for messages (the fix for a missing
    /// metadata file). A config without volumes starts nothing.
    pub async fn start(config: &Config, config_path: &Path) -> Result<Volumes, VolumeError> {
        let mut vols = Volumes {
            hosted: Arc::from(Vec::new()),
            tasks: Vec::new(),
            sockets: Vec::new(),
            servers: Vec::new(),
            peer_socket: None,
        };
        if config.volumes.is_empty() {
            return Ok(vols);
        }
        let mut hosted = Vec::new();
        match vols.open_all(config, config_path, &mut hosted).await {
            Ok(()) => {
                vols.hosted = Arc::from(hosted);
                vols.tasks
                    .push(tokio::spawn(flush_loop(vols.hosted.clone())));
                if !config.volume_notify.is_empty() {
                    // Hooks run in the state directory (a config without one has no
                    // volumes running by now).
                    let dir = config.state_dir().unwrap_or_else(|| PathBuf::from("/"));
                    vols.tasks.push(tokio::spawn(crate::notify::run(
                        vols.hosted.clone(),
                        config.volume_notify.clone(),
                        dir,
                    )));
                }
                Ok(vols)
            }
            Err(e) => {
                // Close what was opened, so its metadata is left clean rather than as
                // after a crash.
                vols.hosted = Arc::from(hosted);
                vols.shutdown().await;
                Err(e)
            }
        }
    }

    async fn open_all(
        &mut self,
        config: &Config,
        config_path: &Path,
        hosted: &mut Vec<Arc<Hosted>>,
    ) -> Result<(), VolumeError> {
        for v in &config.volumes {
            let name = v.name.clone();
            let meta_path = config.volume_meta(v).ok_or(VolumeError::NoStateDir)?;
            let export_addr = config.volume_export(v).ok_or(VolumeError::NoStateDir)?;
            let backend = nbd::FileBackend::open(&v.backing, false).map_err(|source| {
                VolumeError::Backing {
                    name: name.clone(),
                    path: v.backing.clone(),
                    source,
                }
            })?;
            let size = nbd::Backend::size(&backend);
            let meta = {
                let (path, cfg, vname) =
                    (meta_path.clone(), config_path.to_path_buf(), name.clone());
                tokio::task::spawn_blocking(move || match volume::Meta::open(&path, size) {
                    Err(volume::Error::Missing { .. }) => Err(VolumeError::NoMeta {
                        name: vname,
                        path,
                        config: cfg,
                    }),
                    r => r.map_err(|source| VolumeError::Meta {
                        name: vname,
                        source,
                    }),
                })
                .await
                .map_err(|e| VolumeError::Meta {
                    name: name.clone(),
                    source: volume::Error::Invalid {
                        path: meta_path.clone(),
                        why: format!("open panicked: {e}"),
                    },
                })??
            };
            let report = meta.open_report().clone();
            let nodes: Vec<u32> = v
                .peers
                .iter()
                .map(|p| crate::peering::node_id(&p.fingerprint))
                .collect();
            let slots = {
                let r = if nodes.is_empty() && meta.replication().slots().is_empty() {
                    Ok(Vec::new())
                } else {
                    meta.attach_peers(&nodes)
                };
                match r {
                    Ok(s) => s,
                    Err(source) => {
                        let _ = meta.close();
                        return Err(VolumeError::Meta {
                            name: name.clone(),
                            source,
                        });
                    }
                }
            };
            let peer_slots: Vec<(crate::config::Peer, u32)> =
                v.peers.iter().cloned().zip(slots).collect();
            let passes =
                crate::passes::Passes::load(&name, meta.path().with_extension("passes"), &meta);
            let tracker = meta.tracker();
            let backend: Arc<dyn nbd::Backend> = Arc::new(backend);
            let mut export = nbd::Export::new(name.clone(), backend.clone());
            export.description = format!("cutover volume {name}");
            export.observer = Some(tracker.clone());
            export.meta.push(tracker);
            let role = if peer_slots.is_empty() {
                String::new()
            } else {
                let s = meta.status();
                format!(
                    ", {} and {}, {} peer(s)",
                    if s.primary { "primary" } else { "secondary" },
                    if s.inconsistent {
                        "inconsistent"
                    } else {
                        "consistent"
                    },
                    peer_slots.len()
                )
            };
            let write_latency = export.write_latency.clone();
            let server = nbd::Server::new(vec![export]);
            // From here the metadata is ours: a failure below must still close it.
            hosted.push(Arc::new(Hosted {
                name: name.clone(),
                backing: v.backing.clone(),
                export: export_addr.clone(),
                meta: RwLock::new(Some(meta)),
                passes,
                backend,
                peer_slots,
                peers: std::sync::OnceLock::new(),
                server: server.clone(),
                write_latency,
            }));
            let listen_failed = |source| VolumeError::Listen {
                name: name.clone(),
                addr: export_addr.to_string(),
                source,
            };
            self.servers.push((name.clone(), server.clone()));
            let task = match &export_addr {
                ExportAddr::Unix(path) => {
                    let listener = bind_private(path).map_err(listen_failed)?;
                    self.sockets.push(path.clone());
                    tokio::spawn(async move {
                        if let Err(e) = server.serve_unix_listener(listener).await {
                            tracing::error!("NBD export stopped: {e}");
                        }
                    })
                }
                ExportAddr::Tcp(addr) => {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(listen_failed)?;
                    tokio::spawn(async move {
                        if let Err(e) = server.serve_tcp(listener).await {
                            tracing::error!("NBD export stopped: {e}");
                        }
                    })
                }
            };
            self.tasks.push(task);
            let recovered = if report.last_shutdown_clean {
                "last shutdown clean".to_string()
            } else {
                format!(
                    "recovered from an unclean shutdown: {} extent(s) of the activity log marked dirty",
                    report.recovered_extents
                )
            };
            tracing::info!(
                "volume {name}: serving {} ({size} bytes) on {export_addr}, metadata {} ({recovered}){role}",
                v.backing.display(),
                meta_path.display()
            );
        }
        let control_path = config.control_socket().ok_or(VolumeError::NoStateDir)?;
        if hosted.iter().any(|h| !h.peer_slots.is_empty()) {
            self.peer_socket = control_path
                .parent()
                .map(|d| d.join(crate::peer_ssh::PEER_SOCKET));
        }
        let listener = bind_private(&control_path).map_err(|source| VolumeError::Control {
            path: control_path.clone(),
            source,
        })?;
        self.sockets.push(control_path.clone());
        self.tasks.push(tokio::spawn(control::serve(
            listener,
            Arc::from(hosted.clone()),
        )));
        tracing::info!("control socket {}", control_path.display());
        Ok(())
    }

    /// Stop serving (exports and control socket), let connected NBD clients finish what is
    /// in flight, flush and disconnect (new requests get NBD_ESHUTDOWN, for up to
    /// [`DRAIN_GRACE`]), then close every volume's metadata: the whole bitmap is written
    /// and the clean flag set. Returns whether every volume closed cleanly (failures are
    /// logged).
    pub async fn shutdown(self) -> bool {
        for t in &self.tasks {
            t.abort();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        for (_, server) in &self.servers {
            server.drain();
        }
        let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
        for (name, server) in &self.servers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !server.wait_idle(left).await {
                tracing::warn!(
                    "volume {name}: NBD clients still connected {DRAIN_GRACE:?} after the stop began; closing anyway (their further writes fail)"
                );
            }
        }
        let mut clean = true;
        for h in self.hosted.iter() {
            let h = h.clone();
            let closed = tokio::task::spawn_blocking(move || {
                let meta = h.meta.write().unwrap_or_else(|p| p.into_inner()).take();
                (h.name.clone(), meta.map(volume::Meta::close))
            })
            .await;
            match closed {
                Ok((name, Some(Ok(())))) => tracing::info!("volume {name}: closed cleanly"),
                Ok((_, None)) => {}
                Ok((name, Some(Err(e)))) => {
                    clean = false;
                    tracing::error!("volume {name}: close failed: {e}");
                }
                Err(e) => {
                    clean = false;
                    tracing::error!("closing a volume panicked: {e}");
                }
            }
        }
        clean
    }

    /// Start the replication links of every volume's peers: dial those with an address,
    /// wait for the others. The hub routes incoming peer links (`serve_with_peers`).
    pub fn start_peers(
        &mut self,
        identity: Arc<net::tls::Identity>,
    ) -> Arc<crate::peering::PeerHub> {
        let mut hub = crate::peering::PeerHub::default();
        for h in self.hosted.iter() {
            let mut links = Vec::new();
            for (cfg, slot) in &h.peer_slots {
                let link = Arc::new(crate::peering::PeerLink::new(
                    &h.name,
                    cfg.clone(),
                    *slot,
                    &identity.fingerprint,
                ));
                link.view.update(|v| v.connection = "connecting".into());
                if link.dials {
                    self.tasks.push(tokio::spawn(crate::peering::dial_loop(
                        link.clone(),
                        h.clone(),
                        identity.clone(),
                    )));
                }
                hub.links.push((link.clone(), h.clone()));
                links.push(link);
            }
            let _ = h.peers.set(links);
        }
        let hub = Arc::new(hub);
        if let Some(path) = self.peer_socket.clone() {
            match bind_private(&path) {
                Ok(l) => {
                    self.sockets.push(path.clone());
                    self.tasks
                        .push(tokio::spawn(crate::peer_ssh::serve(l, hub.clone())));
                    tracing::info!("peer socket {} (links relayed over ssh)", path.display());
                }
                Err(e) => tracing::error!(
                    "peer socket {}: {e}; peers cannot reach this node over ssh",
                    path.display()
                ),
            }
        }
        hub
    }

    /// The running volumes, for the metrics listener.
    pub(crate) fn hosted(&self) -> Arc<[Arc<Hosted>]> {
        self.hosted.clone()
    }

    /// How many volumes run.
    pub fn len(&self) -> usize {
        self.hosted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosted.is_empty()
    }
}

/// Persist each volume's changed bitmap pages every [`FLUSH_INTERVAL`].
async fn flush_loop(hosted: Arc<[Arc<Hosted>]>) {
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for h in hosted.iter() {
            let h = h.clone();
            let done =
                tokio::task::spawn_blocking(move || (h.name.clone(), h.with_meta(|m| m.flush())))
                    .await;
            match done {
                Ok((name, Ok(Err(e)))) => tracing::warn!("volume {name}: bitmap flush: {e}"),
                Err(e) => tracing::warn!("bitmap flush panicked: {e}"),
                _ => {}
            }
        }
    }
}

/// Bind a Unix socket at `path` with mode 0600 from its first instant: bound inside a fresh
/// directory of mode 0700, restricted, then renamed into place (a chmod after binding at
/// the final path would leave a moment in which anyone could connect). A socket already
/// there is replaced if nothing answers on it (left by a crash); one that answers is
/// another daemon's, and so is an error.
pub(crate) fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening on it (is another `cutover serve` running with this state_dir?)",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; remove it or choose another path",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let file = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "names no file"))?;
    let private = dir.join(format!(
        ".cutover-bind-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join(file);
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    bound
}
