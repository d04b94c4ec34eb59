//! What a hook is once checked ([`Hook`], [`HookRun`]) and the checks that make one from a
//! table's keys, the same for a plan's hook sections and the daemon's `[[volume_notify]]`:
//! `command` or `webhook` ([`hook_run`]), the name logs show ([`hook_name`]), the `timeout`
//! ([`parse_duration`]).

use std::time::Duration;

/// A validated hook.
#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    pub name: String,
    pub run: HookRun,
    pub timeout: Duration,
    pub err_is_fatal: bool,
}

/// What a hook does.
#[derive(Debug, Clone, PartialEq)]
pub enum HookRun {
    /// `sh -c COMMAND` in the plan's directory.
    Command(String),
    /// POST the report (JSON) to this URL (notify hooks).
    Webhook(String),
}

/// A webhook URL as logs may show it: scheme and host only (the path and query of a
/// webhook often hold its secret).
pub fn webhook_shown(url: &str) -> String {
    match url.parse::<ureq::http::Uri>() {
        Ok(u) => format!(
            "{}://{}",
            u.scheme_str().unwrap_or("?"),
            u.authority().map(|a| a.as_str()).unwrap_or("?")
        ),
        Err(_) => "?".into(),
    }
}

/// Parse "10m", "90s", "1h 30m" (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (write e.g. 90s, 10m, 1h30m)"))
}

/// A hook's `command` or `webhook`, checked: exactly one of them, a command not empty, a
/// webhook (only where `notify`) an http(s) URL with a host. The error names the key at
/// fault (None: the `[[section]]` table) and says what to write. Also for the daemon's
/// `[[volume_notify]]` hooks.
pub fn hook_run(
    section: &str,
    notify: bool,
    command: Option<&str>,
    webhook: Option<&str>,
) -> Result<HookRun, (Option<&'static str>, String)> {
    match (command, webhook) {
        (Some(_), Some(_)) => Err((
            Some("webhook"),
            format!("[[{section}]] has both command and webhook: give one of them (a second hook can do the other)"),
        )),
        (None, None) => Err((
            None,
            if notify {
                format!("[[{section}]] needs command = \"…\" or webhook = \"https://…\"")
            } else {
                format!("[[{section}]] needs command = \"…\"")
            },
        )),
        (Some(c), None) if c.trim().is_empty() => Err((
            Some("command"),
            format!("[[{section}]] command is empty: name the command to run"),
        )),
        (Some(c), None) => Ok(HookRun::Command(c.to_string())),
        (None, Some(_)) if !notify => Err((
            Some("webhook"),
            format!("[[{section}]] webhook only applies to notify hooks ([[on_success]], [[on_failure]]); here use command = \"curl …\""),
        )),
        (None, Some(url)) => {
            let ok = url.parse::<ureq::http::Uri>().is_ok_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.host().is_some_and(|h| !h.is_empty())
            });
            if !ok {
                return Err((
                    Some("webhook"),
                    format!("[[{section}]] webhook = {url:?} is not an http:// or https:// URL with a host"),
                ));
            }
            Ok(HookRun::Webhook(url.to_string()))
        }
    }
}

/// A hook's name for logs: its `name`, else its command, else its webhook's scheme and host.
pub fn hook_name(name: Option<&str>, run: &HookRun) -> String {
    name.map(str::to_string).unwrap_or_else(|| match run {
        HookRun::Command(c) => c.clone(),
        HookRun::Webhook(u) => format!("webhook to {}", webhook_shown(u)),
    })
}
