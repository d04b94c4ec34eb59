//! One pass of one task with what the plan puts around it, in this order: the plan's
//! `[[pre_pass]]` hooks, the task's `pre_pass`, its `paths_from` list, the sync (the
//! [`TaskRunner`]'s pass), the task's `post_pass`, the plan's `[[post_pass]]` hooks. Then the
//! result is judged (errors, the delete limit, files that changed during a final pass).
//!
//! A fatal `pre_pass` failure fails the pass before anything is synced, and `paths_from`
//! failing does the same. `post_pass` hooks run whatever happened, with
//! `CUTOVER_PASS_RESULT=ok|failed`, even after Ctrl-C (bounded by their timeouts): they are
//! where a snapshot taken by `pre_pass` is removed, and an interrupted pass must not leave
//! one behind. A fatal `post_pass` failure fails a pass that had succeeded, so its stamp is
//! not advanced.
//!
//! Nothing here writes the stamp: the runner records the pass (and, for a success, the
//! stamp it started with) once this returns.

use crate::file::{Hook, HookRun, Kind, Plan, TaskSpec, DEFAULT_HOOK_TIMEOUT};
use crate::hooks::{run_hook, HookCall};
use crate::run::{human_duration, stopped, PassOutcome};
use crate::{stamps, PassContext, PassStats, PlanError, TaskRunner};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::watch;

/// Checks of one task's pass keys that need only the plan (the runner checks where a
/// `paths_from` can run).
pub(crate) fn check_task(plan: &Plan, i: usize) -> Result<(), PlanError> {
    let t = &plan.tasks[i];
    if t.paths_from.is_some() && t.kind != Kind::Tree {
        return Err(plan.task_key(
            i,
            "paths_from",
            format!(
                "only applies to kind = \"tree\" (it lists paths beneath the source); remove it from this {} task",
                t.kind.as_str()
            ),
        ));
    }
    Ok(())
}

/// A task's own `pre_pass` or `post_pass` as a hook: the plan's defaults (timeout 5m, a
/// failure is fatal), named by its command.
fn task_hook(command: &Option<String>) -> Option<Hook> {
    command.as_ref().map(|c| Hook {
        name: c.clone(),
        run: HookRun::Command(c.clone()),
        timeout: DEFAULT_HOOK_TIMEOUT,
        err_is_fatal: true,
    })
}

/// Everything one pass needs, owned, so that it runs as a task of its own.
pub(crate) struct Pass {
    spec: TaskSpec,
    /// `presync`, `final`, `rerun` or `dry-run`.
    kind: String,
    ctx: PassContext,
    runner: Arc<dyn TaskRunner>,
    store: Arc<dyn state::Store>,
    /// In the order they run.
    pre: Vec<Hook>,
    post: Vec<Hook>,
    plan_path: PathBuf,
    base_dir: PathBuf,
    hooks_log: PathBuf,
    list: PathBuf,
    stop: watch::Receiver<bool>,
}

impl Pass {
    pub(crate) fn new(
        plan: &Plan,
        spec: &TaskSpec,
        kind: &str,
        ctx: PassContext,
        runner: Arc<dyn TaskRunner>,
        store: Arc<dyn state::Store>,
        stop: watch::Receiver<bool>,
    ) -> Pass {
        let pre = plan
            .pre_pass
            .iter()
            .cloned()
            .chain(task_hook(&spec.pre_pass))
            .collect();
        let post = task_hook(&spec.post_pass)
            .into_iter()
            .chain(plan.post_pass.iter().cloned())
            .collect();
        let mut spec = spec.clone();
        if spec.kind == Kind::Replica {
            // The runner sees the mode the plan resolves (the plan's own default included).
            spec.verify_mode = Some(plan.verify_mode(&spec));
        }
        Pass {
            list: plan.paths_list(&spec),
            spec,
            kind: kind.to_string(),
            ctx,
            runner,
            store,
            pre,
            post,
            plan_path: plan.path.clone(),
            base_dir: plan.base_dir.clone(),
            hooks_log: plan.log_dir().join("hooks.log"),
            stop,
        }
    }

    /// Run the pass and judge it.
    pub(crate) async fn run(self) -> PassOutcome {
        let strict = self.kind == "final";
        if self.ctx.dry_run {
            // A dry run changes nothing: hooks (a snapshot, a mount) do not run, and the
            // sync walks the whole source.
            for h in &self.pre {
                self.ctx
                    .log
                    .line(&format!("would run pre_pass hook {:?}", h.name));
            }
            if let Some(c) = &self.spec.paths_from {
                self.ctx.log.line(&format!(
                    "would run paths_from {c:?} and sync only what it lists; this dry run compares everything"
                ));
            }
            for h in &self.post {
                self.ctx
                    .log
                    .line(&format!("would run post_pass hook {:?}", h.name));
            }
            let r = self
                .runner
                .run_pass(self.spec.clone(), self.ctx.clone())
                .await;
            return judge(&self.spec, r, strict);
        }
        let stamp = match self.store.stamp(&self.spec.name) {
            Ok(s) => s,
            Err(e) => return PassOutcome::Failed(format!("cannot read the task's stamp: {e}")),
        };
        let env = stamps::pass_env(&self.spec.name, &self.kind, stamp);
        let mut stop = self.stop.clone();
        let outcome = match self.before_sync(&env, &mut stop).await {
            Err(decided) => decided,
            Ok(files_from) => {
                let mut ctx = self.ctx.clone();
                ctx.files_from = files_from;
                ctx.env = env.clone();
                let sync = self.runner.run_pass(self.spec.clone(), ctx);
                tokio::select! {
                    r = sync => judge(&self.spec, r, strict),
                    // Dropping the sync stops it, as aborting the pass did before it had hooks.
                    _ = stopped(&mut stop) => PassOutcome::Interrupted,
                }
            }
        };
        self.after_sync(outcome, env).await
    }

