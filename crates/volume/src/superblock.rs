//! The superblock: what a volume is (id, size, block size, node id, layout), whether it was
//! shut down cleanly, its generation ids, and one entry per peer slot.
//!
//! Two 4 KiB copies sit at offsets 0 and 4096. Each write takes the next sequence number
//! and goes to copy `seq % 2`, so it overwrites the *older* copy: a write torn by a power
//! cut damages only itself and the other copy still holds the previous state. Reading
//! takes the valid copy (magic, version, BLAKE3 of the rest) with the highest sequence.
//!
//! Copy layout (little-endian):
//!
//! ```text
//!    0  magic "CUTVOLMD"              8   160  reserved (zero) up to 256
//!    8  version (1)                   4   256  peer slots: 32 × 64 bytes
//!   12  copy size (4096)              4          +0 flags (bit 0 = in use)   4
//!   16  sequence number               8          +4 peer node id            4
//!   24  flags (see below)             4          +8 bitmap generation id    8
//!   28  node id                       4         +16 bitmap history, 2 ids  16
//!   32  volume id (random)           16         +32 reserved (zero)        32
//!   48  size in bytes                 8  2304  reserved (zero) up to 4064
//!   56  block size                    4  4064  BLAKE3 of bytes 0..4064    32
//!   60  extent shift (22 = 4 MiB)     4
//!   64  peer slots with a bitmap      4
//!   68  hot extents (AL size)         4
//!   72  AL ring transactions          4
//!   76  reserved (zero)               4
//!   80  AL floor: first valid seq     8
//!   88  AL offset                     8
//!   96  bitmap offset                 8
//!  104  bitmap bytes per slot         8
//!  112  current generation id         8
//!  120  history generation ids, 4    32
//!  152  marks made                    8
//! ```
//!
//! Flags: bit 0 = clean shutdown, bit 1 = primary, bit 2 = inconsistent (a resync into
//! this node has not finished), bit 3 = seeded (inconsistent, but holding a copy of the
//! peer's data made beforehand: its first resync compares checksums), bit 4 = outdated
//! (consistent, but the primary went ahead without it: pull-ahead).
//!
//! Generation ids are random 64-bit values, 0 meaning "none". Per slot, the bitmap holds
//! every block written since generation `bitmap_gen` began; `history` keeps the volume's
//! earlier current ids (newest first) and each slot its earlier bitmap ids, so that
//! "Volumes 2/3" can apply DRBD's table on connect.

use crate::layout::{Geometry, EXTENT_SHIFT, MAX_PEER_SLOTS, PAGE};

pub const MAGIC: &[u8; 8] = b"CUTVOLMD";
pub const VERSION: u32 = 1;
/// Generation ids kept in the volume's history.
pub const HISTORY: usize = 4;
/// Earlier bitmap ids kept per slot.
pub const SLOT_HISTORY: usize = 2;
pub const FLAG_CLEAN: u32 = 1;
/// The node is primary: it exports the volume read-write and replicates to its peers.
pub const FLAG_PRIMARY: u32 = 2;
/// A resync into this node has not finished: its data may be a mix of old and new.
pub const FLAG_INCONSISTENT: u32 = 4;
/// The data was copied from the peer beforehand (`create-md --seeded-from`): the full
/// resync that makes it consistent sends only blocks whose checksums differ.
pub const FLAG_SEEDED: u32 = 8;
/// Consistent but old: the primary pulled ahead (put writes in its bitmap instead of
/// sending them) and the resync that catches up has not finished.
pub const FLAG_OUTDATED: u32 = 16;
pub const SLOT_IN_USE: u32 = 1;

pub(crate) const SUM_AT: usize = 4064;
const SLOTS_AT: usize = 256;
const SLOT_LEN: usize = 64;

/// One peer slot: a bitmap region and the generation ids that say what it is relative to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerSlot {
    pub flags: u32,
    pub peer_node: u32,
    pub bitmap_gen: u64,
    pub history: [u64; SLOT_HISTORY],
}

impl PeerSlot {
    pub fn in_use(&self) -> bool {
        self.flags & SLOT_IN_USE != 0
    }
}

