//! The `[[volume_notify]]` hooks (configured in `config/notify.rs`): the daemon looks at its
//! volumes as `cutover volume events` does (five times a second, off the runtime) and tells
//! each hook about the events it wants, as JSON (on a command's stdin, or as a webhook's
//! POST body):
//!
//! - `split-brain`: a link to a peer was refused for a split brain;
//! - `peer-gone`: a peer not connected for `peer_gone_secs` (a peer disconnected on purpose,
//!   with `cutover volume disconnect`, is not counted);
//! - `lag`: a connected peer's lag rose above `lag_secs`;
//! - `role`, `disk`: the volume's role or data state changed.
//!
//! The first three are conditions: a hook hears once when one begins and once more
//! (`"resolved": true`) when it ends, never on every look while it lasts.
//!
//! Each hook has its own queue and runner task, so a slow hook delays only its own notices,
//! in order, and never the daemon; a hook that fails or times out is logged and the next
//! notice runs. Hooks' output goes to `state_dir/notify.log`.
//!
//! ```text
//! {"event":"peer-gone","resolved":false,"time":"…","host":"alpha","volume":"db","peer":"beta",
//!  "message":"volume db: peer beta not connected for 60 s (connecting; last error: …)",
//!  "role":"primary","disk":"UpToDate","state":{…as in `status`…}}
//! ```

use crate::config::{NotifyEvent, VolumeNotify};
use crate::control::VolumeStatus;
use crate::roles::PeerStatus;
use crate::volumes::Hosted;
use hooks::{run_hook, HookCall};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The hooks' output, in the state directory.
pub const NOTIFY_LOG: &str = "notify.log";
/// Notices waiting for one hook beyond this many are dropped (and logged): a hook stuck
/// until its timeout must not let them pile up.
const QUEUE: usize = 64;

/// What a hook is told.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Notice {
    /// `split-brain`, `peer-gone`, `lag`, `role` or `disk`.
    pub event: &'static str,
    /// The condition ended (a split brain, gone peer or lag); false when it began, and for
    /// `role` and `disk`.
    pub resolved: bool,
    /// RFC 3339, UTC.
    pub time: String,
    /// This node's host name, when known (both sides of a link may notify).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host: String,
    pub volume: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// One line for a human.
    pub message: String,
    /// The volume's role and disk now.
    pub role: String,
    pub disk: String,
    /// `role` and `disk`: what it was before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub was: Option<String>,
    /// The peer's state as `status` shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<PeerStatus>,
}

/// Which notices each look brings: the conditions raised per hook, and what the last look
/// saw. Pure (time is given), so the rules are tested without a daemon.
pub(crate) struct Watcher {
    hooks: Arc<[VolumeNotify]>,
    /// Since when each (volume, peer) has not been connected.
    away: HashMap<(String, String), Instant>,
    /// The conditions each hook was told began: (hook, event, volume, peer).
    raised: HashSet<(usize, NotifyEvent, String, String)>,
    /// Each volume's role and disk at the last look.
    seen: HashMap<String, (String, String)>,
    host: String,
}

impl Watcher {
    pub(crate) fn new(hooks: Arc<[VolumeNotify]>, host: String) -> Watcher {
        Watcher {
            hooks,
            away: HashMap::new(),
            raised: HashSet::new(),
            seen: HashMap::new(),
            host,
        }
    }