    /// The `pre_pass` hooks and `paths_from`: Ok with the list to sync from (None: the
    /// whole source), or Err with how the pass ended before any sync.
    async fn before_sync(
        &self,
        env: &[(String, String)],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<Option<PathBuf>, PassOutcome> {
        for h in &self.pre {
            if let Err(m) = self.hook("pre_pass", h, env, stop).await {
                if *stop.borrow() {
                    return Err(PassOutcome::Interrupted);
                }
                if h.err_is_fatal {
                    return Err(PassOutcome::Failed(format!(
                        "pre_pass hook {:?} failed: {m}; nothing was synced",
                        h.name
                    )));
                }
            }
        }
        let Some(command) = self.spec.paths_from.clone() else {
            return Ok(None);
        };
        let side = self
            .runner
            .source_side(&self.spec, &self.base_dir)
            .map_err(|m| PassOutcome::Failed(format!("paths_from: {m}")))?;
        let listed = crate::paths_from::list(
            &command,
            &side,
            &self.base_dir,
            env,
            &self.list,
            &self.ctx.log,
        );
        let n = tokio::select! {
            r = listed => r.map_err(PassOutcome::Failed)?,
            _ = stopped(stop) => return Err(PassOutcome::Interrupted),
        };
        if n == 0 {
            // Nothing changed since the stamp, as the command sees it: a pass that syncs
            // nothing, and a successful one (it advances the stamp).
            self.ctx
                .log
                .line("paths_from listed nothing: nothing to sync in this pass");
            return Err(PassOutcome::Ok(PassStats::default()));
        }
        Ok(Some(self.list.clone()))
    }

    /// The `post_pass` hooks, told how the pass went; a fatal failure fails a pass that
    /// had succeeded.
    async fn after_sync(
        &self,
        mut outcome: PassOutcome,
        mut env: Vec<(String, String)>,
    ) -> PassOutcome {
        if self.post.is_empty() {
            return outcome;
        }
        let ok = matches!(outcome, PassOutcome::Ok(_));
        env.push((
            "CUTOVER_PASS_RESULT".into(),
            if ok { "ok" } else { "failed" }.into(),
        ));
        // Clean-up runs even after Ctrl-C (a snapshot must not outlive its pass); each hook's
        // timeout still bounds it.
        let (_keep, mut never) = watch::channel(false);
        for h in &self.post {
            if let Err(m) = self.hook("post_pass", h, &env, &mut never).await {
                if h.err_is_fatal && matches!(outcome, PassOutcome::Ok(_)) {
                    outcome =
                        PassOutcome::Failed(format!("post_pass hook {:?} failed: {m}", h.name));
                }
            }
        }
        outcome
    }

    /// Run one hook of this pass; its output goes to `hooks.log`, a line about it to the
    /// task's log.
    async fn hook(
        &self,
        phase: &str,
        h: &Hook,
        env: &[(String, String)],
        stop: &mut watch::Receiver<bool>,
    ) -> Result<f64, String> {
        let call = HookCall {
            phase,
            plan_path: &self.plan_path,
            dir: &self.base_dir,
            log: Some(&self.hooks_log),
            input: None,
            env,
            task: Some(&self.spec.name),
        };
        let r = run_hook(h, &call, stop).await;
        let log = &self.ctx.log;
        match &r {
            Ok(secs) => log.line(&format!(
                "{phase} hook {:?} ok in {}",
                h.name,
                human_duration(*secs)
            )),
            Err(m) => log.line(&format!(
                "{phase} hook {:?} failed: {m} (output in {}){}",
                h.name,
                self.hooks_log.display(),
                if h.err_is_fatal {
                    ""
                } else {
                    "; err_is_fatal = false, going on"
                }
            )),
        }
        r
    }
}

/// Turn a runner's answer into the pass's outcome. `strict` (a final pass): files that
/// changed while they were read make the copy inconsistent, so the pass fails.
pub(crate) fn judge(task: &TaskSpec, r: Result<PassStats, String>, strict: bool) -> PassOutcome {
    match r {
        Err(m) => PassOutcome::Failed(m),
        Ok(s) => {
            if let Some(n) = s.delete_limit_hit {
                PassOutcome::Failed(format!(
                    "max_delete: {n} entries would be deleted (limit {}); nothing was deleted: check the source, or raise max_delete",
                    task.max_delete.unwrap_or(0)
                ))
            } else if let Some(first) = s.errors.first() {
                PassOutcome::Failed(format!("{} error(s); first: {first}", s.errors.len()))
            } else if strict && !s.changed_during_copy.is_empty() {
                PassOutcome::Failed(format!(
                    "{} file(s) changed during the final pass (first: {}); the service is still writing",
                    s.changed_during_copy.len(),
                    s.changed_during_copy[0]
                ))
            } else {
                PassOutcome::Ok(s)
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    const TASK: &str =
        "[[task]]\nname = \"a\"\nkind = \"tree\"\nsource = \"src/\"\ndestination = \"/dst/\"\n";

    fn parse(text: &str) -> Result<Plan, PlanError> {
        Plan::parse(Path::new("dir/move.toml"), text.to_string())
    }

    #[test]
    fn pass_keys_are_read_checked_and_suggested() {
        let p = parse(&format!(
            "[[pre_pass]]\ncommand = \"lvcreate\"\ntimeout = \"1m\"\n[[post_pass]]\ncommand = \"lvremove\"\nerr_is_fatal = false\n{TASK}paths_from = \"find .\"\npre_pass = \"mount\"\npost_pass = \"umount\"\n"
        ))
        .unwrap();
        assert_eq!(p.pre_pass[0].timeout, std::time::Duration::from_secs(60));
        assert!(!p.post_pass[0].err_is_fatal);
        let pass = |p: &Plan| {
            let (_tx, rx) = watch::channel(false);
            let store: Arc<dyn state::Store> = Arc::new(state::SqliteStore::in_memory().unwrap());
            Pass::new(
                p,
                &p.tasks[0],
                "presync",
                ctx(),
                Arc::new(NoRunner),
                store,
                rx,
            )
        };
        let names = |h: &[Hook]| h.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
        let x = pass(&p);
        // The plan's hooks outside the task's own, on both sides.
        assert_eq!(names(&x.pre), ["lvcreate", "mount"]);
        assert_eq!(names(&x.post), ["umount", "lvremove"]);
        assert_eq!(x.list, Path::new("dir/move.state/paths/a"));

        let e = parse(&format!("{TASK}pre_pas = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "dir/move.toml:6: unknown key \"pre_pas\" in task \"a\"; did you mean \"pre_pass\"?"
        );
        let e = parse(&format!("[[post_pas]]\ncommand = \"x\"\n{TASK}"))
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("did you mean \"post_pass\"?"), "{e}");
        let e = parse(&format!(
            "{TASK}[[pre_pass]]\ncommand = \"x\"\ntimout = \"1s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("in [[pre_pass]] number 1; did you mean \"timeout\"?"),
            "{e}"
        );
        let e = parse(&format!("{TASK}[[pre_pass]]\nwebhook = \"https://h/x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("webhook only applies to notify hooks"), "{e}");
        let e = parse(&format!("{TASK}paths_from = \" \"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("paths_from: is empty"), "{e}");
        let volume = TASK.replace("tree", "volume").replace("src/", "disk.img");
        let e = parse(&format!("{volume}paths_from = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("task \"a\": paths_from: only applies to kind = \"tree\""),
            "{e}"
        );
    }

    #[test]
    fn plans_without_pass_keys_keep_their_fingerprint() {
        let file: crate::file::PlanFile = toml::from_str(TASK).unwrap();
        let canonical = serde_json::to_string(&file).unwrap();
        for key in ["paths_from", "pre_pass", "post_pass"] {
            assert!(!canonical.contains(key), "{key} in {canonical}");
        }
    }

    fn ctx() -> PassContext {
        PassContext {
            base_dir: ".".into(),
            kind: "presync".into(),
            spool: "spool".into(),
            dry_run: false,
            collect_sent: false,
            files_from: None,
            env: Vec::new(),
            log: crate::TaskLog::discard(),
            progress: crate::ProgressSink::discard(),
        }
    }

    /// The required methods of a [`TaskRunner`] that runs nothing, for test runners.
    macro_rules! runs_nothing {
        () => {
            fn check(&self, _: &crate::TaskSpec) -> Result<(), crate::KeyError> {
                Ok(())
            }
            fn source_side(
                &self,
                _: &crate::TaskSpec,
                _: &std::path::Path,
            ) -> Result<crate::SourceSide, String> {
                Err("none".into())
            }
            fn run_pass(
                &self,
                _: crate::TaskSpec,
                _: crate::PassContext,
            ) -> crate::BoxFuture<Result<crate::PassStats, String>> {
                Box::pin(async { Err("none".into()) })
            }
            fn verify(
                &self,
                _: crate::TaskSpec,
                _: crate::PassContext,
                _: Option<Vec<String>>,
            ) -> crate::BoxFuture<Result<Vec<crate::Mismatch>, String>> {
                Box::pin(async { Err("none".into()) })
            }
        };
    }
    pub(crate) use runs_nothing;

    /// Runs nothing (and refreshes no prediction: the trait's default).
    pub(crate) struct NoRunner;

    impl TaskRunner for NoRunner {
        runs_nothing!();
    }
}
