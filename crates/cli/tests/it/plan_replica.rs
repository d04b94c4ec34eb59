//! A plan's `replica` task between two real daemons on loopback replicating a 64 MiB
//! volume: presync connects and measures the link and predicts the cutover; the cutover
//! (between `pre_final` and `post_final` hooks) drains, verifies the blocks written since
//! presync, demotes the old primary and promotes its peer, and reports the downtime against
//! the prediction. A verify that finds a difference, and a destination daemon that is gone,
//! stop it before the promotion: the old primary stays primary and writable.

use crate::plan::plan;
use crate::replication::{
    have_qemu, qemu_io, same_backings, sock, status, synced_pair, volume, Node,
};
use crate::util::*;
use std::path::{Path, PathBuf};

/// A plan moving volume "db" from `a` to its peer "b", with hooks that leave marker files.
fn replica_plan(dir: &Path, a: &Node, b: &Node) -> PathBuf {
    let p = dir.join("move.toml");
    std::fs::write(
        &p,
        format!(
            "[[task]]\nname = \"db-disk\"\nkind = \"replica\"\nsource = \"volume:db\"\n\
             volume_config = \"{}\"\ndestination = \"b\"\ndestination_config = \"{}\"\n\
             [[pre_final]]\ncommand = \"touch pre_final.done\"\n\
             [[post_final]]\ncommand = \"test -f pre_final.done && touch post_final.done\"\n",
            s(&a.config),
            s(&b.config)
        ),
    )
    .unwrap();
    p
}

