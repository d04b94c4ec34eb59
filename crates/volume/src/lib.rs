//! A block volume's metadata file and write tracking: what `cutover serve` keeps beside
//! each volume's backing (a file or device it exports over NBD) so that it always knows
//! which blocks may differ from what a peer last received, even after `kill -9` or a
//! power cut. DRBD's meta-disk, in user space.
//!
//! # Use
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let backend = Arc::new(nbd::FileBackend::open("/srv/db.img", false)?);
//! let size = nbd::Backend::size(&*backend);
//! volume::Meta::create("/srv/db.md", size, volume::DEFAULT_BLOCK_SIZE, false)?; // once
//! let meta = volume::Meta::open("/srv/db.md", size)?;
//! let tracker = meta.tracker();
//! let mut export = nbd::Export::new("db", backend);
//! export.observer = Some(tracker.clone()); // every write recorded before it happens
//! export.meta.push(tracker); // `nbdinfo --map=cutover:dirty`
//! tokio::spawn(nbd::serve_unix("/run/cutover/db.sock", vec![export]));
//! // … later, a replication pass:
//! let pass = meta.mark()?; // blocks written since the previous mark
//! for (offset, length) in pass.extents() { /* copy them to the peer */ }
//! meta.close()?; // clean shutdown: bitmap written, clean flag set
//! # Ok(()) }
//! ```
//!
//! - [`Meta::create`] / [`Meta::create_with`] make the file (refusing an existing one
//!   without `force`); [`Meta::open`] checks it against the backing's size, takes an
//!   exclusive `flock`, and recovers from an unclean shutdown ([`Meta::open_report`]);
//!   [`Meta::inspect`] reads the superblock without opening for tracking.
//! - [`Tracker`] is the export's [`nbd::WriteObserver`] and its `cutover:dirty`
//!   [`nbd::MetaContext`] (flag [`FLAG_DIRTY`] = 1: written since the last mark).
//! - [`Meta::attach_peers`] gives each replication peer a slot; [`Meta::replication`]
//!   is the handle its link drives: the numbered stream of writes, resync of out-of-sync
//!   blocks, acknowledgements ([`Replication`]).
//! - [`Meta::mark`] starts a new generation and returns a [`Snapshot`] of the previous
//!   one; [`Meta::flush`] persists changed bitmap pages (the daemon calls it
//!   periodically; the tracker on NBD FLUSH, at most once a second); [`Meta::status`];
//!   [`Meta::close`].
//!
//! # The file
//!
//! All little-endian, every region 4 KiB aligned and written in whole 4 KiB pages:
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0 | 4 KiB | superblock copy 0 |
//! | 4096 | 4 KiB | superblock copy 1 |
//! | 8192 | `al_ring` × 4 KiB | activity log ring (16 transactions for up to 12 320 hot extents) |
//! | 8192 + 4096 × `al_ring` | ⌈blocks / 8⌉ rounded up to 4 KiB, per slot | dirty bitmap of peer slot 0, then slot 1, … |
//!
//! **Superblock** (`superblock.rs` has the byte table): magic `CUTVOLMD`, format version
//! 1, sequence number, flags (bit 0 = clean shutdown), node id, volume id (random 128
//! bits), size in bytes, block size, extent shift (22: 4 MiB), the layout (slots, hot
//! extents, ring size, offsets; `open` recomputes it and refuses a mismatch), the AL
//! floor, the current generation id with 4 earlier ones, the number of marks, and 32
//! peer slots of 64 bytes (flags, peer node id, bitmap generation id and 2 earlier ones).
//! A BLAKE3 of the first 4064 bytes closes it. Writes alternate between the copies (copy
//! `seq % 2`), always overwriting the older one, so a torn write loses only itself; `open`
//! takes the valid copy with the highest sequence.
//!
//! **Generation ids** are random 64-bit values (0 = none). Slot 0 belongs to marks: its
//! bitmap holds every block written since the last mark, and a mark makes a new id for it
//! (pushing the old one into the slot's history). Slots 1.. belong to replication peers
//! ([`Meta::attach_peers`], `peer.rs`): each bitmap holds every block that peer may lack,
//! and the volume's current id with its history is what peers compare on connect (DRBD's
//! table); marks leave it alone.
//!
//! **Activity log** (`al.rs` has the byte table): each 4 KiB transaction carries up to 64
//! (slot, extent) updates and a moving 880-slot slice of the table of hot extents, with a
//! BLAKE3 over the volume id and its bytes. Transaction `seq` lives at ring position
//! `seq % al_ring`; those below the superblock's floor belong to an earlier epoch.
//!
//! **Bitmap**: block `b` is bit `b % 8` of byte `b / 8` of the slot's region.
//!
//! # Crash safety
//!
//! The in-memory bitmap runs ahead of the on-disk one; the activity log makes up the
//! difference. The invariant, at every instant: *every block written since the on-disk
//! superblock's slot-0 generation began is set in the on-disk bitmap or lies in an extent
//! named by a valid AL transaction of the current epoch.* It holds because
//! - a write to a cold extent waits in `before_write` until an AL transaction naming the
//!   extent is written and `fdatasync`ed; writes to hot extents need no I/O (a writer
//!   moving forward, whose previous extent is hot, has the next 7 extents brought in by the
//!   same transaction while free slots last: a sequential copy syncs the log once per
//!   32 MiB, and a crash marks at most 28 MiB more per such writer);
//! - `before_write` sets the bits before it returns, so before the data can land;
//! - a hot extent with writes in flight is never evicted, and an evicted extent's bitmap
//!   page is written and synced before the transaction that drops it from the table;
//! - a write spanning more extents than a transaction can bring in (large TRIMs and
//!   WRITE_ZEROES) writes and syncs its bitmap pages before it proceeds instead;
//! - `mark()` makes its new generation durable before any bitmap page it cleared can be
//!   written (one lock orders every metadata write);
//! - recovery persists the recovered bits before the superblock that starts a new AL
//!   epoch (a crash during recovery just recovers again).
//!
//! So after `kill -9` or a power cut, `open` marks every extent the AL names dirty on top
//! of the on-disk bitmap and gets a superset of what was written: whole 4 MiB extents, at
//! most `al_extents` of them plus the few the ring still names after evicting them. After
//! `close()` the bitmap is complete, the clean flag set, and nothing extra is marked.
//! Metadata writes are whole 4 KiB pages at aligned offsets; a torn superblock loses only
//! itself (the other copy), a torn transaction only itself (its extent was not yet
//! written), and a torn bitmap page mixes two valid versions bit by bit.
//!
//! The tests prove it in three ways: `powercut.rs` records every metadata write and sync
//! of a random workload (across a crash and a recovery) and opens every image a power cut
//! could leave (any subset of unsynced writes, torn ones); `tests/crash.rs` kills the
//! `serve_volume` example with SIGKILL under two qemu-io streams; `tests/meta.rs` covers
//! the pieces (damaged copies, ring wrap, eviction, write-through).
//!
//! A failed metadata write stops tracking: every later write fails (`EIO`) until the
//! volume is reopened, because an untracked write is worse than a refused one.
//!
//! # Marks and concurrent writes
//!
//! `mark()` swaps the live bitmap for an empty one under the lock `before_write` marks
//! under, then marks again every write still in flight (between `before_write` and
//! `after_write`). So: every write acknowledged before `mark()` returns is in the snapshot
//! or in the live set; and a block whose write might land after a consumer of the
//! snapshot read it is in the live set, so the next pass takes it (`tests/concurrent.rs`
//! copies snapshots under concurrent slow writers and must end with an exact copy). The
//! snapshot lives only in memory: after a crash the file says "changes since the new
//! generation", and a consumer that had not finished the pass sees from the ids that its
//! peer holds neither generation and copies everything.
//!
//! # Memory
//!
//! One bit per block (plus a bit per 4 KiB page of it): `size / block_size / 8` bytes,
//! 8 MiB per TiB at the default 16 KiB, 2 MiB at 64 KiB; a snapshot held by a consumer
//! is another such bitmap. The AL table is a few dozen bytes per hot extent (1024 by
//! default). A bitmap may not exceed 1 GiB (`create` refuses: 128 TiB at 16 KiB, 32 TiB
//! at 4 KiB).
//!
//! # Granularity: 16 KiB, by measurement
//!
//! `cargo run --release -p volume --example granularity -- DIR` weighs keeping the
//! bitmap against resyncing from it. Figures from one run (ext4 on a virtio disk, 2
//! vCPUs; over three runs the random-read latencies varied by up to 50%, the rest by
//! less than 10%), 1 TiB volume, one peer slot:
//!
//! | block | bitmap per TiB | 16 TiB | open 1 TiB | close 1 TiB | flush after 20k writes over 1024 extents |
//! |---|---|---|---|---|---|
//! | 4 KiB | 32 MiB | 512 MiB | 47 ms | 52 ms | 969 pages, 12.1 ms |
//! | 16 KiB | 8 MiB | 128 MiB | 13 ms | 14 ms | 815 pages, 6.5 ms |
//! | 64 KiB | 2 MiB | 32 MiB | 3.7 ms | 3.1 ms | 437 pages, 2.6 ms |
//! | 256 KiB | 512 KiB | 8 MiB | 0.7 ms | 0.7 ms | 128 pages, 0.8 ms |
//!
//! Resync: bytes to resend (× the distinct 4 KiB pieces written), time to read them from
//! the backing (random `O_DIRECT` reads measured at 68, 76, 88, 193 and 754 µs for 4, 16,
//! 64, 256 KiB and 1 MiB, runs read in pieces of up to 1 MiB), and time on the link:
//!
//! | pattern | 4 KiB | 16 KiB | 64 KiB | 256 KiB |
//! |---|---|---|---|---|
//! | 200k random 4 KiB writes, 90% in 2 GiB | 674 MiB ×1.0, read 9.0 s, 57 s at 100 Mbit/s | 1.8 GiB ×2.7, 4.5 s, 2.6 min | 3.2 GiB ×4.9, 3.3 s, 4.6 min | 6.9 GiB ×10.5, 5.5 s, 9.9 min |
//! | 100k random 16 KiB writes, 90% in 2 GiB | 1.1 GiB ×1.0, 3.6 s, 99 s | 1.1 GiB ×1.0, 3.6 s, 99 s | 2.5 GiB ×2.2, 2.7 s, 3.5 min | 4.4 GiB ×3.8, 3.5 s, 6.3 min |
//! | 20k random 4 KiB writes over 1 TiB | 78 MiB ×1.0, 1.4 s, 6.6 s | 313 MiB ×4.0, 1.5 s, 26 s | 1.2 GiB ×16, 1.8 s, 105 s | 4.9 GiB ×64, 3.9 s, 7.0 min |
//! | 4 GiB of sequential 1 MiB writes | 4.0 GiB ×1.0, 3.1 s, 5.7 min | same | same | same |
//!
//! The tracker's own cost is about 1 µs per write at every size (5-9 µs for writes that
//! need an AL transaction, the `fdatasync` aside, which does not depend on the block).
//!
//! Reading: keeping the bitmap is cheap at every size for common volumes (a 4 TiB volume
//! needs 128 MiB at 4 KiB, 32 MiB at 16 KiB, per peer), and only 4 KiB grows awkward at
//! 16 TiB with several peers (512 MiB each). Resync is where the sizes part: the link,
//! not the disk, is cutover's bottleneck (a long link at 2 MB/s per flow), and random
//! writes resend 2.7-4× more at 16 KiB than at 4 KiB but 4.9-16× more at 64 KiB; 16 KiB
//! database pages (InnoDB; PostgreSQL's 8 KiB are close) cost nothing extra at 16 KiB.
//! Backing reads favour bigger blocks only mildly (random reads cost about the same up to
//! 64 KiB). 16 KiB keeps most of 4 KiB's resync economy for a quarter of its memory;
//! choose 4 KiB for small volumes under scattered 4 KiB writes, 64 KiB for huge volumes
//! written sequentially (`create-md --block-size`). A resync that compares 4 KiB hashes
//! inside dirty blocks ("Volumes 2/3", `csums`) would make the link cost independent of
//! the choice and favour larger blocks again.
//!
//! # Files
//!
//! `layout.rs` (offsets, limits), `superblock.rs`, `al.rs` (transactions, ring scan,
//! the hot-extent table), `bitmap.rs` (bits, changed pages, snapshots), `disk.rs` (the
//! file I/O trait), `open.rs` (create, open with recovery, inspect), `meta.rs` (the
//! shared state, mark, flush, status, close), `tracker.rs` (the write path and the NBD
//! traits), `error.rs`.

mod al;
mod bitmap;
mod disk;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod generations;
mod layout;
mod meta;
mod open;
mod peer;
mod peer_acks;
mod slots;
mod superblock;
mod tracker;
mod verify;

pub use bitmap::Snapshot;
pub use error::Error;
pub use generations::Generations;
pub use layout::{
    Geometry, DEFAULT_AL_EXTENTS, DEFAULT_BLOCK_SIZE, EXTENT_SIZE, MAX_BLOCK_SIZE, MAX_PEER_SLOTS,
    MIN_BLOCK_SIZE,
};
pub use meta::{AlStatus, Counters, Meta, OpenReport, Result, Status};
pub use open::{CreateOptions, Info};
pub use peer::{Op, OpKind, PeerStatus, Replication, StreamOptions};
pub use peer_acks::Applied;
pub use tracker::{Tracker, DEFAULT_FLUSH_INTERVAL, DIRTY_CONTEXT, FLAG_DIRTY};

#[cfg(test)]
mod powercut;
