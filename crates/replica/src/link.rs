//! One link's life once its connections are open: exchange states, decide, then run as
//! source, target, or idle until a connection breaks. The daemon reconnects.

use crate::decide::{decide, Verdict};
use crate::wire::{NodeState, PeerMsg, SplitBrainPolicy, LINK_VERSION};
use net::{Conn, ConnError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volume::{Replication, StreamOptions};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("the peer sent nothing for {0:?}: it stalled, or the network dropped the link")]
    Idle(Duration),
    #[error("the peer closed the link")]
    Closed,
    #[error("refused: {0}")]
    Refused(String),
    #[error("the peer refused: {0}")]
    PeerRefused(String),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("volume: {0}")]
    Volume(#[from] volume::Error),
    #[error("backing I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl LinkError {
    /// Whether retrying later can help without anyone acting (a broken connection, not
    /// a refusal).
    pub fn is_transient(&self) -> bool {
        !matches!(self, LinkError::Refused(_) | LinkError::PeerRefused(_))
    }
}

/// How one link runs.
#[derive(Clone, Debug)]
pub struct LinkSettings {
    /// The volume's and the peer's names (for messages).
    pub volume: String,
    pub peer: String,
    /// The peer's slot in this node's metadata.
    pub slot: u32,
    pub stream: StreamOptions,
    /// Bytes per second the source sends at most (None: no cap).
    pub max_rate: Option<u64>,
    /// A link silent this long is dead (keepalives go every `idle / 4`).
    pub idle: Duration,
    pub after_split_brain: SplitBrainPolicy,
}

/// What `status` shows of a link.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    /// "connecting", "connected", "standalone" (refused; retried later).
    pub connection: String,
    /// "source", "target", "idle" while connected.
    pub replication: String,
    pub peer_primary: Option<bool>,
    pub peer_inconsistent: Option<bool>,
    /// Data connections of the link.
    pub connections: usize,
    /// Why the last link ended.
    pub last_error: Option<String>,
    /// Resync bytes per second over the last few seconds (source side).
    pub resync_rate: u64,
    /// Bytes received and applied (target side), since the link started.
    pub applied_bytes: u64,
    /// `connect --discard-my-data`: on the next link that needs it, this node takes the
    /// peer's data over its own writes since they parted. Cleared once that resync is
    /// in step.
    pub discard_my_data: bool,
}

/// A link's [`LinkInfo`], shared with the daemon's status.
#[derive(Debug, Default)]
pub struct LinkView(Mutex<LinkInfo>);

