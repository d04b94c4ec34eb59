//! Names of cutover's own files inside a destination: partial files (resumable, renamed over
//! the target once complete and verified) and short-lived temporaries for links.
//!
//! Names are `.cutover.<16 hex of BLAKE3(name)>.part|.tmp`, so they fit any name length and
//! the walker can recognise and skip them on both sides.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

const PREFIX: &[u8] = b".cutover.";

fn internal_name(name: &OsStr, suffix: &str) -> OsString {
    let h = blake3::hash(name.as_bytes());
    let hex: String = h.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    OsString::from(format!(".cutover.{hex}.{suffix}"))
}

/// The name of the partial file that stands beside `name` while it is being written.
pub fn partial_name(name: &OsStr) -> OsString {
    internal_name(name, "part")
}

/// A temporary name beside `name` for objects created whole (symlinks, hard links).
pub fn temp_name(name: &OsStr) -> OsString {
    internal_name(name, "tmp")
}

/// Whether a directory entry is one of cutover's own files, never synced nor deleted by a pass.
pub fn is_internal(name: &OsStr) -> bool {
    let b = name.as_bytes();
    b.starts_with(PREFIX) && (b.ends_with(b".part") || b.ends_with(b".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_names_are_short_and_recognised() {
        let long = "x".repeat(255);
        let name = partial_name(OsStr::new(&long));
        assert!(name.len() < 40);
        assert!(is_internal(&name));
        assert!(is_internal(&temp_name(OsStr::new("a"))));
        assert!(!is_internal(OsStr::new("normal.part")));
        assert_ne!(partial_name(OsStr::new("a")), partial_name(OsStr::new("b")));
    }
}