    /// The notices for each hook (by index) that `volumes`, looked at `now`, bring.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        volumes: &[VolumeStatus],
    ) -> Vec<(usize, Notice)> {
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let mut out = Vec::new();
        for v in volumes {
            let notice =
                |event: NotifyEvent, resolved, peer: Option<&PeerStatus>, message| Notice {
                    event: event.name(),
                    resolved,
                    time: time.clone(),
                    host: self.host.clone(),
                    volume: v.name.clone(),
                    peer: peer.map(|p| p.name.clone()),
                    message,
                    role: v.role.clone(),
                    disk: v.disk.clone(),
                    was: None,
                    state: peer.cloned(),
                };
            let before = self
                .seen
                .insert(v.name.clone(), (v.role.clone(), v.disk.clone()));
            if let Some((role, disk)) = before {
                for (event, was, is) in [
                    (NotifyEvent::Role, role, &v.role),
                    (NotifyEvent::Disk, disk, &v.disk),
                ] {
                    if was == *is {
                        continue;
                    }
                    let what = event.name();
                    for (i, _) in self.wanting(event, &v.name) {
                        let message = format!("volume {}: {what} {was} -> {is}", v.name);
                        let mut n = notice(event, false, None, message);
                        n.was = Some(was.clone());
                        out.push((i, n));
                    }
                }
            }
            for p in &v.peers {
                let key = (v.name.clone(), p.name.clone());
                let connected = p.connection == "connected";
                if connected || p.connection == "disconnected" {
                    self.away.remove(&key);
                } else {
                    self.away.entry(key.clone()).or_insert(now);
                }
                let away = self.away.get(&key).map(|since| now - *since);
                let split = !connected
                    && p.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("split brain"));
                for (i, h) in self.hooks.iter().enumerate() {
                    // None: this look says nothing new (a lag is only measured while
                    // connected; a peer disconnected on purpose is neither gone nor back).
                    let conditions = [
                        (NotifyEvent::SplitBrain, Some(split)),
                        (
                            NotifyEvent::PeerGone,
                            (p.connection != "disconnected")
                                .then(|| away.is_some_and(|d| d >= h.peer_gone)),
                        ),
                        (
                            NotifyEvent::Lag,
                            connected.then_some(p.lag_secs > h.lag_secs),
                        ),
                    ];
                    for (event, on) in conditions {
                        let Some(on) = on.filter(|_| h.wants(event, &v.name)) else {
                            continue;
                        };
                        let k = (i, event, v.name.clone(), p.name.clone());
                        let changed = if on {
                            self.raised.insert(k)
                        } else {
                            self.raised.remove(&k)
                        };
                        if changed {
                            let message = message(event, !on, &v.name, p, h, away);
                            out.push((i, notice(event, !on, Some(p), message)));
                        }
                    }
                }
            }
        }
        out
    }

    fn wanting<'a>(
        &'a self,
        event: NotifyEvent,
        volume: &'a str,
    ) -> impl Iterator<Item = (usize, &'a VolumeNotify)> + 'a {
        self.hooks
            .iter()
            .enumerate()
            .filter(move |(_, h)| h.wants(event, volume))
    }
}

/// The one line of a condition's notice.
fn message(
    event: NotifyEvent,
    resolved: bool,
    volume: &str,
    p: &PeerStatus,
    h: &VolumeNotify,
    away: Option<Duration>,
) -> String {
    let peer = &p.name;
    let error = p.last_error.as_deref().unwrap_or("none");
    match (event, resolved) {
        (NotifyEvent::SplitBrain, false) => format!("volume {volume}: peer {peer}: {error}"),
        (NotifyEvent::SplitBrain, true) => {
            format!(
                "volume {volume}: peer {peer}: the split brain is over ({})",
                p.connection
            )
        }
        (NotifyEvent::PeerGone, false) => format!(
            "volume {volume}: peer {peer} not connected for {} s ({}; last error: {error})",
            away.unwrap_or_default().as_secs(),
            p.connection
        ),
        (NotifyEvent::PeerGone, true) => format!("volume {volume}: peer {peer} connected again"),
        (NotifyEvent::Lag, false) => format!(
            "volume {volume}: peer {peer}: lag {:.1} s ({} byte(s)), over lag_secs = {}",
            p.lag_secs, p.lag_bytes, h.lag_secs
        ),
        (NotifyEvent::Lag, true) => format!(
            "volume {volume}: peer {peer}: lag back to {:.1} s (lag_secs = {})",
            p.lag_secs, h.lag_secs
        ),
        (NotifyEvent::Role | NotifyEvent::Disk, _) => String::new(),
    }
}

