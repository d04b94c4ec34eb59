//! The dialling side of a peer link: open its `connections + 1` connections (TLS with
//! both certificates pinned, or one ssh login each, see `peer_ssh.rs`), and while the
//! link runs, open more data connections as long as each doubling still raises the rate
//! the link carries (as a sync session grows): a link through a path that caps each flow
//! (2 MB/s per TCP stream on a 64 MB/s link) fills the link without anyone tuning
//! `connections`. New connections join the running link (their index is past the link's
//! first count); both ends then use them for the stream and resync.

use crate::config::PeerAddress;
use crate::peering::{greet, PeerLink, DIAL_PATIENCE, MAX_LINK_CONNECTIONS};
use net::tls::Identity;
use net::Conn;
use proto::WireCounter;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// TLS connections dialled at the same time (each costs a handshake's CPU on both ends).
const AT_ONCE_TLS: usize = 32;
/// ssh logins started at the same time (sshd drops logins past its MaxStartups, 10 by
/// default).
const AT_ONCE_SSH: usize = 8;
/// How often the link's rate is looked at.
const GROW_STEP: Duration = Duration::from_secs(1);
/// A doubling must raise the rate by this factor to be followed by another.
const GROW_GAIN: f64 = 1.2;
/// Below this rate the link is idle or limited by something else: no verdict.
const GROW_IDLE_RATE: f64 = 1024.0 * 1024.0;

/// How to reach the peer.
enum Route {
    Tls {
        addr: String,
        config: Arc<rustls::ClientConfig>,
    },
    Ssh {
        dest: String,
        command: (Vec<String>, String),
    },
}

/// What it takes to open more connections of a link.
pub(crate) struct Dialled {
    route: Route,
    own: [u8; 32],
    id: u64,
    /// The first count (control + data), which every later hello repeats.
    count: u32,
    /// Bytes every connection of the link moved.
    wire: Arc<WireCounter>,
}

/// Open every connection of a new link to the peer (several at once: one after another,
/// 41 connections at 100 ms RTT take 9 s); returns them and how to open more.
pub(crate) async fn dial(
    link: &Arc<PeerLink>,
    identity: &Identity,
) -> Result<(Vec<Conn>, Arc<Dialled>), String> {
    let route = match &link.cfg.address {
        Some(PeerAddress::Tcp(a)) => {
            let seen = Arc::new(Mutex::new(None));
            let config = net::tls::client_config(Some(link.cfg.fingerprint), Some(identity), seen)
                .map_err(|e| e.to_string())?;
            Route::Tls {
                addr: a.clone(),
                config,
            }
        }
        Some(PeerAddress::Ssh(dest)) => Route::Ssh {
            dest: dest.clone(),
            command: crate::peer_ssh::command(link)?,
        },
        None => return Err("no address: this side waits for the peer".into()),
    };
    let count = link.cfg.connections as u32 + 1;
    let d = Arc::new(Dialled {
        route,
        own: identity.fingerprint.0,
        id: rand::random(),
        count,
        wire: Arc::new(WireCounter::default()),
    });
    let conns = d.open_many(link, 0..count).await?;
    Ok((conns, d))
}

impl Dialled {
    /// Open connections `indexes` of the link, several at a time; in index order.
    async fn open_many(
        self: &Arc<Self>,
        link: &Arc<PeerLink>,
        indexes: std::ops::Range<u32>,
    ) -> Result<Vec<Conn>, String> {
        let first = indexes.start;
        let at_once = match self.route {
            Route::Tls { .. } => AT_ONCE_TLS,
            Route::Ssh { .. } => AT_ONCE_SSH,
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
        let mut tasks = tokio::task::JoinSet::new();
        for index in indexes.clone() {
            let (d, l, gate) = (self.clone(), link.clone(), gate.clone());
            tasks.spawn(async move {
                let _turn = gate.acquire_owned().await;
                (index, d.open(&l, index).await)
            });
        }
        let mut conns: Vec<Option<Conn>> = indexes.map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            let (index, opened) = done.map_err(|e| format!("dialling failed: {e}"))?;
            // The first failure ends the dial (dropping the set cancels the others).
            conns[(index - first) as usize] = Some(opened?);
        }
        Ok(conns.into_iter().flatten().collect())
    }

    /// Open connection `index` of the link.
    async fn open(&self, link: &PeerLink, index: u32) -> Result<Conn, String> {
        match &self.route {
            Route::Tls { addr, config } => {
                let d = net::secure::connect(
                    addr,
                    Some(config.clone()),
                    self.wire.clone(),
                    Some(DIAL_PATIENCE),
                )
                .await
                .map_err(|e| format!("{addr}: {e}"))?;
                greet(d.conn, link, self.id, index, self.count, self.own)
                    .await
                    .map_err(|e| format!("{addr}: {e}"))
            }
            Route::Ssh { dest, command } => {
                let hello = (self.own, self.id, index, self.count);
                crate::peer_ssh::dial_one(link, dest, command, hello, self.wire.clone()).await
            }
        }
    }

    /// While the link runs: double its data connections while each doubling raises the
    /// rate by [`GROW_GAIN`], up to the peer's `max_connections`; the new ones go to `tx`.
    /// Returns when growing stops helping, or the link ended.
    pub(crate) async fn grow(self: &Arc<Self>, link: &Arc<PeerLink>, tx: mpsc::Sender<Conn>) {
        let moved =
            || self.wire.sent.load(Ordering::Relaxed) + self.wire.received.load(Ordering::Relaxed);
        let mut data = self.count as usize - 1;
        let mut last = moved();
        let mut rule = net::growth::Doubling::new(GROW_GAIN, GROW_IDLE_RATE);
        loop {
            tokio::time::sleep(GROW_STEP).await;
            if tx.is_closed() {
                return;
            }
            let now = moved();
            let rate = now.saturating_sub(last) as f64 / GROW_STEP.as_secs_f64();
            last = now;
            match rule.step(rate) {
                net::growth::Step::Wait => continue,
                net::growth::Step::Stop => {
                    tracing::debug!(data, rate, "peer {}: link stops growing", link.name);
                    return;
                }
                net::growth::Step::Grow => {}
            }
            let most = link.cfg.max_connections.min(MAX_LINK_CONNECTIONS);
            let more = data.min(most.saturating_sub(data));
            if more == 0 {
                return;
            }
            let from = 1 + data as u32;
            match self.open_many(link, from..from + more as u32).await {
                Ok(conns) => {
                    for c in conns {
                        if tx.send(c).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!("peer {}: cannot open more connections: {e}", link.name);
                    return;
                }
            }
            data += more;
            tracing::info!(
                "volume {}: peer {}: link grown to {data} data connections ({:.1} MB/s before)",
                link.volume,
                link.name,
                rate / 1e6
            );
        }
    }
}
