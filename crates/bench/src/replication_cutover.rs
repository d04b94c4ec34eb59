//! R6: a migration plan's `replica` task cuts a replicated volume over to its peer while
//! an application writes to it. The pair is R1–R5's (`replication_pair.rs`): alpha the
//! primary, beta the secondary, the link through wanem, protocol A (what a move over a long
//! link uses: a write waits for the local disk only), the initial full sync untimed over
//! direct loopback onto a sparse backing. Then:
//!
//! 1. the application: `nbd_load.py paced` writing 1 MiB blocks through alpha's export at
//!    [`WRITE_SHARE`] of the link, with a pid file, so a command can stop it; it runs
//!    `warm_secs` before the plan starts, so the link is in its steady state;
//! 2. a plan with one `replica` task (`volume:bench` on alpha's config → peer `beta`) and a
//!    `[[pre_final]]` hook that sends the writer SIGTERM and waits until it has
//!    disconnected (its pid file is gone);
//! 3. `cutover plan presync PLAN --until-under 2s`; the application writes on for another
//!    `warm_secs` (the operator's pause between "ready for cutover" and the go: without it
//!    the final pass would verify next to nothing, as the mark is set by the presync and
//!    the writer is stopped a few milliseconds later); then `cutover plan cutover PLAN`.
//!
//! The figures come from the plan itself: the cutover report's first note, `downtime D
//! (final pass F, predicted P, ±X%)`, where F is the downtime without the hooks (the row's
//! figure, against [`LIMIT_S`]) and P the prediction the cutover compared it against (made
//! at the cutover's start, before the stop hook), the task's own duration in the report
//! (ms), and the task's measurements in `<state_dir>/replica/TASK.json`: after presync the
//! prediction presync made (shown beside P: it cannot know what the writer adds before the
//! cutover), after the cutover the measured drain, verify and demote + promote, with the
//! prediction made at the cutover's start under `predicted`. Afterwards beta must be
//! primary and alpha secondary, and the two backings equal (`cmp`).

use crate::proc::{describe, quote, run_timed, tail, Timed};
use crate::replication::{row_spec, Measured, Row};
use crate::replication_pair::{Pair, PeerOpts, Writer};
use crate::tools::{Env, ToolRun};
use crate::volume_io::{export_uri, VOLUME};
#[cfg(test)]
use crate::workloads::Place;
use crate::workloads::{big, mib, scaled, Spec};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The row's target, as the table shows it.
pub const TARGET: &str = "downtime (hooks excluded) ≤ 2 s";
/// The downtime without hooks the row must stay under, and presync's `--until-under`.
const LIMIT_S: f64 = 2.0;
/// The writer's share of the link.
const WRITE_SHARE: f64 = 0.3;
/// The writer's block.
const CHUNK: u64 = 1 << 20;
/// The plan's one task.
const TASK: &str = "vol";
/// How long the stop hook may take before the cutover gives up (the writer is told to
/// stop after its write in progress; seconds are plenty).
const HOOK_TIMEOUT: &str = "60s";

/// R6 at `scale` (1.0: a 4 GiB volume, the writer 10 s ahead of the plan).
pub fn specs(scale: f64) -> Vec<Spec> {
    let mb = scaled(4096, scale);
    let warm_secs = scaled(10, scale).max(3);
    let row = Row::Cutover { mb, warm_secs };
    let work = format!(
        "plan cutover (`replica` task) of a {} replicated volume, protocol A, under a steady \
         writer at {:.0}% of the link (1 MiB writes; {warm_secs} s before presync and {warm_secs} s \
         between presync and cutover), stopped by a `pre_final` hook",
        mib(mb),
        WRITE_SHARE * 100.0
    );
    // The volume starts sparse; the base set is only the driver's required input.
    vec![row_spec("R6", row, work, big(1, 1, false))]
}

/// The `pre_final` hook: SIGTERM to the writer, then wait until it has disconnected and
/// removed its pid file (the source's demotion is refused while an NBD client is attached).
fn stop_hook(pid_file: &Path) -> String {
    let pid = quote(&pid_file.to_string_lossy());
    format!("kill -TERM \"$(cat {pid})\" && while [ -e {pid} ]; do sleep 0.01; done")
}

