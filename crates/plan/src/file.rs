//! The plan file: its TOML shape (unknown keys are errors), loading with errors that name
//! the file, line and key, the checks that need the whole plan (unique names, known
//! `depends_on`, no cycles), and the fingerprint that tells a changed plan from the one a
//! run was made with.

use crate::graph;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a plan can get wrong, always with the file and (where there is one) the line.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem at one place in the file; `message` names the key and the fix.
    #[error("{path}:{line}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A problem of the plan as a whole.
    #[error("{path}: {message}")]
    Plan { path: PathBuf, message: String },
}

/// How a task moves its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A directory tree (or one file), by the engine's sync.
    Tree,
    /// A block device or image file, written in place by positional delta.
    Volume,
    /// A command's output spooled to a file and synced with delta (not available yet).
    Command,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tree => "tree",
            Kind::Volume => "volume",
            Kind::Command => "command",
        }
    }
}

/// `connections = 8` or `connections = "auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Connections {
    Auto,
    Fixed(u32),
}

impl<'de> Deserialize<'de> for Connections {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Connections;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or a number from 1 to 256")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Connections, E> {
                match u32::try_from(n) {
                    Ok(n) if (1..=256).contains(&n) => Ok(Connections::Fixed(n)),
                    _ => Err(E::custom(format!(
                        "connections = {n}: expected \"auto\" or a number from 1 to 256"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Connections, E> {
                if s == "auto" {
                    Ok(Connections::Auto)
                } else {
                    Err(E::custom(format!(
                        "connections = {s:?}: expected \"auto\" or a number from 1 to 256"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn default_parallel() -> usize {
    4
}

/// `verify_mode`: after the final pass, which files' content hashes are compared on both
/// sides (AWS DataSync's `VerifyMode`: ONLY_FILES_TRANSFERRED, POINT_IN_TIME_CONSISTENT, NONE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// The files the final pass sent (DataSync's default, and ours).
    Transferred,
    /// Every file of the task.
    Full,
    /// No comparison.
    None,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Transferred => "transferred",
            VerifyMode::Full => "full",
            VerifyMode::None => "none",
        }
    }
}

/// What `verify_mode` is when neither the task nor the plan sets it.
pub const DEFAULT_VERIFY_MODE: VerifyMode = VerifyMode::Transferred;

/// The whole plan file as written (after defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// A name for logs and reports (default: the file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// How many tasks may run at once.
    #[serde(default = "default_parallel")]
    pub parallel: usize,
    /// Where the state store and logs live, relative to the plan file (default:
    /// `<plan stem>.state` beside it).
    #[serde(default)]
    pub state_dir: Option<String>,
    /// The downtime the move must fit in (e.g. "10m"): `presync` without `--until-under`
    /// aims for this.
    #[serde(default)]
    pub target_downtime: Option<String>,
    /// The default `verify_mode` of every task (a task's own key wins). Skipped when unset,
    /// so plans written before the key keep their fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_mode: Option<VerifyMode>,
    #[serde(default, rename = "task")]
    pub tasks: Vec<TaskSpec>,
    /// Run by `cutover plan cutover` before the final pass (stop the app, freeze the DB).
    #[serde(default)]
    pub pre_final: Vec<HookSpec>,
    /// Run by `cutover plan cutover` after the final pass (start the app on the new side).
    #[serde(default)]
    pub post_final: Vec<HookSpec>,
    /// Run before every presync and final pass of every task (before the task's own
    /// `pre_pass`); a failure fails that pass. Skipped when empty, so plans written before
    /// the key keep their fingerprint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_pass: Vec<HookSpec>,
    /// Run after every presync and final pass of every task (after the task's own
    /// `post_pass`), whether it succeeded or not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub post_pass: Vec<HookSpec>,
    /// Run at the end of a presync, cutover or rerun that succeeded, with the report (JSON)
    /// on stdin.
    #[serde(default)]
    pub on_success: Vec<HookSpec>,
    /// Run at the end of a presync, cutover or rerun that failed, was interrupted or is not
    /// ready, with the report (JSON) on stdin.
    #[serde(default)]
    pub on_failure: Vec<HookSpec>,
}

/// A hook: a shell command with a timeout, or (notify hooks only) a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookSpec {
    /// For logs (default: the command, or the webhook's scheme and host).
    #[serde(default)]
    pub name: Option<String>,
    /// Run with `sh -c`, in the plan file's directory. (Optional only so that a notify hook
    /// can be a webhook instead; serialised as before when set.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Notify hooks: POST the run's report (JSON) to this http:// or https:// URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Kill it (its whole process group) after this long; default 5m.
    #[serde(default)]
    pub timeout: Option<String>,
    /// A failure stops the cutover (before any final pass, for `pre_final`). Default true:
    /// a freeze that failed must not be followed by a final pass. Not for notify hooks.
    #[serde(default)]
    pub err_is_fatal: Option<bool>,
}

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

/// Hooks run this long at most unless they say otherwise.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// One `[[task]]`: a data set with its engine options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub name: String,
    pub kind: Kind,
    /// Local path (relative to the plan file), `[user@]host:PATH` or `cutover://…`
    /// (`tree` and `volume`).
    #[serde(default)]
    pub source: Option<String>,
    pub destination: String,
    /// `command` tasks: run with `sh -c` in the plan's directory; its stdout is the data.
    #[serde(default)]
    pub command: Option<String>,
    /// `command` tasks: the local file the output is spooled to and synced from (default
    /// `<state_dir>/spool/<name>`), relative to the plan file.
    #[serde(default)]
    pub spool: Option<String>,
    /// `command` tasks: run after the final pass on the destination side with the
    /// transferred file on stdin (e.g. `pg_restore -d app`); local destinations only.
    #[serde(default)]
    pub destination_command: Option<String>,
    /// After the final pass: two commands whose outputs must be identical.
    #[serde(default)]
    pub verify: Option<VerifySpec>,
    /// After the final pass: compare content hashes of what it sent, of everything, or
    /// nothing (default: the plan's `verify_mode`, else "transferred"). Skipped when unset,
    /// so plans written before the key keep their fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_mode: Option<VerifyMode>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub delete: bool,
    #[serde(default)]
    pub max_delete: Option<u64>,
    #[serde(default)]
    pub excludes: Vec<String>,
    #[serde(default)]
    pub includes: Vec<String>,
    /// "500" (KiB/s), "64K", "10M", "1G".
    #[serde(default)]
    pub bwlimit: Option<String>,
    #[serde(default)]
    pub connections: Option<Connections>,
    #[serde(default)]
    pub checksum: bool,
    #[serde(default)]
    pub whole_file: bool,
    #[serde(default)]
    pub hard_links: bool,
    #[serde(default)]
    pub xattrs: bool,
    #[serde(default)]
    pub compress: bool,
    #[serde(default)]
    pub fsync: bool,
    /// The daemon's token (else `$CUTOVER_TOKEN`), for `cutover://` endpoints.
    #[serde(default)]
    pub token_file: Option<String>,
    /// Pin the daemon's certificate (`sha256:HEX`), for `cutover://` endpoints.
    #[serde(default)]
    pub server_fingerprint: Option<String>,
    /// How to reach `[user@]host:PATH` endpoints (`-e/--rsh`; default `$CUTOVER_RSH`, else
    /// `ssh`); a `destination_command` on an ssh destination runs through it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rsh: Option<String>,
    /// The cutover program on the far side of an ssh endpoint (`--remote-cutover`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_cutover: Option<String>,
    /// `tree` tasks: run before each pass on the source side; its stdout lists the paths
    /// (relative to the source) that pass syncs, one a line (see [`crate::paths_from`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths_from: Option<String>,
    /// Run before each presync and final pass of this task (after the plan's `[[pre_pass]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_pass: Option<String>,
    /// Run after each presync and final pass of this task, even a failed one (before the
    /// plan's `[[post_pass]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_pass: Option<String>,
}

/// `verify = { source = "…", destination = "…" }`: run both after the final pass (with
/// `sh -c`, in the plan's directory, on this machine); the outputs must match byte for byte.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    pub source: String,
    pub destination: String,
}

impl TaskSpec {
    /// What the task reads: its source, or its command.
    pub fn what(&self) -> String {
        match (&self.source, &self.command) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => format!("`{c}`"),
            (None, None) => "?".into(),
        }
    }
}

/// A validated plan, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The plan file as given.
    pub path: PathBuf,
    /// The directory relative paths in the plan are taken from.
    pub base_dir: PathBuf,
    pub name: String,
    pub parallel: usize,
    pub state_dir: PathBuf,
    pub target_downtime: Option<Duration>,
    /// The plan's default `verify_mode` (see [`Plan::verify_mode`] for a task's).
    pub verify_mode: VerifyMode,
    pub tasks: Vec<TaskSpec>,
    pub pre_final: Vec<Hook>,
    pub post_final: Vec<Hook>,
    /// Around every presync and final pass of every task.
    pub pre_pass: Vec<Hook>,
    pub post_pass: Vec<Hook>,
    pub on_success: Vec<Hook>,
    pub on_failure: Vec<Hook>,
    /// BLAKE3 (hex) of the plan's canonical content: formatting and comments do not count.
    pub fingerprint: String,
    /// The file's text, kept to point at lines in later checks.
    text: String,
}

/// A problem a caller found in one key of one task (see [`Plan::error_at_task_key`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: &'static str,
    pub message: String,
}

