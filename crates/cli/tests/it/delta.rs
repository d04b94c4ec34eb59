//! Re-syncs after each mkdata edit mode: the result matches the source (with --delete), and
//! for in-place block edits and inserts only a fraction of the large files is sent literally.

use crate::util::*;
use std::path::Path;

/// The 9 MiB random file plus the 9 MiB text file.
const BIG_BYTES: u64 = 18 << 20;

/// A tree with one 9 MiB random file, one 9 MiB text file and small files, synced once.
fn synced_tree(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = root.join("src");
    let dst = root.join("dst");
    mkdata(&["big", s(&src.join("random")), "--count", "1", "--mb", "9"]);
    mkdata(&[
        "big",
        s(&src.join("text")),
        "--count",
        "1",
        "--mb",
        "9",
        "--text",
        "--seed",
        "2",
    ]);
    mkdata(&[
        "tree",
        s(&src.join("small")),
        "--files",
        "60",
        "--seed",
        "3",
    ]);
    sync_json(&[&slash(&src), &slash(&dst)]).ok();
    assert_same(&src, &dst);
    (src, dst)
}

/// Edit the source with mkdata, re-sync with --delete, check with the oracle; returns the run.
fn edit_and_resync(mode: &str, extra: &[&str]) -> Out {
    let t = tmp();
    let (src, dst) = synced_tree(t.path());
    let before = snapshot(&src);
    let mut args = vec!["edit", s(&src), "--mode", mode, "--seed", "11"];
    args.extend_from_slice(extra);
    mkdata(&args);
    assert_ne!(before, snapshot(&src), "mkdata edit {mode} changed nothing");
    let out = sync_json(&["--delete", &slash(&src), &slash(&dst)]);
    out.ok();
    assert_same_with(&src, &dst, &["--delete"]);
    assert!(
        out.stat("files_sent") + out.stat("files_meta_only") > 0,
        "{out}"
    );
    out
}

fn assert_delta_small(out: &Out) {
    let literal = out.stat("bytes_literal");
    assert!(
        literal < BIG_BYTES / 4,
        "{literal} literal bytes for edits in {BIG_BYTES} bytes of large files: delta did not work\n{out}"
    );
    assert!(out.stat("bytes_copied_from_basis") > BIG_BYTES / 2, "{out}");
}

#[test]
fn resync_after_block_edits_is_exact_and_sends_little() {
    let out = edit_and_resync("blocks", &[]);
    assert_delta_small(&out);
}

#[test]
fn resync_after_inserts_is_exact_and_sends_little() {
    let out = edit_and_resync("insert", &[]);
    assert_delta_small(&out);
}

#[test]
fn resync_after_append_is_exact() {
    let out = edit_and_resync("append", &[]);
    assert!(out.stat("bytes_literal") < BIG_BYTES / 4, "{out}");
}

#[test]
fn resync_after_small_file_rewrites_deletes_and_renames_is_exact() {
    let out = edit_and_resync("files", &["--pct", "20"]);
    assert!(out.stat("deleted") > 0, "{out}");
}

#[test]
fn resync_after_touch_is_exact() {
    edit_and_resync("touch", &["--pct", "20"]);
}

