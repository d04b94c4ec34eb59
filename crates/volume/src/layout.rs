//! Where things sit in the metadata file, and the limits on a volume's shape. The layout is
//! a pure function of (size, block size, peer slots, hot extents), so `open` recomputes it
//! and refuses a superblock whose stored offsets disagree: a damaged or hostile file can
//! never make us read or allocate past what its size and block size justify.
//!
//! ```text
//! 0        superblock copy 0                 4 KiB
//! 4096     superblock copy 1                 4 KiB
//! 8192     activity log ring                 al_ring × 4 KiB transactions
//! …        bitmap of peer slot 0             ceil(blocks / 8) rounded up to 4 KiB
//! …        bitmap of peer slot 1, …          (one region per slot)
//! ```

/// The unit of every metadata write: superblock copies, AL transactions and bitmap pages
/// are written whole, 4 KiB aligned, so a torn write damages at most the one being made.
pub const PAGE: u64 = 4096;
/// File offsets of the two superblock copies.
pub const SUPERBLOCK_COPIES: [u64; 2] = [0, PAGE];
/// Where the activity log ring starts.
pub const AL_OFFSET: u64 = 2 * PAGE;
/// An activity log extent: 4 MiB, as DRBD's (the AL names hot extents by number).
pub const EXTENT_SHIFT: u32 = 22;
pub const EXTENT_SIZE: u64 = 1 << EXTENT_SHIFT;
/// Peer slots a superblock can describe (the on-disk table has this many entries).
pub const MAX_PEER_SLOTS: u32 = 32;
/// Hot extents by default: 1024 × 4 MiB = 4 GiB of the volume written without an AL
/// transaction first.
pub const DEFAULT_AL_EXTENTS: u32 = 1024;
/// Upper bound on hot extents (a transaction's slot numbers stay small, and the in-memory
/// table stays a few MiB).
pub const MAX_AL_EXTENTS: u32 = 65534;
/// The smallest AL ring; see [`al_ring_for`].
pub const MIN_AL_RING: u32 = 16;
/// Block size bounds: at least a page (the smallest write that matters to a file system),
/// at most 1 MiB (a larger block makes a 4 KiB write resync a megabyte).
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// The default block (bitmap granularity): 16 KiB, chosen by measurement (the crate docs
/// have the figures): a quarter of 64 KiB's resync bytes for scattered 4 KiB writes and
/// none of its excess for 16 KiB database pages, for 8 MiB of bitmap per TiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 16 << 10;
/// The bitmap of one slot may take at most this much memory and disk (1 GiB: a 32 TiB
/// volume at 4 KiB, or 512 TiB at 64 KiB).
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;

/// The ring size for `al_extents` hot extents: every transaction carries a slice of the
/// hot-extent table (its "context"), so `ceil(al_extents / CONTEXT)` consecutive
/// transactions name every hot extent; two more cover the transaction being written (maybe
/// torn) and a margin. See `al.rs`.
pub fn al_ring_for(al_extents: u32) -> u32 {
    let passes = al_extents.div_ceil(crate::al::CONTEXT_PER_TRANSACTION as u32);
    (passes + 2).max(MIN_AL_RING)
}

/// The shape of one metadata file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Volume size in bytes.
    pub size: u64,
    pub block_size: u32,
    /// Blocks (bits per slot bitmap): `ceil(size / block_size)`.
    pub blocks: u64,
    /// 4 MiB extents: `ceil(size / EXTENT_SIZE)`.
    pub extents: u64,
    pub peer_slots: u32,
    pub al_extents: u32,
    pub al_ring: u32,
    pub al_offset: u64,
    pub bitmap_offset: u64,
    /// Bytes of one slot's bitmap region (a multiple of `PAGE`).
    pub bitmap_slot_len: u64,
    /// The whole file.
    pub file_len: u64,
}

