//! Plans that know what changed: `paths_from` (a real shell script lists the directories
//! changed since the task's stamp, as GitHub did for its repositories), the stamp itself
//! (the start of the last successful pass, kept by Ctrl-C and kill -9), `pre_pass` and
//! `post_pass` hooks around every pass (order, failure, `CUTOVER_PASS_RESULT`), a command
//! task's variables, `paths_from` on an ssh source's host, and `plan check` on the keys.
//! All of it through the real binary, real `sh` scripts and the real state store.

use crate::plan::{dies, errors_json, hook, plan, plan_cmd, status, task, tree_task};
use crate::util::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The script GitHub's pattern comes down to: the top-level directories (repositories)
/// changed since the last successful pass, all of them when there was none. It also
/// records what it was given, one line a run, in `seen.log` beside the plan.
const LIST_CHANGED: &str = r#"#!/bin/sh
echo "task=$CUTOVER_TASK pass=$CUTOVER_PASS last=$CUTOVER_LAST_SUCCESS epoch=$CUTOVER_LAST_SUCCESS_EPOCH ran=$(date +%s%3N)" >> seen.log
if [ -e slow-list ]; then sleep 30 & echo $! > list.pid; wait; fi
cd "$CUTOVER_SOURCE" || exit 1
if [ -z "$CUTOVER_LAST_SUCCESS_EPOCH" ]; then
    find . -mindepth 1 -maxdepth 1 -type d
else
    find . -mindepth 1 -maxdepth 1 -type d -newermt "@$CUTOVER_LAST_SUCCESS_EPOCH"
fi
"#;

/// `n` top-level directories with a file each, dated an hour back (so that only what the
/// test changes later is newer than any stamp).
fn repositories(src: &Path, n: usize) {
    for i in 0..n {
        write(&src.join(format!("r{i:03}/HEAD")), format!("ref {i}\n"));
    }
    sh(&format!(
        "find {} -exec touch -h -d '1 hour ago' {{}} +",
        s(src)
    ));
}

/// The "service": pushes to a few repositories (a new object in each changes the
/// directory's mtime).
fn push_to(src: &Path, repos: &[usize], round: u32) {
    for &i in repos {
        write(
            &src.join(format!("r{i:03}/obj-{round}")),
            format!("push {round}\n"),
        );
    }
}

/// The oracle on everything below the root: a listed pass keeps the destination root's own
/// metadata unless the list names `.` (rsync's rule), so its time is copied first.
fn assert_same_below_root(src: &Path, dst: &Path) {
    sh(&format!("touch -r {} {}", s(src), s(dst)));
    assert_same(src, dst);
}

fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The stamp as the commands get it, computed by `date` (not by cutover).
fn rfc3339(ms: i64) -> String {
    sh(&format!(
        "date -u -d @{} +%Y-%m-%dT%H:%M:%SZ",
        ms.div_euclid(1000)
    ))
    .trim()
    .to_string()
}

/// The list file of a task's newest pass, sorted.
fn listed(dir: &Path, task: &str) -> Vec<String> {
    let path = dir.join("move.state/paths").join(task);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut v: Vec<String> = text.lines().map(String::from).collect();
    v.sort();
    v
}

/// The lines of a file the hooks or scripts append to.
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(String::from)
        .collect()
}

/// `key=value` out of a `seen.log` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn stamp_ms(st: &Value, name: &str) -> Option<i64> {
    task(st, name)["last_success_ms"].as_i64()
}

/// Sleep into the next second of the wall clock.
fn next_second() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(Duration::from_millis(
        1_010 - u64::from(now.subsec_millis()),
    ));
}

/// Wait (at most 20 s) for a file a script writes when it reaches its slow part.
fn wait_for_file(path: &Path, run: &mut Running) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            run.running() && t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Past the write of the pid: the script is now in its sleep.
    std::thread::sleep(Duration::from_millis(100));
}

