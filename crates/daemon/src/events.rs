//! `cutover volume events`: state changes of the hosted volumes and their peers as JSON
//! lines, for monitoring. The connection stays open; the daemon looks at every volume's
//! state five times a second and writes one line per volume or peer whose state changed
//! (role, disk, connection, replication, the peer's role and disk, the last error, a
//! verify starting or ending, a pending `--discard-my-data`), beginning with one line per
//! volume and peer as they are. Changes that come and go within one look are not seen.
//!
//! ```text
//! → {"cmd":"events"}
//! ← {"time":"…","volume":"db","changed":["role","disk"],"role":"primary","disk":"UpToDate"}
//! ← {"time":"…","volume":"db","peer":"beta","changed":["connection"],"role":"primary","disk":"UpToDate","state":{…}}
//! ```

use crate::control::{find, send_reply, Reply};
use crate::roles::PeerStatus;
use crate::volumes::Hosted;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

/// How often the states are looked at.
pub(crate) const POLL: Duration = Duration::from_millis(200);

/// One line of the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub volume: String,
    /// The peer whose state changed; absent for the volume's own role and disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The fields that changed (all of them on the first line).
    pub changed: Vec<String>,
    pub role: String,
    pub disk: String,
    /// The peer's state as `status` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PeerStatus>,
}

/// What a change is measured on: (field, value) pairs.
type Fields = Vec<(&'static str, String)>;
/// A volume's (peer `None`) or a peer's fields as last reported.
type Seen = HashMap<(String, Option<String>), Fields>;

fn volume_fields(role: &str, disk: &str, failed: Option<&str>) -> Fields {
    vec![
        ("role", role.to_string()),
        ("disk", disk.to_string()),
        ("failed", failed.unwrap_or_default().to_string()),
    ]
}

fn peer_fields(p: &PeerStatus) -> Fields {
    vec![
        ("connection", p.connection.clone()),
        ("replication", p.replication.clone()),
        ("peer_role", p.peer_role.clone()),
        ("peer_disk", p.peer_disk.clone()),
        ("last_error", p.last_error.clone().unwrap_or_default()),
        ("verify", p.verify_position.is_some().to_string()),
        ("discard_my_data", p.discard_my_data.to_string()),
    ]
}

/// The fields of `now` that differ from `before` (every field when there was none).
fn changed(
    before: Option<&Vec<(&'static str, String)>>,
    now: &[(&'static str, String)],
) -> Vec<String> {
    now.iter()
        .filter(|(k, v)| before.is_none_or(|b| !b.iter().any(|(bk, bv)| bk == k && bv == v)))
        .map(|(k, _)| k.to_string())
        .collect()
}

/// The status of each of `chosen` (volumes shutting down left out), taken off the runtime
/// (it takes the volumes' locks); None when the runtime is going away. Also what the
/// notify hooks (`notify.rs`) watch.
pub(crate) async fn look(chosen: &[Arc<Hosted>]) -> Option<Vec<crate::control::VolumeStatus>> {
    let hs = chosen.to_vec();
    tokio::task::spawn_blocking(move || {
        hs.iter()
            .filter_map(|h| crate::control::status_of(h).ok())
            .collect()
    })
    .await
    .ok()
}

/// Stream the events of `name` (every volume when None) until the client goes away.
pub(crate) async fn stream(mut conn: UnixStream, hosted: Arc<[Arc<Hosted>]>, name: Option<String>) {
    let chosen: Vec<Arc<Hosted>> = match &name {
        Some(n) => match find(&hosted, n) {
            Ok(h) => vec![h.clone()],
            Err(why) => {
                let _ = send_reply(&mut conn, &Reply::error(why)).await;
                return;
            }
        },
        None => hosted.to_vec(),
    };
    let mut seen = Seen::new();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let Some(states) = look(&chosen).await else {
            return;
        };
        let mut lines = Vec::new();
        for v in states {
            let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
            let fields = volume_fields(&v.role, &v.disk, v.failed.as_deref());
            let key = (v.name.clone(), None);
            let ch = changed(seen.get(&key), &fields);
            if !ch.is_empty() {
                lines.push(Event {
                    time: time.clone(),
                    volume: v.name.clone(),
                    peer: None,
                    changed: ch,
                    role: v.role.clone(),
                    disk: v.disk.clone(),
                    state: None,
                });
                seen.insert(key, fields);
            }
            for p in v.peers {
                let fields = peer_fields(&p);
                let key = (v.name.clone(), Some(p.name.clone()));
                let ch = changed(seen.get(&key), &fields);
                if ch.is_empty() {
                    continue;
                }
                seen.insert(key, fields);
                lines.push(Event {
                    time: time.clone(),
                    volume: v.name.clone(),
                    peer: Some(p.name.clone()),
                    changed: ch,
                    role: v.role.clone(),
                    disk: v.disk.clone(),
                    state: Some(p),
                });
            }
        }
        for e in lines {
            let mut line = serde_json::to_vec(&e).unwrap_or_default();
            line.push(b'\n');
            if conn.write_all(&line).await.is_err() {
                return;
            }
        }
    }
}

/// The client's side: ask for the events of `name` (all volumes when None) and hand each
/// line to `each` until the daemon stops or `each` says to stop. Blocking.
pub fn follow(
    socket: &std::path::Path,
    name: Option<String>,
    mut each: impl FnMut(&str) -> bool,
) -> Result<(), crate::control::ControlError> {
    use std::io::BufRead;
    let (stream, sent) =
        crate::control::send_request(socket, &crate::control::Request::Events { name })?;
    let io_err = |source| crate::control::ControlError::Io {
        path: socket.to_path_buf(),
        source,
    };
    sent.map_err(io_err)?;
    stream.set_read_timeout(None).map_err(io_err)?;
    for line in std::io::BufReader::new(stream).lines() {
        let line = line.map_err(io_err)?;
        // A refusal is a reply, not an event.
        if let Ok(r) = serde_json::from_str::<Reply>(&line) {
            if !r.ok && r.error.is_some() {
                return Err(crate::control::ControlError::Refused(
                    r.error.unwrap_or_default(),
                ));
            }
        }
        if !each(&line) {
            break;
        }
    }
    Ok(())
}
