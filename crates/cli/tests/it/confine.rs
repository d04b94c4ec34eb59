//! Confinement beneath a destination or a daemon module: symlinks planted in a module
//! (pointing out of it, or staying inside), and a directory swapped for a symlink over and
//! over while a sync writes into it. Nothing may be read from or written outside.

use crate::util::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A module `m` holding `escape -> ../outside` and `inside -> sub`, and a secret outside.
struct Planted {
    t: tempfile::TempDir,
    src: std::path::PathBuf,
    module: std::path::PathBuf,
    outside: std::path::PathBuf,
    d: Daemon,
}

fn planted() -> Planted {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.0005"]);
    let module = t.path().join("module");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(module.join("sub")).unwrap();
    write(&outside.join("secret"), "do not read");
    std::os::unix::fs::symlink("../outside", module.join("escape")).unwrap();
    std::os::unix::fs::symlink("sub", module.join("inside")).unwrap();
    let top = format!("state_dir = \"{}\"\n", s(&t.path().join("state")));
    let d = Daemon::start_with_extra(&t.path().join("d"), &[Module::rw("m", &module)], &top, "");
    Planted {
        t,
        src,
        module,
        outside,
        d,
    }
}

#[test]
fn symlinks_planted_in_a_module_lead_nowhere_outside_it() {
    let x = planted();
    let before = snapshot(&x.outside);
    let pulled = x.t.path().join("pulled");
    for path in ["m/escape/", "m/escape/deeper/", "m/escape/secret"] {
        let out = sync(&[&slash(&x.src), &x.d.url(path)]);
        assert_one_line_error(&out, &["refused"]);
        assert!(
            out.err_lines()[0].contains("outside"),
            "the error should say why: {out}"
        );
        let out = sync(&[&x.d.url(path), &slash(&pulled)]);
        assert_ne!(out.code(), 0, "pull of {path} must be refused: {out}");
    }
    assert!(!pulled.join("secret").exists());
    assert_eq!(
        snapshot(&x.outside),
        before,
        "something changed outside the module"
    );

    // A link that stays inside the module is an ordinary way in, both ways.
    sync(&[&slash(&x.src), &x.d.url("m/inside/")]).ok();
    assert_same(&x.src, &x.module.join("sub"));
    sync(&[&x.d.url("m/inside/"), &slash(&pulled)]).ok();
    assert_same(&x.src, &pulled);
    assert_eq!(snapshot(&x.outside), before);
}

/// Swap `dst/d` for a symlink to `outside` and back, as fast as possible, until told to stop.
fn swap_until(dst: &Path, stop: &AtomicBool) -> usize {
    let d = dst.join("d");
    let held = dst.join("d.held");
    let mut swaps = 0;
    while !stop.load(Ordering::Relaxed) {
        if std::fs::rename(&d, &held).is_ok() {
            if std::os::unix::fs::symlink("../outside", &d).is_ok() {
                swaps += 1;
                std::thread::yield_now();
                let _ = std::fs::remove_file(&d);
            }
            // The receiver may have made a new `d` meanwhile; then `held` stays aside.
            let _ = std::fs::rename(&held, &d);
        }
    }
    swaps
}

#[test]
fn a_directory_swapped_for_a_symlink_during_a_sync_leads_nowhere() {
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..800 {
        write(&src.join(format!("d/f{i:04}")), random_bytes(i, 600));
    }
    for i in 0..6 {
        write(
            &src.join(format!("d/e/big{i}")),
            random_bytes(1000 + i, 300_000),
        );
    }
    let dst = t.path().join("dst");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(dst.join("d/e")).unwrap();
    write(&outside.join("keep"), "outside");
    let before = snapshot(&outside);

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (dst, stop) = (dst.clone(), stop.clone());
        std::thread::spawn(move || swap_until(&dst, &stop))
    };
    // Errors are expected while the swapper runs; only where bytes land matters.
    let racing = sync(&[&slash(&src), &slash(&dst)]);
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0, "the swapper never got a turn");
    assert_eq!(
        snapshot(&outside),
        before,
        "a write followed a planted symlink out of the destination ({swaps} swaps): {racing}"
    );

    // With the swapper stopped, the next run (removing what the race left aside) is exact.
    sync(&[&slash(&src), &slash(&dst), "--delete"]).ok();
    assert_same(&src, &dst);
}
