//! `cutover volume primary|secondary|connect|disconnect` and the peers in `status`: what
//! the control socket does for replication. Roles are recorded in the volume's metadata;
//! a change restarts the volume's links, whose handshake then decides again who sends.

use crate::peering::PeerLink;
use crate::volumes::Hosted;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// One peer of a volume as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    /// "connecting", "connected", "standalone" (refused, retried later), "disconnected".
    pub connection: String,
    /// While connected: "source" (this node sends), "target", "idle".
    pub replication: String,
    /// Whether this node dials the peer (else it waits for it).
    pub dials: bool,
    pub protocol: String,
    /// "primary", "secondary", or "unknown" while not connected.
    pub peer_role: String,
    /// The peer's data: "UpToDate", "Inconsistent" (being resynced), or "unknown".
    pub peer_disk: String,
    /// Bytes the peer may lack (its bitmap in this node's metadata).
    pub out_of_sync_bytes: u64,
    /// Of the stream: bytes sent and not yet applied by the peer, and how long ago the
    /// oldest of them was written here (seconds).
    pub lag_bytes: u64,
    #[serde(default)]
    pub lag_secs: f64,
    /// Resync bytes per second (source side) and the time left at that rate.
    pub resync_rate: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_secs: Option<u64>,
    /// Data connections of the link.
    pub connections: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Blocks checksum comparisons (csums resync, online verify) found different and
    /// resent, since the daemon started.
    #[serde(default)]
    pub mismatched_blocks: u64,
    /// An online verify is under way: bytes of the volume compared so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_position: Option<u64>,
    /// Bytes online verifies compared, since the daemon started.
    #[serde(default)]
    pub verified_bytes: u64,
    /// `connect --discard-my-data` is pending: the next link that needs it overwrites this
    /// node's writes since the split.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard_my_data: bool,
}

fn links(h: &Hosted) -> &[Arc<PeerLink>] {
    h.peers.get().map(Vec::as_slice).unwrap_or(&[])
}

/// The peers of `h`, for `status`.
pub(crate) fn peers_of(h: &Hosted) -> Vec<PeerStatus> {
    let repl = h.with_meta(|m| m.replication()).ok();
    links(h)
        .iter()
        .map(|l| {
            let v = l.view.get();
            let st = repl.as_ref().and_then(|r| r.status(l.slot));
            let connected = v.connection == "connected";
            let (oos, lag, resync_blocks) = st.as_ref().map_or((0, 0, 0), |s| {
                (s.out_of_sync_bytes, s.lag_bytes, s.resync_blocks)
            });
            let peer_role = match (connected, v.peer_primary) {
                (true, Some(true)) => "primary",
                (true, Some(false)) => "secondary",
                _ => "unknown",
            };
            let peer_disk = match (connected, v.replication.as_str()) {
                (true, "source") if resync_blocks > 0 || oos > lag.max(1) * 4 => "Inconsistent",
                (true, "source") => "UpToDate",
                (true, _) => match v.peer_inconsistent {
                    Some(true) => "Inconsistent",
                    Some(false) => "UpToDate",
                    None => "unknown",
                },
                _ => "unknown",
            };
            let eta_secs =
                (connected && v.resync_rate > 0 && resync_blocks > 0).then(|| oos / v.resync_rate);
            PeerStatus {
                name: l.name.clone(),
                connection: if l.enabled() {
                    v.connection
                } else {
                    "disconnected".into()
                },
                replication: if connected {
                    v.replication
                } else {
                    String::new()
                },
                dials: l.dials,
                protocol: format!("{:?}", l.cfg.protocol),
                peer_role: peer_role.into(),
                peer_disk: peer_disk.into(),
                out_of_sync_bytes: oos,
                lag_bytes: lag,
                lag_secs: st.as_ref().map_or(0.0, |s| s.lag_ms as f64 / 1000.0),
                resync_rate: if connected { v.resync_rate } else { 0 },
                eta_secs,
                connections: v.connections,
                last_error: v.last_error,
                discard_my_data: v.discard_my_data,
                mismatched_blocks: st.as_ref().map_or(0, |s| s.mismatched_blocks),
                verify_position: st.as_ref().and_then(|s| s.verify_position),
                verified_bytes: st.as_ref().map_or(0, |s| s.verified_bytes),
            }
        })
        .collect()
}

/// `primary`: make this node primary. Refused when its data is inconsistent (unless
/// `force`, which also declares its data the good copy: the first primary of a new
/// volume), or when a connected peer is primary.
pub(crate) fn promote(h: &Hosted, force: bool) -> Result<String, String> {
    let name = &h.name;
    if links(h).is_empty() {
        return Err(format!(
            "volume {name:?} has no peers: it is always primary (add a [[volume.peer]] to replicate it)"
        ));
    }
    let s = h.with_meta(|m| m.status())?;
    if s.primary {
        return Ok(format!("volume {name}: already primary"));
    }
    if s.inconsistent && !force {
        return Err(format!(
            "volume {name:?}: this node's data is inconsistent (never synced, or a resync into \
             it did not finish); promote with --force only to make this node's data the good \
             copy (a new volume's first primary)"
        ));
    }
    if s.outdated && !force {
        return Err(format!(
            "volume {name:?}: this node's data is outdated (the primary went ahead of it under \
             congestion, and the resync that catches up has not finished); wait for it, or \
             promote with --force to take this node's older data"
        ));
    }
    if let Some(l) = links(h)
        .iter()
        .find(|l| l.view.get().connection == "connected" && l.view.get().peer_primary == Some(true))
    {
        return Err(format!(
            "volume {name:?}: peer {} is primary; make it secondary first",
            l.name
        ));
    }
    h.with_meta(|m| -> volume::Result<()> {
        if force {
            m.set_inconsistent(false)?;
            m.set_outdated(false)?;
        }
        m.set_role(true)
    })?
    .map_err(|e| e.to_string())?;
    for l in links(h) {
        l.kick();
    }
    tracing::info!(
        "volume {name}: now primary{}",
        if force { " (forced)" } else { "" }
    );
    Ok(format!("volume {name}: primary"))
}

