//! The replication peers of the hosted volumes (`[[volume.peer]]`): one [`PeerLink`] per
//! peer, which either dials the peer (it has an `address`) and redials after every break
//! with a growing pause, forever, or waits for the peer to dial in. Either way a link is
//! `connections + 1` TLS connections, each authenticated by both daemons' certificates
//! (the dialler presents its identity as a client certificate; each side pins the other's
//! fingerprint from its config, so no secret travels), handed to `replica::run`.
//!
//! Which side dials is independent of roles: the side behind NAT has the `address` and
//! dials out; the other never dials it. If both sides have an address, both dial, and the
//! one with the smaller fingerprint refuses the other's links, so that two links never
//! race: its own link is the one.

use crate::config;
use crate::volumes::Hosted;
use net::tls::{Fingerprint, Identity};
use net::Conn;
use proto::{PeerHello, Welcome, PROTOCOL_VERSION};
use replica::{LinkError, LinkSettings, LinkView};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// A link silent this long (no keepalive either) is dead.
pub const LINK_IDLE: Duration = Duration::from_secs(10);
/// Dialling a peer: each step (TCP, TLS, welcome) within this.
pub(crate) const DIAL_PATIENCE: Duration = Duration::from_secs(10);
/// Data connections a link grows to at most (the first ones included).
pub(crate) const MAX_LINK_CONNECTIONS: usize = config::MAX_CONNECTIONS;
/// Pauses between attempts grow from the first to the last.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_LAST: Duration = Duration::from_secs(30);
/// A link that lasted this long starts the pauses over (one refused at once keeps
/// backing off; one that worked for a while is redialled at once after a break).
const BACKOFF_RESET: Duration = Duration::from_secs(2);
/// Connections of a link being assembled by the waiting side are dropped after this.
const ASSEMBLY_PATIENCE: Duration = Duration::from_secs(30);

/// The node id a peer has in this node's metadata: from its certificate, so that both
/// sides agree without a setting.
pub fn node_id(fp: &Fingerprint) -> u32 {
    u32::from_le_bytes([fp.0[0], fp.0[1], fp.0[2], fp.0[3]]).max(1)
}

/// One peer of one volume.
pub struct PeerLink {
    pub name: String,
    pub volume: String,
    pub cfg: config::Peer,
    pub slot: u32,
    pub view: Arc<LinkView>,
    /// Whether this side dials (else it waits for the peer).
    pub dials: bool,
    /// This node's fingerprint sorts before the peer's (see the module doc).
    first: bool,
    /// `disconnect` clears it: no dialling, incoming links refused, until `connect`.
    enabled: AtomicBool,
    /// Wakes the dialler (from its pause, or out of a running link: a role change).
    restart: Notify,
    /// The link the waiting side runs.
    running: Mutex<Option<JoinHandle<()>>>,
    assembling: Mutex<Option<Assembly>>,
    /// The running link the waiting side accepted (its id), where the dialler's later
    /// data connections join it.
    joining: Mutex<Option<(u64, mpsc::Sender<Conn>)>>,
    links: AtomicU64,
}

/// Incoming connections of one link, by index.
struct Assembly {
    link: u64,
    conns: Vec<Option<Conn>>,
    since: Instant,
}

