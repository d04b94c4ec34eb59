//! Integration tests of the `cutover` binary: one test binary (as in ripgrep), each module a
//! theme. Every test runs the real binary (and a real daemon where it says so) on small data
//! sets and checks the result against rsync as the oracle. The tests expect to run as root.

mod bad_input;
mod basic;
mod confine;
mod daemon;
mod delta;
mod differential;
mod difftree;
mod faults;
mod files;
mod files_from;
mod hostile;
mod live_writer;
mod lying;
mod manual;
mod metadata;
mod no_loss;
mod odd_names;
mod openssl;
mod plan;
mod plan_passes;
mod plan_verify;
mod prop;
mod replication;
mod replication_faults;
mod replication_fs;
mod replication_grow;
mod replication_ssh;
mod resume;
mod rsync_flags;
mod security;
mod seeding;
mod select;
mod soak;
mod split_brain;
mod ssh;
mod state_damage;
mod util;
mod volume;
mod volume_fs;
mod volume_passes;
mod volume_watch;
mod volumes;
