//! `[[volume_notify]]`: hooks the daemon runs when a hosted volume's state changes (the
//! daemon's `notify.rs` watches and runs them). A hook is a command (`sh -c`, the event's
//! JSON on stdin) or a webhook (the JSON POSTed), as a plan's `[[on_failure]]` is; the same
//! keys and the same checks (`hooks::hook_run`).
//!
//! ```toml
//! [[volume_notify]]
//! command = "/usr/local/bin/page-oncall"   # or webhook = "https://…"
//! on = ["split-brain", "peer-gone", "lag"] # default: every event
//! volumes = ["db"]                         # default: every volume
//! peer_gone_secs = 300                     # default 60
//! lag_secs = 5.0                           # default 10
//! timeout = "30s"                          # default 1m
//! ```

use super::Volume;
use serde::Deserialize;
use std::time::Duration;

/// A peer not connected this long is "gone", unless the table says otherwise.
pub const DEFAULT_PEER_GONE_SECS: u64 = 60;
/// Lag (seconds) above which the `lag` event fires, unless the table says otherwise.
pub const DEFAULT_LAG_SECS: f64 = 10.0;
/// A notify hook is killed after this long unless its `timeout` says otherwise: a pager
/// answers in seconds, and a hook stuck longer only holds back the notices after it.
pub const DEFAULT_NOTIFY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a `[[volume_notify]]` hook is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NotifyEvent {
    /// A link to a peer refused for a split brain (and, resolved, connected again).
    SplitBrain,
    /// A peer not connected for longer than `peer_gone_secs` (and, resolved, back).
    PeerGone,
    /// A connected peer's lag rose above `lag_secs` (and, resolved, fell back).
    Lag,
    /// The volume's role changed (primary, secondary).
    Role,
    /// The volume's data state changed (UpToDate, Inconsistent, Outdated).
    Disk,
}

impl NotifyEvent {
    pub const ALL: [NotifyEvent; 5] = [
        NotifyEvent::SplitBrain,
        NotifyEvent::PeerGone,
        NotifyEvent::Lag,
        NotifyEvent::Role,
        NotifyEvent::Disk,
    ];

    /// As written in `on` and in the event's JSON.
    pub fn name(self) -> &'static str {
        match self {
            NotifyEvent::SplitBrain => "split-brain",
            NotifyEvent::PeerGone => "peer-gone",
            NotifyEvent::Lag => "lag",
            NotifyEvent::Role => "role",
            NotifyEvent::Disk => "disk",
        }
    }
}

/// A `[[volume_notify]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NotifySpec {
    name: Option<String>,
    command: Option<String>,
    webhook: Option<String>,
    timeout: Option<String>,
    on: Option<Vec<NotifyEvent>>,
    volumes: Option<Vec<String>>,
    peer_gone_secs: Option<u64>,
    lag_secs: Option<f64>,
}

/// A checked `[[volume_notify]]` hook.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeNotify {
    pub hook: hooks::Hook,
    /// The events it is told about (never empty).
    pub on: Vec<NotifyEvent>,
    /// The volumes it watches; empty for all.
    pub volumes: Vec<String>,
    pub peer_gone: Duration,
    pub lag_secs: f64,
}

impl VolumeNotify {
    /// Whether this hook wants `event` of volume `volume`.
    pub fn wants(&self, event: NotifyEvent, volume: &str) -> bool {
        self.on.contains(&event)
            && (self.volumes.is_empty() || self.volumes.iter().any(|v| v == volume))
    }
}

