//! Data sets: base trees made by `mkdata.py` and cached by their exact generator arguments,
//! fresh copies made with `cp -a`, edits applied with `mkdata.py edit`, and tree statistics.

use crate::proc::{describe, tail};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What a tree holds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct TreeStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of regular files' sizes.
    pub bytes: u64,
}

impl TreeStats {
    /// Files, directories (the root included) and symlinks.
    pub fn entries(&self) -> u64 {
        self.files + self.dirs + self.symlinks
    }
}

/// Walk `root` without following symlinks.
pub fn walk(root: &Path) -> Result<TreeStats> {
    let mut st = TreeStats::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        st.dirs += 1;
        for e in fs::read_dir(&dir).with_context(|| format!("read_dir {}", dir.display()))? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_symlink() {
                st.symlinks += 1;
            } else {
                st.files += 1;
                st.bytes += e.metadata()?.len();
            }
        }
    }
    Ok(st)
}

/// A cached, pristine base data set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Base {
    pub path: PathBuf,
    /// `mkdata.py` arguments after the script name, the directory left out.
    pub args: Vec<String>,
    pub stats: TreeStats,
    /// Seconds the generation took when it was made.
    pub generate_s: f64,
    /// Whether this run found it already made.
    #[serde(skip_deserializing)]
    pub cached: bool,
}

/// Cache key of a generator: its arguments, joined and stripped to a safe file name.
pub fn key(args: &[String]) -> String {
    args.iter()
        .map(|a| a.trim_start_matches('-'))
        .collect::<Vec<_>>()
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `python3 mkdata.py SUB DIR REST...` for `args` = `[SUB, REST...]`.
fn mkdata_cmd(mkdata: &Path, args: &[String], dir: &Path) -> Result<Command> {
    let Some((sub, rest)) = args.split_first() else {
        bail!("empty mkdata arguments");
    };
    let mut c = Command::new("python3");
    c.arg(mkdata).arg(sub).arg(dir).args(rest);
    Ok(c)
}

fn run_quiet(cmd: &mut Command, log: &Path) -> Result<()> {
    let f = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let f2 = f.try_clone()?;
    let st = cmd
        .stdin(std::process::Stdio::null())
        .stdout(f)
        .stderr(f2)
        .status()
        .with_context(|| format!("cannot run {}", describe(cmd)))?;
    if !st.success() {
        bail!("{} failed ({st}): {}", describe(cmd), tail(log, 2000));
    }
    Ok(())
}

/// The base set for `args` under `work/base/`, generated unless a complete one is cached.
/// A set is complete when its marker `KEY.json` exists with the same arguments; anything else
/// found there is removed and made again.
pub fn ensure_base(work: &Path, mkdata: &Path, args: &[String]) -> Result<Base> {
    let k = key(args);
    let dir = work.join("base");
    fs::create_dir_all(&dir)?;
    let path = dir.join(&k);
    let marker = dir.join(format!("{k}.json"));
    if let Ok(text) = fs::read_to_string(&marker) {
        if let Ok(mut b) = serde_json::from_str::<Base>(&text) {
            if b.args == args && path.is_dir() {
                b.cached = true;
                b.path = path;
                return Ok(b);
            }
        }
    }
    let _ = fs::remove_file(&marker);
    remove_tree(&path)?;
    let mut cmd = mkdata_cmd(mkdata, args, &path)?;
    eprintln!("  generating {}", describe(&cmd));
    let start = Instant::now();
    run_quiet(&mut cmd, &dir.join(format!("{k}.log")))?;
    let generate_s = start.elapsed().as_secs_f64();
    let stats = walk(&path)?;
    let b = Base {
        path,
        args: args.to_vec(),
        stats,
        generate_s,
        cached: false,
    };
    fs::write(&marker, serde_json::to_string_pretty(&b)?)?;
    eprintln!(
        "  generated in {generate_s:.1} s: {} files, {} dirs, {:.1} MB",
        stats.files,
        stats.dirs,
        stats.bytes as f64 / 1e6
    );
    Ok(b)
}

/// Apply `mkdata.py edit DIR ARGS...` to `dir`.
pub fn edit(mkdata: &Path, dir: &Path, args: &[String], log: &Path) -> Result<String> {
    let mut full = vec!["edit".to_string()];
    full.extend(args.iter().cloned());
    let mut cmd = mkdata_cmd(mkdata, &full, dir)?;
    let text = describe(&cmd);
    run_quiet(&mut cmd, log)?;
    Ok(text)
}

/// `cp -a SRC DST` (DST must not exist), so the copy has the same mtimes, modes and owners.
pub fn copy(src: &Path, dst: &Path, log: &Path) -> Result<f64> {
    if dst.exists() {
        bail!("copy target {} already exists", dst.display());
    }
    let start = Instant::now();
    run_quiet(Command::new("cp").arg("-a").arg(src).arg(dst), log)?;
    Ok(start.elapsed().as_secs_f64())
}

/// Remove a directory tree if it exists.
pub fn remove_tree(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            fs::remove_dir_all(path).with_context(|| format!("remove {}", path.display()))
        }
        Ok(_) => fs::remove_file(path).with_context(|| format!("remove {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("stat {}", path.display())),
    }
}
