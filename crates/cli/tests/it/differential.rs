//! Differential test against rsync: a seeded tree (`difftree.rs`), a seeded edit script and a
//! random set of options (`-H`, `-X`, `--delete`, `-c`, `--inplace`, `-W`, excludes, SIGKILL
//! mid-run then a rerun), local or pushed to a real daemon. After every sync: rsync's
//! comparison prints nothing, no `.cutover.*` file is left in the destination, nothing outside
//! the destination (the source, a sibling canary) changed, sparse files are not densified; a
//! second identical run changes nothing (no items, same inodes and link counts).
//!
//! CI runs `CI_CASES` seeds. `CUTOVER_DIFF_SEED=N` replays one case, `CUTOVER_DIFF_CASES=N`
//! (with `CUTOVER_DIFF_START=S`) runs N cases from seed S; the ignored `differential_long`
//! runs `LONG_CASES` by default. A check that fails with a tag in `KNOWN` is a warning.

use crate::difftree::{self, Gen, Node};
use crate::util::*;
use rand::Rng;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Seeds CI runs (1..=CI_CASES).
const CI_CASES: u64 = 18;
/// Cases `differential_long` runs unless `CUTOVER_DIFF_CASES` says otherwise.
const LONG_CASES: u64 = 2000;

/// Known bugs (tag, what it is). A failed check whose tag is listed is reported as a warning
/// and does not fail the test; remove a tag once its bug is fixed.
const KNOWN: &[(&str, &str)] = &[];

/// The options of one case.
#[derive(Debug, Clone, Default)]
struct Opts {
    hard_links: bool,
    xattrs: bool,
    delete: bool,
    checksum: bool,
    inplace: bool,
    whole_file: bool,
    excludes: Vec<&'static str>,
    jobs: Option<u8>,
    /// SIGKILL the first sync after this many ms (then run it again).
    kill_first: Option<u64>,
    /// SIGKILL a sync after the edits, edit again (deletes, renames), then sync.
    kill_second: Option<u64>,
    daemon: bool,
}

impl Opts {
    fn random(g: &mut Gen) -> Opts {
        let r = &mut g.rng;
        let mut excludes = Vec::new();
        if r.random_bool(0.25) {
            for e in difftree::EXCLUDES {
                if r.random_bool(0.5) {
                    excludes.push(e);
                }
            }
        }
        Opts {
            hard_links: r.random_bool(0.5),
            xattrs: r.random_bool(0.5),
            delete: r.random_bool(0.6),
            checksum: r.random_bool(0.25),
            inplace: r.random_bool(0.2),
            whole_file: r.random_bool(0.15),
            excludes,
            jobs: [None, None, Some(1), Some(3)][r.random_range(0..4)],
            kill_first: r.random_bool(0.15).then(|| r.random_range(20..400)),
            kill_second: r.random_bool(0.25).then(|| r.random_range(20..400)),
            daemon: r.random_bool(0.35),
        }
    }

    /// The options as `cutover sync` takes them.
    fn cutover_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let flags = [
            (self.hard_links, "-H"),
            (self.xattrs, "-X"),
            (self.delete, "--delete"),
            (self.checksum, "-c"),
            (self.inplace, "--inplace"),
            (self.whole_file, "-W"),
        ];
        a.extend(flags.iter().filter(|f| f.0).map(|f| f.1.to_string()));
        if let Some(j) = self.jobs {
            a.extend(["-j".to_string(), j.to_string()]);
        }
        for e in &self.excludes {
            a.extend(["--exclude".to_string(), e.to_string()]);
        }
        a
    }

    /// The oracle's options: `-anA --checksum --itemize-changes` plus what this case used.
    fn rsync_args(&self) -> Vec<String> {
        let mut a: Vec<String> = ["-anA", "--checksum", "--itemize-changes"]
            .map(String::from)
            .to_vec();
        if self.hard_links {
            a.push("-H".into());
        }
        if self.xattrs {
            a.push("-X".into());
        }
        if self.delete {
            a.push("--delete".into());
        }
        a.extend(self.excludes.iter().map(|e| format!("--exclude={e}")));
        a
    }
}

impl std::fmt::Display for Opts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} [{}]{}{}",
            self.cutover_args().join(" "),
            if self.daemon {
                "push to daemon"
            } else {
                "local"
            },
            self.kill_first
                .map(|ms| format!(" [SIGKILL first sync at {ms} ms]"))
                .unwrap_or_default(),
            self.kill_second
                .map(|ms| format!(" [SIGKILL sync after edits at {ms} ms]"))
                .unwrap_or_default(),
        )
    }
}

