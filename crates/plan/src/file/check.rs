//! Validation: each hook section's hooks (one by one with `hooks::hook_run`), and the
//! checks that need the whole plan (valid, unique names, the keys each kind takes, known
//! `depends_on`, no cycles).

use super::*;

/// Task names end up in file names (logs) and on command lines.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !n.starts_with('.')
}

impl Plan {
    /// Check the hooks of one section (`[[pre_final]]`, `[[on_success]]`, …) and give them
    /// their defaults.
    pub(super) fn hooks_of(
        &self,
        section: &str,
        specs: &[HookSpec],
    ) -> Result<Vec<Hook>, PlanError> {
        let notify = section.starts_with("on_");
        let mut hooks = Vec::with_capacity(specs.len());
        for (i, h) in specs.iter().enumerate() {
            let at = |key| [Seg::Key(section), Seg::Index(i), Seg::Key(key)];
            let run = hook_run(section, notify, h.command.as_deref(), h.webhook.as_deref())
                .map_err(|(key, message)| match key {
                    Some(key) => self.at(&at(key), message),
                    None => self.at(&[Seg::Key(section), Seg::Index(i)], message),
                })?;
            let timeout = match &h.timeout {
                Some(t) => parse_duration(t)
                    .map_err(|m| self.at(&at("timeout"), format!("[[{section}]] timeout = {m}")))?,
                None => DEFAULT_HOOK_TIMEOUT,
            };
            if notify && h.err_is_fatal.is_some() {
                return Err(self.at(
                    &at("err_is_fatal"),
                    format!("[[{section}]] err_is_fatal does not apply: a notify hook never changes the run's outcome; remove it"),
                ));
            }
            let name = hook_name(h.name.as_deref(), &run);
            hooks.push(Hook {
                name,
                run,
                timeout,
                err_is_fatal: h.err_is_fatal.unwrap_or(true),
            });
        }
        Ok(hooks)
    }

    pub(super) fn validate(&self) -> Result<(), PlanError> {
        if self.parallel == 0 {
            return Err(self.at(
                &[Seg::Key("parallel")],
                "parallel = 0: at least one task must be able to run; write parallel = 1 or more"
                    .into(),
            ));
        }
        if self.verify_mode == VerifyMode::Blocks {
            return Err(self.at(
                &[Seg::Key("verify_mode")],
                "verify_mode = \"blocks\" only applies to replica tasks (it is already their default); remove it here".into(),
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
            self.validate_task(i, t)?;
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

    /// One task's keys: its name (valid and unique), the keys its kind needs and the ones it
    /// does not take, and its `depends_on`.
    fn validate_task(&self, i: usize, t: &TaskSpec) -> Result<(), PlanError> {
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
                    "needs both commands: verify = { source = \"…\", destination = \"…\" }".into(),
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
            ("volume_config", &t.volume_config),
            ("pre_pass", &t.pre_pass),
            ("post_pass", &t.post_pass),
        ] {
            if empty(v) {
                return Err(self.task_key(i, key, "is empty: remove it or give it a value".into()));
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
            (Kind::Tree | Kind::Volume | Kind::Replica, None, _) => {
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
        let volume_source = t
            .source
            .as_deref()
            .is_some_and(|s| s.starts_with("volume:"));
        if volume_source && !matches!(t.kind, Kind::Volume | Kind::Replica) {
            return Err(self.task_key(
                i,
                "source",
                "names a tracked volume (volume:NAME): make the task kind = \"volume\"".into(),
            ));
        }
        if t.volume_config.is_some() && !volume_source {
            return Err(self.task_key(
                i,
                "volume_config",
                "only applies to a volume task whose source is volume:NAME; remove it".into(),
            ));
        }
        self.validate_replica(i, t)?;
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
        self.validate_depends_on(i, t)
    }

    /// A task's `depends_on` names other tasks of the plan.
    fn validate_depends_on(&self, i: usize, t: &TaskSpec) -> Result<(), PlanError> {
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
        Ok(())
    }
}