impl Geometry {
    /// The layout for a volume, or why the shape is refused (a sentence without the path).
    pub fn new(
        size: u64,
        block_size: u32,
        peer_slots: u32,
        al_extents: u32,
    ) -> Result<Geometry, String> {
        if size == 0 {
            return Err("the volume size is 0".into());
        }
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(format!(
                "block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and \
                 {MAX_BLOCK_SIZE}"
            ));
        }
        if !(1..=MAX_PEER_SLOTS).contains(&peer_slots) {
            return Err(format!(
                "{peer_slots} peer slots: between 1 and {MAX_PEER_SLOTS} are possible"
            ));
        }
        if !(1..=MAX_AL_EXTENTS).contains(&al_extents) {
            return Err(format!(
                "{al_extents} hot extents: between 1 and {MAX_AL_EXTENTS} are possible"
            ));
        }
        let blocks = size.div_ceil(u64::from(block_size));
        let bitmap_bytes = blocks.div_ceil(8);
        if bitmap_bytes > MAX_BITMAP_BYTES {
            return Err(format!(
                "a {size}-byte volume at {block_size}-byte blocks needs a {bitmap_bytes}-byte \
                 bitmap, more than {MAX_BITMAP_BYTES}; use a larger block size"
            ));
        }
        let extents = size.div_ceil(EXTENT_SIZE);
        // Extent numbers are u32 on disk, u32::MAX meaning "empty slot".
        if extents >= u64::from(u32::MAX) {
            return Err(format!("a {size}-byte volume has too many 4 MiB extents"));
        }
        let al_ring = al_ring_for(al_extents);
        let al_offset = AL_OFFSET;
        let bitmap_offset = al_offset + u64::from(al_ring) * PAGE;
        let bitmap_slot_len = bitmap_bytes.div_ceil(PAGE) * PAGE;
        let file_len = bitmap_offset + u64::from(peer_slots) * bitmap_slot_len;
        Ok(Geometry {
            size,
            block_size,
            blocks,
            extents,
            peer_slots,
            al_extents,
            al_ring,
            al_offset,
            bitmap_offset,
            bitmap_slot_len,
            file_len,
        })
    }

    /// File offset of slot `slot`'s bitmap region.
    pub fn bitmap_at(&self, slot: u32) -> u64 {
        self.bitmap_offset + u64::from(slot) * self.bitmap_slot_len
    }

    /// Bitmap pages of one slot.
    pub fn bitmap_pages(&self) -> u64 {
        self.bitmap_slot_len / PAGE
    }

    /// Blocks per 4 MiB extent.
    pub fn blocks_per_extent(&self) -> u64 {
        EXTENT_SIZE / u64::from(self.block_size)
    }

    /// The blocks `first..=last` covering bytes `offset..offset + length` (length > 0,
    /// within the volume).
    pub fn block_range(&self, offset: u64, length: u64) -> (u64, u64) {
        let bs = u64::from(self.block_size);
        (offset / bs, (offset + length - 1) / bs)
    }

    /// The extents `first..=last` covering bytes `offset..offset + length` (length > 0).
    pub fn extent_range(&self, offset: u64, length: u64) -> (u32, u32) {
        // Below u32::MAX: `new` bounds the extent count and writes are within the volume.
        (
            (offset >> EXTENT_SHIFT) as u32,
            ((offset + length - 1) >> EXTENT_SHIFT) as u32,
        )
    }

    /// The blocks `first..=last` of extent `extent` (the last extent may be short).
    pub fn extent_blocks(&self, extent: u32) -> (u64, u64) {
        let per = self.blocks_per_extent();
        let first = u64::from(extent) * per;
        (first, (first + per).min(self.blocks) - 1)
    }

    /// Bytes covered by `n` dirty blocks when `last_dirty` says whether the final
    /// (possibly short) block is among them.
    pub fn bytes_of(&self, n: u64, last_dirty: bool) -> u64 {
        let full = n * u64::from(self.block_size);
        if last_dirty {
            full - (self.blocks * u64::from(self.block_size) - self.size)
        } else {
            full
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let g = Geometry::new(16 << 40, 64 << 10, 1, DEFAULT_AL_EXTENTS).unwrap();
        assert_eq!(g.blocks, 1 << 28);
        assert_eq!(
            g.bitmap_slot_len,
            32 << 20,
            "16 TiB at 64 KiB: a 32 MiB bitmap"
        );
        assert_eq!(g.al_ring, MIN_AL_RING);
        assert_eq!(g.bitmap_offset, 8192 + 16 * 4096);
        assert_eq!(g.file_len, g.bitmap_offset + (32 << 20));

        let g = Geometry::new(10_000_000, 4096, 2, 4).unwrap();
        assert_eq!(g.blocks, 2442);
        assert_eq!(g.bitmap_slot_len, 4096);
        assert_eq!(g.extents, 3);
        assert_eq!(g.extent_blocks(2), (2048, 2441));
        assert_eq!(g.block_range(4095, 2), (0, 1));
        assert_eq!(g.extent_range(EXTENT_SIZE - 1, 2), (0, 1));
        assert_eq!(g.bytes_of(1, true), 10_000_000 - 2441 * 4096);

        assert!(Geometry::new(0, 4096, 1, 1).is_err());
        assert!(Geometry::new(1 << 30, 3000, 1, 1).is_err());
        assert!(Geometry::new(1 << 30, 2 << 20, 1, 1).is_err());
        assert!(Geometry::new(1 << 30, 4096, 0, 1).is_err());
        assert!(Geometry::new(1 << 30, 4096, 1, 0).is_err());
        assert!(
            Geometry::new(64 << 40, 4096, 1, 1).is_err(),
            "a 2 GiB bitmap"
        );
        assert!(Geometry::new(64 << 40, 64 << 10, 1, 1).is_ok());
        assert!(al_ring_for(MAX_AL_EXTENTS) * 880 >= MAX_AL_EXTENTS + 2 * 880);
    }
}
