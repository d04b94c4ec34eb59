//! `cutover plan check|dry-run|presync|cutover|status|rerun`: the arguments, the [`TaskRunner`] that
//! turns a plan task into a [`SyncJob`] and runs it through `sync::run_job` (the code path
//! of `cutover sync`), Ctrl-C/SIGTERM handling, and what the user reads (status table,
//! `--json`) with the exit codes that go with it.

use crate::endpoint::Endpoint;
use crate::exit;
use crate::names;
use crate::print::{errln, outln};
use crate::security::SecurityArgs;
use crate::sync::{parse_rate, run_job, FilesFrom, SyncJob};
use ::plan::run::{human_bytes, human_duration, PresyncReport, Status, Verdict};
use ::plan::{
    BoxFuture, Echo, KeyError, Kind, Mismatch, PassContext, PassStats, Plan, SourceSide, TaskLog,
    TaskRunner, TaskSpec,
};
use engine::{Action, Event, Events, Stats};
use net::client::Connections;
use proto::{FilterRule, SyncOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod check;
mod events;
mod replica;
mod runner;
mod status;

use check::*;
use events::*;
use runner::*;
use status::*;

/// `presync --until-under` did not reach its window within `--max-passes`.
pub const NOT_READY: u8 = 6;

#[derive(clap::Subcommand, Debug)]
pub enum PlanCommand {
    /// Validate a plan file (keys, names, dependencies, endpoints); changes nothing.
    Check { plan: PathBuf },
    /// Show what every task would change, in dependency order; changes nothing.
    DryRun { plan: PathBuf },
    /// Run passes of every task while the service is live and predict the final pass.
    Presync {
        plan: PathBuf,
        /// Repeat passes until the final pass is predicted to take less than this (e.g. 10m);
        /// default: the plan's target_downtime, if any.
        #[arg(long, value_name = "DURATION", value_parser = ::plan::parse_duration)]
        until_under: Option<Duration>,
        /// At most N passes (default: 10 with a window, else 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_passes: Option<u32>,
    },
    /// Run the pre_final hooks, the final pass of every task and the post_final hooks;
    /// report the downtime against the prediction.
    Cutover {
        plan: PathBuf,
        /// Run even though the plan changed since the last run (presync).
        #[arg(long)]
        force: bool,
    },
    /// Show each task's phase, progress, last success and last error (works during a run).
    Status {
        plan: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run again only the tasks whose last pass failed, was blocked or was interrupted.
    Rerun {
        /// Re-run the failed tasks (the only mode there is; required so the command says it).
        #[arg(long, required = true)]
        failed: bool,
        /// Run even though the plan changed since the last run.
        #[arg(long)]
        force: bool,
        plan: PathBuf,
    },
}

pub async fn run(cmd: PlanCommand) -> u8 {
    let path = match &cmd {
        PlanCommand::Check { plan }
        | PlanCommand::DryRun { plan }
        | PlanCommand::Presync { plan, .. }
        | PlanCommand::Cutover { plan, .. }
        | PlanCommand::Status { plan, .. }
        | PlanCommand::Rerun { plan, .. } => plan.clone(),
    };
    let plan = match Plan::load(&path) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let runner: Arc<dyn TaskRunner> = Arc::new(CliRunner::default());
    let echo: Echo = Arc::new(|line: &str| outln!("{line}"));
    match cmd {
        PlanCommand::Check { .. } => {
            if let Err(e) = ::plan::run::check(&plan, runner.as_ref()) {
                return fail(&e);
            }
            let missing = check_local_paths(&plan);
            if !missing.is_empty() {
                for e in &missing {
                    errln!("cutover plan: {e}");
                }
                return exit::FATAL;
            }
            outln!(
                "{}: ok: {} tasks, at most {} at once; state in {}",
                path.display(),
                plan.tasks.len(),
                plan.parallel,
                plan.state_dir.display()
            );
            print_order(&plan);
            exit::OK
        }
        PlanCommand::DryRun { .. } => {
            print_order(&plan);
            match ::plan::run::dry_run(&plan, runner, echo, stop_on_signal()).await {
                Ok(r) if r.interrupted => exit::INTERRUPTED,
                Ok(r) if r.ok() => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Presync {
            until_under,
            max_passes,
            ..
        } => {
            let r = ::plan::run::presync(
                &plan,
                runner,
                echo,
                until_under,
                max_passes,
                stop_on_signal(),
            )
            .await;
            match r {
                Ok(r) => presync_code(&r),
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Cutover { force, .. } => {
            match ::plan::run::cutover(&plan, runner, echo, force, stop_on_signal()).await {
                Ok(r) if r.interrupted => exit::INTERRUPTED,
                Ok(r) if r.ok => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Status { json, .. } => match ::plan::run::status(&plan) {
            Ok(s) => {
                if json {
                    outln!("{}", status_json(&plan, &s));
                } else {
                    print_status(&plan, &s);
                }
                exit::OK
            }
            Err(e) => fail(&e),
        },
        PlanCommand::Rerun { force, .. } => {
            match ::plan::run::rerun_failed(&plan, runner, echo, force, stop_on_signal()).await {
                Ok((r, _)) if r.interrupted => exit::INTERRUPTED,
                Ok((r, _)) if r.ok() => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    errln!("cutover plan: {e}");
    exit::FATAL
}

fn presync_code(r: &PresyncReport) -> u8 {
    match r.verdict {
        Verdict::Ready | Verdict::Done => exit::OK,
        Verdict::NotReady => NOT_READY,
        Verdict::Failed => exit::PARTIAL,
        Verdict::Interrupted => exit::INTERRUPTED,
    }
}

/// A channel that turns true on the first SIGINT or SIGTERM: the runner then stops every
/// task and records them as interrupted.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        errln!("cutover plan: stopping every task; run the same command again to resume");
        let _ = tx.send(true);
        // Keep the sender alive: a dropped sender reads as "never stop".
        std::future::pending::<()>().await;
    });
    rx
}

fn print_order(plan: &Plan) {
    let levels = ::plan::graph::levels(&plan.tasks);
    let depth = levels.iter().copied().max().unwrap_or(0);
    for l in 0..=depth {
        let names: Vec<&str> = plan
            .tasks
            .iter()
            .zip(&levels)
            .filter(|(_, &tl)| tl == l)
            .map(|(t, _)| t.name.as_str())
            .collect();
        outln!("  step {}: {}", l + 1, names.join(", "));
    }
}