/// The plan: the replica task from alpha to beta, and the hook that stops the writer.
/// (Rust's `{:?}` of these strings is a TOML basic string for the paths the bench makes.)
fn plan_text(alpha_config: &Path, beta_config: &Path, pid_file: &Path) -> String {
    format!(
        "name = \"r6\"\n\n[[task]]\nname = \"{TASK}\"\nkind = \"replica\"\n\
         source = \"volume:{VOLUME}\"\nvolume_config = {:?}\ndestination = \"beta\"\n\
         destination_config = {:?}\n\n[[pre_final]]\nname = \"stop the writer\"\n\
         command = {:?}\ntimeout = \"{HOOK_TIMEOUT}\"\n",
        alpha_config.to_string_lossy(),
        beta_config.to_string_lossy(),
        stop_hook(pid_file)
    )
}

/// Seconds in `human_duration`'s forms: `1.2 s` below ten seconds, else humantime's
/// `12s`, `1m 3s`, `1h 2m 3s`.
fn parse_secs(text: &str) -> Option<f64> {
    let t = text.trim();
    if let Some(n) = t.strip_suffix(" s") {
        return n.trim().parse().ok();
    }
    let mut total = 0.0;
    for word in t.split_whitespace() {
        let (n, unit) = word.split_at(word.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = n.parse().ok()?;
        total += n * match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            _ => return None,
        };
    }
    (!t.is_empty()).then_some(total)
}

/// What the cutover's note `downtime D (final pass F, predicted P, ±X%)` says.
#[derive(Debug, PartialEq)]
struct Downtime {
    downtime_s: f64,
    final_pass_s: f64,
    /// None: `no prediction`.
    predicted_s: Option<f64>,
}

/// The cutover's note `downtime D (final pass F, predicted P, ±X%)` (or `…, predicted P)`,
/// or `…, no prediction)`) read back.
fn parse_downtime(note: &str) -> Option<Downtime> {
    let rest = note.strip_prefix("downtime ")?;
    let (d, rest) = rest.split_once(" (final pass ")?;
    let mut parts = rest.split([',', ')']);
    let f = parts.next()?;
    let predicted_s = match parts.next()?.trim() {
        "no prediction" => None,
        p => Some(parse_secs(p.strip_prefix("predicted ")?)?),
    };
    Some(Downtime {
        downtime_s: parse_secs(d)?,
        final_pass_s: parse_secs(f)?,
        predicted_s,
    })
}

