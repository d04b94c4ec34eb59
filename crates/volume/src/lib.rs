//! A block volume's metadata file and write tracking (draft crate doc, completed below).

mod al;
mod bitmap;
mod disk;
mod error;
mod layout;
mod meta;
mod open;
mod superblock;
mod tracker;

pub use bitmap::Snapshot;
pub use error::Error;
pub use layout::{
    Geometry, DEFAULT_AL_EXTENTS, DEFAULT_BLOCK_SIZE, EXTENT_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE,
};
pub use meta::{AlStatus, Counters, Meta, OpenReport, Result, Status};
pub use open::{CreateOptions, Info};
pub use tracker::{Tracker, DEFAULT_FLUSH_INTERVAL, DIRTY_CONTEXT, FLAG_DIRTY};

#[cfg(test)]
mod powercut;