/// A decoded superblock copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub flags: u32,
    pub node_id: u32,
    pub volume_id: [u8; 16],
    pub size: u64,
    pub block_size: u32,
    pub extent_shift: u32,
    pub peer_slots: u32,
    pub al_extents: u32,
    pub al_ring: u32,
    pub al_floor: u64,
    pub al_offset: u64,
    pub bitmap_offset: u64,
    pub bitmap_slot_len: u64,
    pub current_gen: u64,
    pub history: [u64; HISTORY],
    pub marks: u64,
    pub slots: [PeerSlot; MAX_PEER_SLOTS as usize],
}

/// Why one copy was not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyError {
    /// No magic: never written, or not a metadata file at all.
    Magic,
    /// The magic is there but the checksum does not match: torn or damaged.
    Checksum,
    /// A format this code does not know.
    Version(u32),
    /// Checksummed but inconsistent (a bug, or a hostile file).
    Invalid(String),
}

impl std::fmt::Display for CopyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CopyError::Magic => write!(f, "no magic"),
            CopyError::Checksum => write!(f, "checksum mismatch"),
            CopyError::Version(v) => write!(f, "unknown version {v}"),
            CopyError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

impl Superblock {
    /// A fresh superblock for `geo`: clean, one slot in use whose bitmap is relative to
    /// the first generation.
    pub fn new(geo: &Geometry, node_id: u32, volume_id: [u8; 16], gen: u64) -> Superblock {
        let mut slots = [PeerSlot::default(); MAX_PEER_SLOTS as usize];
        slots[0] = PeerSlot {
            flags: SLOT_IN_USE,
            peer_node: 0,
            bitmap_gen: gen,
            history: [0; SLOT_HISTORY],
        };
        Superblock {
            seq: 0,
            flags: FLAG_CLEAN,
            node_id,
            volume_id,
            size: geo.size,
            block_size: geo.block_size,
            extent_shift: EXTENT_SHIFT,
            peer_slots: geo.peer_slots,
            al_extents: geo.al_extents,
            al_ring: geo.al_ring,
            al_floor: 0,
            al_offset: geo.al_offset,
            bitmap_offset: geo.bitmap_offset,
            bitmap_slot_len: geo.bitmap_slot_len,
            current_gen: gen,
            history: [0; HISTORY],
            marks: 0,
            slots,
        }
    }

    pub fn clean(&self) -> bool {
        self.flags & FLAG_CLEAN != 0
    }

    pub fn primary(&self) -> bool {
        self.flags & FLAG_PRIMARY != 0
    }

    pub fn inconsistent(&self) -> bool {
        self.flags & FLAG_INCONSISTENT != 0
    }

    pub fn seeded(&self) -> bool {
        self.flags & FLAG_SEEDED != 0
    }

    pub fn outdated(&self) -> bool {
        self.flags & FLAG_OUTDATED != 0
    }