/// The JSON report a plan command named on its stdout (`report: J.json and M.md`).
fn report_of(stdout: &str) -> Result<Value> {
    let path = stdout
        .lines()
        .find_map(|l| l.strip_prefix("report: "))
        .and_then(|l| l.split_once(".json and "))
        .map(|(j, _)| PathBuf::from(format!("{j}.json")))
        .context("the plan printed no `report: …json and …md` line")?;
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// `cutover plan ARGS`, its output in `logs/NAME.{out,err}`: the run and its stdout.
fn plan_cmd(
    bin: &Path,
    args: &[&str],
    logs: &Path,
    name: &str,
    limit: Duration,
) -> Result<(Timed, String, String)> {
    let mut cmd = Command::new(bin);
    cmd.arg("plan").args(args);
    let text = describe(&cmd);
    eprintln!("  {name}: {text}");
    let (out, err) = (
        logs.join(format!("{name}.out")),
        logs.join(format!("{name}.err")),
    );
    let t = run_timed(&mut cmd, &out, &err, limit, false)?;
    let stdout = fs::read_to_string(&out).unwrap_or_default();
    if !t.success() {
        bail!(
            "{text} failed ({}): {} {}",
            t.failure(),
            tail(&out, 1500),
            tail(&err, 500)
        );
    }
    Ok((t, stdout, text))
}

/// The task's measurements as the plan keeps them (`<state_dir>/replica/TASK.json`).
fn measures(state_dir: &Path) -> Result<Value> {
    let p = state_dir.join("replica").join(format!("{TASK}.json"));
    let text = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
}

fn ms(v: &Value, key: &str) -> f64 {
    v[key].as_u64().unwrap_or(0) as f64 / 1000.0
}

/// The demote + promote a prediction counts, as `ReplicaMeasure::predicted_ms` does: a
/// switch measured earlier, else the estimate.
fn switch_s(m: &Value) -> f64 {
    m["switch_ms"]
        .as_u64()
        .or(m["fixed_ms"].as_u64())
        .unwrap_or(0) as f64
        / 1000.0
}

/// A kept prediction's total (seconds).
fn predicted_s_of(m: &Value) -> f64 {
    ms(m, "drain_ms") + ms(m, "verify_ms") + switch_s(m)
}

/// A kept prediction's terms, for the row's text.
fn terms(m: &Value) -> String {
    if m.is_null() {
        return "its terms were not kept".into();
    }
    format!(
        "drain {:.2} s at a lag of {:.2} s, verify {:.2} s of {:.0} MB, demote + promote {:.2} s",
        ms(m, "drain_ms"),
        ms(m, "lag_ms"),
        ms(m, "verify_ms"),
        m["verify_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        switch_s(m)
    )
}

/// Wait until the writer has connected and written its pid file.
fn wait_pid_file(writer: &mut Writer, pid_file: &Path) -> Result<()> {
    let t = Instant::now();
    while !pid_file.exists() {
        if !writer.running()? {
            bail!(
                "the writer ended before it connected: {}",
                tail(&writer.log, 1500)
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "the writer wrote no pid file in 30 s: {}",
                tail(&writer.log, 1500)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Let the writer go on for `secs`; an error if it ended meanwhile.
fn keep_writing(writer: &mut Writer, secs: u64) -> Result<()> {
    std::thread::sleep(Duration::from_secs(secs));
    if !writer.running()? {
        bail!("the writer ended early: {}", tail(&writer.log, 1500));
    }
    Ok(())
}

/// What the plan's two commands did: each run with its stdout and command line, and the
/// task's measurements right after presync (presync's prediction).
struct PlanRun {
    presync: (Timed, String, String),
    cutover: (Timed, String, String),
    after_presync: Value,
}

/// `plan presync --until-under 2s`, the writer on for `pause_secs` more, `plan cutover`.
fn drive_plan(
    env: &Env,
    pair: &Pair,
    writer: &mut Writer,
    plan: &str,
    state_dir: &Path,
    pause_secs: u64,
    logs: &Path,
) -> Result<PlanRun> {
    let until = format!("{LIMIT_S}s");
    let args = ["presync", plan, "--until-under", &until];
    let presync = plan_cmd(&pair.bin, &args, logs, "plan-presync", env.timeout)?;
    // Now: the cutover makes the prediction again, then overwrites it with what it measured.
    let after_presync = measures(state_dir)?;
    keep_writing(writer, pause_secs)?;
    let cutover = plan_cmd(
        &pair.bin,
        &["cutover", plan],
        logs,
        "plan-cutover",
        env.timeout,
    )?;
    Ok(PlanRun {
        presync,
        cutover,
        after_presync,
    })
}

/// R6 on a `size`-byte volume, the writer `warm_secs` ahead of the plan and as long again
/// between presync and cutover.
pub(crate) fn run(
    env: &Env,
    size: u64,
    warm_secs: u64,
    dir: &Path,
    logs: &Path,
) -> Result<Measured> {
    let opts = PeerOpts {
        protocol: "A",
        csums: false,
    };
    let pair = Pair::start(env, dir, logs, size, None, opts)?;
    let rate = env.link.total_mbps * 1e6 * WRITE_SHARE;
    let pid_file = dir.join("writer.pid");
    let args = [
        "paced".to_string(),
        export_uri(&pair.alpha.state()),
        size.to_string(),
        rate.to_string(),
        // Until the hook stops it.
        "86400".into(),
        CHUNK.to_string(),
        pid_file.to_string_lossy().into_owned(),
    ];
    let mut writer = Writer::spawn(dir, logs, "writer", &args)?;
    wait_pid_file(&mut writer, &pid_file)?;
    keep_writing(&mut writer, warm_secs)?;
    let plan = dir.join("r6.toml");
    fs::write(
        &plan,
        plan_text(&pair.alpha.config, &pair.beta.config, &pid_file),
    )
    .with_context(|| format!("write {}", plan.display()))?;
    let state_dir = dir.join("r6.state");
    let plan_s = plan.to_string_lossy().into_owned();
    let cpu0 = pair.cpu_mark();
    let ran = drive_plan(
        env,
        &pair,
        &mut writer,
        &plan_s,
        &state_dir,
        warm_secs,
        logs,
    );
    let cpu = cpu0.share_until(&pair.cpu_mark());
    let writer_cmd = writer.command.clone();
    // The hook stopped it; if the cutover never got there, this stops it.
    let w = writer.finish(Duration::ZERO);
    let PlanRun {
        presync: (presync_t, presync_out, presync_cmd),
        cutover: (cutover_t, cutover_out, cutover_cmd),
        after_presync,
    } = ran?;
    let w = w?;
    let measured = measures(&state_dir)?;
    let report = report_of(&cutover_out)?;
    let note = report["notes"][0].as_str().unwrap_or_default().to_string();
    let Downtime {
        downtime_s: downtime,
        final_pass_s: final_pass,
        predicted_s,
    } = parse_downtime(&note)
        .with_context(|| format!("the cutover report's first note is not a downtime: {note:?}"))?;
    // The prediction the cutover compared against, term by term (made at its start).
    let at_start = &measured["predicted"];
    let task_s = report["tasks"][0]["duration_s"].as_f64();
    let role = |st: Value| st["role"].as_str().unwrap_or("of no role").to_string();
    let beta_role = role(pair.status_on(true)?);
    let alpha_role = role(pair.status()?);
    let command = pair.command(&[
        format!(
            "{} (stopped by the hook)",
            crate::replication::describe_writer(&writer_cmd, &w)
        ),
        presync_cmd,
        cutover_cmd,
        format!("plan: {}", quote(&plan_s)),
    ]);
    let (wire, verify) = pair.finish()?;

    let after_presync_s = predicted_s_of(&after_presync);
    let switched = beta_role == "primary" && alpha_role == "secondary";
    let ready = presync_out.contains("ready for cutover");
    let passes = presync_out
        .lines()
        .filter(|l| l.starts_with("presync pass ") && l.ends_with(" starts"))
        .count();
    let judged = format!(
        "downtime without hooks (final pass) {final_pass:.1} s (task {:.2} s: drain {:.2} s, verify {:.2} s of {:.0} MB, \
         demote + promote {:.2} s), {downtime:.1} s with the stop hook; predicted {} at the cutover's start ({}), \
         {after_presync_s:.2} s after presync ({}); beta {beta_role}, alpha {alpha_role}; presync {:.1} s in \
         {passes} pass(es){}; writer {:.1} MB/s of {:.1} asked",
        task_s.unwrap_or(0.0),
        ms(&measured, "drain_ms"),
        ms(&measured, "verify_ms"),
        measured["verify_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
        ms(&measured, "switch_ms"),
        predicted_s.map_or("nothing".into(), |p| format!("{p:.2} s")),
        terms(at_start),
        terms(&after_presync),
        presync_t.seconds,
        if ready { ", ready for cutover" } else { ", **not** ready" },
        w["rate"].as_f64().unwrap_or(0.0) / 1e6,
        rate / 1e6,
    );
    let figures = json!({
        "downtime_s": downtime, "final_pass_s": final_pass, "task_final_pass_s": task_s,
        "note": note, "predicted_s": predicted_s, "predicted": at_start.clone(),
        "predicted_after_presync_s": after_presync_s, "predicted_after_presync": after_presync,
        "measured": measured.clone(), "presync_s": presync_t.seconds, "presync_passes": passes,
        "ready": ready, "cutover_command_s": cutover_t.seconds, "beta_role": beta_role,
        "alpha_role": alpha_role, "writer": w, "cpu_cores": cpu, "warm_secs": warm_secs,
        "pause_before_cutover_s": warm_secs,
    });
    let reference = ToolRun {
        tool: "the plan's prediction at the cutover's start".into(),
        command: format!(
            "drain + verify + demote/promote, `predicted` in the cutover's downtime note (terms \
             under `predicted` in {})",
            state_dir
                .join("replica")
                .join(format!("{TASK}.json"))
                .display()
        ),
        seconds: predicted_s,
        report: Some(at_start.clone()),
        ..Default::default()
    };
    Ok(Measured {
        command,
        seconds: final_pass,
        wire,
        figures,
        met: Some(final_pass <= LIMIT_S && switched && ready),
        judged,
        verify,
        reference: Some(reference),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_in_the_plans_forms() {
        assert_eq!(parse_secs("1.2 s"), Some(1.2));
        assert_eq!(parse_secs("12s"), Some(12.0));
        assert_eq!(parse_secs("1m 3s"), Some(63.0));
        assert_eq!(parse_secs("1h 2m 3s"), Some(3723.0));
        assert_eq!(parse_secs(""), None);
        assert_eq!(parse_secs("soon"), None);
    }

    #[test]
    fn the_downtime_note_gives_its_three_figures() {
        let read =
            |n: &str| parse_downtime(n).map(|d| (d.downtime_s, d.final_pass_s, d.predicted_s));
        let n = "downtime 1.4 s (final pass 0.9 s, predicted 1.1 s, -18%)";
        assert_eq!(read(n), Some((1.4, 0.9, Some(1.1))));
        let n = "downtime 12s (final pass 9.5 s, predicted 1m 3s, -85%)";
        assert_eq!(read(n), Some((12.0, 9.5, Some(63.0))));
        // A prediction of 0.0 s has no percentage.
        let n = "downtime 1.0 s (final pass 0.2 s, predicted 0.0 s)";
        assert_eq!(read(n), Some((1.0, 0.2, Some(0.0))));
        let n = "downtime 12s (final pass 9.5 s, no prediction)";
        assert_eq!(read(n), Some((12.0, 9.5, None)));
        assert_eq!(read("pre_final hook failed"), None);
        assert_eq!(
            read("downtime 1.0 s (final pass 0.2 s, predicted soon)"),
            None
        );
    }

    #[test]
    fn the_report_is_found_from_the_plans_output() {
        let dir = std::env::temp_dir().join(format!("r6-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let j = dir.join("report-x-run2.json");
        fs::write(&j, r#"{"mode": "cutover", "notes": ["downtime 1.0 s (final pass 0.5 s, predicted 0.6 s, -17%)"]}"#).unwrap();
        let out = format!(
            "final pass starts\nreport: {} and {}\n",
            j.display(),
            dir.join("report-x-run2.md").display()
        );
        let r = report_of(&out).unwrap();
        assert_eq!(r["mode"], "cutover");
        assert!(report_of("no report here\n").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_stop_hook_returns_once_the_writer_has_gone() {
        let dir = std::env::temp_dir().join(format!("r6-hook-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pid = dir.join("writer.pid");
        // A stand-in application: pid file once up, removed (after a pause) on SIGTERM.
        let mut app = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "trap 'sleep 0.3; rm {0}; exit 0' TERM; echo $$ > {0}.tmp; mv {0}.tmp {0}; \
                 while :; do sleep 0.05; done",
                pid.display()
            ))
            .spawn()
            .unwrap();
        while !pid.exists() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let t = Instant::now();
        let ok = Command::new("sh")
            .arg("-c")
            .arg(stop_hook(&pid))
            .status()
            .unwrap();
        assert!(ok.success());
        assert!(!pid.exists());
        assert!(t.elapsed() >= Duration::from_millis(300), "it did not wait");
        app.wait().unwrap();
        let text = plan_text(Path::new("/a/serve.toml"), Path::new("/b/serve.toml"), &pid);
        assert!(
            text.contains("kind = \"replica\"\nsource = \"volume:bench\""),
            "{text}"
        );
        assert!(
            text.contains(&format!("command = {:?}", stop_hook(&pid))),
            "{text}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn r6_is_one_row_with_a_smaller_volume_at_small_scales() {
        let s = specs(0.05);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].id, "R6");
        assert_eq!(
            s[0].place,
            Place::Replication(Row::Cutover {
                mb: 205,
                warm_secs: 3
            })
        );
        assert_eq!(
            specs(1.0)[0].place,
            Place::Replication(Row::Cutover {
                mb: 4096,
                warm_secs: 10
            })
        );
    }
}
