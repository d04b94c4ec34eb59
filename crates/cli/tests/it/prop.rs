//! Property test: whatever sequence of edits hits the source (mkdata edit modes plus
//! creates, deletes, renames, chmods, symlinks, truncations and type changes), a sync with
//! --delete, local or through a daemon (push or pull), leaves a destination rsync calls equal.

use crate::util::*;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
enum Op {
    Mkdata {
        mode: &'static str,
        seed: u32,
    },
    CreateFile {
        dir: usize,
        name: u8,
        size: usize,
        seed: u64,
    },
    MakeDir {
        dir: usize,
        name: u8,
    },
    Delete {
        pick: usize,
    },
    Rename {
        pick: usize,
        dir: usize,
        name: u8,
    },
    Chmod {
        pick: usize,
        mode: u32,
    },
    NewSymlink {
        dir: usize,
        name: u8,
        target: usize,
    },
    ReplaceWithSymlink {
        pick: usize,
        target: usize,
    },
    Truncate {
        pick: usize,
        pct: u8,
    },
    FileToDir {
        pick: usize,
    },
    DirToFile {
        pick: usize,
    },
}

#[derive(Debug, Clone, Copy)]
enum Via {
    Local,
    Push,
    Pull,
}

const MODES: [&str; 5] = ["blocks", "insert", "append", "files", "touch"];
const FILE_MODES: [u32; 7] = [0o644, 0o600, 0o755, 0o4755, 0o444, 0o000, 0o2711];
const DIR_MODES: [u32; 4] = [0o755, 0o700, 0o1777, 0o555];
const LINK_TARGETS: [&str; 4] = ["n0", "../up/none", "/nonexistent/abs", "d000/s00"];

fn op(type_changes: bool) -> BoxedStrategy<Op> {
    let size = prop_oneof![0..200usize, 1_000..300_000usize, Just(1_500_000usize)];
    let common = prop_oneof![
        (0..5usize, any::<u32>()).prop_map(|(m, seed)| Op::Mkdata {
            mode: MODES[m],
            seed
        }),
        (any::<usize>(), any::<u8>(), size, any::<u64>()).prop_map(|(dir, name, size, seed)| {
            Op::CreateFile {
                dir,
                name,
                size,
                seed,
            }
        }),
        (any::<usize>(), any::<u8>()).prop_map(|(dir, name)| Op::MakeDir { dir, name }),
        any::<usize>().prop_map(|pick| Op::Delete { pick }),
        (any::<usize>(), any::<usize>(), any::<u8>()).prop_map(|(pick, dir, name)| Op::Rename {
            pick,
            dir,
            name
        }),
        (any::<usize>(), any::<u32>()).prop_map(|(pick, mode)| Op::Chmod { pick, mode }),
        (any::<usize>(), any::<u8>(), any::<usize>())
            .prop_map(|(dir, name, target)| Op::NewSymlink { dir, name, target }),
        (any::<usize>(), any::<usize>())
            .prop_map(|(pick, target)| Op::ReplaceWithSymlink { pick, target }),
        (any::<usize>(), 0..100u8).prop_map(|(pick, pct)| Op::Truncate { pick, pct }),
        any::<usize>().prop_map(|pick| Op::FileToDir { pick }),
    ];
    if type_changes {
        prop_oneof![
            10 => common,
            2 => any::<usize>().prop_map(|pick| Op::DirToFile { pick }),
        ]
        .boxed()
    } else {
        common.boxed()
    }
}

fn via() -> impl Strategy<Value = Via> {
    prop_oneof![Just(Via::Local), Just(Via::Push), Just(Via::Pull)]
}

/// Everything below `root` (not `root` itself), sorted.
fn entries(root: &Path) -> Vec<PathBuf> {
    snapshot(root).into_keys().map(|k| root.join(k)).collect()
}

fn dirs(root: &Path) -> Vec<PathBuf> {
    let mut v = vec![root.to_path_buf()];
    v.extend(entries(root).into_iter().filter(|p| is_dir(p)));
    v
}

fn files(root: &Path) -> Vec<PathBuf> {
    entries(root)
        .into_iter()
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .map(|m| m.is_file())
                .unwrap_or(false)
        })
        .collect()
}

fn is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.is_dir())
        .unwrap_or(false)
}

fn pick<T: Clone>(v: &[T], i: usize) -> Option<T> {
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()].clone())
    }
}

fn remove(p: &Path) {
    if is_dir(p) {
        std::fs::remove_dir_all(p).unwrap();
    } else {
        std::fs::remove_file(p).unwrap();
    }
}