/// `--checksum` compares same-size files by their hashes: identical files are not sent again
/// (they were, in full, when small), and a change that keeps size and mtime is found.
#[test]
fn checksum_sends_only_files_whose_content_differs() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&[
        "tree",
        s(&src),
        "--files",
        "60",
        "--min-kb",
        "1",
        "--max-kb",
        "64",
    ]);
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    let again = sync_json(&["-c", &slash(&src), &slash(&dst)]);
    again.ok();
    assert_eq!(again.stat("bytes_literal"), 0, "{again}");
    // Same size, same mtime, one byte different: only --checksum can tell.
    let victim = std::fs::read_dir(src.join("d000/s00"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let theirs = dst.join(victim.strip_prefix(&src).unwrap());
    corrupt_behind_size_and_mtime(&theirs, 0);
    assert!(
        rsync_diff_with(&src, &dst, &[]).contains(victim.file_name().unwrap().to_str().unwrap())
    );
    let fixed = sync_json(&["-c", &slash(&src), &slash(&dst)]);
    fixed.ok();
    let literal = fixed.stat("bytes_literal");
    assert!(literal > 0 && literal <= 64 << 10, "{fixed}");
    assert_same(&src, &dst);
}

/// Change one byte of `path` at `at`, keeping its size and mtime: a change only a content
/// comparison can see.
pub(crate) fn corrupt_behind_size_and_mtime(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    std::fs::write(path, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

/// `(action, path)` of every item a dry run with `args` lists, sorted.
fn dry_items(args: &[&str]) -> Vec<(String, String)> {
    let mut all = vec!["-n"];
    all.extend_from_slice(args);
    let out = sync_json(&all);
    out.ok();
    let mut items: Vec<(String, String)> = out
        .events("item")
        .iter()
        .map(|v| {
            (
                v["action"].as_str().unwrap_or_default().to_string(),
                v["path"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    items.sort();
    items
}

fn delta(path: &str) -> (String, String) {
    ("delta".into(), path.into())
}

/// `-n -c` is exact: the receiver hashes its same-size files, the sender compares them with
/// its own, and only files whose content differs are listed. Locally, pushing to a real
/// daemon (the sender reports) and pulling from it (the receiver reports).
#[test]
fn dry_run_with_checksum_lists_exactly_the_files_whose_content_differs() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&[
        "tree",
        s(&src),
        "--files",
        "40",
        "--min-kb",
        "1",
        "--max-kb",
        "64",
    ]);
    // More than one 1 MiB leaf, and a change in the last one.
    write(&src.join("big.bin"), random_bytes(5, (3 << 20) + 100));
    let local = t.path().join("local");
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let url = d.url("m/copy/");
    sync(&[&slash(&src), &slash(&local)]).ok();
    sync(&[&slash(&src), &url]).ok();
    let (src_, local_) = (slash(&src), slash(&local));

    // Equal trees: nothing, in every direction.
    assert_eq!(dry_items(&["-c", &src_, &local_]), vec![]);
    assert_eq!(dry_items(&["-c", &src_, &url]), vec![]);
    assert_eq!(dry_items(&["-c", &url, &local_]), vec![]);

    let victim = std::fs::read_dir(src.join("d000/s00"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .min()
        .expect("a file in d000/s00");
    let victim_rel = victim
        .strip_prefix(&src)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    corrupt_behind_size_and_mtime(&local.join(&victim_rel), 0);
    corrupt_behind_size_and_mtime(&module.join("copy/big.bin"), (3 << 20) + 50);
    let local_before = snapshot(&local);

    // Size and mtime alone see nothing...
    assert_eq!(dry_items(&[&src_, &local_]), vec![]);
    // ...the comparison sees exactly the changed files.
    assert_eq!(dry_items(&["-c", &src_, &local_]), vec![delta(&victim_rel)]);
    assert_eq!(dry_items(&["-c", &src_, &url]), vec![delta("big.bin")]);
    assert_eq!(
        dry_items(&["-c", &url, &local_]),
        vec![delta("big.bin"), delta(&victim_rel)]
    );

    // Same content with another mtime is a metadata change, not a content one.
    std::fs::File::options()
        .write(true)
        .open(local.join("big.bin"))
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30))
        .unwrap();
    assert_eq!(
        dry_items(&["-c", &src_, &local_]),
        vec![delta(&victim_rel), ("meta".into(), "big.bin".into())]
    );
    // A dry run changed nothing (the bytes differ still, the mtime is still the odd one).
    let after = snapshot(&local);
    assert_eq!(
        after.len(),
        local_before.len(),
        "the dry runs created or removed entries"
    );
    assert_ne!(
        hash_file(&local.join(&victim_rel)),
        hash_file(&victim),
        "a dry run repaired the file"
    );

    // And the real run repairs exactly what the dry run listed.
    let fixed = sync_json(&["-c", &src_, &local_]);
    fixed.ok();
    assert_same(&src, &local);
    assert_eq!(dry_items(&["-c", &src_, &local_]), vec![]);
}
