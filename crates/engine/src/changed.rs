//! The blocks of a tracked volume written since a destination's last pass (what the volume's
//! daemon hands a `volume:NAME` pass), and their runs as byte ranges for the sender.
//!
//! With these, a pass of a volume reads only the written blocks on the source and writes
//! them in place on the destination (`Need::Changed`): no whole-device hashing on either
//! side, which is what makes the final pass of a large volume take seconds.

/// Longest run sent as one literal: one read, one frame's worth of data in memory.
pub const MAX_PIECE: u64 = 1 << 20;

/// One bit per block of a volume: set = written since the destination's last pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedBlocks {
    size: u64,
    block_size: u32,
    /// Block `b` is bit `b % 8` of byte `b / 8`.
    bits: Vec<u8>,
}

impl ChangedBlocks {
    /// A bitmap of a volume of `size` bytes in blocks of `block_size` (a power of two,
    /// 512 B to 1 MiB); `bits` must hold exactly one bit per block, rounded up to bytes.
    pub fn new(size: u64, block_size: u32, bits: Vec<u8>) -> Result<ChangedBlocks, String> {
        if !block_size.is_power_of_two() || !(512..=1 << 20).contains(&block_size) {
            return Err(format!(
                "block size {block_size} is not a power of two from 512 B to 1 MiB"
            ));
        }
        let blocks = size.div_ceil(u64::from(block_size));
        if bits.len() as u64 != blocks.div_ceil(8) {
            return Err(format!(
                "{} byte(s) of bitmap for {blocks} block(s) of {block_size} B",
                bits.len()
            ));
        }
        Ok(ChangedBlocks {
            size,
            block_size,
            bits,
        })
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size))
    }

    fn get(&self, block: u64) -> bool {
        self.bits
            .get((block / 8) as usize)
            .is_some_and(|b| b & (1 << (block % 8)) != 0)
    }

    /// Changed bytes (the last block may be short).
    pub fn bytes(&self) -> u64 {
        self.extents(u64::MAX).map(|(_, len)| len).sum()
    }

    /// Runs of changed blocks as `(offset, length)` in disk order, cut at `max_piece`
    /// bytes and at the volume's end.
    pub fn extents(&self, max_piece: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let bs = u64::from(self.block_size);
        let blocks = self.blocks();
        let max_piece = max_piece.max(bs);
        let mut block = 0u64;
        // The rest of a run longer than `max_piece`: (offset, end).
        let mut pending: Option<(u64, u64)> = None;
        std::iter::from_fn(move || {
            if pending.is_none() {
                // Skip clear bytes whole: most of a large volume is unchanged.
                while block < blocks && self.bits[(block / 8) as usize] == 0 {
                    block = (block / 8 + 1) * 8;
                }
                while block < blocks && !self.get(block) {
                    block += 1;
                }
                if block >= blocks {
                    return None;
                }
                let start = block;
                while block < blocks && self.get(block) {
                    block += 1;
                }
                pending = Some((start * bs, (block * bs).min(self.size)));
            }
            let (offset, end) = pending.take()?;
            let len = (end - offset).min(max_piece);
            if offset + len < end {
                pending = Some((offset + len, end));
            }
            Some((offset, len))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_at_the_piece_size_and_at_the_end() {
        // 10 blocks of 4 KiB and 100 bytes: an 11th, short block.
        let size = 10 * 4096 + 100;
        let mut bits = vec![0u8; 2];
        for b in [1u64, 2, 3, 10] {
            bits[(b / 8) as usize] |= 1 << (b % 8);
        }
        let c = ChangedBlocks::new(size, 4096, bits).unwrap();
        assert_eq!(
            c.extents(u64::MAX).collect::<Vec<_>>(),
            vec![(4096, 3 * 4096), (40960, 100)]
        );
        assert_eq!(
            c.extents(8192).collect::<Vec<_>>(),
            vec![(4096, 8192), (12288, 4096), (40960, 100)]
        );
        assert_eq!(c.bytes(), 3 * 4096 + 100);
    }

    #[test]
    fn a_bitmap_of_the_wrong_length_or_block_size_is_refused() {
        assert!(ChangedBlocks::new(16 * 4096, 4096, vec![0; 2]).is_ok());
        assert!(ChangedBlocks::new(16 * 4096, 4096, vec![0; 3]).is_err());
        assert!(ChangedBlocks::new(16 * 4096, 4096, vec![0; 1]).is_err());
        assert!(ChangedBlocks::new(16 * 4096, 3000, vec![0; 3]).is_err());
        assert!(ChangedBlocks::new(0, 4096, Vec::new()).is_ok_and(|c| c.bytes() == 0));
        // Bits past the last block are never a run.
        let c = ChangedBlocks::new(4096 * 3, 4096, vec![0xf8]).unwrap();
        assert_eq!(c.extents(u64::MAX).count(), 0);
    }
}
