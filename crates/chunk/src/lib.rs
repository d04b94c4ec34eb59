//! Hashing, chunking and delta planning for the sync pipeline: pure functions over byte slices, no I/O.
//!
//! - [`hash`]: BLAKE3 block hashes for positional compare, the whole-file digest, zero detection.
//! - [`cdc`]: FastCDC (v2020) parameters and a streaming chunker whose cuts equal one-shot chunking.
//! - [`delta`]: the receiver's chunk index, delta ops, their coalescing, planning and applying.
//!
//! Nothing here reads files or sockets: callers hand in the bytes they read, so the engine
//! decides buffering, parallelism across files, and what travels over the wire.
#![forbid(unsafe_code)]

pub mod cdc;
pub mod delta;
pub mod hash;

pub use cdc::{CdcParams, ChunkRef, StreamChunker};
pub use delta::{apply_ops, plan_chunks, ChunkIndex, DeltaOp, OpCoalescer};
pub use hash::{
    block_hash, block_hashes, differing_blocks, file_digest, is_zero, leaf_hash, truncate,
    BlockHash, DigestBuilder, LEAF, LEVELS,
};