fn repos_plan(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("move.toml");
    write(&dir.join("list.sh"), LIST_CHANGED);
    write(
        &p,
        tree_task(
            "repos",
            "src/",
            &slash(&dir.join("dst")),
            &format!("paths_from = \"sh list.sh\"\n{extra}"),
        ),
    );
    p
}

#[test]
fn paths_from_lists_the_repositories_changed_since_the_last_successful_pass() {
    let dir = tmp();
    let src = dir.path().join("src");
    // GitHub's shape: many repositories, a few of them pushed to between passes.
    const REPOS: usize = 10_000;
    repositories(&src, REPOS);
    let p = repos_plan(dir.path(), "");
    plan(&["check", s(&p)]).ok();

    // No stamp yet: the script lists every repository, and was told there is none.
    plan(&["presync", s(&p)]).ok();
    assert_eq!(listed(dir.path(), "repos").len(), REPOS);
    assert_same_below_root(&src, &dir.path().join("dst"));
    let seen = lines(&dir.path().join("seen.log"));
    assert_eq!(
        (
            field(&seen[0], "task"),
            field(&seen[0], "pass"),
            field(&seen[0], "last"),
            field(&seen[0], "epoch")
        ),
        ("repos", "presync", "", "")
    );
    let st = status(&p);
    let t = task(&st, "repos");
    let first_scan = t["last_pass"]["entries_scanned"].as_u64().unwrap();
    assert!(first_scan >= 2 * REPOS as u64, "{t}");
    // The stamp is the pass's start: before the list was made, not when the pass ended.
    let stamp = stamp_ms(&st, "repos").unwrap();
    assert_eq!(stamp, t["last_pass"]["started_ms"].as_i64().unwrap(), "{t}");
    let ran: i64 = field(&seen[0], "ran").parse().unwrap();
    assert!(stamp <= ran, "stamp {stamp} after paths_from ran at {ran}");
    assert_eq!(t["stamp"], rfc3339(stamp));
    assert_eq!(t["stamp_epoch"], stamp.div_euclid(1000));

    // The service pushes to three repositories; the next pass lists exactly those.
    push_to(&src, &[17, 150, 299], 1);
    // Stamps are rounded down to the second, so a push in the second a pass starts is
    // listed again by the pass after it (safe, but not what the third pass checks).
    next_second();
    plan(&["presync", s(&p)]).ok();
    assert_eq!(listed(dir.path(), "repos"), ["r017", "r150", "r299"]);
    let seen = lines(&dir.path().join("seen.log"));
    assert_eq!(field(&seen[1], "last"), rfc3339(stamp));
    assert_eq!(field(&seen[1], "epoch"), stamp.div_euclid(1000).to_string());
    assert_same_below_root(&src, &dir.path().join("dst"));
    let st = status(&p);
    let t = task(&st, "repos");
    assert_eq!(t["last_pass"]["files_changed"], 3, "{t}");
    let scanned = t["last_pass"]["entries_scanned"].as_u64().unwrap();
    // Three directories with two entries each, not the whole tree.
    assert!(
        scanned <= 10 && scanned < first_scan,
        "scanned {scanned} entries for 3 listed dirs (the tree has {first_scan}): {t}"
    );

    // Nothing pushed: an empty list, a pass that syncs nothing and still succeeds (the
    // stamp moves on).
    let before = stamp_ms(&st, "repos").unwrap();
    let out = plan(&["presync", s(&p)]);
    out.ok();
    assert_eq!(listed(dir.path(), "repos"), Vec::<String>::new());
    let st = status(&p);
    let t = task(&st, "repos");
    assert_eq!(t["last_pass"]["outcome"], "ok");
    assert_eq!(t["last_pass"]["entries_scanned"], 0, "no sync ran: {t}");
    assert!(stamp_ms(&st, "repos").unwrap() > before);
    let log = std::fs::read_to_string(dir.path().join("move.state/logs/repos.log")).unwrap();
    assert!(
        log.contains("paths_from listed nothing: nothing to sync in this pass"),
        "{log}"
    );
    assert!(log.contains("paths_from done: 3 paths listed in "), "{log}");
}