    pub fn set_flag(&mut self, flag: u32, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    pub fn set_clean(&mut self, clean: bool) {
        if clean {
            self.flags |= FLAG_CLEAN;
        } else {
            self.flags &= !FLAG_CLEAN;
        }
    }

    /// The layout this superblock describes, checked against the one its shape implies.
    pub fn geometry(&self) -> Result<Geometry, String> {
        if self.extent_shift != EXTENT_SHIFT {
            return Err(format!("extent shift {} (expected 22)", self.extent_shift));
        }
        let geo = Geometry::new(self.size, self.block_size, self.peer_slots, self.al_extents)?;
        let stored = (
            self.al_ring,
            self.al_offset,
            self.bitmap_offset,
            self.bitmap_slot_len,
        );
        let implied = (
            geo.al_ring,
            geo.al_offset,
            geo.bitmap_offset,
            geo.bitmap_slot_len,
        );
        if stored != implied {
            return Err(format!(
                "layout (ring, AL, bitmap, slot length) {stored:?} disagrees with {implied:?}"
            ));
        }
        Ok(geo)
    }

    /// The 4 KiB image of this copy.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        b[0..8].copy_from_slice(MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, PAGE as u32);
        put64(&mut b, 16, self.seq);
        put32(&mut b, 24, self.flags);
        put32(&mut b, 28, self.node_id);
        b[32..48].copy_from_slice(&self.volume_id);
        put64(&mut b, 48, self.size);
        put32(&mut b, 56, self.block_size);
        put32(&mut b, 60, self.extent_shift);
        put32(&mut b, 64, self.peer_slots);
        put32(&mut b, 68, self.al_extents);
        put32(&mut b, 72, self.al_ring);
        put64(&mut b, 80, self.al_floor);
        put64(&mut b, 88, self.al_offset);
        put64(&mut b, 96, self.bitmap_offset);
        put64(&mut b, 104, self.bitmap_slot_len);
        put64(&mut b, 112, self.current_gen);
        for (i, g) in self.history.iter().enumerate() {
            put64(&mut b, 120 + 8 * i, *g);
        }
        put64(&mut b, 152, self.marks);
        for (i, s) in self.slots.iter().enumerate() {
            let at = SLOTS_AT + SLOT_LEN * i;
            put32(&mut b, at, s.flags);
            put32(&mut b, at + 4, s.peer_node);
            put64(&mut b, at + 8, s.bitmap_gen);
            for (j, g) in s.history.iter().enumerate() {
                put64(&mut b, at + 16 + 8 * j, *g);
            }
        }
        let sum = blake3::hash(&b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decode one copy. Checks magic, version and checksum, then that the fields describe
    /// a layout this code would have made; nothing read here is trusted before that.
    pub fn decode(b: &[u8]) -> Result<Superblock, CopyError> {
        if b.len() != PAGE as usize {
            return Err(CopyError::Invalid(format!("{} bytes", b.len())));
        }
        if &b[0..8] != MAGIC {
            return Err(CopyError::Magic);
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            // A newer format may checksum differently: say what it is, not "damaged".
            return Err(CopyError::Version(version));
        }
        if blake3::hash(&b[..SUM_AT]).as_bytes() != &b[SUM_AT..] {
            return Err(CopyError::Checksum);
        }
        if u32_at(b, 12) != PAGE as u32 {
            return Err(CopyError::Invalid(format!("copy size {}", u32_at(b, 12))));
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[32..48]);
        let mut history = [0u64; HISTORY];
        for (i, g) in history.iter_mut().enumerate() {
            *g = u64_at(b, 120 + 8 * i);
        }
        let mut slots = [PeerSlot::default(); MAX_PEER_SLOTS as usize];
        for (i, s) in slots.iter_mut().enumerate() {
            let at = SLOTS_AT + SLOT_LEN * i;
            let mut h = [0u64; SLOT_HISTORY];
            for (j, g) in h.iter_mut().enumerate() {
                *g = u64_at(b, at + 16 + 8 * j);
            }
            *s = PeerSlot {
                flags: u32_at(b, at),
                peer_node: u32_at(b, at + 4),
                bitmap_gen: u64_at(b, at + 8),
                history: h,
            };
        }
        let sb = Superblock {
            seq: u64_at(b, 16),
            flags: u32_at(b, 24),
            node_id: u32_at(b, 28),
            volume_id,
            size: u64_at(b, 48),
            block_size: u32_at(b, 56),
            extent_shift: u32_at(b, 60),
            peer_slots: u32_at(b, 64),
            al_extents: u32_at(b, 68),
            al_ring: u32_at(b, 72),
            al_floor: u64_at(b, 80),
            al_offset: u64_at(b, 88),
            bitmap_offset: u64_at(b, 96),
            bitmap_slot_len: u64_at(b, 104),
            current_gen: u64_at(b, 112),
            history,
            marks: u64_at(b, 152),
            slots,
        };
        sb.geometry().map_err(CopyError::Invalid)?;
        if let Some(i) = sb.slots[sb.peer_slots as usize..]
            .iter()
            .position(|s| s.in_use())
        {
            return Err(CopyError::Invalid(format!(
                "slot {} in use beyond the {} slots with a bitmap",
                sb.peer_slots as usize + i,
                sb.peer_slots
            )));
        }
        Ok(sb)
    }

    /// Which copy a write of this superblock (with its current `seq`) goes to.
    pub fn copy_index(&self) -> usize {
        (self.seq % 2) as usize
    }
}

/// What reading both copies found.
#[derive(Debug)]
pub struct Pick {
    pub sb: Superblock,
    /// The copy used (0 or 1).
    pub copy: usize,
    /// Why the other copy was not used, when it was not merely older.
    pub other: Option<CopyError>,
}

/// Choose between the two copies: the valid one with the highest sequence. `Err` holds
/// both copies' problems when neither is valid.
pub fn pick(copies: [&[u8]; 2]) -> Result<Pick, [CopyError; 2]> {
    let a = Superblock::decode(copies[0]);
    let b = Superblock::decode(copies[1]);
    match (a, b) {
        (Ok(a), Ok(b)) => {
            let (sb, copy) = if b.seq > a.seq { (b, 1) } else { (a, 0) };
            Ok(Pick {
                sb,
                copy,
                other: None,
            })
        }
        (Ok(sb), Err(e)) => Ok(Pick {
            sb,
            copy: 0,
            other: Some(e),
        }),
        (Err(e), Ok(sb)) => Ok(Pick {
            sb,
            copy: 1,
            other: Some(e),
        }),
        (Err(a), Err(b)) => Err([a, b]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::DEFAULT_AL_EXTENTS;

    fn sample() -> Superblock {
        let geo = Geometry::new(1 << 30, 64 << 10, 2, DEFAULT_AL_EXTENTS).unwrap();
        let mut sb = Superblock::new(&geo, 7, [9; 16], 0x1234);
        sb.seq = 5;
        sb.history = [1, 2, 3, 4];
        sb.slots[1] = PeerSlot {
            flags: SLOT_IN_USE,
            peer_node: 3,
            bitmap_gen: 77,
            history: [5, 6],
        };
        sb
    }

    #[test]
    fn round_trip_and_offsets() {
        let sb = sample();
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b), Ok(sb.clone()));
        // The documented offsets.
        assert_eq!(&b[0..8], b"CUTVOLMD");
        assert_eq!(u64_at(&b, 16), 5);
        assert_eq!(u32_at(&b, 28), 7);
        assert_eq!(u64_at(&b, 48), 1 << 30);
        assert_eq!(u32_at(&b, 56), 64 << 10);
        assert_eq!(u64_at(&b, 112), 0x1234);
        assert_eq!(u64_at(&b, 256 + 8), 0x1234);
        assert_eq!(u32_at(&b, 256 + 64 + 4), 3);
    }

    #[test]
    fn damage_is_detected() {
        let good = sample().encode();
        let mut b = good.clone();
        b[200] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(CopyError::Checksum));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Superblock::decode(&b), Err(CopyError::Magic));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(CopyError::Magic));
        let mut b = good.clone();
        put32(&mut b, 8, 2);
        assert_eq!(Superblock::decode(&b), Err(CopyError::Version(2)));

