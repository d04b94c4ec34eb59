//! The dirty bitmap in memory: one bit per block, plus one "page changed" bit per 4 KiB
//! page of its on-disk image, so that persisting it writes only the pages that changed
//! since they were last written (a 16 TiB volume at 64 KiB has 8192 pages; a flush after
//! a burst of writes touches a handful).
//!
//! On disk a slot's bitmap is the little-endian image of the words: block `b` is bit
//! `b % 8` of byte `b / 8`. Bits past the last block are always zero.
//!
//! [`Snapshot`] is a frozen bitmap handed out by `mark()`.

use crate::layout::{Geometry, PAGE};

const WORDS_PER_PAGE: usize = (PAGE / 8) as usize;

/// A bitmap of `len` bits with changed-page tracking.
#[derive(Clone, Debug)]
pub struct Bitmap {
    words: Vec<u64>,
    len: u64,
    ones: u64,
    /// One bit per on-disk page: the page differs (or may differ) from the disk.
    changed: Vec<u64>,
    /// One bit per page: the page may hold set bits (set with them, cleared by `take`),
    /// so that `take` knows which pages to rewrite without scanning the words.
    touched: Vec<u64>,
}

impl Bitmap {
    /// All clear, all pages in step with an all-zero disk image.
    pub fn new(len: u64) -> Bitmap {
        // `len` is bounded by `Geometry::new` (at most 2^33 bits), so these fit in usize.
        let words = len.div_ceil(64) as usize;
        let pages = words.div_ceil(WORDS_PER_PAGE);
        Bitmap {
            words: vec![0; words],
            len,
            ones: 0,
            changed: vec![0; pages.div_ceil(64)],
            touched: vec![0; pages.div_ceil(64)],
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Set bits.
    pub fn count(&self) -> u64 {
        self.ones
    }

    pub fn get(&self, bit: u64) -> bool {
        bit < self.len && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Pages of the on-disk image.
    pub fn pages(&self) -> u64 {
        self.words.len().div_ceil(WORDS_PER_PAGE) as u64
    }

    fn note_changed(&mut self, word: usize) {
        let page = word / WORDS_PER_PAGE;
        self.changed[page / 64] |= 1 << (page % 64);
        self.touched[page / 64] |= 1 << (page % 64);
    }

    /// Set bits `first..=last` (clamped to the bitmap); returns how many were newly set.
    pub fn set_range(&mut self, first: u64, last: u64) -> u64 {
        if self.len == 0 || first >= self.len {
            return 0;
        }
        let last = last.min(self.len - 1);
        if first > last {
            return 0;
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        let mut added = 0;
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let new = mask & !self.words[w];
            if new != 0 {
                self.words[w] |= new;
                added += u64::from(new.count_ones());
                self.note_changed(w);
            }
        }
        self.ones += added;
        added
    }

    /// Clear bits `first..=last` (clamped); returns how many were set. Pages that change
    /// are marked for persisting.
    pub fn clear_range(&mut self, first: u64, last: u64) -> u64 {
        if self.len == 0 || first >= self.len {
            return 0;
        }
        let last = last.min(self.len - 1);
        if first > last {
            return 0;
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        let mut gone = 0;
        for w in w0..=w1 {
            let lo = if w == w0 { first % 64 } else { 0 };
            let hi = if w == w1 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            let old = mask & self.words[w];
            if old != 0 {
                self.words[w] &= !old;
                gone += u64::from(old.count_ones());
                self.note_changed(w);
            }
        }
        self.ones -= gone;
        gone
    }

    /// Replace the contents with all clear, returning the old bits. Pages that held set
    /// bits are marked changed (the disk may still have those bits), as are pages already
    /// changed. O(pages / 64) besides the allocation: it runs under the lock every write
    /// takes.
    pub fn take(&mut self) -> Bitmap {
        let mut fresh = Bitmap::new(self.len);
        for (f, (c, t)) in fresh
            .changed
            .iter_mut()
            .zip(self.changed.iter().zip(&self.touched))
        {
            *f = c | t;
        }
        let mut old = std::mem::replace(self, fresh);
        // The frozen copy has nothing to persist of its own.
        old.changed.fill(0);
        old
    }

    /// The on-disk image of page `page`.
    pub fn page_image(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE as usize];
        let start = page as usize * WORDS_PER_PAGE;
        let end = (start + WORDS_PER_PAGE).min(self.words.len());
        for (i, w) in self.words[start.min(end)..end].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Load page `page` from its on-disk image (bits past the end are ignored, so a
    /// damaged tail cannot make `count` lie). The page is then in step with the disk.
    pub fn load_page(&mut self, page: u64, image: &[u8]) {
        let start = page as usize * WORDS_PER_PAGE;
        let end = (start + WORDS_PER_PAGE).min(self.words.len());
        for w in start.min(end)..end {
            let at = (w - start) * 8;
            let mut a = [0u8; 8];
            if let Some(src) = image.get(at..at + 8) {
                a.copy_from_slice(src);
            }
            let mut v = u64::from_le_bytes(a);
            if w == self.words.len() - 1 && self.len & 63 != 0 {
                v &= (1u64 << (self.len % 64)) - 1;
            }
            self.ones -= u64::from(self.words[w].count_ones());
            self.ones += u64::from(v.count_ones());
            self.words[w] = v;
        }
        let p = page as usize;
        if let Some(c) = self.changed.get_mut(p / 64) {
            *c &= !(1 << (p % 64));
        }
        if self.words[start.min(end)..end].iter().any(|&w| w != 0) {
            self.touched[p / 64] |= 1 << (p % 64);
        }
    }

    /// The first changed page at or after `from`, its image, and it is marked in step
    /// (the caller writes the image; a bit set meanwhile marks it changed again).
    pub fn take_changed_page(&mut self, from: u64) -> Option<(u64, Vec<u8>)> {
        let pages = self.pages();
        let mut p = from;
        while p < pages {
            let (i, b) = ((p / 64) as usize, p % 64);
            let rest = self.changed[i] >> b;
            if rest == 0 {
                p = (p - b) + 64;
                continue;
            }
            p += u64::from(rest.trailing_zeros());
            if p >= pages {
                break;
            }
            self.changed[(p / 64) as usize] &= !(1 << (p % 64));
            return Some((p, self.page_image(p)));
        }
        None
    }

    /// Page `page`'s image if it changed, which is then marked in step.
    pub fn take_page_if_changed(&mut self, page: u64) -> Option<Vec<u8>> {
        let (i, b) = ((page / 64) as usize, page % 64);
        let word = self.changed.get_mut(i)?;
        if *word & (1 << b) == 0 {
            return None;
        }
        *word &= !(1 << b);
        Some(self.page_image(page))
    }

    /// Mark pages `first..=last` changed (to be rewritten whatever they hold).
    pub fn mark_pages_changed(&mut self, first: u64, last: u64) {
        for p in first..=last.min(self.pages().saturating_sub(1)) {
            self.changed[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Pages marked changed.
    pub fn changed_pages(&self) -> u64 {
        self.changed.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The page holding bit `bit`.
    pub fn page_of(bit: u64) -> u64 {
        bit / (PAGE * 8)
    }

    /// The first bit at or after `from` (and before `limit`) whose value is `value`, or
    /// `limit` if there is none.
    pub fn next(&self, from: u64, limit: u64, value: bool) -> u64 {
        let limit = limit.min(self.len);
        let mut bit = from;
        while bit < limit {
            let w = self.words[(bit / 64) as usize];
            let w = if value { w } else { !w };
            let rest = w >> (bit % 64);
            if rest != 0 {
                return (bit + u64::from(rest.trailing_zeros())).min(limit);
            }
            bit = (bit / 64 + 1) * 64;
        }
        limit
    }

    /// Whether the last bit is set (the last block may be short).
    pub fn last_set(&self) -> bool {
        self.len > 0 && self.get(self.len - 1)
    }

    /// Set every bit set in `other` (same length; a shorter or longer one is cut to ours).
    /// Pages are not marked changed: this is for frozen copies, never the live bitmap.
    pub fn union(&mut self, other: &Bitmap) {
        for (w, o) in self.words.iter_mut().zip(&other.words) {
            *w |= o;
        }
        if let Some(last) = self.words.last_mut() {
            if self.len & 63 != 0 {
                *last &= (1u64 << (self.len % 64)) - 1;
            }
        }
        self.ones = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The bitmap [`Bitmap::to_bytes`] made, or None when `bytes` is not `len / 8` rounded
    /// up long (bits past `len` are dropped). Nothing is marked changed.
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Option<Bitmap> {
        if bytes.len() as u64 != len.div_ceil(8) {
            return None;
        }
        let mut b = Bitmap::new(len);
        for (w, chunk) in b.words.iter_mut().zip(bytes.chunks(8)) {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
        if let Some(last) = b.words.last_mut() {
            if len & 63 != 0 {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        b.ones = b.words.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(b)
    }

    /// The bits as bytes, block `b` in bit `b % 8` of byte `b / 8` (the on-disk order),
    /// `len / 8` rounded up.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }
}

/// The blocks written during one generation, frozen by `mark()`: iterate with
/// [`Snapshot::extents`] to copy them to a peer.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub(crate) bits: Bitmap,
    pub(crate) geo: Geometry,
    /// The generation the blocks were written in (the bitmap id before the mark).
    pub from_gen: u64,
    /// The generation that starts with the mark (the new current id).
    pub to_gen: u64,
}

impl Snapshot {
    /// Dirty blocks.
    pub fn blocks(&self) -> u64 {
        self.bits.count()
    }

    /// Dirty bytes (the last block may be short).
    pub fn bytes(&self) -> u64 {
        self.geo.bytes_of(self.bits.count(), self.bits.last_set())
    }

    pub fn block_size(&self) -> u32 {
        self.geo.block_size
    }

    /// Whether the block holding byte `offset` is in the snapshot.
    pub fn contains(&self, offset: u64) -> bool {
        self.bits.get(offset / u64::from(self.geo.block_size))
    }

    /// Add the blocks of `other` (another snapshot of the same volume): what a consumer
    /// still owes a peer after a further mark, or after a pass that failed. `from_gen`
    /// stays `self`'s, `to_gen` becomes `other`'s.
    pub fn union(&mut self, other: &Snapshot) {
        self.bits.union(&other.bits);
        self.to_gen = other.to_gen;
    }

    /// An empty snapshot of the same volume (nothing owed).
    pub fn cleared(&self) -> Snapshot {
        Snapshot {
            bits: Bitmap::new(self.bits.len()),
            geo: self.geo,
            from_gen: self.to_gen,
            to_gen: self.to_gen,
        }
    }

    /// The dirty blocks as bytes: block `b` is bit `b % 8` of byte `b / 8`; the volume's
    /// blocks / 8 rounded up.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bits.to_bytes()
    }

    /// Runs of dirty blocks as `(offset, length)` byte ranges, in disk order, the last cut
    /// at the volume's end.
    pub fn extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let bs = u64::from(self.geo.block_size);
        let mut bit = 0u64;
        std::iter::from_fn(move || {
            let len = self.bits.len();
            let start = self.bits.next(bit, len, true);
            if start >= len {
                return None;
            }
            let end = self.bits.next(start, len, false);
            bit = end;
            let offset = start * bs;
            Some((offset, (end * bs).min(self.geo.size) - offset))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_count_and_runs() {
        let mut b = Bitmap::new(200);
        assert_eq!(b.set_range(3, 70), 68);
        assert_eq!(b.set_range(60, 130), 60);
        assert_eq!(b.set_range(199, 500), 1);
        assert_eq!(b.set_range(300, 400), 0);
        assert_eq!(b.count(), 129);
        assert!(!b.get(2) && b.get(3) && b.get(130) && !b.get(131) && b.get(199));
        assert_eq!(b.next(0, 200, true), 3);
        assert_eq!(b.next(3, 200, false), 131);
        assert_eq!(b.next(131, 200, true), 199);
        assert_eq!(b.next(131, 150, true), 150);
        assert_eq!(b.next(199, 200, false), 200);
        assert!(b.last_set());
    }

    #[test]
    fn pages_round_trip_and_track_changes() {
        let bits = PAGE * 8 * 3 - 5;
        let mut b = Bitmap::new(bits);
        assert_eq!(b.pages(), 3);
        assert_eq!(b.changed_pages(), 0);
        b.set_range(PAGE * 8 + 1, PAGE * 8 + 1);
        b.set_range(bits - 1, bits - 1);
        assert_eq!(b.changed_pages(), 2);
        let (p, img) = b.take_changed_page(0).unwrap();
        assert_eq!(p, 1);
        assert_eq!(img[0], 2);
        let (p2, img2) = b.take_changed_page(p + 1).unwrap();
        assert_eq!(p2, 2);
        assert!(b.take_changed_page(0).is_none());

        let mut c = Bitmap::new(bits);
        c.load_page(1, &img);
        // A garbage tail past the last bit is ignored.
        let mut tail = img2.clone();
        tail[PAGE as usize - 1] |= 0xf8;
        c.load_page(2, &tail);
        assert_eq!(c.count(), 2);
        assert!(c.get(PAGE * 8 + 1) && c.get(bits - 1));
        assert_eq!(c.changed_pages(), 0);
    }

    #[test]
    fn take_leaves_the_old_pages_to_rewrite() {
        let mut b = Bitmap::new(PAGE * 8 * 4);
        b.set_range(5, 5);
        while b.take_changed_page(0).is_some() {}
        b.set_range(PAGE * 8 * 2, PAGE * 8 * 2);
        let old = b.take();
        assert_eq!(old.count(), 2);
        assert_eq!(old.changed_pages(), 0);
        assert_eq!(b.count(), 0);
        // Page 0 (persisted with a bit that is now clear) and page 2 (never persisted).
        assert_eq!(b.changed_pages(), 2);
        assert!(b.take_page_if_changed(0).is_some() && b.take_page_if_changed(2).is_some());
        // The next take has nothing to rewrite.
        b.take();
        assert_eq!(b.changed_pages(), 0);
        // Bits loaded from disk count as held.
        let mut c = Bitmap::new(PAGE * 8 * 4);
        let mut image = vec![0u8; PAGE as usize];
        image[10] = 1;
        c.load_page(3, &image);
        assert_eq!(c.changed_pages(), 0);
        c.take();
        assert_eq!(c.changed_pages(), 1);
    }

    #[test]
    fn snapshot_extents_cut_at_the_end() {
        let geo = Geometry::new(10 * 4096 + 100, 4096, 1, 4).unwrap();
        let mut bits = Bitmap::new(geo.blocks);
        bits.set_range(1, 2);
        bits.set_range(10, 10);
        let s = Snapshot {
            bits,
            geo,
            from_gen: 1,
            to_gen: 2,
        };
        let v: Vec<_> = s.extents().collect();
        assert_eq!(v, vec![(4096, 8192), (40960, 100)]);
        assert_eq!(s.bytes(), 8192 + 100);
        assert!(s.contains(40960 + 50) && !s.contains(0));
    }

    #[test]
    fn snapshots_unite_and_turn_into_bytes_in_disk_order() {
        let geo = Geometry::new(70 * 4096, 4096, 1, 4).unwrap();
        let snap = |ranges: &[(u64, u64)], from_gen, to_gen| {
            let mut bits = Bitmap::new(geo.blocks);
            for &(a, b) in ranges {
                bits.set_range(a, b);
            }
            Snapshot {
                bits,
                geo,
                from_gen,
                to_gen,
            }
        };
        let mut a = snap(&[(0, 0), (9, 9)], 1, 2);
        a.union(&snap(&[(9, 10), (69, 69)], 2, 3));
        assert_eq!((a.blocks(), a.from_gen, a.to_gen), (4, 1, 3));
        let bytes = a.to_bytes();
        // 70 blocks: 9 bytes; block 9 and 10 in byte 1 (bits 1, 2), block 69 bit 5 of byte 8.
        assert_eq!(bytes, vec![1, 0b110, 0, 0, 0, 0, 0, 0, 1 << 5]);
        let empty = a.cleared();
        assert_eq!((empty.blocks(), empty.from_gen, empty.to_gen), (0, 3, 3));
        assert_eq!(empty.to_bytes(), vec![0; 9]);
        let back = Bitmap::from_bytes(geo.blocks, &bytes).unwrap();
        assert_eq!(back.to_bytes(), bytes);
        assert_eq!(back.count(), 4);
        assert!(Bitmap::from_bytes(geo.blocks, &bytes[1..]).is_none());
        // Bits past the end are dropped.
        let mut tail = bytes.clone();
        tail[8] |= 0xc0;
        assert_eq!(Bitmap::from_bytes(geo.blocks, &tail).unwrap().count(), 4);
    }
}