#[test]
fn a_change_made_while_a_pass_runs_is_listed_by_the_next_one() {
    // GitHub's lesson: stamp the start of the work, not its end. The service writes to
    // r005 after the first pass's list was made (here from its post_pass, after the sync),
    // and the pass goes on for more than a second: a stamp taken at its end would be
    // newer than the write, and the next list would miss it.
    let dir = tmp();
    let src = dir.path().join("src");
    repositories(&src, 10);
    let p = repos_plan(
        dir.path(),
        "post_pass = \"if [ ! -e wrote ]; then touch wrote; echo late > src/r005/late; sleep 1.2; fi\"",
    );
    plan(&["presync", s(&p)]).ok();
    assert!(!dir.path().join("dst/r005/late").exists());
    plan(&["presync", s(&p)]).ok();
    assert_eq!(listed(dir.path(), "repos"), ["r005"]);
    assert_same_below_root(&src, &dir.path().join("dst"));
}

#[test]
fn ctrl_c_and_kill_9_during_a_pass_keep_the_stamp() {
    let dir = tmp();
    let src = dir.path().join("src");
    repositories(&src, 20);
    // kill -9 lands in a slow pre_pass, Ctrl-C in a slow paths_from.
    let p = repos_plan(
        dir.path(),
        "pre_pass = \"if [ -e slow-pre ]; then sleep 30 & echo $! > pre.pid; wait; fi\"\n\
         post_pass = \"echo post $CUTOVER_PASS_RESULT >> post.log\"",
    );
    plan(&["presync", s(&p)]).ok();
    let stamp = stamp_ms(&status(&p), "repos").unwrap();
    push_to(&src, &[3], 1);

    // Ctrl-C while paths_from runs: interrupted, its sleep killed, the stamp as it was.
    write(&dir.path().join("slow-list"), "");
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    wait_for_file(&dir.path().join("list.pid"), &mut run);
    run.signal(rustix::process::Signal::INT);
    let out = run.wait();
    out.expect_code(130);
    assert!(
        dies(&dir.path().join("list.pid")),
        "paths_from's sleep survived Ctrl-C"
    );
    let st = status(&p);
    assert_eq!(task(&st, "repos")["phase"], "interrupted");
    assert_eq!(task(&st, "repos")["last_pass"]["outcome"], "interrupted");
    assert_eq!(stamp_ms(&st, "repos"), Some(stamp));
    std::fs::remove_file(dir.path().join("slow-list")).unwrap();

    // kill -9 while pre_pass runs: nothing is recorded at all, so the stamp stays too.
    write(&dir.path().join("slow-pre"), "");
    let mut run = Running::start(plan_cmd(&["presync", s(&p)]));
    wait_for_file(&dir.path().join("pre.pid"), &mut run);
    run.signal(rustix::process::Signal::KILL);
    let out = run.wait();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "{out}"
    );
    // A hook's process group outlives a runner killed with -9 (nothing can clean up after
    // SIGKILL); end it here.
    let pid = std::fs::read_to_string(dir.path().join("pre.pid")).unwrap();
    let _ = Command::new("kill").arg(pid.trim()).status();
    let st = status(&p);
    assert_eq!(st["runner_alive"], false);
    assert_eq!(task(&st, "repos")["phase"], "running");
    assert_eq!(stamp_ms(&st, "repos"), Some(stamp));
    std::fs::remove_file(dir.path().join("slow-pre")).unwrap();

    // The next pass is told the old stamp, and lists what changed since then.
    plan(&["presync", s(&p)]).ok();
    let seen = lines(&dir.path().join("seen.log"));
    let last = seen.last().unwrap();
    assert_eq!(field(last, "last"), rfc3339(stamp), "{seen:?}");
    assert_eq!(field(last, "epoch"), stamp.div_euclid(1000).to_string());
    assert_eq!(listed(dir.path(), "repos"), ["r003"]);
    assert!(stamp_ms(&status(&p), "repos").unwrap() > stamp);
    assert_same_below_root(&src, &dir.path().join("dst"));
    // post_pass ran after the interrupted pass too (a snapshot is removed even then); a
    // runner killed with -9 runs nothing more.
    assert_eq!(
        lines(&dir.path().join("post.log")),
        ["post ok", "post failed", "post ok"]
    );
}

