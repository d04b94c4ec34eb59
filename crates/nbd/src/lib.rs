//! cutover's NBD server: the block-volume export a `cutover serve` daemon offers on its
//! primary node (a Unix socket by default), so that the kernel's `nbd-client`, QEMU
//! (`nbd+unix:///NAME?socket=PATH`), `nbdcopy` or `qemu-io` can attach to a volume while
//! cutover records (and later replicates) every write.
//!
//! What it speaks: the fixed newstyle handshake (with `NO_ZEROES`); the options
//! `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`
//! and `SET_META_CONTEXT` (anything else, TLS included, is unsupported); the commands
//! READ (structured replies with holes as `OFFSET_HOLE`, or simple replies), WRITE, FLUSH,
//! TRIM, WRITE_ZEROES (`NO_HOLE`, `FAST_ZERO`), BLOCK_STATUS (`base:allocation` plus the
//! embedder's contexts) and DISC, with FUA; many requests in flight per connection and
//! several connections per export (`CAN_MULTI_CONN` when the backend's flush covers them
//! all).
//!
//! What it is given: [`Export`]s, each a [`Backend`] ([`FileBackend`] for a file or block
//! device), [`MetaContext`]s (cutover's dirty bitmap as `cutover:dirty`) and an optional
//! [`WriteObserver`] called before and after every write (cutover's activity log must
//! record a cold extent before the first write to it).
//!
//! Entry points: [`serve_unix`], [`serve_tcp`], [`serve_connection`], or a [`Server`]
//! with a [`Config`] of per-connection bounds.
//!
//! Files follow the protocol's phases: `handshake.rs` (greeting, option loop on the wire),
//! `options.rs` (what each option does), `request.rs` (request decoding and checks),
//! `reply.rs` (reply encoding), `server.rs` (transmission: reader, writer), `handle.rs`
//! (the handlers), `behind.rs` (writes answered before they are made),
//! `backend.rs`, `export.rs` (what the embedder supplies), `latency.rs` (the write latency
//! histogram), `wire.rs` (the numbers).

mod backend;
mod behind;
mod direct;
mod error;
mod export;
mod handle;
mod handshake;
mod latency;
pub mod options;
pub mod reply;
pub mod request;
mod server;
pub mod wire;

pub use backend::{write_zero_buffers, Allocation, Backend, FileBackend, Zeroing};
pub use error::Error;
pub use export::{Export, Extent, MetaContext, WriteEvent, WriteKind, WriteObserver};
pub use latency::{LatencyHistogram, LatencySnapshot};
pub use server::{serve_connection, serve_tcp, serve_unix, Config, Server};
pub use wire::Errno;
