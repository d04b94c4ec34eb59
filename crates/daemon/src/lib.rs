//! `cutover serve`: accepts TLS connections, authenticates the client for the module it asks
//! for (a token proven over the connection's keying material, or a client certificate's
//! fingerprint), opens sessions, routes joining data connections to their session, and runs
//! the engine's sender or receiver for each session.
//!
//! It also hosts the node's block volumes (`volumes.rs`: NBD exports tracked by their
//! metadata) and answers `cutover volume` on a root-only control socket (`control.rs`); the
//! `[[volume_notify]]` hooks hear of their state changes (`notify.rs`).
//!
//! Paths from clients are validated lexically (relative, no `..`, no NUL) before they are
//! joined to a module root.

pub mod checksums;
pub mod config;
pub mod control;
pub mod events;
mod link_dial;
pub mod metrics;
pub mod notify;
mod pass_store;
mod passes;
pub mod peer_ssh;
pub mod peering;
pub mod roles;
pub mod stdio;
pub mod volumes;

pub use config::{
    Access, Config, ConfigError, Credential, ExportAddr, Grant, Module, Peer, Volume,
};
pub use config::{OnCongestion, PeerAddress, Protocol, SplitBrainPolicy};
pub use passes::DestinationStatus;
pub use volumes::{VolumeError, Volumes};