impl PeerLink {
    pub fn new(volume: &str, cfg: config::Peer, slot: u32, own: &Fingerprint) -> PeerLink {
        PeerLink {
            dials: cfg.address.is_some(),
            first: own.0 < cfg.fingerprint.0,
            name: cfg.name.clone(),
            volume: volume.to_string(),
            slot,
            view: Arc::new(LinkView::default()),
            enabled: AtomicBool::new(true),
            restart: Notify::new(),
            running: Mutex::new(None),
            assembling: Mutex::new(None),
            joining: Mutex::new(None),
            links: AtomicU64::new(0),
            cfg,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// `connect` / `disconnect`.
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
        if !on {
            self.view.update(|v| v.connection = "disconnected".into());
        }
        self.kick();
    }

    /// End the running link (it reconnects when enabled): after a role change.
    pub fn kick(&self) {
        if let Some(t) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
        self.restart.notify_waiters();
        self.restart.notify_one();
    }

    fn settings(&self) -> LinkSettings {
        LinkSettings {
            volume: self.volume.clone(),
            peer: self.name.clone(),
            slot: self.slot,
            stream: volume::StreamOptions {
                max_lag: self.cfg.max_lag,
                sync: self.cfg.protocol == config::Protocol::C,
                pull_ahead: self.cfg.on_congestion == config::OnCongestion::PullAhead,
                csums: self.cfg.csums,
            },
            max_rate: self.cfg.max_rate,
            idle: LINK_IDLE,
            after_split_brain: self.cfg.after_split_brain,
        }
    }
}

/// Run one link over `conns` and record how it ended. Returns whether it got as far as
/// replicating (both sides agreed) and then broke: worth redialling at once.
async fn run_link(
    link: &PeerLink,
    hosted: &Hosted,
    conns: Vec<Conn>,
    more: mpsc::Receiver<Conn>,
) -> bool {
    let n = link.links.fetch_add(1, Ordering::Relaxed) + 1;
    let repl = match hosted.with_meta(|m| m.replication()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("volume {}: peer {}: {e}", link.volume, link.name);
            return false;
        }
    };
    tracing::info!(
        "volume {}: peer {}: link {n} up ({} data connections)",
        link.volume,
        link.name,
        conns.len().saturating_sub(1)
    );
    let r = replica::run_growing(
        conns,
        more,
        repl,
        hosted.backend.clone(),
        &link.settings(),
        &link.view,
    )
    .await;
    let (state, why) = match &r {
        Ok(()) => ("connecting", "ended".to_string()),
        Err(e) if e.is_transient() => ("connecting", e.to_string()),
        Err(e) => ("standalone", e.to_string()),
    };
    match &r {
        Err(LinkError::Refused(_)) | Err(LinkError::PeerRefused(_)) => {
            tracing::error!("volume {}: peer {}: {why}", link.volume, link.name)
        }
        _ => tracing::warn!(
            "volume {}: peer {}: link {n} down: {why}",
            link.volume,
            link.name
        ),
    }
    let replicated =
        matches!(&r, Err(e) if e.is_transient()) && link.view.get().connection == "connected";
    link.view.update(|v| {
        v.connection = state.into();
        v.replication = String::new();
        v.last_error = Some(why);
    });
    replicated
}

/// Dial `link`'s peer and run links to it until the daemon stops.
pub(crate) async fn dial_loop(link: Arc<PeerLink>, hosted: Arc<Hosted>, identity: Arc<Identity>) {
    let mut pause = BACKOFF_FIRST;
    loop {
        if !link.enabled() {
            link.restart.notified().await;
            continue;
        }
        link.view.update(|v| v.connection = "connecting".into());
        let started = Instant::now();
        let dialled = tokio::select! {
            d = crate::link_dial::dial(&link, &identity) => d,
            _ = link.restart.notified() => Err("restarted".into()),
        };
        match dialled {
            Ok((conns, d)) => {
                let (tx, more) = mpsc::channel(MAX_LINK_CONNECTIONS);
                let grow = async {
                    d.grow(&link, tx).await;
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    broke = run_link(&link, &hosted, conns, more) => {
                        // A link that worked and broke is redialled at once; one refused
                        // or failing in its handshake keeps backing off.
                        if broke {
                            pause = BACKOFF_FIRST;
                        }
                    }
                    _ = grow => {}
                    _ = link.restart.notified() => {
                        link.view.update(|v| v.connection = "connecting".into());
                    }
                }
            }
            Err(why) => {
                tracing::debug!("volume {}: peer {}: dial: {why}", link.volume, link.name);
                link.view.update(|v| v.last_error = Some(why));
            }
        }
        if started.elapsed() > BACKOFF_RESET {
            pause = BACKOFF_FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = link.restart.notified() => {}
        }
        pause = (pause * 2).min(BACKOFF_LAST);
    }
}

/// Say which link and connection this is, and take the peer's welcome.
pub(crate) async fn greet(
    mut conn: Conn,
    link: &PeerLink,
    id: u64,
    index: u32,
    count: u32,
    sender: [u8; 32],
) -> Result<Conn, String> {
    let hello = proto::Hello::Peer(PeerHello {
        version: PROTOCOL_VERSION,
        volume: link.volume.clone(),
        link: id,
        index,
        count,
        sender,
    });
    conn.writer
        .send_value(&hello)
        .await
        .map_err(|e| e.to_string())?;
    let welcome = tokio::time::timeout(DIAL_PATIENCE, conn.reader.recv_value::<Welcome>())
        .await
        .map_err(|_| format!("no answer within {DIAL_PATIENCE:?}"))?
        .map_err(|e| e.to_string())?;
    match welcome {
        Some(Welcome::Accepted { .. }) => Ok(conn),
        Some(Welcome::Refused { reason }) => Err(format!("refused: {reason}")),
        None => Err("closed the connection".into()),
    }
}

