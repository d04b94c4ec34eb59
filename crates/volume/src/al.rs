//! The activity log: which 4 MiB extents may be written without touching the metadata
//! first ("hot"), recorded on disk *before* the first write to an extent that was cold.
//!
//! In memory the AL is a table of `al_extents` slots, each holding an extent number, with
//! a reference count per hot extent (writes between `before_write` and `after_write`) and
//! an LRU order of the unreferenced ones, from which victims are evicted.
//!
//! On disk it is a ring of `al_ring` 4 KiB transactions, DRBD's design: transaction `seq`
//! sits at ring position `seq % al_ring` and holds
//! - *updates*: the (slot, extent) pairs it puts in the table (up to 64), and
//! - *context*: a slice of the table as it is after the updates (880 slots, the slice
//!   moving on with each transaction),
//!
//! so the last `ceil(al_extents / 880)` transactions together name every extent that has
//! been in the table since they were written. Recovery does not replay anything: it takes
//! every extent named by any valid transaction of the current epoch (`seq` at or above the
//! superblock's floor) and marks it dirty. That is a superset of the hot extents at the
//! crash: an extent hot at the crash either entered the table in a transaction still in
//! the ring, or was in its slot when a later context slice (still in the ring, because
//! the ring is two transactions longer than a full pass of the context) recorded it. The
//! transaction being written when the power went may be torn; its checksum fails and it
//! is ignored, which is safe because nothing was written to its new extents yet.
//!
//! Transaction layout (little-endian):
//!
//! ```text
//!    0  magic "CVAL"                  4
//!    4  version (1)                   2
//!    6  updates in use                2
//!    8  sequence number               8
//!   16  context: first slot           4
//!   20  context: slots in use         2
//!   22  reserved (zero)              10
//!   32  updates: 64 × (slot u32, extent u32)
//!  544  context: 880 × extent u32 (u32::MAX = empty slot)
//! 4064  BLAKE3 of volume id ‖ bytes 0..4064   32
//! ```
//!
//! The checksum covers the volume id so that transactions left by an earlier metadata file
//! at the same place (re-created with `--force`) never count.

use crate::layout::PAGE;
use std::collections::{BTreeMap, HashMap, HashSet};

pub const MAGIC: &[u8; 4] = b"CVAL";
pub const VERSION: u16 = 1;
/// New extents one transaction can bring in.
pub const UPDATES_PER_TRANSACTION: usize = 64;
/// Table slots one transaction records.
pub const CONTEXT_PER_TRANSACTION: usize = 880;
/// An empty slot, on disk and in memory.
pub const EMPTY: u32 = u32::MAX;

const UPDATES_AT: usize = 32;
const CONTEXT_AT: usize = UPDATES_AT + 8 * UPDATES_PER_TRANSACTION;
pub(crate) const SUM_AT: usize = CONTEXT_AT + 4 * CONTEXT_PER_TRANSACTION;

pub(crate) fn checksum(volume_id: &[u8; 16], body: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(volume_id);
    h.update(body);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// A decoded transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    pub seq: u64,
    /// (slot, extent) pairs.
    pub updates: Vec<(u32, u32)>,
    /// First slot of the context slice.
    pub context_start: u32,
    /// Extents of the slots `context_start..`, `EMPTY` for an empty slot.
    pub context: Vec<u32>,
}

