//! The plan file: its TOML shape (unknown keys are errors), loading with errors that name
//! the file, line and key, the checks that need the whole plan (unique names, known
//! `depends_on`, no cycles), and the fingerprint that tells a changed plan from the one a
//! run was made with.

use crate::graph;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod check;
mod locate;
mod replica;
mod suggest;

// Hooks are their own crate (the daemon runs them too); plan's API names them as before.
pub use hooks::{hook_name, hook_run, parse_duration, webhook_shown, Hook, HookRun};
pub use locate::Seg;
use locate::*;
use suggest::*;

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
    /// A replicated volume cut over to its peer: drain, verify, demote, promote.
    Replica,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tree => "tree",
            Kind::Volume => "volume",
            Kind::Command => "command",
            Kind::Replica => "replica",
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
    /// `replica` tasks: the blocks written since the last mark (the default there).
    Blocks,
}

impl VerifyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyMode::Transferred => "transferred",
            VerifyMode::Full => "full",
            VerifyMode::None => "none",
            VerifyMode::Blocks => "blocks",
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
    /// `volume` tasks with `source = "volume:NAME"`: the config of the local `cutover
    /// serve` hosting the volume (relative to the plan file), to find its control socket;
    /// default: the daemon's default state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_config: Option<String>,
    /// `replica` tasks: the config of the daemon hosting the destination peer's volume
    /// (relative to the plan file; a path on that host with `destination_ssh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_config: Option<String>,
    /// `replica` tasks: the source daemon runs on this host (`[user@]host`), reached by
    /// `ssh_command`; its control requests go through `cutover volume request` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ssh: Option<String>,
    /// `replica` tasks: the destination daemon runs on this host, as `source_ssh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_ssh: Option<String>,
    /// `replica` tasks: the ssh command line for `source_ssh` and `destination_ssh`
    /// (default `ssh`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_command: Option<String>,
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
            let hooks = plan.hooks_of(section, specs)?;
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

    /// The state store's file.
    pub fn state_db(&self) -> PathBuf {
        self.state_dir.join("state.db")
    }

    /// A task's `verify_mode`: its own, else the plan's, else "transferred"; for a
    /// `replica` task its own, else "blocks" (the plan's "full" or "none" too).
    pub fn verify_mode(&self, t: &TaskSpec) -> VerifyMode {
        match (t.kind, t.verify_mode) {
            (_, Some(m)) => m,
            (Kind::Replica, None) => match self.verify_mode {
                VerifyMode::Full | VerifyMode::None => self.verify_mode,
                _ => VerifyMode::Blocks,
            },
            (_, None) => self.verify_mode,
        }
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
mod tests;