/// Check the `[[volume_notify]]` tables against the config's volumes.
pub(super) fn load_notify(
    specs: &[NotifySpec],
    volumes: &[Volume],
) -> Result<Vec<VolumeNotify>, String> {
    const SECTION: &str = "volume_notify";
    if !specs.is_empty() && volumes.is_empty() {
        return Err("[[volume_notify]] needs a [[volume]] to watch; add one or remove it".into());
    }
    let mut hooks = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let at = format!("volume_notify #{}", i + 1);
        let run = hooks::hook_run(SECTION, true, s.command.as_deref(), s.webhook.as_deref())
            .map_err(|(_, why)| format!("{at}: {why}"))?;
        let timeout = match &s.timeout {
            Some(t) => hooks::parse_duration(t).map_err(|why| format!("{at}: timeout = {why}"))?,
            None => DEFAULT_NOTIFY_TIMEOUT,
        };
        let on = s.on.clone().unwrap_or_else(|| NotifyEvent::ALL.to_vec());
        if on.is_empty() {
            return Err(format!(
                "{at}: on = [] names no event; name some (split-brain, peer-gone, lag, role, disk) or leave `on` out for all"
            ));
        }
        let names = s.volumes.clone().unwrap_or_default();
        if let Some(v) = names
            .iter()
            .find(|n| !volumes.iter().any(|v| &v.name == *n))
        {
            let known: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            return Err(format!(
                "{at}: volumes names {v:?}, which is not a [[volume]] of this config (it has: {})",
                known.join(", ")
            ));
        }
        let peer_gone_secs = s.peer_gone_secs.unwrap_or(DEFAULT_PEER_GONE_SECS);
        if peer_gone_secs == 0 {
            return Err(format!(
                "{at}: peer_gone_secs = 0: give at least 1 (a link redialling takes a moment)"
            ));
        }
        let lag_secs = s.lag_secs.unwrap_or(DEFAULT_LAG_SECS);
        if !lag_secs.is_finite() || lag_secs <= 0.0 {
            return Err(format!(
                "{at}: lag_secs = {lag_secs}: give seconds above 0, e.g. 5.0"
            ));
        }
        hooks.push(VolumeNotify {
            hook: hooks::Hook {
                name: hooks::hook_name(s.name.as_deref(), &run),
                run,
                timeout,
                err_is_fatal: false,
            },
            on,
            volumes: names,
            peer_gone: Duration::from_secs(peer_gone_secs),
            lag_secs,
        });
    }
    Ok(hooks)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, NotifyEvent};
    use std::time::Duration;

    fn parse(notify: &str) -> Result<Config, String> {
        Config::parse(
            &format!("[[volume]]\nname = \"db\"\nbacking = \"/x\"\n[[volume_notify]]\n{notify}"),
            "x.toml",
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_choices() {
        let c = parse("command = \"page\"\n").unwrap();
        let n = &c.volume_notify[0];
        assert_eq!(n.on, NotifyEvent::ALL.to_vec());
        assert_eq!(n.peer_gone, Duration::from_secs(60));
        assert_eq!(n.hook.name, "page");
        assert!(n.wants(NotifyEvent::Lag, "db"));
        let c = parse(
            "webhook = \"https://h.example/T/s\"\non = [\"lag\"]\nvolumes = [\"db\"]\nlag_secs = 2.5\ntimeout = \"5s\"\n",
        )
        .unwrap();
        let n = &c.volume_notify[0];
        assert!(n.wants(NotifyEvent::Lag, "db") && !n.wants(NotifyEvent::Role, "db"));
        assert!(!n.wants(NotifyEvent::Lag, "other"));
        assert_eq!((n.lag_secs, n.hook.timeout), (2.5, Duration::from_secs(5)));
        assert_eq!(n.hook.name, "webhook to https://h.example");
    }

    #[test]
    fn mistakes_are_one_line_naming_the_key() {
        for (text, words) in [
            ("", &["volume_notify #1", "command", "webhook"][..]),
            ("command = \"a\"\nwebhook = \"https://x\"\n", &["both"]),
            ("webhook = \"ftp://x\"\n", &["webhook", "http"]),
            (
                "command = \"a\"\non = [\"boom\"]\n",
                &["boom", "split-brain"],
            ),
            ("command = \"a\"\non = []\n", &["on = []"]),
            ("command = \"a\"\nvolumes = [\"nope\"]\n", &["nope", "db"]),
            ("command = \"a\"\npeer_gone_secs = 0\n", &["peer_gone_secs"]),
            ("command = \"a\"\nlag_secs = -1.0\n", &["lag_secs"]),
            ("command = \"a\"\ntimeout = \"soon\"\n", &["timeout"]),
            ("command = \"a\"\nbogus = 1\n", &["bogus"]),
        ] {
            let e = parse(text).unwrap_err();
            assert!(!e.contains('\n'), "{text}: {e}");
            for w in words {
                assert!(e.contains(w), "{text}: {e} lacks {w}");
            }
        }
    }
}
