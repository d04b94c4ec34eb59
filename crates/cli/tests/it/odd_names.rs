//! Names with a newline, a control character, bytes that are not UTF-8 and a backslash that
//! looks like an escape: copied exactly; `-v` prints each on one line escaped as rsync does
//! (`\#ooo`); `--json` carries the exact bytes in `path_b64` when a name is not UTF-8.

use crate::util::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// (name on disk, as `-v` shows it, `path_b64` in `--json` if any)
const NAMES: &[(&[u8], &str, Option<&str>)] = &[
    (b"new\nline", "new\\#012line", None),
    (b"ctl\x01x", "ctl\\#001x", None),
    (
        b"bad\xff\xfename",
        "bad\\#377\\#376name",
        Some("YmFk//5uYW1l"),
    ),
    (b"back\\#012slash", "back\\#134#012slash", None),
    (b"tab\there", "tab\there", None),
];

fn odd_tree(dir: &Path) {
    for (i, (name, _, _)) in NAMES.iter().enumerate() {
        write(&dir.join(OsStr::from_bytes(name)), format!("file {i}\n"));
    }
    write(
        &dir.join(OsStr::from_bytes(b"dir\nwith\xffodd"))
            .join("inner"),
        "x",
    );
}

#[test]
fn verbose_escapes_odd_names_and_the_copy_is_exact() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    odd_tree(&src);
    let out = sync(&["-v", &slash(&src), &slash(&dst)]);
    out.ok();
    assert_same(&src, &dst);
    let lines: Vec<&str> = out.stdout.lines().collect();
    for (_, shown, _) in NAMES {
        let line = format!("send   {shown}");
        assert!(lines.contains(&line.as_str()), "no line {line:?}\n{out}");
    }
    assert!(
        lines.contains(&"send   dir\\#012with\\#377odd/inner"),
        "{out}"
    );
    // Every itemised line is one entry: no name was split by a raw newline.
    let items = lines.iter().filter(|l| l.starts_with("send ")).count();
    assert_eq!(items, NAMES.len() + 1, "{out}");
}

#[test]
fn json_carries_the_exact_bytes_of_names_that_are_not_utf8() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    odd_tree(&src);
    let out = sync_json(&[&slash(&src), &slash(&dst)]);
    out.ok();
    let items = out.events("item");
    for (name, _, b64) in NAMES {
        let lossy = String::from_utf8_lossy(name);
        let item = items
            .iter()
            .find(|i| i["path"] == *lossy)
            .unwrap_or_else(|| panic!("no item for {lossy:?}\n{out}"));
        assert_eq!(item["path_b64"].as_str(), *b64, "{item}");
    }
}

#[test]
fn deletes_reported_by_a_daemon_keep_their_bytes() {
    let t = tmp();
    let (src, module) = (t.path().join("src"), t.path().join("module"));
    write(&src.join("keep.txt"), "keep\n");
    odd_tree(&module);
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let out = sync_json(&["--delete", &slash(&src), &d.url("m/")]);
    out.ok();
    let deleted: Vec<_> = out
        .events("item")
        .into_iter()
        .filter(|i| i["action"] == "delete")
        .collect();
    assert!(
        deleted.iter().any(|i| i["path_b64"] == "YmFk//5uYW1l"),
        "{out}"
    );
    assert!(deleted.iter().any(|i| i["path"] == "new\nline"), "{out}");
    assert_same_with(&src, &module, &["--delete"]);
    // The same in text: escaped, one line each.
    odd_tree(&module);
    let out = sync(&["-v", "--delete", &slash(&src), &d.url("m/")]);
    out.ok();
    assert!(out.stdout.contains("delete bad\\#377\\#376name\n"), "{out}");
    assert!(out.stdout.contains("delete new\\#012line\n"), "{out}");
}
