//! The [`TaskRunner`] of the CLI: a plan task as the `cutover sync` it stands for (local
//! paths from the plan's directory), run through `sync::run_job`; a command task's spool and
//! destination command; `verify_mode`'s comparison as a dry run with checksum.

use super::*;

/// Runs plan tasks through the same function as `cutover sync`.
#[derive(Default)]
pub(super) struct CliRunner {
    /// `replica` tasks whose source this command marked already (a presync marks once,
    /// at its first pass).
    marked: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A task's local paths are taken from the plan file's directory, made absolute so that a
/// colon in it can never make the path read as an ssh endpoint.
pub(super) fn resolve(endpoint: &str, base_dir: &Path) -> String {
    match Endpoint::parse(endpoint) {
        Ok(Endpoint::Local {
            path,
            trailing_slash,
        }) if path.is_relative() => {
            let base = if base_dir.is_absolute() {
                base_dir.to_path_buf()
            } else {
                std::env::current_dir()
                    .unwrap_or_else(|_| PathBuf::from("/"))
                    .join(base_dir)
            };
            let mut s = base.join(path).to_string_lossy().into_owned();
            if trailing_slash && !s.ends_with('/') {
                s.push('/');
            }
            s
        }
        _ => endpoint.to_string(),
    }
}

/// A `replica` task's verify mode ("blocks" unless it says otherwise).
fn replica_verify_mode(t: &TaskSpec) -> ::plan::VerifyMode {
    t.verify_mode.unwrap_or(::plan::VerifyMode::Blocks)
}

/// The `cutover sync` a task stands for; a command task syncs its spool file.
pub fn job_for(
    t: &TaskSpec,
    base_dir: &Path,
    dry_run: bool,
    spool: &Path,
) -> Result<SyncJob, String> {
    let bwlimit = t
        .bwlimit
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(|e| format!("bwlimit: {e}"))?;
    let server_fingerprint = t
        .server_fingerprint
        .as_deref()
        .map(net::tls::Fingerprint::parse)
        .transpose()
        .map_err(|e| format!("server_fingerprint: {e}"))?;
    // rsync semantics, as `cutover sync` applies them: includes first, so they win over
    // excludes of the same path.
    let filters = t
        .includes
        .iter()
        .map(|p| FilterRule::Include(p.clone()))
        .chain(t.excludes.iter().map(|p| FilterRule::Exclude(p.clone())))
        .collect();
    Ok(SyncJob {
        src: match &t.source {
            Some(s) => resolve(s, base_dir),
            None => spool.to_string_lossy().into_owned(),
        },
        dst: resolve(&t.destination, base_dir),
        connections: match t.connections {
            None | Some(::plan::Connections::Auto) => Connections::Auto,
            Some(::plan::Connections::Fixed(n)) => Connections::Fixed(n as usize),
        },
        options: SyncOptions {
            delete: t.delete,
            max_delete: t.max_delete,
            dry_run,
            whole_file: t.whole_file,
            checksum: t.checksum,
            // A volume is written in place by positional delta, never renamed.
            inplace: t.kind == Kind::Volume,
            fsync: t.fsync,
            hard_links: t.hard_links,
            xattrs: t.xattrs,
            compress: t.compress,
            filters,
            bwlimit,
            ..SyncOptions::default()
        },
        timeout: 120,
        retry_for: crate::sync::DEFAULT_RETRY_FOR,
        security: SecurityArgs {
            server_fingerprint,
            token_file: t.token_file.as_ref().map(|f| base_dir.join(f)),
            ..SecurityArgs::default()
        },
        rsh: rsh_of(t),
        remote_cutover: t
            .remote_cutover
            .clone()
            .unwrap_or_else(|| crate::sync::DEFAULT_REMOTE_CUTOVER.into()),
        remote_install: t.remote_cutover.is_none(),
        files_from: None,
        changed: None,
        volume_config: t.volume_config.as_ref().map(|c| base_dir.join(c)),
    })
}

/// A task's ssh command: its `rsh`, else `$CUTOVER_RSH`, else `ssh` (as `cutover sync -e`).
fn rsh_of(t: &TaskSpec) -> String {
    t.rsh
        .clone()
        .or_else(|| std::env::var("CUTOVER_RSH").ok())
        .unwrap_or_else(|| "ssh".into())
}

/// The command line that runs `command` on an ssh destination's host with the transferred
/// file on its stdin: `sh -c COMMAND < FILE` for the remote shell, where FILE is `path`, or
/// the spool file's name in it when `path` is a directory there (as `cutover sync` lands it).
fn remote_feed_command(command: &str, path: &str, spool_name: &str) -> Result<String, String> {
    let q = |s: &str| {
        shlex::try_quote(s).map(|q| q.into_owned()).map_err(|e| {
            format!("destination_command: cannot quote {s:?} for the remote shell: {e}")
        })
    };
    let path = if path.is_empty() { "." } else { path };
    let into_dir = format!("{}/{spool_name}", path.trim_end_matches('/'));
    Ok(if path.ends_with('/') || path == "." {
        format!("sh -c {} < {}", q(command)?, q(&into_dir)?)
    } else {
        // Decided there: only the remote knows whether the path is a directory.
        format!(
            "f={}; if [ -d \"$f\" ]; then f={}; fi; sh -c {} < \"$f\"",
            q(path)?,
            q(&into_dir)?,
            q(command)?
        )
    })
}

/// Where a single file synced to the local destination `dst` lands: `dst` itself, or in it
/// when it is a directory (written with a trailing slash or existing), as `cutover sync` does.
fn landed(dst: &str, file: &Path) -> PathBuf {
    let d = PathBuf::from(dst);
    match file.file_name() {
        Some(name) if dst.ends_with('/') || d.is_dir() => d.join(name),
        _ => d,
    }
}

/// Aborts the progress ticker when the pass ends or is dropped (Ctrl-C).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TaskRunner for CliRunner {
    fn check(&self, t: &TaskSpec) -> Result<(), KeyError> {
        if t.kind == Kind::Replica {
            if let Some(ssh) = &t.ssh_command {
                if shlex::split(ssh).is_none_or(|a| a.is_empty()) {
                    return Err(KeyError {
                        key: "ssh_command",
                        message: format!("{ssh:?} is not a command line (unbalanced quotes?)"),
                    });
                }
            }
            return Ok(());
        }
        let mut remote = 0;
        for (key, v) in [
            ("source", &t.source),
            ("destination", &Some(t.destination.clone())),
        ] {
            // A tracked volume of the local daemon (volume:NAME) is a local source.
            let tracked = key == "source"
                && v.as_deref()
                    .is_some_and(|s| crate::volume_pass::name_of(s).is_some());
            match v.as_deref().map(Endpoint::parse) {
                _ if tracked => {}
                None | Some(Ok(Endpoint::Local { .. })) => {}
                Some(Ok(_)) => remote += 1,
                Some(Err(message)) => return Err(KeyError { key, message }),
            }
        }
        if t.destination_command.is_some() {
            if let Ok(Endpoint::Daemon { addr, .. }) = Endpoint::parse(&t.destination) {
                return Err(KeyError {
                    key: "destination_command",
                    message: format!("cannot run on the daemon destination {addr}: a daemon never runs commands; write the destination as [user@]host:PATH (ssh) so it runs there, or run it on that host in a post_final hook"),
                });
            }
        }
        if t.paths_from.is_some() {
            if let Some(Ok(Endpoint::Daemon { addr, .. })) =
                t.source.as_deref().map(Endpoint::parse)
            {
                return Err(KeyError {
                    key: "paths_from",
                    message: format!("cannot run on the daemon source {addr}: a daemon never runs commands; write the source as [user@]host:PATH (ssh) so it runs there"),
                });
            }
        }
        if let Some(rsh) = &t.rsh {
            if shlex::split(rsh).is_none_or(|a| a.is_empty()) {
                return Err(KeyError {
                    key: "rsh",
                    message: format!("{rsh:?} is not a command line (unbalanced quotes?)"),
                });
            }
        }
        if remote == 2 {
            return Err(KeyError {
                key: "destination",
                message: "source and destination are both remote; one side must be a local path"
                    .into(),
            });
        }
        job_for(t, Path::new("/"), false, Path::new("/spool"))
            .map(drop)
            .map_err(|m| {
                let key = if m.starts_with("bwlimit") {
                    "bwlimit"
                } else {
                    "server_fingerprint"
                };
                let message = m.split_once(": ").map(|x| x.1).unwrap_or(&m).to_string();
                KeyError { key, message }
            })
    }