        // Checksummed but lying about its layout.
        let mut sb = sample();
        sb.bitmap_offset += 4096;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(CopyError::Invalid(_))
        ));
        let mut sb = sample();
        sb.slots[5].flags = SLOT_IN_USE;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(CopyError::Invalid(_))
        ));
        let mut sb = sample();
        sb.block_size = 1000;
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(CopyError::Invalid(_))
        ));
    }

    #[test]
    fn pick_prefers_the_newest_valid_copy() {
        let mut sb = sample();
        let older = sb.encode();
        sb.seq += 1;
        sb.marks = 9;
        let newer = sb.encode();
        let p = pick([&older, &newer]).unwrap();
        assert_eq!((p.copy, p.sb.seq, p.other), (1, 6, None));
        let p = pick([&newer, &older]).unwrap();
        assert_eq!((p.copy, p.sb.marks), (0, 9));

        // A torn newer copy: the older one is used, and the damage reported.
        let mut torn = newer.clone();
        torn[2048..].fill(0);
        let p = pick([&older, &torn]).unwrap();
        assert_eq!((p.copy, p.sb.seq), (0, 5));
        assert_eq!(p.other, Some(CopyError::Checksum));

        let e = pick([&torn, &[0u8; 4096]]).unwrap_err();
        assert_eq!(e, [CopyError::Checksum, CopyError::Magic]);
    }
}
