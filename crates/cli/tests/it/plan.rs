//! Migration plans end to end: `cutover plan check|dry-run|presync|status|rerun` run as the
//! real binary on a copy of the bundled example tree (and a real daemon where it says so);
//! timings, phases and passes are read back with `plan status --json` from another process.

use crate::util::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `cutover plan ARGS...`.
pub(crate) fn plan_cmd(args: &[&str]) -> Command {
    let mut c = cutover_cmd();
    c.arg("plan").args(args);
    c
}

pub(crate) fn plan(args: &[&str]) -> Out {
    Running::start(plan_cmd(args)).wait()
}

/// `plan status --json PLAN`, parsed.
pub(crate) fn status(plan_file: &Path) -> Value {
    let out = plan(&["status", "--json", s(plan_file)]);
    out.ok();
    serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"))
}

pub(crate) fn task<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["name"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {status}"))
}

/// (started_ms, ended_ms) of a task's last pass.
fn span(status: &Value, name: &str) -> (i64, i64) {
    let p = &task(status, name)["last_pass"];
    (
        p["started_ms"].as_i64().unwrap_or_else(|| panic!("{p}")),
        p["ended_ms"].as_i64().unwrap_or_else(|| panic!("{p}")),
    )
}

/// A copy of the bundled example tree in `dir/src`, to change without touching the repo.
pub(crate) fn example_copy(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tree");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&example)
        .arg(&src)
        .status()
        .expect("cp");
    assert!(st.success());
    src
}

/// A temporary directory with a copy of the example tree (`src`), an empty `dst` and the
/// path of a plan file (`move.toml`) in it.
pub(crate) fn setup() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tmp();
    let src = example_copy(dir.path());
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let p = dir.path().join("move.toml");
    (dir, src, dst, p)
}