#[test]
fn a_replica_task_presyncs_and_cuts_a_volume_over_to_its_peer() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (a, _da, b, _db) = synced_pair(t.path(), "");
    // A disconnected link: presync connects it.
    volume(&a, &["disconnect", "db", "b"]).ok();
    let p = replica_plan(t.path(), &a, &b);
    plan(&["check", s(&p)]).ok();
    let out = plan(&[
        "presync",
        s(&p),
        "--until-under",
        "30s",
        "--max-passes",
        "5",
    ]);
    out.ok();
    assert!(out.stdout.contains("ready for cutover"), "{out}");
    assert!(out.stdout.contains("prediction for db-disk: "), "{out}");
    assert!(out.stdout.contains("drain "), "{out}");
    let log = std::fs::read_to_string(t.path().join("move.state/logs/db-disk.log")).unwrap();
    assert!(
        log.contains("the link to b was disconnected: connected it"),
        "{log}"
    );
    assert!(log.contains("out of sync, lag"), "{log}");
    // Presync marked the volume just before it predicted: nothing to verify yet.
    assert!(
        out.stdout.contains("at presync: drain ")
            && out
                .stdout
                .contains("+ verify 0.0 s (0 B written since the presync mark)"),
        "{out}"
    );
    // The application writes after presync began: those blocks (whole 16 KiB blocks) are
    // what the cutover verifies.
    let w = qemu_io(
        &sock(&a),
        &["write -P 0x5a 5M 192k", "write -P 0x6b 40M 4k"],
    );
    assert!(w.status.success(), "{w:?}");

    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert!(t.path().join("pre_final.done").exists() && t.path().join("post_final.done").exists());
    assert!(out.stdout.contains("downtime "), "{out}");
    assert!(out.stdout.contains("predicted "), "{out}");
    // The prediction the downtime is compared against was made at the cutover's start,
    // before the pre_final hooks: it verifies what was written since presync.
    let predicted = out
        .stdout
        .lines()
        .find(|l| l.starts_with("prediction for db-disk: "))
        .unwrap_or_else(|| panic!("no prediction line: {out}"));
    assert!(
        predicted.contains(", at the cutover's start: drain ")
            && predicted.contains(" (208.0 KiB written since the presync mark, at "),
        "{predicted}"
    );
    let log = std::fs::read_to_string(t.path().join("move.state/logs/db-disk.log")).unwrap();
    assert!(
        log.contains("verify blocks: 208.0 KiB compared, the same on both sides"),
        "{log}"
    );
    assert!(log.contains("b is primary, the source secondary"), "{log}");
    // The cutover's measurements keep the prediction they were compared against.
    let kept: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(t.path().join("move.state/replica/db-disk.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(kept["made"], "cutover", "{kept}");
    assert_eq!(kept["predicted"]["made"], "cutover_start", "{kept}");
    assert_eq!(kept["predicted"]["verify_bytes"], 208 * 1024, "{kept}");
    assert_eq!(status(&b)["role"], "primary");
    assert_eq!(status(&a)["role"], "secondary");
    let data = same_backings(&a, &b);
    assert!(data[(5 << 20)..(5 << 20) + 192 * 1024]
        .iter()
        .all(|&x| x == 0x5a));
    // The new primary takes writes; the old one follows it.
    let w = qemu_io(&sock(&b), &["write -P 0x7c 1M 64k"]);
    assert!(w.status.success(), "{w:?}");
    let report = std::fs::read_to_string(
        std::fs::read_dir(t.path().join("move.state/logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.to_string_lossy().contains("report-") && p.extension().is_some_and(|e| e == "md")
            })
            .max()
            .unwrap(),
    )
    .unwrap();
    assert!(
        report.contains("downtime") && report.contains(predicted),
        "{report}"
    );
}

#[test]
fn a_failed_replica_cutover_leaves_the_old_primary_primary_and_writable() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (a, _da, b, db) = synced_pair(t.path(), "");
    let p = replica_plan(t.path(), &a, &b);
    plan(&["presync", s(&p)]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x21 2M 64k"]);
    assert!(w.status.success(), "{w:?}");
    crate::replication::wait_in_step(&a, &b, "after the write");
    // Rot on the destination, behind the link's back: the verify must see it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.image)
            .unwrap();
        f.write_all_at(&[0xee; 512], (2 << 20) + 4096).unwrap();
    }
    let out = plan(&["cutover", s(&p)]);
    assert_eq!(out.code(), 3, "{out}");
    assert!(
        out.stdout
            .contains("stopped before the promotion: verify: 1 piece(s)")
            && out.stdout.contains("the source is still primary"),
        "{out}"
    );
    assert!(!t.path().join("post_final.done").exists());
    assert_eq!(status(&a)["role"], "primary");
    assert_eq!(status(&b)["role"], "secondary");
    let w = qemu_io(&sock(&a), &["write -P 0x22 3M 4k"]);
    assert!(w.status.success(), "the old primary refuses writes: {w:?}");

    // The destination's daemon is gone: nothing is demoted.
    drop(db);
    let out = plan(&["cutover", s(&p)]);
    assert_eq!(out.code(), 3, "{out}");
    assert!(out.stdout.contains("destination: "), "{out}");
    assert_eq!(status(&a)["role"], "primary");
    let w = qemu_io(&sock(&a), &["write -P 0x23 4M 4k"]);
    assert!(w.status.success(), "the old primary refuses writes: {w:?}");
}

#[test]
fn a_replica_task_reaches_the_destination_daemon_over_ssh() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let (a, _da, b, _db) = synced_pair(t.path(), "");
    let p = t.path().join("move.toml");
    std::fs::write(
        &p,
        format!(
            "[[task]]\nname = \"db-disk\"\nkind = \"replica\"\nsource = \"volume:db\"\n\
             volume_config = \"{}\"\ndestination = \"b\"\ndestination_config = \"{}\"\n\
             destination_ssh = \"root@127.0.0.1\"\nssh_command = \"{}\"\nremote_cutover = \"{}\"\n",
            s(&a.config),
            s(&b.config),
            sshd.rsh(),
            bin()
        ),
    )
    .unwrap();
    plan(&["presync", s(&p)]).ok();
    let logins = sshd.logins();
    assert!(logins > 0, "presync asked the destination nothing over ssh");
    let w = qemu_io(&sock(&a), &["write -P 0x44 3M 64k"]);
    assert!(w.status.success(), "{w:?}");
    plan(&["cutover", s(&p)]).ok();
    assert!(
        sshd.logins() > logins,
        "the cutover did not reach the destination over ssh"
    );
    assert_eq!(status(&b)["role"], "primary");
    assert_eq!(status(&a)["role"], "secondary");
    same_backings(&a, &b);
}