/// `secondary`: stop writing; refused while NBD clients are attached (they would see
/// their writes fail).
pub(crate) fn demote(h: &Hosted) -> Result<String, String> {
    let name = &h.name;
    if links(h).is_empty() {
        return Err(format!(
            "volume {name:?} has no peers: it is always primary (add a [[volume.peer]] to replicate it)"
        ));
    }
    let s = h.with_meta(|m| m.status())?;
    if !s.primary {
        return Ok(format!("volume {name}: already secondary"));
    }
    let attached = h.server.connections();
    if attached > 0 {
        return Err(format!(
            "volume {name:?}: {attached} NBD client(s) attached; detach them (unmount, nbd-client -d) first"
        ));
    }
    h.with_meta(|m| m.set_role(false))?
        .map_err(|e| e.to_string())?;
    for l in links(h) {
        l.kick();
    }
    tracing::info!("volume {name}: now secondary");
    Ok(format!("volume {name}: secondary"))
}

/// `connect [--discard-my-data]`: enable the links; with `discard`, this node (which must
/// be secondary) takes the peer's data over its own writes on the next link that needs it.
pub(crate) fn connect(h: &Hosted, peer: Option<&str>, discard: bool) -> Result<String, String> {
    if discard {
        let s = h.with_meta(|m| m.status())?;
        if s.primary {
            return Err(format!(
                "volume {:?}: this node is primary and its data is in use; --discard-my-data \
                 is for the node whose writes are to be given up: make it secondary first \
                 (`cutover volume secondary {}`)",
                h.name, h.name
            ));
        }
        for l in chosen(h, peer)? {
            l.view.update(|v| v.discard_my_data = true);
        }
    }
    let said = set_connected(h, peer, true)?;
    Ok(if discard {
        format!("{said} (discarding this node's writes since the split)")
    } else {
        said
    })
}

/// `verify`: compare every block with the chosen peers' (connected, this node their
/// source); the blocks that differ are resent as the verify goes.
pub(crate) fn verify(h: &Hosted, peer: Option<&str>) -> Result<String, String> {
    let name = &h.name;
    let repl = h.with_meta(|m| m.replication())?;
    let chosen = chosen(h, peer)?;
    for l in &chosen {
        let v = l.view.get();
        if v.connection != "connected" || v.replication != "source" {
            return Err(format!(
                "volume {name:?}: peer {} is not connected with this node as its source ({}); \
                 verify runs on the primary of a connected link",
                l.name,
                if v.connection == "connected" {
                    format!("this node is its {}", v.replication)
                } else {
                    v.connection.clone()
                }
            ));
        }
    }
    for l in &chosen {
        repl.start_verify(l.slot).map_err(|e| e.to_string())?;
        tracing::info!("volume {name}: peer {}: online verify started", l.name);
    }
    let names: Vec<&str> = chosen.iter().map(|l| l.name.as_str()).collect();
    Ok(format!(
        "volume {name}: verifying against {} (progress in `cutover volume status`)",
        names.join(", ")
    ))
}

/// The links `peer` names (all when `None`), or an error listing the volume's peers.
fn chosen<'a>(h: &'a Hosted, peer: Option<&str>) -> Result<Vec<&'a Arc<PeerLink>>, String> {
    let name = &h.name;
    let chosen: Vec<&Arc<PeerLink>> = links(h)
        .iter()
        .filter(|l| peer.is_none_or(|p| l.name == p))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = links(h).iter().map(|l| l.name.as_str()).collect();
        return Err(match peer {
            Some(p) => format!(
                "volume {name:?} has no peer {p:?} (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
            None => format!("volume {name:?} has no peers"),
        });
    }
    Ok(chosen)
}

/// `connect` / `disconnect` of one peer (or all).
pub(crate) fn set_connected(h: &Hosted, peer: Option<&str>, on: bool) -> Result<String, String> {
    let name = &h.name;
    let chosen = chosen(h, peer)?;
    for l in &chosen {
        l.set_enabled(on);
        tracing::info!(
            "volume {name}: peer {}: {}",
            l.name,
            if on { "connect" } else { "disconnect" }
        );
    }
    let names: Vec<&str> = chosen.iter().map(|l| l.name.as_str()).collect();
    Ok(format!(
        "volume {name}: {} {}",
        if on {
            "connecting"
        } else {
            "disconnected from"
        },
        names.join(", ")
    ))
}