impl Transaction {
    /// Its 4 KiB image.
    pub fn encode(&self, volume_id: &[u8; 16]) -> Vec<u8> {
        assert!(self.updates.len() <= UPDATES_PER_TRANSACTION);
        assert!(self.context.len() <= CONTEXT_PER_TRANSACTION);
        let mut b = vec![0u8; PAGE as usize];
        b[0..4].copy_from_slice(MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.updates.len() as u16).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.context_start.to_le_bytes());
        b[20..22].copy_from_slice(&(self.context.len() as u16).to_le_bytes());
        for (i, (slot, extent)) in self.updates.iter().enumerate() {
            let at = UPDATES_AT + 8 * i;
            b[at..at + 4].copy_from_slice(&slot.to_le_bytes());
            b[at + 4..at + 8].copy_from_slice(&extent.to_le_bytes());
        }
        for (i, extent) in self.context.iter().enumerate() {
            let at = CONTEXT_AT + 4 * i;
            b[at..at + 4].copy_from_slice(&extent.to_le_bytes());
        }
        let sum = checksum(volume_id, &b[..SUM_AT]);
        b[SUM_AT..].copy_from_slice(sum.as_bytes());
        b
    }

    /// Decode one ring entry; `None` for anything but an intact transaction of this
    /// volume (never written, torn, damaged, another volume's, or malformed).
    pub fn decode(b: &[u8], volume_id: &[u8; 16]) -> Option<Transaction> {
        if b.len() != PAGE as usize || &b[0..4] != MAGIC || u16_at(b, 4) != VERSION {
            return None;
        }
        if checksum(volume_id, &b[..SUM_AT]).as_bytes() != &b[SUM_AT..] {
            return None;
        }
        let n_updates = usize::from(u16_at(b, 6));
        let n_context = usize::from(u16_at(b, 20));
        if n_updates > UPDATES_PER_TRANSACTION || n_context > CONTEXT_PER_TRANSACTION {
            return None;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        Some(Transaction {
            seq: u64::from_le_bytes(seq),
            updates: (0..n_updates)
                .map(|i| {
                    let at = UPDATES_AT + 8 * i;
                    (u32_at(b, at), u32_at(b, at + 4))
                })
                .collect(),
            context_start: u32_at(b, 16),
            context: (0..n_context)
                .map(|i| u32_at(b, CONTEXT_AT + 4 * i))
                .collect(),
        })
    }

    /// Every extent it names (updates and context), empties left out.
    pub fn extents(&self) -> impl Iterator<Item = u32> + '_ {
        self.updates
            .iter()
            .map(|u| u.1)
            .chain(self.context.iter().copied())
            .filter(|&e| e != EMPTY)
    }
}

/// What a scan of the ring found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Every extent (below the volume's extent count) named by a valid transaction of the
    /// current epoch.
    pub extents: HashSet<u32>,
    /// Valid transactions of the current epoch.
    pub transactions: usize,
    /// The highest sequence seen (any epoch), if any transaction was valid.
    pub max_seq: Option<u64>,
    /// Extent numbers past the volume's end (a bug or a hostile file; ignored).
    pub out_of_range: usize,
}

/// Read the ring image (`ring` transactions of 4 KiB each).
pub fn scan(image: &[u8], ring: u32, floor: u64, extents: u64, volume_id: &[u8; 16]) -> Scan {
    let mut s = Scan::default();
    for (pos, entry) in image.chunks(PAGE as usize).take(ring as usize).enumerate() {
        let Some(t) = Transaction::decode(entry, volume_id) else {
            continue;
        };
        // A transaction found where its number does not put it was not written by us.
        if t.seq % u64::from(ring) != pos as u64 {
            continue;
        }
        s.max_seq = Some(s.max_seq.map_or(t.seq, |m| m.max(t.seq)));
        if t.seq < floor {
            continue;
        }
        s.transactions += 1;
        for e in t.extents() {
            if u64::from(e) < extents {
                s.extents.insert(e);
            } else {
                s.out_of_range += 1;
            }
        }
    }
    s
}

/// A hot extent.
#[derive(Clone, Copy, Debug)]
struct Hot {
    slot: u32,
    /// Writes to it between `before_write` and `after_write`: it cannot be evicted.
    refs: u32,
    /// Its place in the LRU (meaningful when `refs == 0`).
    tick: u64,
}

/// A planned transaction: the extents it brings in, and the extents it evicts (whose
/// bitmap bits must be on disk before the transaction is written).
#[derive(Debug, Default)]
pub struct Plan {
    pub transaction: Option<Transaction>,
    pub adds: Vec<u32>,
    pub evicted: Vec<u32>,
}