/// Parse "10m", "90s", "1h 30m" (humantime's syntax).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?}: {e} (write e.g. 90s, 10m, 1h30m)"))
}

/// Task names end up in file names (logs) and on command lines.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !n.starts_with('.')
}

/// Byte offset to 1-based line number.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset.min(text.len()))
        .map(|t| t.matches('\n').count() + 1)
        .unwrap_or(1)
}

/// One step of a path into the TOML document.
pub enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// The line where `path` is in the document (the deepest part of it that exists).
fn locate(text: &str, path: &[Seg]) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut best = None;
    let mut table = Some(doc.get_ref());
    let mut value: Option<&toml::Spanned<toml::de::DeValue>> = None;
    for seg in path {
        let next = match (seg, table, value) {
            (Seg::Key(k), Some(t), _) => t.get(*k),
            (Seg::Key(k), None, Some(v)) => v.get_ref().get(*k),
            (Seg::Index(i), _, Some(v)) => v.get_ref().get(*i),
            _ => None,
        };
        let Some(next) = next else { break };
        best = Some(next.span().start);
        value = Some(next);
        table = None;
    }
    best.map(|o| line_of(text, o))
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as a line that says where the key
/// is and suggests the known key nearest to it: `unknown key "destinaton" in task "db";
/// did you mean "destination"?`. The list of known keys is given only when none is near.
fn unknown_key(text: &str, offset: Option<usize>, message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field ")?;
    let names: Vec<&str> = rest.split('`').skip(1).step_by(2).collect();
    let (key, known) = names.split_first()?;
    let mut place = offset.map(|o| place_of(text, o)).unwrap_or_default();
    // The only nested table: `verify = { source = "…", destination = "…" }`.
    if known == ["source", "destination"] && place.starts_with(" in task") {
        place.push_str(" verify");
    }
    Some(match nearest(key, known) {
        Some(k) => format!("unknown key {key:?}{place}; did you mean {k:?}?"),
        None if known.is_empty() => format!("unknown key {key:?}{place}"),
        None => format!(
            "unknown key {key:?}{place}; the keys here are {}",
            known.join(", ")
        ),
    })
}