/// `ORDER` appends `WHAT TASK PASS [RESULT] synced=yes|no` to order.log, where `synced`
/// says whether the file the pass carries is already on the destination.
fn order(what: &str) -> String {
    format!(
        "echo \"{what} $CUTOVER_TASK $CUTOVER_PASS${{CUTOVER_PASS_RESULT:+ $CUTOVER_PASS_RESULT}} synced=$(test -e dst/new-$CUTOVER_PASS && echo yes || echo no)\" >> order.log"
    )
}

#[test]
fn pass_hooks_run_in_order_around_every_pass_and_a_failing_pre_pass_syncs_nothing() {
    let dir = tmp();
    let src = dir.path().join("src");
    write(&src.join("base"), "base\n");
    let p = dir.path().join("move.toml");
    write(
        &p,
        format!(
            "{}{}{}{}",
            hook("pre_pass", &order("plan-pre"), ""),
            hook(
                "pre_pass",
                "exit 9",
                "name = \"optional\"\nerr_is_fatal = false"
            ),
            hook("post_pass", &order("plan-post"), ""),
            tree_task(
                "a",
                "src/",
                "dst/",
                &format!(
                    "pre_pass = {:?}\npaths_from = {:?}\npost_pass = {:?}",
                    format!("{} && test ! -e fail-pre", order("task-pre")),
                    format!("{} && echo new-$CUTOVER_PASS && echo base", order("paths")),
                    order("task-post"),
                )
            ),
        ),
    );
    plan(&["check", s(&p)]).ok();
    let order_log = dir.path().join("order.log");

    write(&src.join("new-presync"), "1\n");
    plan(&["presync", s(&p)]).ok();
    assert_eq!(
        lines(&order_log),
        [
            "plan-pre a presync synced=no",
            "task-pre a presync synced=no",
            "paths a presync synced=no",
            "task-post a presync ok synced=yes",
            "plan-post a presync ok synced=yes",
        ]
    );
    let st = status(&p);
    let stamp = stamp_ms(&st, "a").unwrap();
    let log = std::fs::read_to_string(dir.path().join("move.state/logs/a.log")).unwrap();
    assert!(
        log.contains("pre_pass hook \"optional\" failed: exited with status 9")
            && log.contains("err_is_fatal = false, going on"),
        "{log}"
    );
    let hooks_log = std::fs::read_to_string(dir.path().join("move.state/logs/hooks.log")).unwrap();
    assert!(
        hooks_log.contains("[pre_pass a] optional: sh -c"),
        "{hooks_log}"
    );

    // A failing task pre_pass: no paths_from, no sync; post_pass still runs, told so; the
    // pass fails and the stamp stays.
    std::fs::remove_file(&order_log).unwrap();
    write(&dir.path().join("fail-pre"), "");
    write(&src.join("base"), "changed\n");
    let out = plan(&["presync", s(&p)]);
    out.expect_code(3);
    assert_eq!(
        lines(&order_log),
        [
            "plan-pre a presync synced=yes",
            "task-pre a presync synced=yes",
            "task-post a presync failed synced=yes",
            "plan-post a presync failed synced=yes",
        ]
    );
    assert_eq!(
        std::fs::read(dir.path().join("dst/base")).unwrap(),
        b"base\n"
    );
    let st = status(&p);
    let t = task(&st, "a");
    assert_eq!(t["phase"], "failed");
    assert_eq!(stamp_ms(&st, "a"), Some(stamp));
    let error = t["last_error"].as_str().unwrap();
    assert!(
        error.contains("pre_pass hook") && error.contains("exited with status 1"),
        "{error}"
    );
    assert!(error.contains("nothing was synced"), "{error}");
    let errors = errors_json(dir.path());
    assert_eq!(errors["failed"][0]["task"], "a");

    // The final pass gets the same hooks, told it is the final one.
    std::fs::remove_file(&order_log).unwrap();
    std::fs::remove_file(dir.path().join("fail-pre")).unwrap();
    write(&src.join("new-final"), "2\n");
    plan(&["cutover", s(&p)]).ok();
    assert_eq!(
        lines(&order_log),
        [
            "plan-pre a final synced=no",
            "task-pre a final synced=no",
            "paths a final synced=no",
            "task-post a final ok synced=yes",
            "plan-post a final ok synced=yes",
        ]
    );
    assert_eq!(
        std::fs::read(dir.path().join("dst/base")).unwrap(),
        b"changed\n"
    );
}