/// One failed check.
#[derive(Debug, Clone)]
struct Failure {
    tag: String,
    step: String,
    detail: String,
}

/// One case: its directories, options, the generator (with its log) and what failed.
struct Case {
    seed: u64,
    opts: Opts,
    gen: Gen,
    _tmp: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    dst_arg: String,
    /// Trees outside the destination that no sync may change (root, subtree to skip).
    outside: Vec<(PathBuf, Option<PathBuf>)>,
    failures: Vec<Failure>,
    steps: Vec<String>,
}

/// A shared daemon serving `module` read-write as `m`.
struct Served {
    daemon: Daemon,
    module: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Served {
    fn start() -> Served {
        let t = tmp();
        let module = t.path().join("module");
        let daemon = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
        Served {
            daemon,
            module,
            _tmp: t,
        }
    }
}

impl Case {
    fn new(seed: u64, served: Option<&Served>) -> Case {
        let mut gen = Gen::new(seed);
        let opts = Opts::random(&mut gen);
        gen.replace_dirs = opts.delete;
        let t = tmp();
        let src = t.path().join("src");
        let (dst, dst_arg, outside) = match served.filter(|_| opts.daemon) {
            Some(sv) => {
                let here = sv.module.join(format!("c{seed}"));
                let dst = here.join("dst");
                let url = sv.daemon.url(&format!("m/c{seed}/dst/"));
                let outside = vec![(t.path().to_path_buf(), None), (here, Some(dst.clone()))];
                (dst, url, outside)
            }
            None => {
                let dst = t.path().join("dst");
                let outside = vec![(t.path().to_path_buf(), Some(dst.clone()))];
                (dst.clone(), slash(&dst), outside)
            }
        };
        let mut opts = opts;
        opts.daemon = served.is_some() && opts.daemon;
        Case {
            seed,
            opts,
            gen,
            _tmp: t,
            src,
            dst,
            dst_arg,
            outside,
            failures: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// One failure of `tag` listing `lines` (at most 30) under `head`.
    fn fail_lines(&mut self, tag: &str, step: &str, head: &str, mut lines: Vec<String>) {
        if lines.len() > 30 {
            let more = lines.len() - 30;
            lines.truncate(30);
            lines.push(format!("... and {more} more"));
        }
        self.fail(tag, step, format!("{head}\n{}", lines.join("\n")));
    }

    fn fail(&mut self, tag: &str, step: &str, detail: String) {
        self.failures.push(Failure {
            tag: tag.to_string(),
            step: step.to_string(),
            detail,
        });
    }

    fn args(&self, extra: &[&str]) -> Vec<String> {
        let mut a = vec!["--json".to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend(self.opts.cutover_args());
        a.push(slash(&self.src));
        a.push(self.dst_arg.clone());
        a
    }

    /// The source tree and a canary beside the destination.
    fn build(&mut self) {
        let n = self.gen.rng.random_range(30..=60);
        self.gen.tree(&self.src, n);
        let canary = self.dst.with_file_name("canary");
        write(&canary.join("keep.txt"), "canary\n");
        write(
            &canary.join("sub/data.bin"),
            random_bytes(self.seed, 70_000),
        );
        std::os::unix::fs::symlink("../dst", canary.join("to-dst")).expect("symlink");
        std::fs::create_dir_all(self.dst.parent().expect("dst has a parent")).expect("mkdir");
        settle();
    }

    /// A sync killed with SIGKILL after `ms` (slowed by --bwlimit so it is usually mid-run).
    fn killed_run(&mut self, step: &str, ms: u64) {
        let args = self.args(&["--bwlimit", "16M"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut run = spawn_sync(&refs);
        std::thread::sleep(Duration::from_millis(ms));
        // `running` reaps a process that has exited; one that has not is killed (at worst
        // a zombie not yet reaped, which the signal does not mind).
        let finished = !run.running();
        if !finished {
            run.signal(rustix::process::Signal::KILL);
        }
        let out = run.wait();
        self.steps.push(format!(
            "{step}: cutover sync {} killed at {ms} ms ({})",
            refs.join(" "),
            if finished {
                format!("had already exited: {:?}", out.status)
            } else {
                "mid-run".to_string()
            }
        ));
    }

    fn snapshot_outside(&self) -> Vec<BTreeMap<Vec<u8>, Node>> {
        self.outside
            .iter()
            .map(|(root, skip)| difftree::scan(root, skip.as_deref()))
            .collect()
    }

    /// Run one sync (after a killed one, a "busy destination" refusal is retried briefly)
    /// and check its exit code and what it did outside the destination.
    fn run_sync(&mut self, step: &str) -> Option<Out> {
        let before = self.snapshot_outside();
        let args = self.args(&[]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut out = sync(&refs);
        let started = Instant::now();
        while out.code() != 0
            && out.stderr.contains("busy")
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(200));
            out = sync(&refs);
        }
        self.steps
            .push(format!("{step}: cutover sync {}", refs.join(" ")));
        let after = self.snapshot_outside();
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let d = difftree::scan_diff(b, a, 20);
            if !d.is_empty() {
                let root = self.outside[i].0.display().to_string();
                self.fail("outside", step, format!("below {root}:\n{}", d.join("\n")));
            }
        }
        if out.code() != 0 {
            let tag = if self.opts.inplace
                && (out.stdout.contains("Too many levels of symbolic links")
                    || out.stdout.contains("not a regular file"))
            {
                "exit-inplace-type"
            } else if out.stdout.contains("cannot hard-link")
                && out.stdout.contains("Is a directory")
            {
                "exit-hardlink-over-dir"
            } else {
                "exit"
            };
            self.fail(tag, step, format!("exit {}\n{out}", out.code()));
            return None;
        }
        Some(out)
    }

    /// Checks (1) oracle, (2) leftovers, (4) sparse allocation.
    fn check_dst(&mut self, step: &str) {
        let args = self.opts.rsync_args();
        let out = std::process::Command::new("rsync")
            .args(&args)
            .arg(slash(&self.src))
            .arg(slash(&self.dst))
            .output()
            .expect("cannot run rsync (the oracle)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            self.fail(
                "oracle",
                step,
                format!("rsync {} failed: {err}", args.join(" ")),
            );
        }
        let mut classes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let class = match oracle_class(line) {
                "oracle" if self.stale_link(line) => "oracle-hardlink-split",
                c => c,
            };
            classes.entry(class).or_default().push(line.to_string());
        }
        for (class, lines) in classes {
            let head = format!("rsync {} SRC/ DST/:", args.join(" "));
            self.fail_lines(class, step, &head, lines);
        }
        for p in difftree::entries(&self.dst) {
            let name = p.file_name().unwrap_or_default().as_bytes();
            if name.starts_with(b".cutover.") {
                // Without --delete a partial whose source went away after a killed run stays
                // by design (the next run with --delete removes it).
                let stranded_ok = !self.opts.delete && self.opts.kill_second.is_some();
                if name.ends_with(b".part") && stranded_ok {
                    continue;
                }
                let tag = if name.ends_with(b".tmp") {
                    "leftover-tmp"
                } else if name.ends_with(b".part") {
                    "leftover-part"
                } else {
                    "leftover"
                };
                let size = std::fs::symlink_metadata(&p).map(|m| m.len()).unwrap_or(0);
                let shown = difftree::show(&self.dst, &p);
                self.fail(tag, step, format!("{shown} ({size} bytes)"));
            }
        }
        self.check_sparse(step);
    }

    /// Whether an oracle line is a metadata-only difference (`.f`/`hf` + attributes) of a file
    /// that is still hard-linked at the destination while its source is not linked the same
    /// way (the source broke a link group).
    fn stale_link(&self, line: &str) -> bool {
        let meta_only = line.starts_with(".f") || line.starts_with("hf");
        if !self.opts.hard_links || !meta_only || line.len() < 13 {
            return false;
        }
        let rel = unescape_rsync(&line[12..]);
        let nlink = |root: &PathBuf| {
            std::fs::symlink_metadata(root.join(OsStr::from_bytes(&rel)))
                .map(|m| m.nlink())
                .unwrap_or(0)
        };
        let (s, d) = (nlink(&self.src), nlink(&self.dst));
        d > 1 && s != d
    }

    /// (4): no destination file takes more than 110% (+ 64 KiB) of its source's blocks.
    fn check_sparse(&mut self, step: &str) {
        for p in difftree::entries(&self.src) {
            if difftree::kind_of(&p) != Some(difftree::Kind::File) {
                continue;
            }
            let rel = p.strip_prefix(&self.src).expect("below src");
            let d = self.dst.join(rel);
            let (Ok(sm), Ok(dm)) = (std::fs::symlink_metadata(&p), std::fs::symlink_metadata(&d))
            else {
                continue;
            };
            if !dm.is_file() {
                continue;
            }
            let (sa, da) = (sm.blocks() * 512, dm.blocks() * 512);
            if da > sa + sa / 10 + (64 << 10) {
                let shown = difftree::show(&self.src, &p);
                self.fail(
                    "sparse",
                    step,
                    format!(
                        "{shown}: size {}, allocated {sa} at the source, {da} at the destination",
                        sm.len()
                    ),
                );
            }
        }
    }

    /// (5): a second identical run itemises nothing and leaves every inode as it was.
    fn check_rerun(&mut self) {
        let before = difftree::scan(&self.dst, None);
        let Some(out) = self.run_sync("rerun") else {
            return;
        };
        let mut classes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for v in out.events("item") {
            let path = v["path"].as_str().unwrap_or("");
            let src = std::fs::symlink_metadata(self.src.join(path)).ok();
            let linked = src.as_ref().is_some_and(|m| m.is_file() && m.nlink() > 1);
            // `path` is lossy for names that are not UTF-8 (issue 13 item 11): count those
            // as files, which nearly all items are.
            let file = src.as_ref().is_some_and(|m| m.is_file()) || path.contains('\u{FFFD}');
            let lossy = path.contains('\u{FFFD}');
            let class = if self.opts.hard_links && (linked || lossy && v["action"] == "create") {
                "rerun-items-hardlink"
            } else if self.opts.checksum
                && file
                && (v["action"] == "delta" || v["action"] == "send")
            {
                "rerun-items-checksum"
            } else {
                "rerun-items"
            };
            let line = format!("{} {}", v["action"], v["path"]);
            classes.entry(class).or_default().push(line);
        }
        for (class, lines) in classes {
            self.fail_lines(class, "rerun", "items:", lines);
        }
        let after = difftree::scan(&self.dst, None);
        // One failure per class: metadata rewritten (only ctime moved), an entry replaced or
        // re-linked (inode or link count), anything else.
        let mut classes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (key, line) in difftree::scan_diff_keyed(&before, &after) {
            let (b, a) = (before.get(&key), after.get(&key));
            let kind = b.or(a).map(|n| n.kind);
            let linked = b.is_some_and(|n| n.nlink > 1) || a.is_some_and(|n| n.nlink > 1);
            let only_ctime = line.contains("changed: ctime") && !line.contains("; ");
            let replaced = line.contains("ino ") || line.contains("nlink ");
            let class = if kind == Some('d') && only_ctime {
                "rerun-ctime-dir"
            } else if self.opts.hard_links && linked {
                "rerun-inode-hardlink"
            } else if self.opts.checksum && kind == Some('f') && (only_ctime || replaced) {
                "rerun-rewrite-checksum"
            } else if only_ctime {
                "rerun-ctime"
            } else if replaced {
                "rerun-inode"
            } else {
                "rerun-changed"
            };
            classes.entry(class).or_default().push(line);
        }
        for (class, lines) in classes {
            self.fail_lines(class, "rerun", "destination entries:", lines);
        }
        self.check_dst("rerun");
    }

    /// The whole case: build, (killed) first sync, edits, (killed sync, more edits), sync,
    /// rerun. Stops after the first step that failed a check.
    fn run(&mut self) {
        self.build();
        if let Some(ms) = self.opts.kill_first {
            self.killed_run("first", ms);
        }
        if self.run_sync("first").is_some() {
            self.check_dst("first");
        }
        if !self.failures.is_empty() {
            return;
        }
        let n = self.gen.rng.random_range(1..=12);
        self.gen.log.push(format!("edit script ({n} edits):"));
        for _ in 0..n {
            self.gen.edit(&self.src, false);
        }
        settle();
        if let Some(ms) = self.opts.kill_second {
            self.killed_run("second", ms);
            let n = self.gen.rng.random_range(1..=4);
            self.gen
                .log
                .push(format!("after the killed sync ({n} edits):"));
            for _ in 0..n {
                self.gen.edit(&self.src, true);
            }
            settle();
        }
        if self.run_sync("second").is_some() {
            self.check_dst("second");
        }
        if self.failures.is_empty() {
            self.check_rerun();
        }
    }

    /// Everything needed to understand and replay a failure.
    fn report(&self, known_only: bool) -> String {
        let mut r = format!(
            "differential case seed={} {}\n  options: {}\n",
            self.seed,
            if known_only {
                "hit known bugs only"
            } else {
                "FAILED"
            },
            self.opts
        );
        for f in &self.failures {
            let known = known_tag(&f.tag).map(|w| format!(" (known: {w})"));
            r.push_str(&format!(
                "  [{}]{} at {}: {}\n",
                f.tag,
                known.unwrap_or_default(),
                f.step,
                f.detail.replace('\n', "\n      ")
            ));
        }
        r.push_str("  steps:\n");
        for s in &self.steps {
            r.push_str(&format!("    {s}\n"));
        }
        r.push_str("  generator log:\n");
        for l in &self.gen.log {
            r.push_str(&format!("    {l}\n"));
        }
        r.push_str(&format!(
            "  replay: CUTOVER_DIFF_SEED={} cargo test -p cli --test it differential_ci -- --nocapture\n",
            self.seed
        ));
        r
    }
}

/// The class of one line of the oracle's itemised output: a cutover temporary file it
/// would delete, a metadata change of an existing special file (`.S` in rsync's itemise
/// code: a FIFO here), or anything else.
fn oracle_class(line: &str) -> &'static str {
    if line.contains(".cutover.") {
        "oracle-leftover"
    } else if line.starts_with(".S") {
        "oracle-special-meta"
    } else {
        "oracle"
    }
}

/// A path as rsync itemises it: `\#ooo` (octal) stands for a byte it would not print.
fn unescape_rsync(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 2..i + 5)
            .and_then(|o| std::str::from_utf8(o).ok());
        match oct.and_then(|o| u8::from_str_radix(o, 8).ok()) {
            Some(v) if b[i] == b'\\' && b.get(i + 1) == Some(&b'#') => {
                out.push(v);
                i += 5;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Flush every filesystem: ext4 allocates delayed blocks (and extent-tree blocks, which
/// count in st_blocks) at writeback, and the sync's own syncfs must not look like a change to
/// the source.
fn settle() {
    rustix::fs::sync();
}

fn known_tag(tag: &str) -> Option<&'static str> {
    KNOWN.iter().find(|(t, _)| *t == tag).map(|(_, w)| *w)
}

fn panic_text(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic".into())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// Run the cases `seeds`; print every failure; panic at the end if any was not a known bug.
fn run_seeds(seeds: impl Iterator<Item = u64>) {
    let mut served: Option<Served> = None;
    let mut bad = Vec::new();
    let mut tags: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let started = Instant::now();
    let mut count = 0;
    for seed in seeds {
        count += 1;
        if count % 50 == 0 {
            eprintln!("differential: {count} cases so far; failed checks by tag: {tags:?}");
        }
        if served.as_mut().is_none_or(|s| !s.daemon.alive()) {
            served = Some(Served::start());
        }
        let mut case = Case::new(seed, served.as_ref());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case.run()));
        if let Err(e) = r {
            case.fail("harness-panic", "?", panic_text(e.as_ref()));
        }
        if case.opts.daemon {
            if let Some(sv) = &served {
                let _ = std::fs::remove_dir_all(sv.module.join(format!("c{seed}")));
            }
        }
        if case.failures.is_empty() {
            continue;
        }
        for f in &case.failures {
            let seeds = tags.entry(f.tag.clone()).or_default();
            if seeds.last() != Some(&seed) {
                seeds.push(seed);
            }
        }
        let known_only = case.failures.iter().all(|f| known_tag(&f.tag).is_some());
        let report = case.report(known_only);
        eprintln!("{}{report}", if known_only { "warning: " } else { "" });
        if !known_only {
            bad.push(seed);
        }
    }
    eprintln!(
        "differential: {count} cases in {:.1} s; failed checks by tag: {}",
        started.elapsed().as_secs_f64(),
        tags.iter()
            .map(|(t, s)| format!("{t} x{} (seeds {:?})", s.len(), &s[..s.len().min(12)]))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert!(bad.is_empty(), "differential cases failed: seeds {bad:?}");
}

/// CI's budget of seeds, or what `CUTOVER_DIFF_SEED` / `CUTOVER_DIFF_CASES` ask for.
#[test]
fn differential_ci() {
    if let Some(seed) = env_u64("CUTOVER_DIFF_SEED") {
        return run_seeds(std::iter::once(seed));
    }
    let start = env_u64("CUTOVER_DIFF_START").unwrap_or(1);
    let n = env_u64("CUTOVER_DIFF_CASES").unwrap_or(CI_CASES);
    run_seeds(start..start + n);
}

/// The long mode: thousands of cases (`CUTOVER_DIFF_CASES`, from `CUTOVER_DIFF_START`).
#[test]
#[ignore = "long: thousands of differential cases (minutes to hours)"]
fn differential_long() {
    let start = env_u64("CUTOVER_DIFF_START").unwrap_or(100_000);
    let n = env_u64("CUTOVER_DIFF_CASES").unwrap_or(LONG_CASES);
    run_seeds(start..start + n);
}

/// The harness can fail: plant each kind of fault in a correct copy and see its check report.
#[test]
fn differential_harness_catches_planted_faults() {
    use std::io::{Seek, SeekFrom, Write};
    // Find a local case whose tree has a regular file of some size.
    let mut case = (1..)
        .map(|seed| Case::new(seed, None))
        .find(|c| !c.opts.daemon && c.opts.excludes.is_empty() && !c.opts.delete)
        .expect("some seed is local");
    case.opts.checksum = false;
    case.opts.kill_first = None;
    case.opts.kill_second = None;
    case.build();
    case.run_sync("copy").expect("the first copy succeeds");
    case.check_dst("copy");
    let tags = |c: &Case| -> Vec<String> { c.failures.iter().map(|f| f.tag.clone()).collect() };
    let ignore_known = |c: &mut Case| c.failures.retain(|f| known_tag(&f.tag).is_none());
    ignore_known(&mut case);
    assert!(case.failures.is_empty(), "{}", case.report(false));

    // (1) one byte flipped, size and mtime kept: only --checksum sees it.
    let file = difftree::entries(&case.dst)
        .into_iter()
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.len() > 10)
                .unwrap_or(false)
        })
        .expect("the tree has a non-empty file");
    let (s, ns) = difftree::mtime_of(&file);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .expect("open");
    let mut b = [0u8; 1];
    std::io::Read::read_exact(&mut f, &mut b).expect("read");
    f.seek(SeekFrom::Start(0)).expect("seek");
    f.write_all(&[b[0] ^ 0x55]).expect("write");
    drop(f);
    difftree::set_mtime(&file, s, ns);
    case.check_dst("corrupt");
    assert_eq!(tags(&case), ["oracle"], "{}", case.report(false));
    case.failures.clear();

