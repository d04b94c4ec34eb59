//! The replication link between two nodes of a volume: DRBD's wire protocol, in user
//! space, over a set of connections the daemon opened (TLS, mutually pinned).
//!
//! A link is N + 1 connections. Connection 0 carries the control messages: each end's
//! generation ids and role first ([`wire::NodeState`]), from which both ends compute the
//! same verdict ([`decide`]); then the target's bitmap for the source, the start of the
//! stream, acknowledgements and keepalives. Connections 1..=N carry the numbered stream
//! from the primary (the source): application writes as they happen and resync runs in
//! disk order, spread over all of them so that a link whose single flows are capped is
//! still filled. The target applies by number ([`target`]), so the order of connections
//! does not matter, and acknowledges what it wrote and what it flushed; the source's
//! volume clears a block from the peer's bitmap only once its last write is durable there.
//!
//! The source's side is [`source`]; what a node lacks and what the stream holds live in
//! the volume crate ([`volume::Replication`]).

pub mod decide;
mod link;
mod source;
mod target;
pub mod wire;

pub use decide::{decide, Verdict};
pub use link::{run, run_growing, LinkError, LinkInfo, LinkSettings, LinkView};
pub use wire::SplitBrainPolicy;