/// The links of every hosted volume, for routing incoming peer connections.
#[derive(Default)]
pub struct PeerHub {
    pub(crate) links: Vec<(Arc<PeerLink>, Arc<Hosted>)>,
}

impl PeerHub {
    /// The link of `volume` whose peer has certificate `cert`.
    fn find(&self, volume: &str, cert: &Fingerprint) -> Option<&(Arc<PeerLink>, Arc<Hosted>)> {
        self.links
            .iter()
            .find(|(l, _)| l.volume == volume && l.cfg.fingerprint == *cert)
    }
}

/// An incoming connection of a peer link: check who it is, welcome it, and start the link
/// once all its connections are in. Anything not a configured peer is refused as late as
/// a failed authentication.
pub(crate) async fn accept(
    hub: &PeerHub,
    mut conn: Conn,
    cert: Option<Fingerprint>,
    hello: PeerHello,
    failures: &AtomicU64,
    addr: &str,
) {
    let found = cert.and_then(|c| hub.find(&hello.volume, &c));
    let Some((link, hosted)) = found else {
        let n = failures.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            peer = %addr,
            failures = n,
            "peer link refused: volume {:?} has no peer with this certificate",
            hello.volume
        );
        tokio::time::sleep(crate::AUTH_FAILURE_DELAY).await;
        crate::refuse(
            &mut conn,
            format!(
                "volume {:?} has no peer with this node's certificate; add it as a [[volume.peer]] \
                 with this node's fingerprint",
                hello.volume
            ),
        )
        .await;
        return;
    };
    let refusal = if !link.enabled() {
        Some(format!(
            "volume {}: the link to this peer is disconnected (`cutover volume connect` on that node)",
            link.volume
        ))
    } else if link.dials && link.first {
        Some(format!(
            "volume {}: both nodes dial each other and that one's link wins; remove the \
             address on one side",
            link.volume
        ))
    } else if hello.version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {} here, {} there; run the same cutover on both nodes",
            PROTOCOL_VERSION, hello.version
        ))
    } else if hello.count < 2
        || hello.count as usize > MAX_LINK_CONNECTIONS + 1
        || hello.index as usize > MAX_LINK_CONNECTIONS
    {
        Some(format!(
            "connection {} of {}: a link has 2 to 65 connections",
            hello.index, hello.count
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        crate::refuse(&mut conn, reason).await;
        return;
    }
    if conn
        .writer
        .send_value(&Welcome::Accepted {
            session: hello.link,
            secret: [0; 16],
        })
        .await
        .is_err()
    {
        return;
    }
    if hello.index >= hello.count {
        // A connection the dialler added to its running link.
        let joining = link
            .joining
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match joining {
            Some((id, tx)) if id == hello.link => {
                let _ = tx.send(conn).await;
            }
            _ => conn.writer.close().await,
        }
        return;
    }
    let complete = {
        let mut slot = link.assembling.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = match &*slot {
            Some(a) => a.link != hello.link || a.since.elapsed() > ASSEMBLY_PATIENCE,
            None => true,
        };
        if fresh {
            *slot = Some(Assembly {
                link: hello.link,
                conns: (0..hello.count).map(|_| None).collect(),
                since: Instant::now(),
            });
        }
        let a = slot.as_mut().expect("set above");
        if a.conns.len() != hello.count as usize {
            None
        } else {
            a.conns[hello.index as usize] = Some(conn);
            if a.conns.iter().all(Option::is_some) {
                slot.take()
                    .map(|a| a.conns.into_iter().flatten().collect::<Vec<_>>())
            } else {
                None
            }
        }
    };
    let Some(conns) = complete else {
        return;
    };
    // A new link replaces the one running (the peer redialled: the old one is dead).
    let (tx, more) = mpsc::channel(MAX_LINK_CONNECTIONS);
    *link.joining.lock().unwrap_or_else(|p| p.into_inner()) = Some((hello.link, tx));
    let (l, h) = (link.clone(), hosted.clone());
    let task = tokio::spawn(async move {
        run_link(&l, &h, conns, more).await;
    });
    let old = link
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .replace(task);
    if let Some(old) = old {
        old.abort();
    }
}