    // (2) a stray partial file; (4) a destination file made dense.
    write(&case.dst.join(".cutover.0123.part"), "x");
    let sparse = case.src.join("planted-sparse");
    difftree::write_sparse(&sparse, &{
        let mut v = vec![0u8; 4 << 20];
        v[100] = 1;
        v
    });
    let dense = case.dst.join("planted-sparse");
    std::fs::write(&dense, std::fs::read(&sparse).expect("read")).expect("write dense");
    case.check_dst("planted");
    let mut got = tags(&case);
    got.sort();
    assert!(got.contains(&"leftover-part".to_string()), "{got:?}");
    assert!(got.contains(&"sparse".to_string()), "{got:?}");
    case.failures.clear();

    // (3) the sync must not touch the source: one that did would be caught. Simulate it by
    // changing the source while `run_sync` snapshots around a no-op command.
    let before = case.snapshot_outside();
    write(&case.src.join("touched-by-sync"), "oops");
    let after = case.snapshot_outside();
    assert!(
        before
            .iter()
            .zip(&after)
            .any(|(b, a)| !difftree::scan_diff(b, a, 5).is_empty()),
        "a changed source must show in the outside snapshot"
    );

    // (5) a rerun that replaces a file (new inode) is caught.
    let before = difftree::scan(&case.dst, None);
    // A copy renamed over it: a new inode while the old one still exists.
    let copy = case.dst.join("planted-copy");
    std::fs::copy(&file, &copy).expect("copy");
    std::fs::rename(&copy, &file).expect("rename over");
    let after = difftree::scan(&case.dst, None);
    let d = difftree::scan_diff(&before, &after, 5);
    assert!(d.iter().any(|l| l.contains("ino")), "{d:?}");
}