/// The in-memory table of hot extents.
#[derive(Debug)]
pub struct ActivityLog {
    slots: Vec<u32>,
    hot: HashMap<u32, Hot>,
    /// Unreferenced hot extents by last use: the front is the eviction victim.
    lru: BTreeMap<u64, u32>,
    free: Vec<u32>,
    tick: u64,
    /// The next transaction's sequence number.
    pub next_seq: u64,
    /// The first slot of the next context slice.
    cursor: u32,
    /// Cold extents that writes are waiting for; the next transaction takes them in.
    wanted: HashSet<u32>,
    /// Cold extents a sequential writer is expected to reach soon: the next transaction
    /// takes them in while free slots last, never evicting for them.
    ahead: Vec<u32>,
    /// Counters since open.
    pub transactions: u64,
    pub evictions: u64,
}

impl ActivityLog {
    /// An empty table of `capacity` slots whose next transaction is `next_seq`.
    pub fn new(capacity: u32, next_seq: u64) -> ActivityLog {
        ActivityLog {
            slots: vec![EMPTY; capacity as usize],
            hot: HashMap::new(),
            lru: BTreeMap::new(),
            free: (0..capacity).rev().collect(),
            tick: 0,
            next_seq,
            cursor: 0,
            wanted: HashSet::new(),
            ahead: Vec::new(),
            transactions: 0,
            evictions: 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Hot extents (durably in the AL).
    pub fn hot(&self) -> usize {
        self.hot.len()
    }

    /// Hot extents with writes in flight.
    pub fn pinned(&self) -> usize {
        self.hot.len() - self.lru.len()
    }

    pub fn is_hot(&self, extent: u32) -> bool {
        self.hot.contains_key(&extent)
    }

    /// Whether every extent of `first..=last` is hot.
    pub fn all_hot(&self, first: u32, last: u32) -> bool {
        (first..=last).all(|e| self.hot.contains_key(&e))
    }

    /// Take a reference on every extent of `first..=last` (all hot).
    pub fn pin(&mut self, first: u32, last: u32) {
        for e in first..=last {
            if let Some(h) = self.hot.get_mut(&e) {
                if h.refs == 0 {
                    self.lru.remove(&h.tick);
                }
                h.refs += 1;
            }
        }
    }

    /// Drop a reference on every extent of `first..=last`; true if one became evictable.
    pub fn unpin(&mut self, first: u32, last: u32) -> bool {
        let mut freed = false;
        for e in first..=last {
            if let Some(h) = self.hot.get_mut(&e) {
                if h.refs > 0 {
                    h.refs -= 1;
                    if h.refs == 0 {
                        self.tick += 1;
                        h.tick = self.tick;
                        self.lru.insert(self.tick, e);
                        freed = true;
                    }
                }
            }
        }
        freed
    }

    /// Ask for the cold extents of `first..=last` in the next transaction.
    pub fn want(&mut self, first: u32, last: u32) {
        for e in first..=last {
            if !self.hot.contains_key(&e) {
                self.wanted.insert(e);
            }
        }
    }

    /// Ask for the cold extents of `first..=last` in the next transaction if free slots
    /// are left over (read-ahead for a sequential writer).
    pub fn want_ahead(&mut self, first: u32, last: u32) {
        self.ahead = (first..=last)
            .filter(|e| !self.hot.contains_key(e))
            .collect();
    }

    /// Forget what writes were waiting for (at close, so nothing is brought in).
    pub fn clear_wanted(&mut self) {
        self.wanted.clear();
        self.ahead.clear();
    }

    /// Plan the transaction that makes `first..=last` hot, taking in other wanted extents
    /// while free or evictable slots and update entries last. Returns `None` when the
    /// request's own extents cannot all get a slot now (every slot is pinned): wait for an
    /// `unpin`. The plan's victims leave the table at once, so no new write can pin them
    /// while their bits are being persisted; their slots already hold the new extents,
    /// which count as hot only after [`ActivityLog::commit`].
    pub fn plan(&mut self, first: u32, last: u32) -> Option<Plan> {
        let mine: Vec<u32> = (first..=last).filter(|e| !self.is_hot(*e)).collect();
        if mine.is_empty() {
            return Some(Plan::default());
        }
        // Victims may not be among the request's own (unpinned) hot extents.
        let evictable = self
            .lru
            .values()
            .filter(|e| !(first..=last).contains(*e))
            .take(mine.len())
            .count();
        if self.free.len() + evictable < mine.len() {
            return None;
        }
        let others: Vec<u32> = self
            .wanted
            .iter()
            .copied()
            .filter(|e| !(first..=last).contains(e) && !self.is_hot(*e))
            .collect();
        let mut plan = Plan::default();
        let mut updates = Vec::new();
        for (i, e) in mine.into_iter().chain(others).enumerate() {
            if updates.len() == UPDATES_PER_TRANSACTION {
                break;
            }
            let slot = match self.free.pop() {
                Some(s) => s,
                None => {
                    let victim = self
                        .lru
                        .iter()
                        .find(|(_, v)| !(first..=last).contains(*v))
                        .map(|(t, v)| (*t, *v));
                    let Some((tick, victim)) = victim else {
                        // Only reachable for the optional extents (counted above).
                        debug_assert!(i > 0);
                        break;
                    };
                    self.lru.remove(&tick);
                    let Some(h) = self.hot.remove(&victim) else {
                        break;
                    };
                    plan.evicted.push(victim);
                    self.evictions += 1;
                    h.slot
                }
            };
            self.slots[slot as usize] = e;
            updates.push((slot, e));
            plan.adds.push(e);
        }
        // Read-ahead: free slots only, after everything a write waits for.
        for e in std::mem::take(&mut self.ahead) {
            if updates.len() == UPDATES_PER_TRANSACTION {
                break;
            }
            if self.is_hot(e) || plan.adds.contains(&e) {
                continue;
            }
            let Some(slot) = self.free.pop() else {
                break;
            };
            self.slots[slot as usize] = e;
            updates.push((slot, e));
            plan.adds.push(e);
        }
        let n = self.slots.len() as u32;
        let start = self.cursor % n;
        let len = (CONTEXT_PER_TRANSACTION as u32).min(n - start);
        self.cursor = (start + len) % n;
        plan.transaction = Some(Transaction {
            seq: self.next_seq,
            updates,
            context_start: start,
            context: self.slots[start as usize..(start + len) as usize].to_vec(),
        });
        self.next_seq += 1;
        Some(plan)
    }

    /// The planned transaction is durable: its extents are hot (unreferenced).
    pub fn commit(&mut self, plan: &Plan) {
        let Some(t) = &plan.transaction else {
            return;
        };
        for &(slot, e) in &t.updates {
            self.tick += 1;
            self.hot.insert(
                e,
                Hot {
                    slot,
                    refs: 0,
                    tick: self.tick,
                },
            );
            self.lru.insert(self.tick, e);
            self.wanted.remove(&e);
        }
        self.transactions += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [3; 16];

    #[test]
    fn transactions_round_trip_and_reject_damage() {
        let t = Transaction {
            seq: 42,
            updates: vec![(0, 7), (3, 9)],
            context_start: 0,
            context: vec![7, EMPTY, EMPTY, 9],
        };
        let b = t.encode(&ID);
        assert_eq!(&b[0..4], b"CVAL");
        assert_eq!(Transaction::decode(&b, &ID), Some(t.clone()));
        assert_eq!(t.extents().collect::<Vec<_>>(), vec![7, 9, 7, 9]);
        assert_eq!(Transaction::decode(&b, &[4; 16]), None, "another volume");
        let mut torn = b.clone();
        torn[2048..].fill(0);
        assert_eq!(Transaction::decode(&torn, &ID), None);
        assert_eq!(Transaction::decode(&[0u8; 4096], &ID), None);
    }

    /// Run `plan`/`commit` cycles like the tracker does and return the ring image.
    fn write_ring(al: &mut ActivityLog, ring: u32, image: &mut [u8], extents: &[u32]) {
        for &e in extents {
            al.pin(e, e);
            if !al.is_hot(e) {
                let plan = al.plan(e, e).expect("a slot");
                let t = plan.transaction.as_ref().unwrap();
                let pos = (t.seq % u64::from(ring)) as usize * PAGE as usize;
                image[pos..pos + PAGE as usize].copy_from_slice(&t.encode(&ID));
                al.commit(&plan);
                al.pin(e, e);
            }
            al.unpin(e, e);
        }
    }

    #[test]
    fn ring_wraps_and_still_names_every_hot_extent() {
        // A table bigger than one context slice, and a ring that wraps many times.
        let capacity = 2000;
        let ring = crate::layout::al_ring_for(capacity);
        assert_eq!(ring, 16);
        let mut al = ActivityLog::new(capacity, 0);
        let mut image = vec![0u8; ring as usize * PAGE as usize];
        // 2000 distinct extents fill the table (transactions 0..2000, wrapping the ring
        // 125 times); then 300 more evict the oldest.
        let all: Vec<u32> = (0..2300).map(|i| i * 7).collect();
        write_ring(&mut al, ring, &mut image, &all);
        assert_eq!(al.hot(), 2000);
        assert_eq!(al.next_seq, 2300);
        assert_eq!(al.evictions, 300);
        let s = scan(&image, ring, 0, u64::from(u32::MAX - 1), &ID);
        assert_eq!(s.transactions, ring as usize);
        assert_eq!(s.max_seq, Some(2299));
        let hot: Vec<u32> = all[300..].to_vec();
        for e in &hot {
            assert!(
                s.extents.contains(e),
                "hot extent {e} not named by the ring"
            );
        }
        // The union is bounded: the table now plus the few evicted since the oldest
        // transaction in the ring.
        assert!(
            s.extents.len() <= 2000 + ring as usize,
            "{}",
            s.extents.len()
        );

        // A torn last transaction loses nothing that was hot before it.
        let last = (2299 % ring) as usize * PAGE as usize;
        image[last + 100] ^= 0xff;
        let s = scan(&image, ring, 0, u64::from(u32::MAX - 1), &ID);
        assert_eq!(s.max_seq, Some(2298));
        let newest = all[2299];
        for e in hot.iter().filter(|e| **e != newest) {
            assert!(
                s.extents.contains(e),
                "hot extent {e} lost with a torn entry"
            );
        }

        // The floor hides an older epoch.
        let s = scan(&image, ring, 2300, u64::from(u32::MAX - 1), &ID);
        assert!(s.extents.is_empty());
        assert_eq!(s.max_seq, Some(2298));
    }

    #[test]
    fn pinned_extents_are_never_evicted() {
        let mut al = ActivityLog::new(2, 0);
        for e in [1, 2] {
            let p = al.plan(e, e).unwrap();
            al.commit(&p);
        }
        al.pin(1, 2);
        assert!(al.plan(3, 3).is_none(), "both slots pinned");
        al.unpin(2, 2);
        let p = al.plan(3, 3).unwrap();
        assert_eq!(p.evicted, vec![2]);
        assert!(!al.is_hot(2) && !al.is_hot(3), "hot only after commit");
        al.commit(&p);
        assert!(al.is_hot(3) && al.is_hot(1));
        // A request's own extents are not victims: 1 is pinned, 3 is its own.
        al.unpin(1, 1);
        let p = al.plan(3, 4).unwrap();
        assert_eq!(p.evicted, vec![1]);
        assert_eq!(p.adds, vec![4]);
    }

    #[test]
    fn one_transaction_takes_in_what_others_wait_for() {
        let mut al = ActivityLog::new(8, 5);
        al.want(10, 12);
        al.want(20, 20);
        let p = al.plan(10, 11).unwrap();
        let t = p.transaction.as_ref().unwrap();
        assert_eq!(t.seq, 5);
        assert_eq!(&p.adds[..2], &[10, 11]);
        let mut adds = p.adds.clone();
        adds.sort();
        assert_eq!(adds, vec![10, 11, 12, 20]);
        al.commit(&p);
        assert!(al.all_hot(10, 12) && al.is_hot(20));
        assert_eq!(al.transactions, 1);
    }
}
