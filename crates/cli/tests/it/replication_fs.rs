//! A filesystem on a replicated volume, then a switchover: two daemons keep volume "db" in
//! step (protocol C); ext4 is made and a tree copied in through the primary's export
//! (qemu-storage-daemon's FUSE export and a loop device, as in `volume_fs`). While it is
//! mounted, `cutover volume secondary` is refused in one line (an NBD client is attached).
//! Once it is unmounted and the export detached, the primary steps down and the peer is
//! promoted: the peer's backing file alone must pass `e2fsck -fn` and, mounted read-only,
//! hold the tree exactly; the old primary then follows the new one and ends identical.
//! Skipped with a note where the machine cannot do it (see `volume_fs`).

use crate::replication::{have_qemu, same_backings, status, synced_pair, volume, wait_in_step};
use crate::util::*;
use crate::volume_fs::{missing, skip, Stack};

#[test]
fn ext4_made_on_the_primary_is_whole_on_the_peer_after_a_switchover() {
    if let Some(why) = missing() {
        return skip(&why);
    }
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let dir = t.path();
    let (a, _da, b, _db) = synced_pair(dir, "protocol = \"C\"\n");

    let mut stack = Stack::default();
    let fs = match stack.ext4_with_tree(dir, &a.dir.join("state").join("db.sock")) {
        Ok(fs) => fs,
        Err(why) => return skip(&why),
    };

    // The filesystem is in use: the primary may not step down under it.
    let out = volume(&a, &["secondary", "db"]);
    assert_one_line_error(&out, &["1 NBD client(s) attached", "detach"]);
    assert_eq!(status(&a)["role"], "primary");

    stack.unmount(&fs);
    volume(&a, &["secondary", "db"]).ok();
    volume(&b, &["primary", "db"]).ok();

    // What protocol C acknowledged is on the peer: its backing alone holds the filesystem.
    stack.assert_holds_tree(&b.image, &fs.src, &dir.join("back"));
    let sb = status(&b);
    assert_eq!(
        (&sb["role"], &sb["disk"]),
        (&"primary".into(), &"UpToDate".into())
    );
    // The old primary follows the new one.
    wait_in_step(&b, &a, "after the switchover");
    same_backings(&a, &b);
}