    fn source_side(&self, t: &TaskSpec, base_dir: &Path) -> Result<SourceSide, String> {
        let source = t
            .source
            .as_deref()
            .ok_or("the task has no source (a command task lists nothing)")?;
        match Endpoint::parse(&resolve(source, base_dir))? {
            Endpoint::Local { path, .. } => Ok(SourceSide::Local(path)),
            Endpoint::Ssh { dest, path } => {
                let rsh = rsh_of(t);
                let mut argv = shlex::split(&rsh)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| format!("rsh {rsh:?}: not a command line"))?;
                argv.push(dest);
                Ok(SourceSide::Remote {
                    argv,
                    path: if path.is_empty() { ".".into() } else { path },
                })
            }
            // `check` refuses it before any pass.
            Endpoint::Daemon { addr, .. } => Err(format!(
                "cannot run on the daemon source {addr}: a daemon never runs commands"
            )),
        }
    }

    fn verify(
        &self,
        t: TaskSpec,
        ctx: PassContext,
        only: Option<Vec<String>>,
    ) -> BoxFuture<Result<Vec<Mismatch>, String>> {
        verify_task(t, ctx, only)
    }

    fn refresh_replica(
        &self,
        t: TaskSpec,
        base_dir: PathBuf,
        kept: ::plan::replica::ReplicaMeasure,
    ) -> BoxFuture<Result<Option<::plan::replica::ReplicaMeasure>, String>> {
        let mode = replica_verify_mode(&t);
        super::replica::refresh(t, base_dir, mode, kept)
    }

    fn run_pass(&self, t: TaskSpec, ctx: PassContext) -> BoxFuture<Result<PassStats, String>> {
        if t.kind == Kind::Replica {
            let mode = replica_verify_mode(&t);
            let first = ctx.kind != "final"
                && !ctx.dry_run
                && self
                    .marked
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(t.name.clone());
            return super::replica::run_pass(t, ctx, mode, first);
        }
        Box::pin(async move {
            let mut job = job_for(&t, &ctx.base_dir, ctx.dry_run, &ctx.spool)?;
            job.files_from = ctx.files_from.as_ref().map(|list| FilesFrom {
                list: list.clone(),
                from0: false,
            });
            if let Some(f) = &job.files_from {
                ctx.log.line(&format!(
                    "sync of the paths listed in {} (files_from)",
                    f.list.display()
                ));
            }
            if let Some(command) = &t.command {
                if ctx.dry_run {
                    // A dry run changes nothing, and a dump can be heavy: say what would run.
                    ctx.log.line(&format!(
                        "would run {command:?}, spool it to {} and sync it to {}",
                        ctx.spool.display(),
                        job.dst
                    ));
                    return Ok(PassStats::default());
                }
                ::plan::spool::spool(command, &ctx.base_dir, &ctx.env, &ctx.spool, &ctx.log)
                    .await?;
            }
            let stats = Arc::new(Stats::default());
            let events = Arc::new(TaskEvents {
                log: ctx.log.clone(),
                dry_run: ctx.dry_run,
                would: Default::default(),
                sent: ctx.collect_sent.then(Default::default),
            });
            let st = stats.clone();
            let sink = ctx.progress.clone();
            let _ticker = AbortOnDrop(tokio::spawn(async move {
                loop {
                    sink.update(state::Progress {
                        files_done: Stats::get(&st.files_done),
                        files_total: Stats::get(&st.files_to_send),
                        bytes_done: Stats::get(&st.bytes_done),
                        bytes_total: Stats::get(&st.bytes_to_send),
                    });
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }));
            let (mut s, wire) = run_job(&job, events.clone(), stats).await?;
            if let (Some(cmd), "final", true) = (
                &t.destination_command,
                ctx.kind.as_str(),
                s.errors.is_empty(),
            ) {
                match Endpoint::parse(&job.dst) {
                    Ok(Endpoint::Ssh { dest, path }) => {
                        let name = ctx
                            .spool
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let remote = remote_feed_command(cmd, &path, &name)?;
                        let mut argv = shlex::split(&job.rsh)
                            .filter(|a| !a.is_empty())
                            .ok_or_else(|| format!("rsh {:?}: not a command line", job.rsh))?;
                        argv.push(dest);
                        argv.push(remote);
                        ::plan::spool::feed_remote(&argv, &ctx.base_dir, &ctx.log).await?;
                    }
                    Ok(Endpoint::Local { .. }) => {
                        ::plan::spool::feed(
                            cmd,
                            &ctx.base_dir,
                            &landed(&job.dst, &ctx.spool),
                            &ctx.log,
                        )
                        .await?
                    }
                    // `check` refuses it before any pass; a plan cannot get here.
                    _ => {
                        return Err(
                            "destination_command: a daemon destination never runs commands".into(),
                        )
                    }
                }
            }
            if ctx.dry_run {
                let w = *events.would.lock().unwrap_or_else(|p| p.into_inner());
                (s.files_sent, s.files_meta_only, s.bytes_logical, s.deleted) = (w.0, 0, w.1, w.2);
            }
            let sent = events
                .sent
                .as_ref()
                .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner())))
                .unwrap_or_default();
            Ok(PassStats {
                sent,
                entries_scanned: s.entries_scanned,
                files_changed: s.files_sent + s.files_meta_only,
                bytes_changed: s.bytes_logical,
                bytes_literal: s.bytes_literal,
                wire_bytes: wire,
                deleted: s.deleted,
                errors: s.errors,
                changed_during_copy: s.changed,
                delete_limit_hit: s.delete_limit_hit,
                replica: None,
            })
        })
    }
}

