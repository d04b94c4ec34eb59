//! P1, a pass over a list of what changed (the application knows; GitHub listed the
//! repositories changed since the last sync instead of rescanning them all): the base tree,
//! mkdata's 100 files to a directory, is copied to the destination and to a source. Timed
//! first: a full pass of the unchanged base into the destination (it stands in the peer's
//! slot). Then 0.1% of the source's directories are edited with mkdata, and one pass with
//! `--files-from` naming only those directories is timed. Afterwards the destination must
//! equal the edited source, which shows the list missed nothing.

use crate::data;
use crate::report::WorkloadResult;
use crate::tools::{self, Env, ToolRun, Verify};
use crate::workloads::{leaf_dirs, listed_dirs, Spec};
use anyhow::{Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

/// The directory of mkdata's tree that holds files `100 k` to `100 k + 99`.
fn leaf(k: u64) -> PathBuf {
    PathBuf::from(format!("d{:03}", k / 100)).join(format!("s{:02}", k % 100))
}

/// `count` leaf directories spread evenly over the `total`.
fn chosen(total: u64, count: u64) -> Vec<PathBuf> {
    (0..count).map(|j| leaf(j * total / count)).collect()
}

/// Run P1 on the base tree of `files` files at `base`.
pub fn run(
    env: &Env,
    spec: &Spec,
    base: &Path,
    files: u64,
    run_dir: &Path,
    logs: &Path,
    res: &mut WorkloadResult,
) -> Result<()> {
    let dst = run_dir.join("dst-cutover");
    let src = run_dir.join("src");
    eprintln!("  copying the base to the destination and to a fresh source (cp -a)");
    data::copy(base, &dst, &logs.join("copy-dst-cutover.log"))?;
    data::copy(base, &src, &logs.join("copy-src.log"))?;

    res.order.push("cutover full pass (nothing changed)".into());
    let delete = OsStr::new("--delete");
    let full = tools::cutover_local_with(
        env,
        "cutover full pass",
        &[delete],
        base,
        &dst,
        logs,
        "cutover-full",
    );
    let full_ok = full.ok();
    res.rsync = Some(full);
    if !full_ok {
        res.verify = Some(Verify::skipped("the full pass did not finish"));
        return Ok(());
    }

    let dirs = chosen(leaf_dirs(files), listed_dirs(files));
    let edit = spec.edit.clone().unwrap_or_default();
    let mut edits = Vec::new();
    for d in &dirs {
        edits.push(data::edit(
            &env.mkdata(),
            &src.join(d),
            &edit,
            &logs.join("edit.log"),
        )?);
    }
    res.edit = Some(format!(
        "in each of {} directories: {}",
        dirs.len(),
        edits.first().cloned().unwrap_or_default()
    ));
    res.source = data::walk(&src)?;
    let list = run_dir.join("changed.list");
    let text: String = dirs.iter().map(|d| format!("{}\n", d.display())).collect();
    fs::write(&list, text).with_context(|| format!("writing {}", list.display()))?;

    res.order
        .push(format!("cutover listed pass ({} directories)", dirs.len()));
    let listed: ToolRun = tools::cutover_local_with(
        env,
        "cutover listed pass",
        &[delete, OsStr::new("--files-from"), list.as_os_str()],
        &src,
        &dst,
        logs,
        "cutover",
    );
    let listed_ok = listed.ok();
    res.cutover = Some(listed);
    res.verify = Some(if listed_ok {
        tools::verify(env, "cutover's destination", &src, &dst, logs)
    } else {
        Verify::skipped("the listed pass did not finish")
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_directories_are_mkdatas_and_spread_out() {
        assert_eq!(leaf(0), PathBuf::from("d000/s00"));
        assert_eq!(leaf(9_999), PathBuf::from("d099/s99"));
        let c = chosen(10_000, 10);
        assert_eq!(c.len(), 10);
        assert_eq!(c[1], PathBuf::from("d010/s00"));
        assert_eq!(listed_dirs(1_000_000), 10);
        assert_eq!(listed_dirs(1_000), 1);
    }
}
