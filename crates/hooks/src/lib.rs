//! Hooks, shared by migration plans (`plan`: `[[pre_final]]`, `[[on_failure]]`, per-pass
//! hooks…) and `cutover serve` (`[[volume_notify]]`): what a checked hook is and the checks
//! that make one ([`spec`]), running it as a shell command in its own process group with a
//! timeout or POSTing a webhook ([`run`]), and the process handling under both
//! ([`process`]). Kept apart from `plan` so the daemon runs hooks without the plan runner
//! and its state store.

pub mod process;
pub mod run;
pub mod spec;

pub use process::{exit_reason, kill_group, stopped};
pub use run::{post_webhook, run_hook, stamp, HookCall};
pub use spec::{hook_name, hook_run, parse_duration, webhook_shown, Hook, HookRun};