/// `verify_mode`: the task's sync as a dry run with `checksum`, which lists exactly the
/// entries that differ (same-size files compared by their hashes on both sides), as the
/// task's final pass saw source and destination (same filters, `delete` for extra entries).
fn verify_task(
    t: TaskSpec,
    ctx: PassContext,
    only: Option<Vec<String>>,
) -> BoxFuture<Result<Vec<Mismatch>, String>> {
    Box::pin(async move {
        let mut job = job_for(&t, &ctx.base_dir, true, &ctx.spool)?;
        job.options.checksum = true;
        job.options.whole_file = false;
        // A dry run deletes nothing; extra entries are listed, never counted against a limit.
        job.options.max_delete = None;
        let events = Arc::new(CheckEvents {
            log: ctx.log.clone(),
            found: Default::default(),
        });
        let (s, _) = run_job(&job, events.clone(), Arc::new(Stats::default())).await?;
        if let Some(first) = s.errors.first() {
            return Err(format!(
                "{} error(s) while comparing; first: {first}",
                s.errors.len()
            ));
        }
        let found = std::mem::take(&mut *events.found.lock().unwrap_or_else(|p| p.into_inner()));
        // "transferred": the comparison covered everything; keep what the final pass sent.
        let only: Option<std::collections::HashSet<String>> = only.map(|v| v.into_iter().collect());
        Ok(found
            .into_iter()
            .filter(|m| only.as_ref().is_none_or(|o| o.contains(&m.path)))
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_destination_commands_read_the_landed_file_there() {
        assert_eq!(
            remote_feed_command("pg_restore -d app", "/srv/new/", "db").unwrap(),
            "sh -c 'pg_restore -d app' < /srv/new/db"
        );
        assert_eq!(
            remote_feed_command("cat > x", "", "db").unwrap(),
            "sh -c 'cat > x' < ./db"
        );
        // Without a slash only the remote knows whether it is a directory.
        assert_eq!(
            remote_feed_command("restore", "dumps/app dump", "db").unwrap(),
            "f='dumps/app dump'; if [ -d \"$f\" ]; then f='dumps/app dump/db'; fi; sh -c restore < \"$f\""
        );
    }

    #[test]
    fn relative_local_paths_are_taken_from_the_plan_directory() {
        let base = Path::new("/srv/plans");
        assert_eq!(resolve("tree/docs/", base), "/srv/plans/tree/docs/");
        assert_eq!(resolve("tree/docs", base), "/srv/plans/tree/docs");
        assert_eq!(resolve("/abs/x/", base), "/abs/x/");
        assert_eq!(resolve("host:rel/", base), "host:rel/");
        assert_eq!(resolve("cutover://h:1/m/p", base), "cutover://h:1/m/p");
        // A colon in the plan's directory must not turn the path into an ssh endpoint.
        let odd = Path::new("/srv/a:b");
        assert!(matches!(
            Endpoint::parse(&resolve("x/", odd)).unwrap(),
            Endpoint::Local { .. }
        ));
    }
}