use engine::{Destination, NoEvents, Session, Source, Stats};
use net::secure::Accepted;
use net::tls::{verify_join_proof, verify_token_proof, Fingerprint};
use net::{Conn, RateLimiter};
use proto::{Hello, NewSession, Role, Welcome, WireCounter, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A failed authentication (or join) is answered this late, so guessing tokens is slow.
pub(crate) const AUTH_FAILURE_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "refusing to listen on {0} with insecure_plaintext = true: plaintext is only allowed on loopback"
    )]
    NotLoopback(std::net::SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

struct Joinable {
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
    /// The opener's IP address, for the per-client session limit.
    client: String,
    /// Data connections joined so far.
    joined: usize,
}

/// Shared state of a running daemon.
struct Server {
    config: Config,
    tls: tokio_rustls::TlsAcceptor,
    /// The volumes' replication peers, for incoming peer links.
    peers: Arc<peering::PeerHub>,
    sessions: Mutex<HashMap<u64, Joinable>>,
    /// Sessions, their bytes and refused connections, for the metrics.
    counters: Arc<metrics::DaemonCounters>,
}

impl Server {
    /// The session registry; a panic elsewhere while holding it leaves it usable.
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Joinable>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bind the given address; with `plaintext_allowed`, refuse anything but loopback.
pub async fn bind(addr: &str, plaintext_allowed: bool) -> Result<TcpListener, DaemonError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    if plaintext_allowed && !local.ip().is_loopback() {
        return Err(DaemonError::NotLoopback(local));
    }
    Ok(listener)
}

/// Serve until `shutdown` completes (its output, e.g. `SIGTERM`, is the reason logged with
/// the shutdown); then stop accepting and give sessions in flight up to
/// `shutdown_grace_secs` to finish. Whatever is still running after that is dropped: its
/// partial files stay beside their targets and the client's next run resumes from them.
pub async fn serve<R: std::fmt::Display>(
    listener: TcpListener,
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = R>,
) {
    serve_with_peers(
        listener,
        config,
        tls,
        Arc::default(),
        Arc::default(),
        shutdown,
    )
    .await
}

/// [`serve`], also taking the replication links of `peers` (see `Volumes::start_peers`)
/// and the counters the metrics listener reads.
pub async fn serve_with_peers<R: std::fmt::Display>(
    listener: TcpListener,
    config: Config,
    tls: Arc<rustls::ServerConfig>,
    peers: Arc<peering::PeerHub>,
    counters: Arc<metrics::DaemonCounters>,
    shutdown: impl Future<Output = R>,
) {
    let server = Arc::new(Server {
        config,
        peers,
        tls: tokio_rustls::TlsAcceptor::from(tls),
        sessions: Mutex::new(HashMap::new()),
        counters,
    });
    tokio::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            r = &mut shutdown => break r,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(handle(server.clone(), stream, peer.to_string()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    };
    drop(listener);
    let grace = Duration::from_secs(server.config.shutdown_grace_secs);
    let running = server.sessions().len();
    if running > 0 {
        tracing::info!(
            running,
            "shutting down on {reason}: waiting up to {grace:?} for sessions to finish"
        );
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline && !server.sessions().is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = server.sessions().len();
    if left > 0 {
        tracing::warn!(
            left,
            "shutting down with sessions still running; their partial files stay for resuming"
        );
    }
    let drained = running.saturating_sub(left);
    tracing::info!("stopped on {reason}: {drained} session(s) drained, {left} cut off");
}

/// Welcome a joining data connection that proved itself into its session (`tx`).
pub(crate) async fn admit(mut conn: Conn, session: u64, secret: [u8; 16], tx: mpsc::Sender<Conn>) {
    if conn
        .writer
        .send_value(&Welcome::Accepted { session, secret })
        .await
        .is_ok()
    {
        let _ = tx.send(conn).await;
    }
}

pub(crate) async fn refuse(conn: &mut Conn, reason: String) {
    let _ = conn.writer.send_value(&Welcome::Refused { reason }).await;
    conn.writer.close().await;
}

/// The TLS handshake and the hello of one connection, within the handshake timeout; the
/// connection's bytes are counted in `wire`.
async fn greet(
    server: &Server,
    stream: tokio::net::TcpStream,
    wire: Arc<WireCounter>,
) -> Result<(Accepted, Hello), String> {
    let mut accepted = net::secure::accept(stream, Some(&server.tls), wire)
        .await
        .map_err(|e| {
            server.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            format!(
                "TLS handshake failed: {}",
                net::tls::describe_handshake_failure(&e)
            )
        })?;
    match accepted.conn.reader.recv_value::<Hello>().await {
        Ok(Some(h)) => Ok((accepted, h)),
        Ok(None) => Err("closed before saying hello".into()),
        Err(e) => Err(format!("bad hello: {e}")),
    }
}

/// Read the hello of one connection and open or join a session.
async fn handle(server: Arc<Server>, stream: tokio::net::TcpStream, peer: String) {
    let timeout = Duration::from_secs(server.config.handshake_timeout_secs);
    let wire = Arc::new(WireCounter::default());
    let greeting = greet(&server, stream, wire.clone());
    let (accepted, hello) = match tokio::time::timeout(timeout, greeting).await {
        Ok(Ok(greeted)) => greeted,
        Ok(Err(why)) => {
            tracing::info!(%peer, "connection dropped: {why}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "connection dropped: no handshake within {timeout:?}");
            return;
        }
    };
    let mut conn = accepted.conn;
    if accepted.binding.is_none() && !server.config.insecure_plaintext {
        tracing::info!(%peer, "plaintext connection refused");
        refuse(
            &mut conn,
            "this daemon only accepts TLS connections; drop --insecure-plaintext".into(),
        )
        .await;
        return;
    }
    match hello {
        Hello::Join { session, proof } => {
            server.counters.track_session_wire(wire);
            let binding = accepted.binding.unwrap_or([0; 32]);
            join(&server, conn, &peer, session, &proof, &binding).await;
        }
        Hello::Peer(hello) => {
            peering::accept(
                &server.peers,
                conn,
                accepted.client_cert,
                hello,
                &server.counters.auth_failures,
                &peer,
            )
            .await;
        }
        Hello::New(new) => {
            server.counters.track_session_wire(wire);
            let who = Client {
                addr: &peer,
                binding: accepted.binding.unwrap_or([0; 32]),
                client_cert: accepted.client_cert,
            };
            if let Err(reason) = open(&server, conn, new, &who).await {
                tracing::info!(%peer, "session refused: {reason}");
            }
        }
    }
}

/// Add a data connection to its session if it proves the session's secret over its own
/// binding (keying material; zeros over plaintext). An unknown session and a wrong proof get
/// the same answer, as late as a failed authentication, and count as one.
async fn join(
    server: &Server,
    mut conn: Conn,
    peer: &str,
    session: u64,
    proof: &[u8; 32],
    binding: &[u8; 32],
) {
    let max = server.config.max_connections_per_session;
    let joined = {
        let mut sessions = server.sessions();
        match sessions
            .get_mut(&session)
            .filter(|j| verify_join_proof(&j.secret, binding, proof))
        {
            None => None,
            Some(j) if j.joined >= max => Some(Err(format!(
                "the session already has {max} data connections (max_connections_per_session)"
            ))),
            Some(j) => {
                j.joined += 1;
                Some(Ok((j.tx.clone(), j.secret)))
            }
        }
    };
    match joined {
        Some(Ok((tx, secret))) => admit(conn, session, secret, tx).await,
        Some(Err(reason)) => refuse(&mut conn, reason).await,
        None => refuse_join(conn, &server.counters.auth_failures, peer).await,
    }
}

/// Answer a join that did not prove its session: counted in `failures`, logged, and refused
/// as late as a failed authentication, with the same words whichever part was wrong.
pub(crate) async fn refuse_join(mut conn: Conn, failures: &AtomicU64, peer: &str) {
    let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::warn!(%peer, failures = n, "join refused: unknown session or wrong proof");
    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
    refuse(&mut conn, UNKNOWN_SESSION.into()).await;
}

/// The one answer to a join that does not prove its session, whichever part was wrong.
pub(crate) const UNKNOWN_SESSION: &str = "unknown session";

/// Who is asking: the address for logs, and what the client can prove.
struct Client<'a> {
    addr: &'a str,
    binding: [u8; 32],
    client_cert: Option<Fingerprint>,
}

/// The most any of `module`'s grants gives this peer.
fn authorize(module: &Module, new: &NewSession, who: &Client) -> Option<Access> {
    module
        .grants
        .iter()
        .filter(|g| match &g.credential {
            Credential::Token(token) => new
                .token_proof
                .is_some_and(|p| verify_token_proof(token, &who.binding, &p)),
            Credential::ClientCert(fp) => who.client_cert == Some(*fp),
        })
        .map(|g| g.access)
        .max()
}

async fn open(
    server: &Arc<Server>,
    mut conn: Conn,
    new: NewSession,
    who: &Client<'_>,
) -> Result<(), String> {
    let peer = who.addr;
    let root = match check(&server.config, &new, who) {
        Ok(root) => root,
        Err(refusal) => {
            let reason = match refusal {
                Refusal::Unauthenticated => {
                    let n = server
                        .counters
                        .auth_failures
                        .fetch_add(1, Ordering::Relaxed)
                        + 1;
                    tracing::warn!(%peer, module = %new.module, failures = n, "authentication failed");
                    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
                    format!(
                        "authentication failed for module {:?}: give its token with --token-file or CUTOVER_TOKEN, or a client certificate it allows",
                        new.module
                    )
                }
                Refusal::Because(reason) => reason,
            };
            refuse(&mut conn, reason.clone()).await;
            return Err(reason);
        }
    };
    let session: u64 = rand::random();
    let secret: [u8; 16] = rand::random();
    let (tx, rx) = mpsc::channel(128);
    let client = peer.rsplit_once(':').map_or(peer, |(ip, _)| ip).to_string();
    let full = {
        let mut sessions = server.sessions();
        let (total, theirs) = (
            sessions.len(),
            sessions.values().filter(|j| j.client == client).count(),
        );
        let cfg = &server.config;
        if total >= cfg.max_sessions {
            Some(format!(
                "the daemon is serving its maximum of {} sessions; try again later",
                cfg.max_sessions
            ))
        } else if theirs >= cfg.max_sessions_per_client {
            Some(format!(
                "{client} already has {theirs} sessions open (max_sessions_per_client); try again when one ends"
            ))
        } else {
            sessions.insert(
                session,
                Joinable {
                    secret,
                    tx,
                    client: client.clone(),
                    joined: 0,
                },
            );
            server
                .counters
                .sessions_total
                .fetch_add(1, Ordering::Relaxed);
            server
                .counters
                .sessions_active
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    };
    if let Some(reason) = full {
        refuse(&mut conn, reason.clone()).await;
        return Err(reason);
    }
    // From here the slot is freed however this task ends, a panic included.
    let _slot = SessionSlot {
        server: server.clone(),
        session,
    };
    if conn
        .writer
        .send_value(&Welcome::Accepted { session, secret })
        .await
        .is_err()
    {
        return Err("client went away during the handshake".into());
    }
    tracing::info!(%peer, module = %new.module, path = %new.path, role = ?new.server_role, "session opened");
    let idle = Duration::from_secs(server.config.idle_timeout_secs);
    run_engine(conn, rx, &new, root, idle).await?;
    tracing::info!(%peer, "session finished");
    Ok(())
}

/// A session's entry in the table; dropping it (on any exit, unwinding included) removes
/// the entry, so a failed session never keeps its slot or its joiners' channel.
struct SessionSlot {
    server: Arc<Server>,
    session: u64,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.server.sessions().remove(&self.session);
        let active = &self.server.counters.sessions_active;
        active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Run this side of a session: the receiver for a push, the sender for a pull.
async fn run_engine(
    control: Conn,
    data: mpsc::Receiver<Conn>,
    new: &NewSession,
    place: SessionPlace,
    idle_timeout: Duration,
) -> Result<(), String> {
    let mut opts = new.options.clone();
    let sess = Session {
        control,
        data,
        limiter: opts.bwlimit.and_then(RateLimiter::new).map(Arc::new),
        idle_timeout: Some(idle_timeout),
        public_name: place.public_name.clone(),
    };
    let stats = Arc::new(Stats::default());
    let result = match new.server_role {
        Role::Receiver => {
            opts.owners = rustix::process::geteuid().is_root();
            let dest = Destination {
                root: place.root,
                is_dir_hint: new.path.ends_with('/') || new.path.is_empty(),
                jail: place.jail,
                devices: place.devices,
                // In a pull the list is the client's; a push brings it walked.
                paths: None,
            };
            engine::run_receiver(sess, dest, opts, Arc::new(NoEvents), stats)
                .await
                .map(|_| ())
        }
        Role::Sender => {
            let source = Source {
                root: place.root,
                jail: place.jail,
                // With --files-from, the client streams its list.
                paths: None,
                changed: None,
            };
            engine::run_sender(sess, source, opts, Arc::new(NoEvents), stats)
                .await
                .map(|_| ())
        }
    };
    result.map_err(|e| e.to_string())
}

/// The refusal for a client of another protocol version, if it is one.
fn version_mismatch(new: &NewSession) -> Option<String> {
    (new.version != PROTOCOL_VERSION).then(|| {
        format!(
            "{}{} is not supported (this side speaks {PROTOCOL_VERSION}); use the same cutover version on both sides",
            proto::VERSION_REFUSAL,
            new.version
        )
    })
}

/// Why a session request is turned down.
enum Refusal {
    /// No grant of the module matches what the client proved (delayed, logged, counted).
    Unauthenticated,
    Because(String),
}

/// Where a session works: its root, and the module directory it must stay beneath (none
/// for an ssh session, which has its login's own rights).
pub(crate) struct SessionPlace {
    pub(crate) root: PathBuf,
    pub(crate) jail: Option<PathBuf>,
    /// Device nodes and block devices may be written (module `allow_devices`; always for an
    /// ssh session, whose login could make them itself).
    pub(crate) devices: bool,
    /// The module directory's real path and the name the client knows it by: messages to
    /// the client never show the daemon's own paths.
    pub(crate) public_name: Option<engine::PublicName>,
}

/// Everything a new session must pass before it opens: version, module, credentials,
/// access for the role, and the path. Returns where the session works.
fn check(config: &Config, new: &NewSession, who: &Client) -> Result<SessionPlace, Refusal> {
    if let Some(reason) = version_mismatch(new) {
        return Err(Refusal::Because(reason));
    }
    let module = find_module(config, &new.module).map_err(Refusal::Because)?;
    let access = authorize(module, new, who).ok_or(Refusal::Unauthenticated)?;
    if new.server_role == Role::Receiver && access < Access::ReadWrite {
        return Err(Refusal::Because(format!(
            "module {:?}: your credentials grant read-only access",
            module.name
        )));
    }
    resolve(module, new).map_err(Refusal::Because)
}

fn find_module<'c>(config: &'c Config, name: &str) -> Result<&'c Module, String> {
    config
        .modules
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = config.modules.iter().map(|m| m.name.as_str()).collect();
            format!(
                "unknown module {name:?} (this daemon serves: {})",
                names.join(", ")
            )
        })
}

/// Map a session request to a path beneath its module root, or say why not. The path must
/// resolve beneath the module even through the symlinks a client may have planted there;
/// the engine then opens it through the module's directory again, so a swap in between
/// leads nowhere either.
fn resolve(module: &Module, new: &NewSession) -> Result<SessionPlace, String> {
    if new.server_role == Role::Receiver && module.read_only {
        return Err(format!("module {:?} is read-only", module.name));
    }
    let rel = new.path.trim_end_matches('/').trim_start_matches("./");
    let refused = |why: String| format!("path {:?} refused: {why}", new.path);
    cofs::validate_rel(rel.as_bytes()).map_err(refused)?;
    let jail = cofs::Root::open(&module.path)
        .map_err(|e| format!("module {:?} is unavailable: {e}", module.name))?;
    let missing = || {
        format!(
            "path {:?} does not exist in module {:?}",
            new.path, module.name
        )
    };
    match jail.place(rel.as_bytes()) {
        // The parent is beneath; the last component may be a link that stays inside.
        Ok(place) => match place.metadata() {
            Ok(Some(md)) if md.is_symlink() => {
                jail.open_beneath(rel.as_bytes(), rustix::fs::OFlags::PATH)
                    .map_err(|e| refused(e.to_string()))?;
            }
            Ok(Some(_)) => {}
            _ if new.server_role == Role::Sender => return Err(missing()),
            _ => {}
        },
        Err(cofs::FsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            if new.server_role == Role::Sender {
                return Err(missing());
            }
        }
        Err(e) => return Err(refused(e.to_string())),
    }
    Ok(SessionPlace {
        root: cofs::join(&module.path, rel.as_bytes()),
        jail: Some(module.path.clone()),
        devices: module.allow_devices,
        public_name: Some(engine::PublicName {
            real: module.path.clone(),
            shown: module.name.clone(),
        }),
    })
}