impl LinkView {
    pub fn get(&self) -> LinkInfo {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut LinkInfo)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// This node's state for the peer of `s`.
pub(crate) fn my_state(repl: &Replication, s: &LinkSettings, view: &LinkView) -> NodeState {
    let slot = s.slot;
    let g = repl.generations(slot);
    let geo = repl.geometry();
    NodeState {
        version: LINK_VERSION,
        size: geo.size,
        block_size: geo.block_size,
        current: g.current,
        history: g.history.to_vec(),
        bitmap: g.bitmap,
        bitmap_history: g.bitmap_history.to_vec(),
        primary: g.primary,
        inconsistent: g.inconsistent,
        seeded: g.seeded,
        out_of_sync_blocks: repl.status(slot).map_or(0, |s| s.out_of_sync_blocks),
        discard_my_data: view.get().discard_my_data,
        after_split_brain: s.after_split_brain,
    }
}

/// The next control message within `idle`.
pub(crate) async fn recv_within(
    r: &mut net::MsgReader,
    idle: Duration,
) -> Result<PeerMsg, LinkError> {
    match tokio::time::timeout(idle, r.recv_any::<PeerMsg>()).await {
        Err(_) => Err(LinkError::Idle(idle)),
        Ok(Ok(Some(PeerMsg::Refuse { reason }))) => Err(LinkError::PeerRefused(reason)),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(LinkError::Closed),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Run a link over `conns` (control first, then data) until it breaks or is refused.
/// `backend` is the volume's backing: the source reads resync data from it, the target
/// writes the stream into it.
pub async fn run(
    conns: Vec<Conn>,
    repl: Replication,
    backend: Arc<dyn nbd::Backend>,
    settings: &LinkSettings,
    view: &LinkView,
) -> Result<(), LinkError> {
    let (_none, more) = tokio::sync::mpsc::channel(1);
    run_growing(conns, more, repl, backend, settings, view).await
}

/// [`run`], taking more data connections from `more` while it runs (the dialling side
/// opens them while they raise the link's rate).
pub async fn run_growing(
    mut conns: Vec<Conn>,
    more: tokio::sync::mpsc::Receiver<Conn>,
    repl: Replication,
    backend: Arc<dyn nbd::Backend>,
    settings: &LinkSettings,
    view: &LinkView,
) -> Result<(), LinkError> {
    if conns.len() < 2 {
        return Err(LinkError::Protocol(format!(
            "a link needs a control and at least one data connection, got {}",
            conns.len()
        )));
    }
    let mut ctl = conns.remove(0);
    let me = my_state(&repl, settings, view);
    ctl.writer.send_any(&me, false).await?;
    let peer: NodeState = match tokio::time::timeout(settings.idle, ctl.reader.recv_any()).await {
        Err(_) => return Err(LinkError::Idle(settings.idle)),
        Ok(Ok(Some(p))) => p,
        Ok(Ok(None)) => return Err(LinkError::Closed),
        Ok(Err(e)) => return Err(e.into()),
    };
    if peer.version != LINK_VERSION {
        let reason = format!(
            "peer {} speaks link version {}, this node {LINK_VERSION}; run the same cutover on both",
            settings.peer, peer.version
        );
        let _ = ctl
            .writer
            .send_any(
                &PeerMsg::Refuse {
                    reason: reason.clone(),
                },
                false,
            )
            .await;
        return Err(LinkError::Refused(reason));
    }
    let verdict = decide(&me, &peer, &settings.peer, &settings.volume);
    view.update(|v| {
        v.connection = "connected".into();
        v.peer_primary = Some(peer.primary);
        v.peer_inconsistent = Some(peer.inconsistent);
        v.connections = conns.len();
        v.replication = match &verdict {
            Verdict::Idle => "idle",
            Verdict::Source(_) => "source",
            Verdict::Target(_) => "target",
            Verdict::Refuse(_) => "refused",
        }
        .into();
    });
    if let Verdict::Source(r) | Verdict::Target(r) = &verdict {
        if let Some(why) = &r.discards {
            tracing::warn!(peer = %settings.peer, "{why}");
        }
    }
    match verdict {
        Verdict::Refuse(reason) => {
            let _ = ctl
                .writer
                .send_any(
                    &PeerMsg::Refuse {
                        reason: reason.clone(),
                    },
                    false,
                )
                .await;
            Err(LinkError::Refused(reason))
        }
        Verdict::Idle => idle(ctl, settings.idle).await,
        Verdict::Source(r) => {
            let mut settings = settings.clone();
            settings.stream.csums |= r.checksums;
            crate::source::run(ctl, conns, more, repl, backend, &settings, r.full, view).await
        }
        Verdict::Target(r) => {
            crate::target::run(
                ctl,
                conns,
                more,
                repl,
                backend,
                settings,
                r.full,
                view,
                peer.current,
            )
            .await
        }
    }
}

/// Neither side writes: keep the link alive until it breaks (a role change restarts it).
async fn idle(ctl: Conn, idle: Duration) -> Result<(), LinkError> {
    let Conn {
        reader: mut r,
        writer: mut w,
    } = ctl;
    let beat = async move {
        loop {
            tokio::time::sleep(idle / 4).await;
            w.send_any(&PeerMsg::Keepalive, false).await?;
        }
    };
    let listen = async move {
        loop {
            match recv_within(&mut r, idle).await? {
                PeerMsg::Keepalive => {}
                other => return Err(LinkError::Protocol(format!("{other:?} on an idle link"))),
            }
        }
    };
    tokio::select! {
        r = beat => r,
        r = listen => r,
    }
}

/// A control message arrived (or the receive failed): note when, pass it on.
pub(crate) fn heard_now<T>(heard: &mut Instant, msg: Result<T, LinkError>) -> Result<T, LinkError> {
    *heard = Instant::now();
    msg
}

/// Keepalive bookkeeping for a control writer.
pub(crate) struct Beat {
    last: Instant,
    every: Duration,
}

impl Beat {
    pub fn new(idle: Duration) -> Beat {
        Beat {
            last: Instant::now(),
            every: idle / 4,
        }
    }

    pub fn sent(&mut self) {
        self.last = Instant::now();
    }

    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every
    }
}