/// The table that the byte `offset` of the plan is in: ` in task "db"`, ` in [[pre_final]]
/// number 2` or ` at the top level`. Tables of an array (`[[task]]`) end where the next
/// header starts, and top-level keys come before the first header, so the nearest header
/// before `offset` is the one.
fn place_of(text: &str, offset: usize) -> String {
    let Ok(doc) = toml::de::DeTable::parse(text) else {
        return String::new();
    };
    let mut best: Option<(std::ops::Range<usize>, &str, usize, &toml::de::DeValue)> = None;
    for (section, value) in doc.get_ref().iter() {
        let Some(items) = value.get_ref().as_array() else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let span = item.span();
            if span.start <= offset && best.as_ref().is_none_or(|b| b.0.start < span.start) {
                best = Some((span, section.get_ref(), i, item.get_ref()));
            }
        }
    }
    match best {
        // The key is the header itself (`[[tsk]]`): a key of the top level.
        Some((span, section, i, item)) if offset >= span.end => match section {
            "task" => match item.get("name").and_then(|n| n.get_ref().as_str()) {
                Some(name) => format!(" in task {name:?}"),
                None => format!(" in task number {}", i + 1),
            },
            _ => format!(" in [[{section}]] number {}", i + 1),
        },
        _ => " at the top level".into(),
    }
}