/// The JSON error log of the plan's latest run.
pub(crate) fn errors_json(dir: &Path) -> Value {
    let path = dir.join("move.state/logs/errors-latest.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Poll `plan status --json` (another process) while `run` goes on, until `ready` holds;
/// returns that status.
fn wait_for_status(p: &Path, run: &mut Running, ready: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    let db = p.with_file_name("move.state/state.db");
    loop {
        assert!(
            run.running() && started.elapsed() < Duration::from_secs(20),
            "the status never showed what was expected"
        );
        // The store exists a moment before the run is recorded in it.
        let out = plan(&["status", "--json", s(p)]);
        if db.exists() && !out.stderr.contains("no run has been recorded yet") {
            out.ok();
            let st: Value = serde_json::from_str(out.stdout.trim())
                .unwrap_or_else(|e| panic!("status JSON: {e}\n{out}"));
            if ready(&st) {
                return st;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `[[task]]` of a tree.
pub(crate) fn tree_task(name: &str, source: &str, destination: &str, extra: &str) -> String {
    format!(
        "[[task]]\nname = \"{name}\"\nkind = \"tree\"\nsource = \"{source}\"\ndestination = \"{destination}\"\n{extra}\n"
    )
}

/// A 3 MiB file behind `bwlimit = "1M"` takes about 2 s (the limiter lets the first MiB
/// through at once): long enough to see tasks overlap or not, and to look at a running one.
fn slow_source(dir: &Path, seed: u64) -> PathBuf {
    let d = dir.join(format!("slow{seed}"));
    write(&d.join("big.bin"), random_bytes(seed, 3 << 20));
    d
}

const SLOW: &str = "bwlimit = \"1M\"";

#[test]
fn example_plan_checks() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/plan.toml");
    let out = plan(&["check", s(&example)]);
    out.ok();
    assert!(out.stdout.contains("ok: 3 tasks"), "{out}");
    assert!(out.stdout.contains("step 2: top"), "{out}");
}

#[test]
fn bad_plans_get_one_line_naming_line_and_key() {
    let dir = tmp();
    let p = dir.path().join("move.toml");
    let t = |name: &str, extra: &str| tree_task(name, "src/", "dst/", extra);

    write(
        &p,
        format!("parallel = 2\n{}{}", t("a", ""), t("b", "bwlimt = \"1M\"")),
    );
    let out = plan(&["check", s(&p)]);
    assert_one_line_error(
        &out,
        &["move.toml:13: unknown key \"bwlimt\" in task \"b\"; did you mean \"bwlimit\"?"],
    );
    assert_eq!(out.code(), 1);

    write(
        &p,
        format!(
            "{}{}{}",
            t("a", "depends_on = [\"c\"]"),
            t("b", "depends_on = [\"a\"]"),
            t("c", "depends_on = [\"b\"]")
        ),
    );
    let out = plan(&["check", s(&p)]);
    assert_one_line_error(&out, &["move.toml:6:", "cycle: a -> c -> b -> a"]);

    write(&p, format!("{}{}", t("a", ""), t("a", "")));
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:8:", "name", "unique"],
    );

    write(&p, t("a", "depends_on = [\"nope\"]"));
    assert_one_line_error(&plan(&["check", s(&p)]), &["move.toml:6:", "\"nope\""]);

    // What only the runner understands is checked too, with its line.
    write(&p, t("a", "bwlimit = \"fast\""));
    assert_one_line_error(&plan(&["check", s(&p)]), &["move.toml:6:", "bwlimit"]);
    write(&p, tree_task("a", "cutover://h/m/x", "host:/y", ""));
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:5:", "destination", "both remote"],
    );

    // A plan that never ran has no status; nothing was created by any of the checks.
    write(&p, t("a", ""));
    assert_one_line_error(&plan(&["status", s(&p)]), &["no run has been recorded yet"]);
    assert!(!dir.path().join("move.state").exists());
    assert_one_line_error(
        &plan(&["check", s(&dir.path().join("missing.toml"))]),
        &["missing.toml", "No such file"],
    );
}

#[test]
fn presync_runs_every_task_and_records_passes_and_logs() {
    let (dir, src, dst, p) = setup();
    write(
        &p,
        format!(
            "parallel = 2\n{}{}{}",
            tree_task(
                "docs",
                "src/docs/",
                &slash(&dst.join("docs")),
                "delete = true\nmax_delete = 5"
            ),
            tree_task(
                "data",
                "src/data/",
                &slash(&dst.join("data")),
                "connections = 2\nwhole_file = true"
            ),
            tree_task(
                "rest",
                "src/",
                &slash(&dst.join("rest")),
                "excludes = [\"/docs/\", \"/data/\"]\ndepends_on = [\"docs\", \"data\"]"
            ),
        ),
    );
    // dry-run first: it changes nothing and keeps no state.
    let out = plan(&["dry-run", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("[docs] would send note00.txt"), "{out}");
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 0);
    assert!(!dir.path().join("move.state").exists());

    let out = plan(&["presync", s(&p)]);
    out.ok();
    assert_same(&src.join("docs"), &dst.join("docs"));
    assert_same(&src.join("data"), &dst.join("data"));
    assert_same_with(
        &src,
        &dst.join("rest"),
        &["--exclude=/docs/", "--exclude=/data/"],
    );
    assert!(out.stdout.contains("predicted final pass"), "{out}");

    let st = status(&p);
    for name in ["docs", "data", "rest"] {
        let t = task(&st, name);
        assert_eq!(t["phase"], "done", "{t}");
        assert!(t["last_success_ms"].as_i64().is_some(), "{t}");
        assert_eq!(t["last_pass"]["outcome"], "ok");
    }
    assert_eq!(task(&st, "docs")["last_pass"]["files_changed"], 12);
    assert_eq!(st["run"]["outcome"], "ok");

    // Logs: one per task, a timestamped summary, a JSON error log naming nothing to re-run.
    let logs = dir.path().join("move.state/logs");
    let docs_log = std::fs::read_to_string(logs.join("docs.log")).unwrap();
    assert!(docs_log.contains("send note03.txt"), "{docs_log}");
    assert!(docs_log.contains("presync pass ok: 12 files"), "{docs_log}");
    let summary: Vec<_> = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("summary-") && n.ends_with("-run1.log"))
        .collect();
    assert_eq!(summary.len(), 1, "{summary:?}");
    let text = std::fs::read_to_string(logs.join(&summary[0])).unwrap();
    assert!(
        text.lines()
            .all(|l| l.starts_with("20") && l.contains("Z ")),
        "{text}"
    );
    let errors = errors_json(dir.path());
    assert_eq!(errors["ok"], true);
    assert_eq!(errors["rerun"], Value::Array(vec![]));

    // The next pass finds nothing changed, then one edit.
    write(&src.join("docs/note05.txt"), "edited\n");
    plan(&["presync", s(&p)]).ok();
    let st = status(&p);
    assert_eq!(task(&st, "docs")["last_pass"]["files_changed"], 1);
    assert_eq!(task(&st, "data")["last_pass"]["files_changed"], 0);
    assert_same(&src.join("docs"), &dst.join("docs"));
}

#[test]
fn independent_tasks_overlap_and_dependents_wait() {
    let dir = tmp();
    let src = example_copy(dir.path());
    let (a, b) = (slow_source(dir.path(), 1), slow_source(dir.path(), 2));
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let tasks = format!(
        "{}{}{}",
        tree_task("a", &slash(&a), &slash(&dst.join("a")), SLOW),
        tree_task("b", &slash(&b), &slash(&dst.join("b")), SLOW),
        tree_task(
            "c",
            "src/docs/",
            &slash(&dst.join("c")),
            "depends_on = [\"a\", \"b\"]"
        ),
    );
    let p = dir.path().join("move.toml");
    write(&p, format!("parallel = 2\n{tasks}"));
    plan(&["presync", s(&p)]).ok();
    assert_same(&a, &dst.join("a"));
    assert_same(&src.join("docs"), &dst.join("c"));
    let st = status(&p);
    let (sa, ea, sb, eb, sc) = {
        let ((sa, ea), (sb, eb), (sc, _)) = (span(&st, "a"), span(&st, "b"), span(&st, "c"));
        (sa, ea, sb, eb, sc)
    };
    assert!(
        sa < eb && sb < ea,
        "a {sa}..{ea} and b {sb}..{eb} must overlap"
    );
    assert!(
        sc >= ea.max(eb),
        "c started at {sc}, before a ({ea}) and b ({eb}) ended"
    );

    // The same plan with parallel = 1: never two at once (so the overlap above is the
    // limit's doing, not chance).
    let p1 = dir.path().join("serial.toml");
    write(&p1, format!("parallel = 1\n{tasks}"));
    std::fs::remove_dir_all(&dst).unwrap();
    std::fs::create_dir(&dst).unwrap();
    plan(&["presync", s(&p1)]).ok();
    let st = status(&p1);
    let ((sa, ea), (sb, eb)) = (span(&st, "a"), span(&st, "b"));
    assert!(
        ea <= sb || eb <= sa,
        "a {sa}..{ea} and b {sb}..{eb} overlap with parallel = 1"
    );
}

#[test]
fn rerun_failed_runs_only_failed_and_blocked_tasks() {
    let (dir, src, dst, p) = setup();
    write(
        &p,
        format!(
            "{}{}{}",
            tree_task("good", "src/docs/", &slash(&dst.join("good")), ""),
            tree_task("bad", "later/", &slash(&dst.join("bad")), ""),
            tree_task(
                "after",
                "src/data/",
                &slash(&dst.join("after")),
                "depends_on = [\"bad\"]"
            ),
        ),
    );
    let out = plan(&["presync", s(&p)]);
    out.expect_code(3);
    assert!(out.stdout.contains("bad: presync pass failed"), "{out}");
    assert!(
        out.stdout.contains("after: blocked: bad did not succeed"),
        "{out}"
    );
    assert!(!dst.join("after").exists());
    let errors = errors_json(dir.path());
    assert_eq!(errors["rerun"], serde_json::json!(["bad", "after"]));
    assert_eq!(errors["failed"][0]["task"], "bad");
    assert!(
        errors["failed"][0]["error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{errors}"
    );
    assert_eq!(errors["blocked"][0]["waiting_for"], "bad");
    let st = status(&p);
    assert_eq!(task(&st, "bad")["phase"], "failed");
    assert_eq!(task(&st, "after")["phase"], "blocked");
    assert!(task(&st, "bad")["last_error"]
        .as_str()
        .unwrap()
        .contains("does not exist"));

    // Fix the cause and re-run: only bad and after run.
    let good_before = task(&st, "good")["last_pass"].clone();
    std::fs::rename(src.join("docs"), dir.path().join("later")).unwrap();
    let out = plan(&["rerun", "--failed", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("re-running bad, after"), "{out}");
    assert!(!out.stdout.contains("good:"), "{out}");
    let st = status(&p);
    assert_eq!(task(&st, "good")["last_pass"], good_before);
    for name in ["bad", "after"] {
        assert_eq!(task(&st, name)["phase"], "done");
        assert_eq!(task(&st, name)["last_pass"]["kind"], "rerun");
    }
    assert_same(&dir.path().join("later"), &dst.join("bad"));
    assert_same(&src.join("data"), &dst.join("after"));

    // Nothing left to re-run.
    let out = plan(&["rerun", "--failed", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("nothing to re-run"), "{out}");

    // An edited plan is not resumed without --force.
    let text = std::fs::read_to_string(&p).unwrap();
    write(&p, format!("parallel = 3\n{text}"));
    let out = plan(&["rerun", "--failed", s(&p)]);
    assert_one_line_error(&out, &["the plan changed since the last run", "--force"]);
    plan(&["rerun", "--failed", "--force", s(&p)]).ok();
}

#[test]
fn status_from_another_process_while_a_run_is_going() {
    let dir = tmp();
    let slow = slow_source(dir.path(), 3);
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let p = dir.path().join("move.toml");
    write(
        &p,
        tree_task("slow", &slash(&slow), &slash(&dst.join("slow")), SLOW),
    );
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    // Running, with progress of the pass under way (3 MiB to send).
    let seen = wait_for_status(&p, &mut run, |st| {
        let t = task(st, "slow");
        t["phase"] == "running" && t["progress"]["bytes_total"] == 3 << 20
    });
    let done = task(&seen, "slow")["progress"]["bytes_done"]
        .as_u64()
        .unwrap();
    assert!(done < 3 << 20, "{seen}");
    assert_eq!(seen["runner_alive"], true, "{seen}");
    assert_eq!(seen["run"]["outcome"], Value::Null);
    assert_eq!(task(&seen, "slow")["last_success_ms"], Value::Null);
    // The human table works during the run too.
    let out = plan(&["status", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("slow  running"), "{out}");
    assert!(out.stdout.contains("running (pid"), "{out}");
    // A second runner on the same plan is refused, and costs the first nothing.
    let second = plan(&["presync", s(&p)]);
    assert_one_line_error(&second, &["another runner", "pid"]);
    run.wait().ok();
    let st = status(&p);
    assert_eq!(task(&st, "slow")["phase"], "done");
    assert_eq!(st["runner_alive"], false);
    assert_same(&slow, &dst.join("slow"));
}

#[test]
fn ctrl_c_interrupts_every_task_and_rerun_resumes() {
    let dir = tmp();
    let (a, b) = (slow_source(dir.path(), 4), slow_source(dir.path(), 5));
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let p = dir.path().join("move.toml");
    write(
        &p,
        format!(
            "parallel = 2\n{}{}{}",
            tree_task(
                "a",
                &slash(&a),
                &slash(&dst.join("a")),
                "bwlimit = \"256K\""
            ),
            tree_task(
                "b",
                &slash(&b),
                &slash(&dst.join("b")),
                "bwlimit = \"256K\""
            ),
            // Waits for a free slot (parallel = 2): it must not start once the run is stopping.
            tree_task("c", &slash(&a), &slash(&dst.join("c")), ""),
        ),
    );
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    wait_for_status(&p, &mut run, |st| {
        task(st, "a")["phase"] == "running" && task(st, "b")["phase"] == "running"
    });
    run.signal(rustix::process::Signal::INT);
    let out = run.wait();
    out.expect_code(130);
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
    let st = status(&p);
    for name in ["a", "b", "c"] {
        assert_eq!(task(&st, name)["phase"], "interrupted", "{st}");
    }
    assert_eq!(task(&st, "c")["last_pass"], Value::Null, "c never started");
    assert!(!dst.join("c").exists());
    assert_eq!(st["run"]["outcome"], "interrupted");
    let errors = errors_json(dir.path());
    assert_eq!(errors["interrupted"], serde_json::json!(["a", "b", "c"]));
    let out = plan(&["rerun", "--failed", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("re-running a, b, c"), "{out}");
    assert_same(&a, &dst.join("a"));
    assert_same(&b, &dst.join("b"));
    assert_same(&a, &dst.join("c"));
}

#[test]
fn presync_until_under_says_ready_for_cutover() {
    let dir = tmp();
    let src = example_copy(dir.path());
    let slow = slow_source(dir.path(), 6);
    let dst = dir.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    let p = dir.path().join("move.toml");
    write(
        &p,
        format!(
            "{}{}",
            tree_task("docs", "src/docs/", &slash(&dst.join("docs")), ""),
            tree_task("slow", &slash(&slow), &slash(&dst.join("slow")), SLOW),
        ),
    );
    // One pass that takes about 2 s predicts a final pass as long: over a 1 s window.
    let out = plan(&["presync", "--until-under", "1s", "--max-passes", "1", s(&p)]);
    out.expect_code(6);
    assert!(out.stdout.contains("not ready after 1 passes"), "{out}");
    // The next pass sends nothing: the model puts the first pass's time on its bytes, and
    // the last pass changed none.
    let out = plan(&["presync", "--until-under", "10m", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("ready for cutover"), "{out}");
    let st = status(&p);
    assert_eq!(st["run"]["outcome"], "ready");
    let predicted = st["predicted_final_s"].as_f64().unwrap();
    assert!(
        predicted < 1.5,
        "predicted {predicted} s for a pass with nothing to send"
    );
    assert_same(&src.join("docs"), &dst.join("docs"));
}

#[test]
fn a_plan_task_reaches_a_daemon() {
    let dir = tmp();
    let src = example_copy(dir.path());
    let root = dir.path().join("module");
    let d = Daemon::start(&dir.path().join("daemon"), &[Module::rw("m", &root)]);
    let p = dir.path().join("move.toml");
    let local = dir.path().join("local");
    std::fs::create_dir(&local).unwrap();
    write(
        &p,
        format!(
            "{}{}",
            tree_task(
                "remote",
                "src/",
                &d.url("m/tree/"),
                "connections = 2\ndelete = true"
            ),
            tree_task("local", "src/docs/", &slash(&local.join("docs")), ""),
        ),
    );
    plan(&["presync", s(&p)]).ok();
    assert_same(&src, &root.join("tree"));
    let st = status(&p);
    assert!(
        task(&st, "remote")["last_pass"]["wire_bytes"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(task(&st, "local")["last_pass"]["wire_bytes"], 0);
}

/// Whether process `pid` (read from `pidfile`) is gone (or a zombie) within 5 s.
pub(crate) fn dies(pidfile: &Path) -> bool {
    let pid =
        std::fs::read_to_string(pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
    let stat = format!("/proc/{}/stat", pid.trim());
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        match std::fs::read_to_string(&stat) {
            Err(_) => return true,
            Ok(s) if s.contains(") Z ") => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

/// Milliseconds since the epoch written by a hook (`date +%s%3N`).
fn ms_in(path: &Path) -> i64 {
    let t = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.trim().parse().unwrap_or_else(|e| panic!("{t:?}: {e}"))
}

pub(crate) fn hook(section: &str, command: &str, extra: &str) -> String {
    format!("[[{section}]]\ncommand = {command:?}\n{extra}\n")
}

#[test]
fn cutover_runs_hooks_around_the_final_pass_and_reports_downtime() {
    let (dir, src, dst, p) = setup();
    write(
        &p,
        format!(
            "{}{}{}{}{}",
            tree_task(
                "docs",
                "src/docs/",
                &slash(&dst.join("docs")),
                "delete = true"
            ),
            tree_task("data", "src/data/", &slash(&dst.join("data")), ""),
            // Hooks run in the plan's directory.
            hook("pre_final", "date +%s%3N > frozen", "timeout = \"10s\""),
            hook(
                "pre_final",
                "exit 7",
                "name = \"optional\"\nerr_is_fatal = false"
            ),
            hook("post_final", "date +%s%3N > thawed", ""),
        ),
    );
    plan(&["presync", s(&p)]).ok();
    // The service writes between presync and cutover; the final pass must carry it.
    write(&src.join("docs/new.txt"), "written after presync\n");
    std::fs::remove_file(src.join("docs/note01.txt")).unwrap();
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert_same(&src.join("docs"), &dst.join("docs"));
    assert_same(&src.join("data"), &dst.join("data"));
    assert!(
        out.stdout
            .contains("pre_final hook \"optional\" failed: exited with status 7"),
        "{out}"
    );
    assert!(out.stdout.contains("downtime "), "{out}");
    assert!(out.stdout.contains("predicted "), "{out}");
    let st = status(&p);
    assert_eq!(st["run"]["mode"], "cutover");
    assert_eq!(st["run"]["outcome"], "ok");
    let docs = task(&st, "docs");
    assert_eq!(docs["last_pass"]["kind"], "final");
    assert_eq!(docs["last_pass"]["files_changed"], 1);
    assert_eq!(docs["last_pass"]["deleted"], 1);
    // Order: freeze, then every final pass, then thaw.
    let (frozen, thawed) = (
        ms_in(&dir.path().join("frozen")),
        ms_in(&dir.path().join("thawed")),
    );
    for name in ["docs", "data"] {
        let (start, end) = span(&st, name);
        assert!(
            frozen <= start && end <= thawed,
            "{name}: {start}..{end} not within {frozen}..{thawed}"
        );
    }
    // The report, as JSON and Markdown.
    let logs = dir.path().join("move.state/logs");
    let report: Vec<PathBuf> = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().contains("-run2."))
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("report-")
        })
        .collect();
    assert_eq!(report.len(), 2, "{report:?}");
    let json_path = report
        .iter()
        .find(|p| p.extension().unwrap() == "json")
        .unwrap();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(json_path).unwrap()).unwrap();
    assert_eq!(r["mode"], "cutover");
    assert_eq!(r["tasks"][0]["task"], "docs");
    assert_eq!(r["tasks"][0]["files_changed"], 1);
    assert!(
        r["notes"][0].as_str().unwrap().starts_with("downtime"),
        "{r}"
    );
    let md = std::fs::read_to_string(json_path.with_extension("md")).unwrap();
    assert!(md.contains("| docs | ok | 1 |"), "{md}");
}

#[test]
fn a_failing_fatal_pre_final_hook_stops_before_any_final_pass() {
    let (dir, src, dst, p) = setup();
    write(
        &p,
        format!(
            "{}{}{}{}{}",
            tree_task("docs", "src/docs/", &slash(&dst.join("docs")), ""),
            hook(
                "pre_final",
                "echo cannot stop the app >&2; exit 1",
                "name = \"stop app\""
            ),
            hook("post_final", "touch thawed", ""),
            hook("on_failure", "cat > alert.json", "timeout = \"10s\""),
            hook("on_success", "touch success", ""),
        ),
    );
    plan(&["presync", s(&p)]).ok();
    write(&src.join("docs/new.txt"), "late\n");
    let before = snapshot(&dst);
    let out = plan(&["cutover", s(&p)]);
    out.expect_code(3);
    assert!(
        out.stdout
            .contains("pre_final hook \"stop app\" failed: exited with status 1"),
        "{out}"
    );
    assert!(out.stdout.contains("no final pass was started"), "{out}");
    assert_eq!(snapshot(&dst), before);
    assert!(!dir.path().join("thawed").exists());
    let st = status(&p);
    assert_eq!(task(&st, "docs")["last_pass"]["kind"], "presync");
    assert_eq!(st["run"]["outcome"], "failed");
    // The alert got the report on stdin; the presync before it succeeded and said so.
    let alert: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("alert.json")).unwrap())
            .unwrap();
    assert_eq!(
        (alert["mode"].as_str(), alert["outcome"].as_str()),
        (Some("cutover"), Some("failed"))
    );
    assert!(
        alert["notes"][0].as_str().unwrap().contains("stop app"),
        "{alert}"
    );
    assert!(dir.path().join("success").exists());
    let hooks_log = std::fs::read_to_string(dir.path().join("move.state/logs/hooks.log")).unwrap();
    assert!(hooks_log.contains("cannot stop the app"), "{hooks_log}");
}

#[test]
fn a_hung_hook_is_killed_with_its_children_on_timeout_and_on_ctrl_c() {
    let dir = tmp();
    let src = example_copy(dir.path());
    let p = dir.path().join("move.toml");
    let tasks = tree_task("docs", "src/docs/", &slash(&dir.path().join("dst")), "");
    // The sleep is a grandchild of the runner: only killing the process group reaches it.
    let hung = "sleep 60 & echo $! > hook.pid; wait";
    write(
        &p,
        format!("{tasks}{}", hook("pre_final", hung, "timeout = \"1s\"")),
    );
    plan(&["presync", s(&p)]).ok();
    let out = plan(&["cutover", s(&p)]);
    out.expect_code(3);
    assert!(out.elapsed < Duration::from_secs(15), "{out}");
    assert!(out.stdout.contains("timed out after 1s"), "{out}");
    assert!(
        dies(&dir.path().join("hook.pid")),
        "the hook's child survived its timeout"
    );

    // Ctrl-C while a hook runs: same cleanup, exit 130.
    std::fs::remove_file(dir.path().join("hook.pid")).unwrap();
    write(
        &p,
        format!("{tasks}{}", hook("pre_final", hung, "timeout = \"5m\"")),
    );
    let run = Running::start(plan_cmd(&["cutover", "--force", s(&p)]));
    let t = Instant::now();
    while !dir.path().join("hook.pid").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the hook never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    run.signal(rustix::process::Signal::INT);
    let out = run.wait();
    out.expect_code(130);
    assert!(
        dies(&dir.path().join("hook.pid")),
        "the hook's child survived Ctrl-C"
    );
    assert_eq!(status(&p)["run"]["outcome"], "interrupted");
    assert!(src.exists());
}

#[test]
fn cutover_refuses_a_plan_edited_after_presync() {
    let dir = tmp();
    example_copy(dir.path());
    let dst = dir.path().join("dst");
    let p = dir.path().join("move.toml");
    let t = tree_task("docs", "src/docs/", &slash(&dst), "");
    write(&p, &t);
    plan(&["presync", s(&p)]).ok();
    write(&p, t.replace("src/docs/", "src/data/"));
    let out = plan(&["cutover", s(&p)]);
    assert_one_line_error(
        &out,
        &[
            "move.toml",
            "the plan changed since the last run",
            "--force",
        ],
    );
    // Nothing was recorded for the refused run.
    assert_eq!(status(&p)["run"]["mode"], "presync");
}

#[test]
fn prediction_of_the_final_pass_on_a_synthetic_workload() {
    // Eight 1 MiB files behind a 4 MiB/s limit (so transfer, not the machine's speed,
    // dominates): a first pass sends all of them, then every pass finds four rewritten, as
    // a service with a steady write rate would leave them. The prediction after two
    // presync passes is compared with the final pass that cutover then measures.
    let dir = tmp();
    let src = dir.path().join("src");
    let dst = dir.path().join("dst");
    let rewrite = |first: u64, seed: u64| {
        for i in first..first + 4 {
            write(
                &src.join(format!("f{i}")),
                random_bytes(seed * 100 + i, 1 << 20),
            );
        }
    };
    rewrite(0, 1);
    rewrite(4, 1);
    let p = dir.path().join("move.toml");
    write(
        &p,
        tree_task("data", &slash(&src), &slash(&dst), "bwlimit = \"4M\""),
    );
    plan(&["presync", s(&p)]).ok();
    rewrite(0, 2);
    plan(&["presync", s(&p)]).ok();
    let predicted = status(&p)["predicted_final_s"].as_f64().unwrap();
    rewrite(4, 3);
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert_same(&src, &dst);
    let st = status(&p);
    let last = &task(&st, "data")["last_pass"];
    assert_eq!(last["kind"], "final");
    assert_eq!(last["bytes_changed"], 4 << 20);
    let actual = last["duration_s"].as_f64().unwrap();
    let error = (predicted - actual) / actual;
    eprintln!(
        "prediction: {predicted:.3} s, final pass: {actual:.3} s, error {:+.1}%",
        error * 100.0
    );
    assert!(
        error.abs() < 0.5,
        "predicted {predicted:.3} s, took {actual:.3} s\n{out}"
    );
}

/// A private PostgreSQL server on a loopback port, run as the `postgres` user (it refuses
/// root), stopped on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Postgres {
    /// The newest installed server's binaries (Debian: /usr/lib/postgresql/VERSION/bin).
    fn bin() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .collect();
        found.sort_by_key(|b| {
            b.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
        found
            .pop()
            .expect("no initdb under /usr/lib/postgresql/*/bin")
    }

    fn as_postgres(args: &[&str]) {
        let out = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .output()
            .expect("runuser");
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(dir: &Path) -> Postgres {
        let bin = Postgres::bin();
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data).unwrap();
        let st = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success());
        Postgres::as_postgres(&[
            s(&bin.join("initdb")),
            "-D",
            s(&data),
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            s(dir)
        );
        Postgres::as_postgres(&[
            s(&bin.join("pg_ctl")),
            "-D",
            s(&data),
            "-l",
            s(&dir.join("server.log")),
            "-w",
            "-o",
            &opts,
            "start",
        ]);
        Postgres { bin, data, port }
    }

    /// The connection options every client here uses.
    fn conn(&self) -> String {
        format!("-h 127.0.0.1 -p {} -U postgres", self.port)
    }

    fn tool(&self, name: &str) -> String {
        s(&self.bin.join(name)).to_string()
    }

    fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                db,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A plain-text dump of `db` (schema and data), without the lines that differ between
    /// any two dumps of the same content (the random `\restrict` key).
    fn dump(&self, db: &str) -> String {
        let out = Command::new(self.bin.join("pg_dump"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["--no-owner", db])
            .output()
            .expect("pg_dump");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", s(&self.data), "-m", "immediate", "stop"])
            .output();
    }
}

#[test]
fn a_command_task_moves_a_live_postgres_database() {
    let (dir, src, dst, p) = setup();
    let pg_dir = dir.path().join("pg");
    chmod(dir.path(), 0o755);
    let pg = Postgres::start(&pg_dir);
    pg.psql("postgres", "CREATE DATABASE app");
    pg.psql("postgres", "CREATE DATABASE app2");
    pg.psql(
        "app",
        "CREATE TABLE items (id serial PRIMARY KEY, body text NOT NULL, n int NOT NULL);
         CREATE INDEX items_n ON items (n);
         INSERT INTO items (body, n)
           SELECT repeat(md5(i::text), 8), i % 97 FROM generate_series(1, 20000) i;",
    );
    // Uncompressed custom format (-Z0): consecutive dumps share most bytes, so delta sends
    // little; the engine compresses on the wire where that pays.
    let dump = format!("{} {}", pg.tool("pg_dump"), pg.conn());
    // The schema check: both sides' schemas, without pg_dump's random \restrict key.
    let schema =
        |db: &str| format!("{dump} -s {db} | grep -v '^.restrict' | grep -v '^.unrestrict'");
    let db_task = format!(
        "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = \"{dump} -Fc -Z0 app\"\ndestination = \"{}\"\ndestination_command = \"{} {} -d app2 --clean --if-exists --no-owner --exit-on-error\"\nverify = {{ source = \"{}\", destination = \"{}\" }}\n",
        s(&dst.join("app.dump")),
        pg.tool("pg_restore"),
        pg.conn(),
        schema("app"),
        schema("app2"),
    );
    write(
        &p,
        format!(
            "{}{db_task}",
            tree_task("files", "src/docs/", &slash(&dst.join("docs")), "")
        ),
    );
    plan(&["check", s(&p)]).ok();

    // The service writes while presync runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let (bin, port) = (pg.bin.clone(), pg.port);
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let sql = format!(
                    "INSERT INTO items (body, n) VALUES ('live {n}', {n}); UPDATE items SET n = n + 1 WHERE id = {n};"
                );
                let st = Command::new(bin.join("psql"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
                    .args(["-d", "app", "-X", "-q", "-c", &sql])
                    .status()
                    .expect("psql");
                assert!(st.success());
                std::thread::sleep(Duration::from_millis(20));
            }
            n
        })
    };
    plan(&["presync", "--max-passes", "2", s(&p)]).ok();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    // The app is stopped (writes ended); one more change lands before the final pass.
    pg.psql("app", "UPDATE items SET body = 'last word' WHERE id = 7");
    let out = plan(&["cutover", s(&p)]);
    out.ok();

    let (a, b) = (pg.dump("app"), pg.dump("app2"));
    assert!(a.contains("CREATE INDEX items_n"), "{a:.2000}");
    assert!(a == b, "the restored database differs from the source");
    assert_eq!(
        pg.psql("app2", "SELECT body FROM items WHERE id = 7"),
        "last word"
    );
    assert_same(&src.join("docs"), &dst.join("docs"));
    // Delta: the final pass sent a fraction of the dump.
    let st = status(&p);
    let last = &task(&st, "db")["last_pass"];
    assert_eq!(last["kind"], "final");
    let (changed, literal) = (
        last["bytes_changed"].as_u64().unwrap(),
        last["bytes_literal"].as_u64().unwrap(),
    );
    assert!(changed > 1 << 20, "{last}");
    eprintln!("final pass of the dump: {literal} literal bytes of {changed}");
    assert!(
        literal < changed / 2,
        "delta sent {literal} of {changed} bytes"
    );
    let log = std::fs::read_to_string(dir.path().join("move.state/logs/db.log")).unwrap();
    assert!(log.contains("destination_command done"), "{log}");
    assert!(
        log.contains("verify ok: both outputs are the same"),
        "{log}"
    );
    assert!(out.stdout.contains("db: verify ok"), "{out}");
}

#[test]
fn ctrl_c_kills_a_command_tasks_processes_and_keeps_the_last_spool() {
    let (dir, _src, dst, p) = setup();
    let flag = dir.path().join("second");
    // First run: a quick dump. Second run: a dump that hangs in a grandchild, until Ctrl-C.
    let command = format!(
        "if [ -e {f} ]; then sleep 60 & echo $! > dump.pid; wait; else echo version 1; fi",
        f = s(&flag)
    );
    write(
        &p,
        format!(
            "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = {command:?}\ndestination = \"{}\"\n",
            s(&dst.join("db.out"))
        ),
    );
    plan(&["presync", s(&p)]).ok();
    assert_eq!(
        std::fs::read_to_string(dst.join("db.out")).unwrap(),
        "version 1\n"
    );
    write(&flag, "");
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    let t = Instant::now();
    while !dir.path().join("dump.pid").exists() {
        assert!(
            run.running() && t.elapsed() < Duration::from_secs(20),
            "the dump never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    run.signal(rustix::process::Signal::INT);
    let out = run.wait();
    out.expect_code(130);
    assert!(
        dies(&dir.path().join("dump.pid")),
        "the dump's child survived Ctrl-C"
    );
    assert_eq!(task(&status(&p), "db")["phase"], "interrupted");
    // The interrupted dump replaced nothing.
    let spool = dir.path().join("move.state/spool/db");
    assert_eq!(std::fs::read_to_string(&spool).unwrap(), "version 1\n");
    assert_eq!(
        std::fs::read_to_string(dst.join("db.out")).unwrap(),
        "version 1\n"
    );
}

#[test]
fn an_unreachable_destination_fails_its_task_only() {
    let (_dir, src, dst, p) = setup();
    let port = free_port();
    write(
        &p,
        format!(
            "{}{}",
            tree_task(
                "away",
                "src/docs/",
                &format!("cutover://127.0.0.1:{port}/m/docs/"),
                ""
            ),
            tree_task("here", "src/data/", &slash(&dst.join("data")), ""),
        ),
    );
    let out = plan(&["presync", s(&p)]);
    out.expect_code(3);
    assert_same(&src.join("data"), &dst.join("data"));
    let st = status(&p);
    let err = task(&st, "away")["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert_eq!(task(&st, "here")["phase"], "done");
}

#[test]
fn a_volume_task_updates_an_image_in_place_by_delta() {
    let (dir, _src, dst, p) = setup();
    let image = dir.path().join("disk.img");
    let mut data = random_bytes(7, 4 << 20);
    write(&image, &data);
    let target = dst.join("disk.img");
    write(
        &p,
        format!(
            "[[task]]\nname = \"disk\"\nkind = \"volume\"\nsource = \"disk.img\"\ndestination = \"{}\"\n",
            s(&target)
        ),
    );
    plan(&["presync", s(&p)]).ok();
    assert_eq!(hash_file(&image), hash_file(&target));
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&target).unwrap());
    // Two 4 KiB blocks change, as a running VM or database would change them.
    data[4096..8192].fill(1);
    data[3 << 20..(3 << 20) + 4096].fill(2);
    write(&image, &data);
    plan(&["presync", s(&p)]).ok();
    assert_eq!(hash_file(&image), hash_file(&target));
    // In place (same inode: never a new file renamed over it), and only the blocks.
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&target).unwrap()),
        inode
    );
    let last = task(&status(&p), "disk")["last_pass"].clone();
    assert!(
        last["bytes_literal"].as_u64().unwrap() <= 64 << 10,
        "{last}"
    );
}

#[test]
fn the_example_plan_runs_presync_and_cutover() {
    // The shipped example, as a new user would run it, with its copies kept in this test's
    // directory instead of /tmp.
    let dir = tmp();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let st = Command::new("cp")
        .arg("-a")
        .arg(examples.join("tree"))
        .arg(dir.path().join("tree"))
        .status()
        .unwrap();
    assert!(st.success());
    let out_prefix = format!("{}/out-", s(dir.path()));
    let text = std::fs::read_to_string(examples.join("plan.toml"))
        .unwrap()
        .replace("/tmp/cutover-plan-example-", &out_prefix);
    let p = dir.path().join("plan.toml");
    write(&p, text);
    let out = plan(&["presync", "--until-under", "1m", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("ready for cutover"), "{out}");
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("downtime"), "{out}");
    // Its verify_mode: docs compares every file, the others what the final pass sent.
    assert!(out.stdout.contains("docs: verify ok"), "{out}");
    let tree = dir.path().join("tree");
    assert_same(&tree.join("docs"), &dir.path().join("out-docs"));
    assert_same(&tree.join("data"), &dir.path().join("out-data"));
    assert_same_with(
        &tree,
        &dir.path().join("out-top"),
        &["--exclude=/docs/", "--exclude=/data/"],
    );
    assert!(dir.path().join("plan.state/state.db").exists());
}

#[test]
fn verify_pairs_must_match_and_a_mismatch_stops_post_final() {
    let (dir, src, dst, p) = setup();
    let same = "verify = { source = \"cat src/docs/note00.txt\", destination = \"cat dst/docs/note00.txt\" }";
    let differ = "verify = { source = \"echo one\", destination = \"echo two\" }";
    write(
        &p,
        format!(
            "{}{}{}",
            tree_task("docs", "src/docs/", &slash(&dst.join("docs")), same),
            tree_task("data", "src/data/", &slash(&dst.join("data")), differ),
            hook("post_final", "touch thawed", ""),
        ),
    );
    plan(&["presync", s(&p)]).ok();
    let out = plan(&["cutover", s(&p)]);
    out.expect_code(3);
    assert!(out.stdout.contains("docs: verify ok"), "{out}");
    assert!(
        out.stdout
            .contains("data: verify: the outputs differ (source 4 bytes, destination 4 bytes)"),
        "{out}"
    );
    assert!(
        !dir.path().join("thawed").exists(),
        "post_final ran after a mismatch"
    );
    // The data itself arrived; it is the check that failed.
    assert_same(&src.join("data"), &dst.join("data"));
    let st = status(&p);
    assert_eq!(task(&st, "docs")["phase"], "done");
    assert_eq!(task(&st, "data")["phase"], "failed");
    assert!(task(&st, "data")["last_error"]
        .as_str()
        .unwrap()
        .contains("outputs differ"));
    let errors = errors_json(dir.path());
    assert_eq!(errors["rerun"], serde_json::json!(["data"]));
    let logs = dir.path().join("move.state/logs");
    assert_eq!(
        std::fs::read_to_string(logs.join("verify-data.source.out")).unwrap(),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(logs.join("verify-data.destination.out")).unwrap(),
        "two\n"
    );
    // The report lists the mismatch.
    let md_path = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("report-") && n.ends_with("-run2.md")
        })
        .expect("cutover report");
    let md = std::fs::read_to_string(md_path).unwrap();
    assert!(
        md.contains("| data | ok |") && md.contains("| mismatch |"),
        "{md}"
    );
    assert!(
        md.contains("- **data**: verify: the outputs differ"),
        "{md}"
    );
}

/// Run `cmd` as `cmd | head -1` would: its stdout is read up to the first line, then closed.
/// Returns the exit status, that line and everything on stderr.
pub(crate) fn stdout_closed_after_first_line(
    mut cmd: Command,
) -> (std::process::ExitStatus, String, String) {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut stderr = child.stderr.take().expect("stderr");
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut first = String::new();
    {
        let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        out.read_line(&mut first).expect("first line");
        // Dropped here: the pipe's read end is closed, every later write gets EPIPE.
    }
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("{what} did not finish within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status, first, err.join().unwrap_or_default())
}

#[test]
fn a_closed_stdout_stops_printing_not_the_run() {
    let (dir, _src, dst, p) = setup();
    // The command task prints nothing for a second, so its pass ends (and is printed) after
    // the reader is gone; it fails until `ok` exists, so that rerun has something to do.
    write(
        &p,
        format!(
            "{}[[task]]\nname = \"db\"\nkind = \"command\"\n\
             command = \"sleep 1; test -e ok && cat src/docs/note0*.txt\"\ndestination = \"{}\"\n",
            tree_task("docs", "src/docs/", &slash(&dst.join("docs")), ""),
            s(&dst.join("db.dump"))
        ),
    );
    let no_task_running = |st: &Value| {
        for t in st["tasks"].as_array().expect("tasks") {
            assert!(
                t["phase"] != "running" && t["phase"] != "verifying",
                "a task is left {}: {st}",
                t["phase"]
            );
        }
    };
    let (code, first, stderr) = stdout_closed_after_first_line(plan_cmd(&["presync", s(&p)]));
    assert!(first.starts_with("presync of plan"), "{first}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code.code(), Some(3), "{stderr}");
    let st = status(&p);
    no_task_running(&st);
    assert_eq!(st["run"]["outcome"], "failed", "{st}");
    assert_eq!(task(&st, "db")["phase"], "failed", "{st}");
    assert_eq!(st["runner_alive"], false);

    // The issue's `cutover plan rerun --failed x.toml | head -3`, with a pass to finish.
    write(&dir.path().join("ok"), "");
    let (code, first, stderr) =
        stdout_closed_after_first_line(plan_cmd(&["rerun", "--failed", s(&p)]));
    assert!(
        first.contains("rerunning the failed tasks of run 1"),
        "{first}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(code.code(), Some(0), "{stderr}");
    let st = status(&p);
    no_task_running(&st);
    assert_eq!(st["run"]["mode"], "rerun", "{st}");
    assert_eq!(st["run"]["outcome"], "ok", "{st}");
    assert_eq!(task(&st, "db")["phase"], "done", "{st}");
    assert!(dst.join("db.dump").exists());

    // Commands that print and end: status (a table), check, and a sync that itemises.
    for args in [
        vec!["plan", "status", s(&p)],
        vec!["plan", "check", s(&p)],
        vec!["sync", "-v", "--delete"],
    ] {
        let mut cmd = cutover_cmd();
        cmd.args(&args);
        if args[0] == "sync" {
            cmd.arg(slash(&dir.path().join("src")))
                .arg(s(&dir.path().join("copy")));
        }
        let (code, _, stderr) = stdout_closed_after_first_line(cmd);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code.code(), Some(0), "{args:?}: {stderr}");
    }
}

#[test]
fn rerun_repeats_the_mode_of_the_run_it_resumes() {
    let (dir, _src, dst, p) = setup();
    // `gate` takes long only while the file `slow` exists; `db` waits for it, so a presync
    // interrupted during `gate` leaves `db` interrupted without a pass of its own: its last
    // pass is still the cutover's final one.
    write(
        &p,
        format!(
            "[[task]]\nname = \"gate\"\nkind = \"command\"\n\
             command = \"if [ -e slow ]; then sleep 30; fi; echo gate\"\ndestination = \"{}\"\n\
             [[task]]\nname = \"db\"\nkind = \"command\"\ncommand = \"if [ -e fail ]; then exit 1; fi; cat src/docs/note0*.txt\"\n\
             destination = \"{}\"\ndestination_command = \"cat > restored; echo restore >> restores\"\n\
             depends_on = [\"gate\"]\n",
            s(&dst.join("gate.out")),
            s(&dst.join("db.dump")),
        ),
    );
    let restores = || {
        std::fs::read_to_string(dir.path().join("restores"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    plan(&["presync", s(&p)]).ok(); // run 1
    assert_eq!(restores(), 0);
    plan(&["cutover", s(&p)]).ok(); // run 2
    assert_eq!(restores(), 1);
    let st = status(&p);
    assert_eq!(task(&st, "db")["last_pass"]["kind"], "final");

    // Run 3: a presync, interrupted while `gate` runs.
    write(&dir.path().join("slow"), "");
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    wait_for_status(&p, &mut run, |st| task(st, "gate")["phase"] == "running");
    run.signal(rustix::process::Signal::INT);
    run.wait().expect_code(130);
    let st = status(&p);
    assert_eq!(task(&st, "db")["phase"], "interrupted", "{st}");
    assert_eq!(task(&st, "db")["last_pass"]["kind"], "final", "{st}");
    std::fs::remove_file(dir.path().join("slow")).unwrap();

    // The rerun finishes that presync: no final pass, no restore.
    let out = plan(&["rerun", "--failed", s(&p)]);
    out.ok();
    let first = out.stdout.lines().next().unwrap_or_default();
    assert_eq!(
        first, "cutover: rerunning the failed tasks of run 3 (presync)",
        "{out}"
    );
    assert!(!out.stdout.contains("final pass"), "{out}");
    assert_eq!(restores(), 1, "the destination_command ran again\n{out}");
    let st = status(&p);
    for name in ["gate", "db"] {
        assert_eq!(task(&st, name)["phase"], "done", "{st}");
        assert_eq!(task(&st, name)["last_pass"]["kind"], "rerun", "{st}");
    }
    assert_eq!(st["run"]["repeats"], "presync", "{st}");

    // A cutover whose final pass failed is finished by a final pass (with the restore), and
    // a rerun of that rerun is still one.
    write(&dir.path().join("fail"), "");
    plan(&["cutover", s(&p)]).expect_code(3); // run 5
    let out = plan(&["rerun", "--failed", s(&p)]); // run 6, fails again
    out.expect_code(3);
    assert!(
        out.stdout
            .starts_with("cutover: rerunning the failed tasks of run 5 (cutover)\n"),
        "{out}"
    );
    assert_eq!(restores(), 1);
    std::fs::remove_file(dir.path().join("fail")).unwrap();
    let out = plan(&["rerun", "--failed", s(&p)]); // run 7
    out.ok();
    assert!(
        out.stdout
            .starts_with("cutover: rerunning the failed tasks of run 6 (cutover)\n"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("re-running db (as the final pass of the cutover)"),
        "{out}"
    );
    assert_eq!(restores(), 2);
    let st = status(&p);
    assert_eq!(task(&st, "db")["last_pass"]["kind"], "final", "{st}");
    assert_eq!(st["run"]["repeats"], "cutover", "{st}");
}

#[test]
fn check_looks_at_local_paths_and_suggests_the_nearest_key() {
    let dir = tmp();
    let d = dir.path();
    let p = d.join("move.toml");
    std::fs::create_dir(d.join("src")).unwrap();
    let check = || plan(&["check", s(&p)]);

    // A local source that is not there: the task, the key, and where the plan's directory
    // put the relative path.
    write(&p, tree_task("db", "pg/", "dst/", ""));
    assert_one_line_error(
        &check(),
        &[
            "move.toml:4: task \"db\": source:",
            &format!("{} does not exist", slash(&d.join("pg"))),
        ],
    );
    // A local destination whose parent is missing (cutover sync would refuse it).
    write(&p, tree_task("db", "src/", "new/db/", ""));
    assert_one_line_error(
        &check(),
        &[
            "move.toml:5: task \"db\": destination:",
            &format!("its parent directory {} does not exist", s(&d.join("new"))),
        ],
    );
    // Every such problem, one line each; and the check created nothing.
    write(
        &p,
        format!(
            "{}{}",
            tree_task("a", "pg/", "dst/", ""),
            tree_task("b", "src/", "new/b/", "")
        ),
    );
    let out = check();
    out.expect_code(1);
    assert_eq!(out.err_lines().len(), 2, "{out}");
    assert!(out.stderr.contains("task \"a\": source:"), "{out}");
    assert!(out.stderr.contains("task \"b\": destination:"), "{out}");
    assert!(!d.join("new").exists() && !d.join("dst").exists());
    assert!(!d.join("move.state").exists());

    // What a task it depends on makes is not looked for; remote paths are not looked at.
    let b = |deps: &str| tree_task("b", "stage/sub/", "stage/out/b/", deps);
    let a = tree_task("a", "src/", "stage/", "");
    write(&p, format!("{a}{}", b("depends_on = [\"a\"]")));
    check().ok();
    write(&p, format!("{a}{}", b("")));
    let out = check();
    assert_eq!(out.err_lines().len(), 2, "{out}");
    write(&p, tree_task("db", "src/", "host:/nowhere/db/", ""));
    check().ok();

    // A misspelt key: the nearest known one, not the list of all.
    write(&p, tree_task("db", "src/", "dst/", "destinaton = \"x\""));
    let out = check();
    assert_one_line_error(
        &out,
        &["move.toml:6: unknown key \"destinaton\" in task \"db\"; did you mean \"destination\"?"],
    );
    assert!(!out.stderr.contains("bwlimit"), "{out}");
}
