//! Volumes: a block device (a loop device over an image file) as destination — full copy, then
//! an in-place positional delta — and as source. Skipped with a note where loop devices
//! cannot be set up (no root, no loop driver).

use crate::util::*;
use std::path::Path;
use std::process::Command;

/// A loop device over `image`, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", s(image)])
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "note: losetup failed ({}); volume test skipped",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_is_written_in_place_then_delta_updated_and_read_as_source() {
    let t = tmp();
    let src = t.path().join("disk.img");
    write(&src, random_bytes(7, 16 << 20));
    let image = t.path().join("dev.img");
    write(&image, vec![0u8; 16 << 20]);
    let Some(dev) = Loop::attach(&image) else {
        return;
    };

    sync(&[s(&src), &dev.0]).ok();
    assert_eq!(
        hash_file(Path::new(&dev.0)),
        hash_file(&src),
        "full copy onto the device differs"
    );

    // Rewrite 5000 bytes in the middle: only the touched 4 KiB blocks travel.
    let mut data = std::fs::read(&src).expect("read image");
    data[(5 << 20)..(5 << 20) + 5000].fill(b'x');
    write(&src, &data);
    let out = sync_json(&[s(&src), &dev.0]);
    out.ok();
    assert_eq!(
        hash_file(Path::new(&dev.0)),
        hash_file(&src),
        "delta onto the device differs"
    );
    assert!(
        out.stat("bytes_literal") <= 3 * 4096,
        "in-place delta sent too much:\n{out}"
    );
    // The device node itself is still a block device (never renamed over).
    let md = std::fs::metadata(&dev.0).expect("stat device");
    assert!(std::os::unix::fs::FileTypeExt::is_block_device(
        &md.file_type()
    ));

    // And the device as a source: sized by ioctl, read as a volume.
    let back = t.path().join("back.img");
    sync(&[&dev.0, s(&back)]).ok();
    assert_eq!(
        hash_file(&back),
        hash_file(&src),
        "reading the device back differs"
    );
}
