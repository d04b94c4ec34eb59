//! Integration tests of the nbd crate, in one binary: real clients (`qemu.rs`: qemu-io and
//! qemu-img; `libnbd.rs`: nbdinfo, nbdcopy, nbdsh; `behind.rs`: writes answered before
//! they are made), a raw-protocol client for what real
//! clients never send (`raw.rs`), and random requests against a live export (`props.rs`).
//! The clients must be installed (scripts/test installs them).

mod behind;
mod common;
mod libnbd;
mod props;
mod qemu;
mod raw;