fn apply(root: &Path, op: &Op) {
    match *op {
        Op::Mkdata { mode, seed } => mkdata(&[
            "edit",
            s(root),
            "--mode",
            mode,
            "--seed",
            &seed.to_string(),
            "--pct",
            "10",
        ]),
        Op::CreateFile {
            dir,
            name,
            size,
            seed,
        } => {
            let d = pick(&dirs(root), dir).unwrap();
            let p = d.join(format!("n{}", name % 6));
            if std::fs::symlink_metadata(&p).is_ok() {
                if is_dir(&p) {
                    return;
                }
                std::fs::remove_file(&p).unwrap();
            }
            write(&p, random_bytes(seed, size));
        }
        Op::MakeDir { dir, name } => {
            let d = pick(&dirs(root), dir).unwrap();
            let p = d.join(format!("m{}", name % 4));
            if std::fs::symlink_metadata(&p).is_err() {
                std::fs::create_dir(&p).unwrap();
            }
        }
        Op::Delete { pick: i } => {
            if let Some(p) = pick(&entries(root), i) {
                remove(&p);
            }
        }
        Op::Rename { pick: i, dir, name } => {
            let Some(from) = pick(&entries(root), i) else {
                return;
            };
            let to_dir = pick(&dirs(root), dir).unwrap();
            let to = to_dir.join(format!("r{}", name % 5));
            if to.starts_with(&from) || std::fs::symlink_metadata(&to).is_ok() {
                return;
            }
            std::fs::rename(&from, &to).unwrap();
        }
        Op::Chmod { pick: i, mode } => {
            let Some(p) = pick(&entries(root), i) else {
                return;
            };
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                chmod(&p, DIR_MODES[mode as usize % DIR_MODES.len()]);
            } else if md.is_file() {
                chmod(&p, FILE_MODES[mode as usize % FILE_MODES.len()]);
            }
        }
        Op::NewSymlink { dir, name, target } => {
            let d = pick(&dirs(root), dir).unwrap();
            let p = d.join(format!("l{}", name % 4));
            if std::fs::symlink_metadata(&p).is_ok() {
                if is_dir(&p) {
                    return;
                }
                std::fs::remove_file(&p).unwrap();
            }
            std::os::unix::fs::symlink(LINK_TARGETS[target % LINK_TARGETS.len()], &p).unwrap();
        }
        Op::ReplaceWithSymlink { pick: i, target } => {
            let nondirs: Vec<_> = entries(root).into_iter().filter(|p| !is_dir(p)).collect();
            if let Some(p) = pick(&nondirs, i) {
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(LINK_TARGETS[target % LINK_TARGETS.len()], &p).unwrap();
            }
        }
        Op::Truncate { pick: i, pct } => {
            if let Some(p) = pick(&files(root), i) {
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len * u64::from(pct) / 100).unwrap();
            }
        }
        Op::FileToDir { pick: i } => {
            if let Some(p) = pick(&files(root), i) {
                std::fs::remove_file(&p).unwrap();
                write(&p.join("was_a_file"), "now a dir\n");
            }
        }
        Op::DirToFile { pick: i } => {
            let ds: Vec<_> = dirs(root).into_iter().skip(1).collect();
            if let Some(p) = pick(&ds, i) {
                std::fs::remove_dir_all(&p).unwrap();
                write(&p, "now a file\n");
            }
        }
    }
}

/// Build a small tree, sync it, edit the source with `ops`, sync again with --delete, and
/// compare with the oracle.
fn run_case(ops: &[Op], via: Via, seed: u32) {
    let t = tmp();
    let module = t.path().join("module");
    let (src, dst) = match via {
        Via::Local => (t.path().join("src"), t.path().join("dst")),
        Via::Push => (t.path().join("src"), module.join("dst")),
        Via::Pull => (module.join("src"), t.path().join("dst")),
    };
    mkdata(&[
        "tree",
        s(&src),
        "--files",
        "25",
        "--max-kb",
        "400",
        "--seed",
        &seed.to_string(),
    ]);
    mkdata(&[
        "big",
        s(&src.join("big")),
        "--count",
        "1",
        "--mb",
        "8",
        "--seed",
        &seed.to_string(),
    ]);
    std::os::unix::fs::symlink("big/big00.bin", src.join("current")).unwrap();
    let daemon = match via {
        Via::Local => None,
        _ => Some(Daemon::start(
            &t.path().join("d"),
            &[Module::rw("m", &module)],
        )),
    };
    let (from, to) = match (via, &daemon) {
        (Via::Push, Some(d)) => (slash(&src), d.url("m/dst/")),
        (Via::Pull, Some(d)) => (d.url("m/src/"), slash(&dst)),
        _ => (slash(&src), slash(&dst)),
    };
    sync(&["-H", "-X", &from, &to]).ok();
    assert_same(&src, &dst);
    for op in ops {
        apply(&src, op);
    }
    let out = sync_json(&["-H", "-X", "--delete", &from, &to]);
    out.ok();
    assert_same_with(&src, &dst, &["--delete"]);
    let again = sync_json(&["-H", "-X", "--delete", &from, &to]);
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "not idempotent\n{again}");
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 6,
        max_shrink_iters: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_edits_then_sync_with_delete_matches_rsync(
        ops in prop::collection::vec(op(false), 1..12),
        via in via(),
        seed in 0..1000u32,
    ) {
        run_case(&ops, via, seed);
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]

    fn random_edits_with_dir_to_file_then_sync_with_delete_matches_rsync(
        ops in prop::collection::vec(op(true), 1..12),
        via in via(),
        seed in 0..1000u32,
    ) {
        run_case(&ops, via, seed);
    }
}