#[test]
fn a_failing_post_pass_fails_the_pass_and_keeps_the_stamp() {
    let dir = tmp();
    write(&dir.path().join("src/f"), "x\n");
    let p = dir.path().join("move.toml");
    write(
        &p,
        tree_task(
            "a",
            "src/",
            "dst/",
            "post_pass = \"echo cannot remove the snapshot >&2; test ! -e fail-post\"",
        ),
    );
    plan(&["presync", s(&p)]).ok();
    let stamp = stamp_ms(&status(&p), "a").unwrap();
    write(&dir.path().join("fail-post"), "");
    plan(&["presync", s(&p)]).expect_code(3);
    let st = status(&p);
    assert_eq!(stamp_ms(&st, "a"), Some(stamp));
    let error = task(&st, "a")["last_error"].as_str().unwrap().to_string();
    assert!(error.starts_with("post_pass hook"), "{error}");
    let hooks_log = std::fs::read_to_string(dir.path().join("move.state/logs/hooks.log")).unwrap();
    assert!(
        hooks_log.contains("cannot remove the snapshot"),
        "{hooks_log}"
    );
}

#[test]
fn a_command_task_sees_the_pass_variables() {
    let dir = tmp();
    write(&dir.path().join("data.sql"), "INSERT 1;\n");
    let p = dir.path().join("move.toml");
    write(
        &p,
        format!(
            "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = {:?}\ndestination = {:?}\n",
            "env | grep '^CUTOVER_' | sort > env-$CUTOVER_PASS.txt; cat data.sql",
            slash(&dir.path().join("dst")),
        ),
    );
    std::fs::create_dir(dir.path().join("dst")).unwrap();
    let env = |pass: &str| lines(&dir.path().join(format!("env-{pass}.txt")));
    plan(&["presync", s(&p)]).ok();
    let first = env("presync");
    for want in [
        "CUTOVER_TASK=db",
        "CUTOVER_PASS=presync",
        "CUTOVER_LAST_SUCCESS=",
        "CUTOVER_LAST_SUCCESS_EPOCH=",
    ] {
        assert!(first.iter().any(|l| l == want), "{want} not in {first:?}");
    }
    let stamp = stamp_ms(&status(&p), "db").unwrap();
    // A dump can start where the last successful one started.
    plan(&["cutover", s(&p)]).ok();
    let last = env("final");
    assert!(last.contains(&"CUTOVER_PASS=final".to_string()), "{last:?}");
    assert!(
        last.contains(&format!("CUTOVER_LAST_SUCCESS={}", rfc3339(stamp))),
        "{last:?}"
    );
    assert!(
        last.contains(&format!(
            "CUTOVER_LAST_SUCCESS_EPOCH={}",
            stamp.div_euclid(1000)
        )),
        "{last:?}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("dst/db")).unwrap(),
        b"INSERT 1;\n"
    );
}

