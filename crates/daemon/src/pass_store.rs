//! The file that keeps a volume's sync destinations across daemon restarts (beside its
//! metadata, `NAME.passes`): for each destination a pass confirmed, the bitmap generation it
//! is current with and the blocks it still lacks from earlier generations.
//!
//! Layout (little-endian): magic `CUTPASS1`; `u32` count; per destination `u32` key length,
//! the key, `u64` generation, `u64` bitmap length, the bitmap (empty: nothing owed); then
//! the first 16 bytes of a BLAKE3 of everything before. Written to a temporary file,
//! `fsync`ed and renamed over the old one, so a crash leaves the old file or the new one.
//!
//! A record is only used while its generation is the volume's current bitmap generation:
//! the metadata's bitmap then holds every block written since (after a crash, a superset),
//! so "owed ∪ bitmap" is what the destination lacks. A file older than the last mark names
//! an earlier generation, and its destinations get a full pass: a stale file is never
//! trusted, only ignored.

use std::io::{self, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"CUTPASS1";
const SUM: usize = 16;

/// One destination as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Saved {
    pub destination: String,
    pub gen: u64,
    /// The owed bitmap's bytes; empty when nothing is owed.
    pub owed: Vec<u8>,
}

pub(crate) fn encode(records: &[Saved]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for r in records {
        out.extend_from_slice(&(r.destination.len() as u32).to_le_bytes());
        out.extend_from_slice(r.destination.as_bytes());
        out.extend_from_slice(&r.gen.to_le_bytes());
        out.extend_from_slice(&(r.owed.len() as u64).to_le_bytes());
        out.extend_from_slice(&r.owed);
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..SUM]);
    out
}

/// The records, or None for anything but a whole, intact file of this layout.
pub(crate) fn decode(bytes: &[u8]) -> Option<Vec<Saved>> {
    let body_len = bytes.len().checked_sub(SUM)?;
    let (body, sum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes()[..SUM] != *sum {
        return None;
    }
    let mut rest = body.strip_prefix(MAGIC.as_slice())?;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = (rest.get(..n)?, rest.get(n..)?);
        rest = b;
        Some(a)
    };
    let u32_of = |b: &[u8]| b.try_into().ok().map(u32::from_le_bytes);
    let u64_of = |b: &[u8]| b.try_into().ok().map(u64::from_le_bytes);
    let count = u32_of(take(4)?)?;
    let mut records = Vec::new();
    for _ in 0..count {
        let key_len = u32_of(take(4)?)? as usize;
        let destination = String::from_utf8(take(key_len)?.to_vec()).ok()?;
        let gen = u64_of(take(8)?)?;
        let owed_len = usize::try_from(u64_of(take(8)?)?).ok()?;
        let owed = take(owed_len)?.to_vec();
        records.push(Saved {
            destination,
            gen,
            owed,
        });
    }
    rest.is_empty().then_some(records)
}

/// Replace the file at `path` with `records`, durably.
pub(crate) fn save(path: &Path, records: &[Saved]) -> io::Result<()> {
    let tmp = path.with_extension("passes.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&encode(records))?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The records saved at `path`: none when there is no file; an error for a damaged one.
pub(crate) fn load(path: &Path) -> io::Result<Vec<Saved>> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not a sync-destination file of this version, or damaged",
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_any_damage_is_refused() {
        let records = vec![
            Saved {
                destination: "cutover://10.0.0.2:8730/images/db.img".into(),
                gen: 0x1234_5678_9abc_def0,
                owed: vec![0, 1, 0x80],
            },
            Saved {
                destination: "/mnt/copy/db.img".into(),
                gen: 7,
                owed: Vec::new(),
            },
        ];
        let bytes = encode(&records);
        assert_eq!(decode(&bytes), Some(records.clone()));
        assert_eq!(decode(&encode(&[])), Some(Vec::new()));
        for cut in [0, 5, bytes.len() / 2, bytes.len() - 1] {
            assert_eq!(decode(&bytes[..cut]), None, "cut at {cut}");
        }
        for flip in [0, 9, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[flip] ^= 1;
            assert_eq!(decode(&b), None, "bit flipped at {flip}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.passes");
        assert_eq!(load(&path).unwrap(), Vec::new());
        save(&path, &records).unwrap();
        assert_eq!(load(&path).unwrap(), records);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(load(&path).is_err());
    }
}
