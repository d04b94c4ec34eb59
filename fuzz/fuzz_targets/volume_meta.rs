//! Fuzz target: arbitrary bytes as the on-disk structures of a volume's metadata file (the
//! `volume` crate): superblock copies and activity log transactions, with their checksums
//! made valid so that the checks behind them are reached, and rings of transactions as
//! they are. What decodes must describe a layout the crate accepts and round-trip. Owns
//! nothing but this harness.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = volume::fuzzing::superblock(data);
    let _ = volume::fuzzing::activity_log(data);
});
