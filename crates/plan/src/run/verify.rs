//! After a final pass: each task's `verify_mode` comparison (content hashes on both sides,
//! through the runner) and its `verify` pair of commands.

use super::*;

/// After a final pass, for every task whose pass succeeded: its `verify_mode` comparison
/// (content hashes on both sides, through the runner), then its `verify` pair. A mismatch
/// fails the task (its pass stays recorded: the data moved, but is not what the source
/// has). Returns true when a stop request ended it (the task being verified is then
/// interrupted).
pub(super) async fn verify_tasks(
    ctx: &Ctx<'_>,
    report: &mut RunReport,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    for r in &mut report.results {
        let Some(spec) = ctx.plan.task(&r.name) else {
            continue;
        };
        let PassOutcome::Ok(stats) = &r.outcome else {
            continue;
        };
        let mode = ctx.plan.verify_mode(spec);
        if spec.kind == crate::Kind::Replica {
            // Its pass verified before it promoted the destination (or failed).
            if mode != VerifyMode::None {
                r.verify = Some(Ok(()));
            }
            continue;
        }
        if mode == VerifyMode::None && spec.verify.is_none() {
            continue;
        }
        ctx.store.set_phase(ctx.run, &r.name, Phase::Verifying)?;
        ctx.logs.summary(&format!("{}: verify starts", r.name));
        let log = ctx.logs.task(&r.name).map_err(|source| Error::Log {
            path: ctx.plan.log_dir(),
            source,
        })?;
        let mut failures: Vec<String> = Vec::new();
        let only = (mode == VerifyMode::Transferred).then(|| stats.sent.clone());
        if mode == VerifyMode::None {
            // Only the `verify` pair below.
        } else if only.as_ref().is_some_and(|o| o.is_empty()) {
            log.line("verify_mode transferred: the final pass sent nothing; nothing to compare");
        } else {
            let what = match &only {
                Some(o) => format!("the {} entries the final pass sent", o.len()),
                None => "every file".into(),
            };
            log.line(&format!(
                "verify_mode {}: comparing content hashes of {what} on both sides",
                mode.as_str()
            ));
            let check = ctx.runner.verify(
                spec.clone(),
                PassContext {
                    base_dir: ctx.plan.base_dir.clone(),
                    kind: "verify".into(),
                    spool: ctx.plan.spool_path(spec),
                    dry_run: true,
                    collect_sent: false,
                    files_from: None,
                    env: Vec::new(),
                    log: log.clone(),
                    progress: ProgressSink::discard(),
                },
                only,
            );
            let found = tokio::select! {
                found = check => found,
                _ = stopped(stop) => {
                    let m = "interrupted during verification".to_string();
                    ctx.store.set_phase(ctx.run, &r.name, Phase::Interrupted)?;
                    log.line(&m);
                    ctx.logs.summary(&format!("{}: {m}", r.name));
                    r.verify = Some(Err(m));
                    return Ok(true);
                }
            };
            match found {
                Ok(m) if m.is_empty() => log.line(&format!(
                    "verify_mode {}: same content on both sides",
                    mode.as_str()
                )),
                Ok(m) => {
                    for x in &m {
                        log.line(&format!("mismatch: {}: {}", x.path, x.reason));
                    }
                    failures.push(format!(
                        "verify_mode {}: {} mismatch{} (first: {}: {})",
                        mode.as_str(),
                        m.len(),
                        if m.len() == 1 { "" } else { "es" },
                        m[0].path,
                        m[0].reason
                    ));
                    r.mismatches = m;
                }
                Err(e) => failures.push(format!(
                    "verify_mode {}: the comparison failed: {e}",
                    mode.as_str()
                )),
            }
        }
        if let Some(v) = &spec.verify {
            match verify_pair(ctx, &r.name, v, &log).await {
                Ok(()) => {}
                Err(m) => failures.push(m),
            }
        }
        let result = if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        };
        match &result {
            Ok(()) => {
                ctx.store.set_phase(ctx.run, &r.name, Phase::Done)?;
                ctx.logs.summary(&format!("{}: verify ok", r.name));
            }
            Err(m) => {
                ctx.store.record_error(ctx.run, &r.name, m)?;
                ctx.store.set_phase(ctx.run, &r.name, Phase::Failed)?;
                log.line(m);
                ctx.logs.summary(&format!("{}: {m}", r.name));
            }
        }
        r.verify = Some(result);
    }
    Ok(false)
}

/// A task's `verify` pair: both commands' outputs must be identical.
async fn verify_pair(
    ctx: &Ctx<'_>,
    name: &str,
    v: &crate::file::VerifySpec,
    log: &crate::TaskLog,
) -> Result<(), String> {
    let dir = ctx.plan.log_dir();
    let out = |side: &str| dir.join(format!("verify-{name}.{side}.out"));
    let base = &ctx.plan.base_dir;
    let a = crate::spool::fingerprint_output("verify source", &v.source, base, &out("source"), log)
        .await;
    let b = crate::spool::fingerprint_output(
        "verify destination",
        &v.destination,
        base,
        &out("destination"),
        log,
    )
    .await;
    match (a, b) {
        (Ok((ha, n)), Ok((hb, _))) if ha == hb => {
            log.line(&format!("verify ok: both outputs are the same {n} bytes"));
            Ok(())
        }
        (Ok((_, na)), Ok((_, nb))) => Err(format!(
            "verify: the outputs differ (source {na} bytes, destination {nb} bytes); compare {} and {}",
            out("source").display(),
            out("destination").display()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!("verify: {e}")),
    }
}