/// Watch `hosted` and run `hooks` (their working directory and log in `dir`, the state
/// directory) until the task is aborted, when the daemon stops.
pub(crate) async fn run(hosted: Arc<[Arc<Hosted>]>, hooks: Vec<VolumeNotify>, dir: PathBuf) {
    let hooks: Arc<[VolumeNotify]> = hooks.into();
    let queues: Vec<mpsc::Sender<Notice>> = hooks
        .iter()
        .map(|h| {
            let (tx, rx) = mpsc::channel(QUEUE);
            // Ends once this task is aborted (its sender dropped) and the queue is empty.
            tokio::spawn(deliver(h.hook.clone(), rx, dir.clone()));
            tx
        })
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let mut watcher = Watcher::new(hooks.clone(), host);
    let mut tick = tokio::time::interval(crate::events::POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(states) = crate::events::look(&hosted).await else {
            return;
        };
        for (i, n) in watcher.observe(Instant::now(), &states) {
            if let Err(e) = queues[i].try_send(n) {
                let n = e.into_inner();
                tracing::warn!(
                    "volume {}: notify hook {}: {QUEUE} notices already waiting; dropped: {}",
                    n.volume,
                    hooks[i].hook.name,
                    n.message
                );
            }
        }
    }
}

/// Run `hook` on each notice of `queue`, one after the other.
async fn deliver(hook: hooks::Hook, mut queue: mpsc::Receiver<Notice>, dir: PathBuf) {
    // Nothing stops a hook under way but its timeout (a stopping daemon lets it finish).
    let (_never, mut stop) = watch::channel(false);
    let log = dir.join(NOTIFY_LOG);
    while let Some(n) = queue.recv().await {
        let input = serde_json::to_vec(&n).unwrap_or_default();
        let env = [
            ("CUTOVER_VOLUME", n.volume.clone()),
            ("CUTOVER_PEER", n.peer.clone().unwrap_or_default()),
            ("CUTOVER_EVENT", n.event.to_string()),
            (
                "CUTOVER_RESOLVED",
                if n.resolved { "1" } else { "0" }.into(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v));
        let tag = format!("{} {}", n.volume, n.event);
        let call = HookCall {
            phase: "volume_notify",
            plan_path: Path::new(""),
            dir: &dir,
            log: Some(&log),
            input: Some(&input),
            env: &env,
            task: Some(&tag),
        };
        match run_hook(&hook, &call, &mut stop).await {
            Ok(secs) => tracing::info!(
                "volume {}: notify hook {}: told {} ({secs:.1} s)",
                n.volume,
                hook.name,
                n.message
            ),
            Err(why) => tracing::warn!(
                "volume {}: notify hook {} failed ({}): {why}; output in {}",
                n.volume,
                hook.name,
                n.event,
                log.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hooks(on: &[NotifyEvent], volumes: &[&str]) -> Arc<[VolumeNotify]> {
        Arc::from(vec![VolumeNotify {
            hook: hooks::Hook {
                name: "t".into(),
                run: hooks::HookRun::Command("true".into()),
                timeout: Duration::from_secs(1),
                err_is_fatal: false,
            },
            on: on.to_vec(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            peer_gone: Duration::from_secs(5),
            lag_secs: 2.0,
        }])
    }

    /// Volume "db" (primary, `disk`) with peer "b" as given.
    fn look(disk: &str, connection: &str, lag: f64, error: Option<&str>) -> Vec<VolumeStatus> {
        let v = serde_json::json!({
            "name": "db", "role": "primary", "disk": disk, "backing": "/x", "meta": "/m",
            "export": "unix:/s", "volume_id": "1", "size": 1, "block_size": 4096,
            "dirty_bytes": 0, "dirty_blocks": 0, "writes": 0, "bytes_written": 0,
            "flushes": 0, "current_gen": "0", "bitmap_gen": "0", "marks": 0,
            "activity_log": {"hot_extents": 0, "capacity": 1, "pinned": 0,
                "transactions": 0, "evictions": 0},
            "unpersisted_pages": 0, "clean_flag": false, "last_shutdown_clean": true,
            "peers": [{"name": "b", "connection": connection, "replication": "",
                "dials": true, "protocol": "C", "peer_role": "unknown",
                "peer_disk": "unknown", "out_of_sync_bytes": 0, "lag_bytes": 0,
                "lag_secs": lag, "resync_rate": 0, "connections": 0,
                "last_error": error}],
        });
        vec![serde_json::from_value(v).unwrap()]
    }

    /// The look brings no notice.
    fn quiet(w: &mut Watcher, at: Instant, look: &[VolumeStatus]) {
        let n = w.observe(at, look);
        assert!(n.is_empty(), "{n:?}");
    }

    fn events(n: &[(usize, Notice)]) -> Vec<(&'static str, bool)> {
        n.iter().map(|(_, n)| (n.event, n.resolved)).collect()
    }

    #[test]
    fn a_gone_peer_is_told_once_and_once_more_when_back() {
        let mut w = Watcher::new(hooks(&NotifyEvent::ALL, &[]), "h".into());
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        quiet(&mut w, at(0), &look("UpToDate", "connected", 0.0, None));
        quiet(
            &mut w,
            at(1),
            &look("UpToDate", "connecting", 0.0, Some("refused")),
        );
        quiet(&mut w, at(5), &look("UpToDate", "connecting", 0.0, None));
        let n = w.observe(at(6), &look("UpToDate", "connecting", 0.0, Some("refused")));
        assert_eq!(events(&n), [("peer-gone", false)]);
        assert_eq!(n[0].1.peer.as_deref(), Some("b"));
        assert!(
            n[0].1
                .message
                .contains("not connected for 5 s (connecting; last error: refused)"),
            "{}",
            n[0].1.message
        );
        quiet(&mut w, at(60), &look("UpToDate", "standalone", 0.0, None));
        // Disconnected on purpose: neither gone nor back.
        quiet(&mut w, at(61), &look("UpToDate", "disconnected", 0.0, None));
        let n = w.observe(at(62), &look("UpToDate", "connected", 0.0, None));
        assert_eq!(events(&n), [("peer-gone", true)]);
        quiet(&mut w, at(63), &look("UpToDate", "disconnected", 0.0, None));
        quiet(&mut w, at(99), &look("UpToDate", "disconnected", 0.0, None));
    }

    #[test]
    fn lag_is_told_per_crossing_and_split_brain_per_episode() {
        let mut w = Watcher::new(hooks(&NotifyEvent::ALL, &["db"]), String::new());
        let t = Instant::now();
        quiet(&mut w, t, &look("UpToDate", "connected", 1.0, None));
        let n = w.observe(t, &look("UpToDate", "connected", 2.5, None));
        assert_eq!(events(&n), [("lag", false)]);
        quiet(&mut w, t, &look("UpToDate", "connected", 9.0, None));
        // Not measured while the link is down.
        quiet(&mut w, t, &look("UpToDate", "connecting", 0.0, None));
        let n = w.observe(t, &look("UpToDate", "connected", 0.5, None));
        assert_eq!(events(&n), [("lag", true)]);
        let sb = Some("refused: split brain: this node wrote 4 block(s)");
        let n = w.observe(t, &look("UpToDate", "standalone", 0.0, sb));
        assert_eq!(events(&n), [("split-brain", false)]);
        assert!(n[0].1.message.contains("split brain: this node wrote"));
        quiet(&mut w, t, &look("UpToDate", "connecting", 0.0, sb));
        quiet(&mut w, t, &look("UpToDate", "standalone", 0.0, sb));
        let n = w.observe(t, &look("UpToDate", "connected", 0.0, sb));
        assert_eq!(events(&n), [("split-brain", true)]);
    }

    #[test]
    fn role_and_disk_changes_go_to_the_hooks_that_want_them() {
        let t = Instant::now();
        let mut w = Watcher::new(hooks(&[NotifyEvent::Disk], &[]), String::new());
        quiet(&mut w, t, &look("UpToDate", "connected", 0.0, None));
        let n = w.observe(t, &look("Inconsistent", "connected", 9.0, None));
        assert_eq!(events(&n), [("disk", false)]);
        assert_eq!(n[0].1.was.as_deref(), Some("UpToDate"));
        assert_eq!(n[0].1.message, "volume db: disk UpToDate -> Inconsistent");
        let mut w = Watcher::new(hooks(&NotifyEvent::ALL, &["other"]), String::new());
        quiet(
            &mut w,
            t,
            &look("UpToDate", "standalone", 9.0, Some("split brain")),
        );
        quiet(&mut w, t, &look("Inconsistent", "connected", 9.0, None));
    }
}