/// The key of `known` that `key` most likely meant (a typo: a few letters off, another
/// case, `-` for `_`), if one is near enough.
fn nearest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let key = norm(key);
    let limit = (key.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(&key, &norm(k)), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of
/// two neighbours each count 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * w + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let cost = usize::from(a[i - 1] != b[j - 1]);
                let mut v = (d[(i - 1) * w + j] + 1)
                    .min(d[i * w + j - 1] + 1)
                    .min(d[(i - 1) * w + j - 1] + cost);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    v = v.min(d[(i - 2) * w + j - 2] + 1);
                }
                v
            };
        }
    }
    d[a.len() * w + b.len()]
}

impl Plan {
    /// Read, parse and validate a plan file.
    pub fn load(path: &Path) -> Result<Plan, PlanError> {
        let text = std::fs::read_to_string(path).map_err(|source| PlanError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Plan::parse(path, text)
    }

    /// Parse and validate `text` as the plan at `path`.
    pub fn parse(path: &Path, text: String) -> Result<Plan, PlanError> {
        let file: PlanFile = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
            let message = e.message().trim();
            let message = unknown_key(&text, e.span().map(|s| s.start), message)
                .unwrap_or_else(|| message.to_string());
            PlanError::At {
                path: path.to_path_buf(),
                line,
                message,
            }
        })?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plan".into());
        let canonical = serde_json::to_string(&file).map_err(|e| PlanError::Plan {
            path: path.to_path_buf(),
            message: format!("cannot fingerprint the plan: {e}"),
        })?;
        let mut plan = Plan {
            path: path.to_path_buf(),
            name: file.name.clone().unwrap_or_else(|| stem.clone()),
            parallel: file.parallel,
            state_dir: base_dir.join(
                file.state_dir
                    .clone()
                    .unwrap_or_else(|| format!("{stem}.state")),
            ),
            base_dir,
            target_downtime: None,
            verify_mode: file.verify_mode.unwrap_or(DEFAULT_VERIFY_MODE),
            tasks: file.tasks.clone(),
            pre_final: Vec::new(),
            post_final: Vec::new(),
            pre_pass: Vec::new(),
            post_pass: Vec::new(),
            on_success: Vec::new(),
            on_failure: Vec::new(),
            fingerprint: blake3::hash(canonical.as_bytes()).to_hex().to_string(),
            text,
        };
        if let Some(t) = &file.target_downtime {
            plan.target_downtime = Some(parse_duration(t).map_err(|m| {
                plan.at(
                    &[Seg::Key("target_downtime")],
                    format!("target_downtime = {m}"),
                )
            })?);
        }
        for (section, specs) in [
            ("pre_final", &file.pre_final),
            ("post_final", &file.post_final),
            ("pre_pass", &file.pre_pass),
            ("post_pass", &file.post_pass),
            ("on_success", &file.on_success),
            ("on_failure", &file.on_failure),
        ] {
            let notify = section.starts_with("on_");
            let mut hooks = Vec::with_capacity(specs.len());
            for (i, h) in specs.iter().enumerate() {
                let at = |key| [Seg::Key(section), Seg::Index(i), Seg::Key(key)];
                let run = match (&h.command, &h.webhook) {
                    (Some(_), Some(_)) => {
                        return Err(plan.at(
                            &at("webhook"),
                            format!("[[{section}]] has both command and webhook: give one of them (a second hook can do the other)"),
                        ))
                    }
                    (None, None) => {
                        return Err(plan.at(
                            &[Seg::Key(section), Seg::Index(i)],
                            if notify {
                                format!("[[{section}]] needs command = \"…\" or webhook = \"https://…\"")
                            } else {
                                format!("[[{section}]] needs command = \"…\"")
                            },
                        ))
                    }
                    (Some(c), None) if c.trim().is_empty() => {
                        return Err(plan.at(
                            &at("command"),
                            format!("[[{section}]] command is empty: name the command to run"),
                        ))
                    }
                    (Some(c), None) => HookRun::Command(c.clone()),
                    (None, Some(_)) if !notify => {
                        return Err(plan.at(
                            &at("webhook"),
                            format!("[[{section}]] webhook only applies to notify hooks ([[on_success]], [[on_failure]]); here use command = \"curl …\""),
                        ))
                    }
                    (None, Some(url)) => {
                        let ok = url.parse::<ureq::http::Uri>().is_ok_and(|u| {
                            matches!(u.scheme_str(), Some("http" | "https"))
                                && u.host().is_some_and(|h| !h.is_empty())
                        });
                        if !ok {
                            return Err(plan.at(
                                &at("webhook"),
                                format!("[[{section}]] webhook = {url:?} is not an http:// or https:// URL with a host"),
                            ));
                        }
                        HookRun::Webhook(url.clone())
                    }
                };
                let timeout = match &h.timeout {
                    Some(t) => parse_duration(t).map_err(|m| {
                        plan.at(&at("timeout"), format!("[[{section}]] timeout = {m}"))
                    })?,
                    None => DEFAULT_HOOK_TIMEOUT,
                };
                if notify && h.err_is_fatal.is_some() {
                    return Err(plan.at(
                        &at("err_is_fatal"),
                        format!("[[{section}]] err_is_fatal does not apply: a notify hook never changes the run's outcome; remove it"),
                    ));
                }
                let name = h.name.clone().unwrap_or_else(|| match &run {
                    HookRun::Command(c) => c.clone(),
                    HookRun::Webhook(u) => format!("webhook to {}", webhook_shown(u)),
                });
                hooks.push(Hook {
                    name,
                    run,
                    timeout,
                    err_is_fatal: h.err_is_fatal.unwrap_or(true),
                });
            }
            match section {
                "pre_final" => plan.pre_final = hooks,
                "post_final" => plan.post_final = hooks,
                "pre_pass" => plan.pre_pass = hooks,
                "post_pass" => plan.post_pass = hooks,
                "on_success" => plan.on_success = hooks,
                _ => plan.on_failure = hooks,
            }
        }
        plan.validate()?;
        Ok(plan)
    }

    /// An error at `path` in the file.
    pub fn at(&self, path: &[Seg], message: String) -> PlanError {
        PlanError::At {
            path: self.path.clone(),
            line: locate(&self.text, path).unwrap_or(1),
            message,
        }
    }

    /// An error about `key` of task number `index` (a problem found by the caller, such as
    /// an endpoint the CLI cannot parse).
    pub fn error_at_task_key(&self, index: usize, e: KeyError) -> PlanError {
        let name = self
            .tasks
            .get(index)
            .map(|t| t.name.as_str())
            .unwrap_or("?");
        self.at(
            &[Seg::Key("task"), Seg::Index(index), Seg::Key(e.key)],
            format!("task {name:?}: {}: {}", e.key, e.message),
        )
    }

    pub(crate) fn task_key(&self, i: usize, key: &'static str, message: String) -> PlanError {
        self.error_at_task_key(i, KeyError { key, message })
    }

    fn validate(&self) -> Result<(), PlanError> {
        if self.parallel == 0 {
            return Err(self.at(
                &[Seg::Key("parallel")],
                "parallel = 0: at least one task must be able to run; write parallel = 1 or more"
                    .into(),
            ));
        }
        if self.tasks.is_empty() {
            return Err(PlanError::Plan {
                path: self.path.clone(),
                message: "no [[task]]: add at least one task (see README, \"Migration plans\")"
                    .into(),
            });
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if !valid_name(&t.name) {
                return Err(self.task_key(
                    i,
                    "name",
                    format!("{:?} is not a valid name: use letters, digits, '-', '_' and '.', at most 64, not starting with '.'", t.name),
                ));
            }
            if let Some(j) = self.tasks[..i].iter().position(|o| o.name == t.name) {
                return Err(self.task_key(
                    i,
                    "name",
                    format!(
                        "the name is already used by task number {} (line {}); task names must be unique",
                        j + 1,
                        locate(&self.text, &[Seg::Key("task"), Seg::Index(j), Seg::Key("name")])
                            .unwrap_or(1)
                    ),
                ));
            }
            let empty = |v: &Option<String>| v.as_deref().is_some_and(|v| v.trim().is_empty());
            if let Some(v) = &t.verify {
                if v.source.trim().is_empty() || v.destination.trim().is_empty() {
                    return Err(self.task_key(
                        i,
                        "verify",
                        "needs both commands: verify = { source = \"…\", destination = \"…\" }"
                            .into(),
                    ));
                }
            }
            for (key, v) in [
                ("source", &t.source),
                ("destination", &Some(t.destination.clone())),
                ("command", &t.command),
                ("spool", &t.spool),
                ("destination_command", &t.destination_command),
                ("rsh", &t.rsh),
                ("remote_cutover", &t.remote_cutover),
                ("paths_from", &t.paths_from),
                ("pre_pass", &t.pre_pass),
                ("post_pass", &t.post_pass),
            ] {
                if empty(v) {
                    return Err(self.task_key(
                        i,
                        key,
                        "is empty: remove it or give it a value".into(),
                    ));
                }
            }
            match (t.kind, &t.source, &t.command) {
                (Kind::Command, _, None) => {
                    return Err(self.task_key(
                        i,
                        "command",
                        "is missing: a command task names the command whose output it moves (e.g. command = \"pg_dump -Fc -Z0 app\")".into(),
                    ))
                }
                (Kind::Command, Some(_), _) => {
                    return Err(self.task_key(
                        i,
                        "source",
                        "does not apply to a command task (its data is the command's output); remove it".into(),
                    ))
                }
                (Kind::Tree | Kind::Volume, None, _) => {
                    return Err(self.task_key(
                        i,
                        "source",
                        format!("is missing: a {} task names what to copy", t.kind.as_str()),
                    ))
                }
                _ => {}
            }
            if t.kind != Kind::Command {
                for (key, set) in [
                    ("command", t.command.is_some()),
                    ("spool", t.spool.is_some()),
                    ("destination_command", t.destination_command.is_some()),
                ] {
                    if set {
                        return Err(self.task_key(
                            i,
                            key,
                            format!(
                                "only applies to kind = \"command\"; remove it from this {} task",
                                t.kind.as_str()
                            ),
                        ));
                    }
                }
            }
            crate::passes::check_task(self, i)?;
            if t.max_delete.is_some() && !t.delete {
                return Err(self.task_key(
                    i,
                    "max_delete",
                    "only makes sense with delete = true; add it or remove max_delete".into(),
                ));
            }
            if t.kind != Kind::Tree {
                for (key, bad) in [
                    ("delete", t.delete),
                    ("excludes", !t.excludes.is_empty()),
                    ("includes", !t.includes.is_empty()),
                    ("hard_links", t.hard_links),
                ] {
                    if bad {
                        return Err(self.task_key(
                            i,
                            key,
                            format!(
                                "does not apply to a {} task (one file, not a tree); remove it",
                                t.kind.as_str()
                            ),
                        ));
                    }
                }
            }
            for (d, dep) in t.depends_on.iter().enumerate() {
                let dep_at = [
                    Seg::Key("task"),
                    Seg::Index(i),
                    Seg::Key("depends_on"),
                    Seg::Index(d),
                ];
                if dep == &t.name {
                    return Err(self.at(
                        &dep_at,
                        format!(
                            "task {:?}: depends_on names the task itself; remove it",
                            t.name
                        ),
                    ));
                }
                if !self.tasks.iter().any(|o| &o.name == dep) {
                    return Err(self.at(
                        &dep_at,
                        format!(
                            "task {:?}: depends_on names {dep:?}, which is not a task in this plan (known: {})",
                            t.name,
                            self.tasks.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(cycle) = graph::find_cycle(&self.tasks) {
            let first = cycle[0];
            let names: Vec<&str> = cycle
                .iter()
                .chain(std::iter::once(&first))
                .map(|&i| self.tasks[i].name.as_str())
                .collect();
            return Err(self.at(
                &[Seg::Key("task"), Seg::Index(first), Seg::Key("depends_on")],
                format!(
                    "depends_on has a cycle: {}; remove one of these dependencies",
                    names.join(" -> ")
                ),
            ));
        }
        Ok(())
    }

    /// The state store's file.
    pub fn state_db(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// A task's `verify_mode`: its own, else the plan's, else "transferred".
    pub fn verify_mode(&self, t: &TaskSpec) -> VerifyMode {
        t.verify_mode.unwrap_or(self.verify_mode)
    }

    /// Where logs go.
    pub fn log_dir(&self) -> PathBuf {
        self.state_dir.join("logs")
    }

    pub fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks.iter().find(|t| t.name == name)
    }

    /// Where the path list of a task's `paths_from` is written (the newest pass's).
    pub fn paths_list(&self, t: &TaskSpec) -> PathBuf {
        self.state_dir.join("paths").join(&t.name)
    }

    /// Where a command task's output is spooled.
    pub fn spool_path(&self, t: &TaskSpec) -> PathBuf {
        match &t.spool {
            Some(p) => self.base_dir.join(p),
            None => self.state_dir.join("spool").join(&t.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse(Path::new("dir/move.toml"), text.to_string())
    }

    const TWO: &str = r#"
parallel = 2
[[task]]
name = "a"
kind = "tree"
source = "src/a/"
destination = "/dst/a/"

[[task]]
name = "b"
kind = "tree"
source = "src/b/"
destination = "/dst/b/"
depends_on = ["a"]
"#;

    #[test]
    fn loads_and_defaults() {
        let p = parse(TWO).unwrap();
        assert_eq!(p.name, "move");
        assert_eq!(p.parallel, 2);
        assert_eq!(p.state_dir, Path::new("dir/move.state"));
        assert_eq!(p.base_dir, Path::new("dir"));
        assert_eq!(p.tasks[1].depends_on, vec!["a".to_string()]);
        assert_eq!(p.tasks[0].connections, None);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = TWO.replace(
            "depends_on = [\"a\"]",
            "depends_on = [\"a\"]\nbwlimt = \"1M\"",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert_eq!(
            e,
            "dir/move.toml:15: unknown key \"bwlimt\" in task \"b\"; did you mean \"bwlimit\"?"
        );
        let e = parse(&format!("paralel = 3\n{TWO}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dir/move.toml:1: unknown key \"paralel\" at the top level; did you mean \"parallel\"?"
        );
        // The first task: the nearest header before the key is its own.
        let e = parse(&TWO.replace("destination = \"/dst/a/\"", "destinaton = \"/dst/a/\""))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dir/move.toml:7: unknown key \"destinaton\" in task \"a\"; did you mean \"destination\"?"
        );
        // Case and '-' for '_' are typos too; the inline verify table is named.
        let e = parse(&TWO.replace("depends_on", "Hard-Links = true\ndepends_on"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("did you mean \"hard_links\"?"), "{e}");
        let e = parse(&TWO.replace(
            "depends_on",
            "verify = { source = \"a\", destnation = \"b\" }\ndepends_on",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.ends_with(
                "unknown key \"destnation\" in task \"b\" verify; did you mean \"destination\"?"
            ),
            "{e}"
        );
        // A header the plan does not know is a key of the top level, even after a task.
        let e = parse(&format!("{TWO}[[tasks]]\nname = \"c\"\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dir/move.toml:15: unknown key \"tasks\" at the top level; did you mean \"task\"?"
        );
        // Nothing near: the keys that are known there, instead of a guess.
        let e = parse(&TWO.replace("depends_on", "colour = 1\ndepends_on"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "unknown key \"colour\" in task \"b\"; the keys here are name, kind, source,"
            ),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let e = parse(&TWO.replace(
            "kind = \"tree\"\nsource = \"src/b/\"",
            "kind = \"tape\"\nsource = \"src/b/\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("dir/move.toml:11:") && e.contains("tape"),
            "{e}"
        );
        let e = parse(&TWO.replace("parallel = 2", "parallel = 0"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dir/move.toml:2: parallel = 0"), "{e}");
        let e = parse(&TWO.replace("depends_on = [\"a\"]", "connections = 0"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dir/move.toml:14:") && e.contains("connections"),
            "{e}"
        );
        let e = parse(&format!("target_downtime = \"soon\"\n{TWO}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("dir/move.toml:1: target_downtime"), "{e}");
    }

    #[test]
    fn duplicate_names_and_unknown_dependencies() {
        let e = parse(&TWO.replace("name = \"b\"", "name = \"a\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dir/move.toml:10: task \"a\": name: the name is already used by task number 1 (line 4)"),
            "{e}"
        );
        let e = parse(&TWO.replace("depends_on = [\"a\"]", "depends_on = [\"a\", \"zz\"]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("dir/move.toml:14: task \"b\": depends_on names \"zz\""),
            "{e}"
        );
    }

    #[test]
    fn cycles_are_reported_with_their_path() {
        let text = format!(
            "{TWO}\n[[task]]\nname = \"c\"\nkind = \"tree\"\nsource = \"s\"\ndestination = \"d\"\ndepends_on = [\"b\"]\n"
        )
        .replacen("destination = \"/dst/a/\"", "destination = \"/dst/a/\"\ndepends_on = [\"c\"]", 1);
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("depends_on has a cycle: a -> c -> b -> a"),
            "{e}"
        );
        assert!(e.starts_with("dir/move.toml:8:"), "{e}");
    }

    #[test]
    fn fingerprint_ignores_formatting_not_content() {
        let a = parse(TWO).unwrap().fingerprint;
        let b = parse(&format!("# a comment\n{}", TWO.replace(" = ", "=")))
            .unwrap()
            .fingerprint;
        assert_eq!(a, b);
        let c = parse(&TWO.replace("src/b/", "src/B/")).unwrap().fingerprint;
        assert_ne!(a, c);
    }

    #[test]
    fn hooks_have_defaults_and_checked_timeouts() {
        let p = parse(&format!(
            "{TWO}\n[[pre_final]]\ncommand = \"systemctl stop app\"\n[[post_final]]\nname = \"start\"\ncommand = \"true\"\ntimeout = \"10s\"\nerr_is_fatal = false\n"
        ))
        .unwrap();
        assert_eq!(p.pre_final[0].name, "systemctl stop app");
        assert_eq!(p.pre_final[0].timeout, DEFAULT_HOOK_TIMEOUT);
        assert!(p.pre_final[0].err_is_fatal);
        assert_eq!(p.post_final[0].timeout, Duration::from_secs(10));
        assert!(!p.post_final[0].err_is_fatal);
        let e = parse(&format!(
            "{TWO}\n[[pre_final]]\ncommand = \"x\"\ntimeout = \"forever\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("dir/move.toml:18: [[pre_final]] timeout"),
            "{e}"
        );
        let e = parse(&format!(
            "{TWO}\n[[pre_final]]\ncommand = \"x\"\nerr_is_fatl = true\n"
        ))
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "dir/move.toml:18: unknown key \"err_is_fatl\" in [[pre_final]] number 1; did you mean \"err_is_fatal\"?"
        );
    }

    #[test]
    fn verify_mode_defaults_to_transferred_and_the_plan_can_set_it() {
        let p = parse(TWO).unwrap();
        assert_eq!(p.verify_mode(&p.tasks[0]), VerifyMode::Transferred);
        let p = parse(&format!("verify_mode = \"full\"\n{TWO}").replace(
            "depends_on = [\"a\"]",
            "depends_on = [\"a\"]\nverify_mode = \"none\"",
        ))
        .unwrap();
        assert_eq!(p.verify_mode(&p.tasks[0]), VerifyMode::Full);
        assert_eq!(p.verify_mode(&p.tasks[1]), VerifyMode::None);
        // Keys a plan does not use leave its fingerprint as it was before they existed.
        // (The fingerprint hashes this canonical JSON.)
        let hooked = format!("{TWO}\n[[on_success]]\ncommand = \"true\"\n");
        let file: PlanFile = toml::from_str(&hooked).unwrap();
        let canonical = serde_json::to_string(&file).unwrap();
        for key in ["verify_mode", "webhook", "rsh", "remote_cutover"] {
            assert!(!canonical.contains(key), "{key} in {canonical}");
        }
        assert!(
            canonical.contains("\"on_success\":[{\"name\":null,\"command\":\"true\",\"timeout\""),
            "{canonical}"
        );
        let w = parse(&format!(
            "{TWO}\n[[on_success]]\nwebhook = \"https://hooks.example/T0/x\"\n"
        ))
        .unwrap();
        assert_eq!(w.on_success[0].name, "webhook to https://hooks.example");
        assert_eq!(
            w.on_success[0].run,
            HookRun::Webhook("https://hooks.example/T0/x".into())
        );
    }

    #[test]
    fn command_tasks_and_bad_names_are_explained() {
        let cmd = TWO.replace(
            "kind = \"tree\"\nsource = \"src/b/\"",
            "kind = \"command\"\ncommand = \"pg_dump app\"",
        );
        let p = parse(&cmd).unwrap();
        assert_eq!(p.tasks[1].command.as_deref(), Some("pg_dump app"));
        assert_eq!(
            p.spool_path(&p.tasks[1]),
            Path::new("dir/move.state/spool/b")
        );
        let e = parse(&TWO.replace(
            "kind = \"tree\"\nsource = \"src/b/\"",
            "kind = \"command\"\nsource = \"src/b/\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("command: is missing"), "{e}");
        let e = parse(&cmd.replace(
            "destination = \"/dst/b/\"",
            "destination = \"/dst/b/\"\nexcludes = [\"x\"]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with(
                "dir/move.toml:14: task \"b\": excludes: does not apply to a command task"
            ),
            "{e}"
        );
        let e = parse(&TWO.replace(
            "source = \"src/a/\"",
            "source = \"src/a/\"\ndestination_command = \"x\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("destination_command: only applies to kind = \"command\""),
            "{e}"
        );
        let e = parse(&TWO.replace("name = \"b\"", "name = \"../b\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid name"), "{e}");
    }
}
