//! Nothing lost: paths a new user tried that destroyed or damaged data. Each test fails
//! without its fix: a file named as the destination of a tree, hard-link groups re-created
//! on every run, sparse files densified by a delta, partial files left forever.

use crate::util::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A small tree to copy.
fn small_tree(src: &Path) {
    write(&src.join("a.txt"), "a\n");
    write(&src.join("d/b.txt"), "b\n");
}

/// `sync dir/ afile` refuses before writing anything: one line, exit 1, `afile` untouched,
/// nothing left beside it; the same for a FIFO or a symlink named as the destination, in a
/// dry run, a second run, and through a daemon in both directions.
#[test]
fn a_file_named_as_the_destination_of_a_tree_is_refused_and_kept() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let place = t.path().join("place");
    std::fs::create_dir(&place).unwrap();
    let afile = place.join("afile");
    write(&afile, "precious\n");
    let outside = t.path().join("outside.txt");
    write(&outside, "outside\n");
    let link = place.join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo = place.join("fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let before = snapshot(&place);
    for dst in [&afile, &link, &fifo] {
        for args in [
            vec![slash(&src), s(dst).to_string()],
            vec![s(&src).to_string(), s(dst).to_string()],
            vec!["-n".to_string(), slash(&src), s(dst).to_string()],
        ] {
            // Twice: a second run once "succeeded" over what the first had left.
            for _ in 0..2 {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = sync(&a);
                out.expect_code(1);
                assert_one_line_error(&out, &[s(dst), "the source is a directory"]);
                assert_eq!(before, snapshot(&place), "{out}");
            }
        }
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside\n");

    // Push to a daemon whose module holds a file at the destination path.
    let module = t.path().join("module");
    write(&module.join("afile"), "precious\n");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let before_module = snapshot(&module);
    let out = sync(&[&slash(&src), &d.url("m/afile")]);
    out.expect_code(1);
    assert_one_line_error(&out, &["afile", "the source is a directory"]);
    assert_eq!(before_module, snapshot(&module));

    // Pull a module directory into a local file.
    let out = sync(&[&d.url("m/"), s(&afile)]);
    out.expect_code(1);
    assert_one_line_error(&out, &["afile", "the source is a directory"]);
    assert_eq!(before, snapshot(&place));
}

/// Whether any `.cutover.*` name is left anywhere beneath `root`.
pub fn leftovers(root: &Path) -> Vec<String> {
    snapshot(root)
        .keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".cutover."))
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// Inode and link count of every regular file beneath `root`.
pub fn inodes(root: &Path) -> Vec<(String, u64, u64)> {
    snapshot(root)
        .keys()
        .filter_map(|p| {
            let md = std::fs::symlink_metadata(root.join(p)).ok()?;
            md.is_file()
                .then(|| (p.display().to_string(), md.ino(), md.nlink()))
        })
        .collect()
}
