//! File names as the user sees them: escaped in text the way rsync does (`\#ooo` for control
//! characters and bytes that are not UTF-8), so one entry is one line; and the exact bytes in
//! base64 for `--json` when the name is not UTF-8.

use std::fmt::Write;

/// `name` for a terminal or a log: UTF-8 text as it is, except that control characters
/// (C0 but tab, DEL, C1) and bytes that are not valid UTF-8 become `\#` and three octal
/// digits per byte, and a backslash that would read as such an escape is escaped itself,
/// as rsync prints names. Unescaping gives the bytes back.
pub fn escape(name: &[u8]) -> String {
    let mut out = String::with_capacity(name.len());
    for chunk in name.utf8_chunks() {
        let valid = chunk.valid();
        for (at, c) in valid.char_indices() {
            let control = (c < ' ' && c != '\t') || ('\u{7f}'..='\u{9f}').contains(&c);
            let looks_escaped = c == '\\' && looks_like_escape(&valid.as_bytes()[at + 1..]);
            if control || looks_escaped {
                let mut buf = [0; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    octal(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            octal(&mut out, b);
        }
    }
    out
}

/// `#` and three octal digits: what follows a backslash in an escape.
fn looks_like_escape(rest: &[u8]) -> bool {
    rest.len() >= 4 && rest[0] == b'#' && rest[1..4].iter().all(|b| (b'0'..=b'7').contains(b))
}

fn octal(out: &mut String, b: u8) {
    let _ = write!(out, "\\#{b:03o}");
}

/// The exact bytes of `name` in base64 (RFC 4648, with padding) when it is not UTF-8: what
/// `--json` puts in `path_b64` beside the lossy `path`.
pub fn b64_unless_utf8(name: &[u8]) -> Option<String> {
    std::str::from_utf8(name).is_err().then(|| base64(name))
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for group in data.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_as_rsync_does() {
        assert_eq!(escape(b"plain/na me\tx"), "plain/na me\tx");
        assert_eq!(escape(b"a\nb"), "a\\#012b");
        assert_eq!(escape(b"\x01\x7f"), "\\#001\\#177");
        assert_eq!(escape(b"bad\xff\xfe"), "bad\\#377\\#376");
        assert_eq!(escape("ü\u{85}".as_bytes()), "ü\\#302\\#205");
        assert_eq!(escape(b"x\\#012"), "x\\#134#012");
        assert_eq!(escape(b"x\\n"), "x\\n");
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (data, b64) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\xff\xfe\x00", "//4A"),
        ] {
            assert_eq!(base64(data), b64);
        }
        assert_eq!(b64_unless_utf8(b"ok"), None);
        assert_eq!(b64_unless_utf8(b"\xff").as_deref(), Some("/w=="));
    }
}