#[test]
fn paths_from_runs_on_an_ssh_sources_host() {
    let dir = tmp();
    let sshd = Sshd::start(&dir.path().join("sshd"));
    let src = dir.path().join("src");
    repositories(&src, 5);
    let seen = dir.path().join("seen-remote");
    let p = dir.path().join("move.toml");
    write(
        &p,
        tree_task(
            "repos",
            &format!("root@127.0.0.1:{}/", s(&src)),
            &slash(&dir.path().join("dst")),
            &format!(
                "paths_from = {:?}\nrsh = {:?}\nremote_cutover = {:?}",
                format!(
                    "echo \"ssh=${{SSH_CONNECTION:+yes}} source=$CUTOVER_SOURCE pass=$CUTOVER_PASS task=$CUTOVER_TASK\" > {}; cd \"$CUTOVER_SOURCE\" && find . -mindepth 1 -maxdepth 1 -name 'r00[13]'",
                    s(&seen)
                ),
                sshd.rsh(),
                bin()
            ),
        ),
    );
    plan(&["check", s(&p)]).ok();
    let logins = sshd.logins();
    plan(&["presync", s(&p)]).ok();
    assert!(sshd.logins() > logins);
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        format!("ssh=yes source={}/ pass=presync task=repos", s(&src))
    );
    assert_eq!(listed(dir.path(), "repos"), ["r001", "r003"]);
    assert!(dir.path().join("dst/r001/HEAD").exists());
    assert!(!dir.path().join("dst/r002").exists());
}

#[test]
fn check_names_misspelt_and_misplaced_pass_keys() {
    let dir = tmp();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    let p = dir.path().join("move.toml");
    write(&p, tree_task("a", "src/", "dst/", "pre_pas = \"true\""));
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:6: unknown key \"pre_pas\" in task \"a\"; did you mean \"pre_pass\"?"],
    );
    write(
        &p,
        format!(
            "[[post_pas]]\ncommand = \"true\"\n{}",
            tree_task("a", "src/", "dst/", "")
        ),
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:1: unknown key \"post_pas\" at the top level; did you mean \"post_pass\"?"],
    );
    write(&p, tree_task("a", "src/", "dst/", "paths_frm = \"find .\""));
    assert_one_line_error(&plan(&["check", s(&p)]), &["did you mean \"paths_from\"?"]);
    write(
        &p,
        tree_task(
            "a",
            "cutover://old-dc/data/",
            "dst/",
            "paths_from = \"find .\"",
        ),
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &[
            "move.toml:6:",
            "task \"a\": paths_from",
            "a daemon never runs commands",
            "[user@]host:PATH",
        ],
    );
    write(
        &p,
        "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = \"pg_dump\"\ndestination = \"dst/\"\npaths_from = \"find .\"\n",
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &[
            "move.toml:6:",
            "paths_from: only applies to kind = \"tree\"",
        ],
    );
    assert!(!dir.path().join("move.state").exists());
}

#[test]
fn a_listed_path_missing_from_the_source_is_logged_as_missing_not_as_changed() {
    let dir = tmp();
    let src = dir.path().join("src");
    repositories(&src, 2);
    let p = dir.path().join("move.toml");
    write(
        &p,
        tree_task(
            "repos",
            "src/",
            &slash(&dir.path().join("dst")),
            "paths_from = \"echo r001; echo ghost\"",
        ),
    );
    let out = plan(&["presync", s(&p)]);
    assert!(dir.path().join("dst/r001/HEAD").exists(), "{out}");
    let log = std::fs::read_to_string(dir.path().join("move.state/logs/repos.log")).unwrap();
    assert!(
        log.contains("missing: ghost: listed by paths_from but not in the source"),
        "{log}"
    );
    assert!(!log.contains("changed while read: ghost"), "{log}");
}
