//! Hooks (`[[pre_final]]`, `[[post_final]]`, the per-pass `pre_pass`/`post_pass` and notify
//! hooks) run as the `hooks` crate runs them: a shell command in its own process group with
//! a timeout, or a webhook POSTed as JSON. Re-exported here so plan's API is unchanged.

pub use ::hooks::{post_webhook, run_hook, HookCall};
