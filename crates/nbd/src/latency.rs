//! How long an export's writes take, as a histogram with fixed buckets: the server records
//! every WRITE, WRITE_ZEROES and TRIM from the moment its handler starts (before the
//! observer's `before_write`) to the moment its reply is ready (after `after_write`, which
//! for replication protocol C waits for the peers). The embedder reads it for monitoring.
//!
//! Recording is a handful of relaxed atomic adds and no lock: it sits on every write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the last bucket, `+Inf`, is implicit): from a
/// write to the page cache (tens of microseconds) to one stalled on a slow disk or peer.
pub const BOUNDS_SECS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The same bounds in nanoseconds, for the comparison on the hot path.
const BOUNDS_NANOS: [u64; 16] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Write latencies of one export.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Writes per bucket (not cumulative); the last one counts those above every bound.
    buckets: [AtomicU64; BOUNDS_NANOS.len() + 1],
    sum_nanos: AtomicU64,
}

/// What [`LatencyHistogram::snapshot`] read.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySnapshot {
    /// Writes recorded (the sum of `buckets`).
    pub count: u64,
    /// Their total time, in seconds.
    pub sum_secs: f64,
    /// (upper bound in seconds, writes in that bucket only), ending with `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NANOS
            .iter()
            .position(|&b| nanos <= b)
            .unwrap_or(BOUNDS_NANOS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The histogram as it stands. The count is the sum of the buckets read, so the two
    /// agree even while writes are being recorded.
    pub fn snapshot(&self) -> LatencySnapshot {
        let buckets: Vec<(f64, u64)> = BOUNDS_SECS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        LatencySnapshot {
            count: buckets.iter().map(|(_, n)| n).sum(),
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_agree_and_writes_land_in_their_bucket() {
        for (s, n) in BOUNDS_SECS.iter().zip(BOUNDS_NANOS) {
            assert_eq!((s * 1e9).round() as u64, n);
        }
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(10));
        h.record(Duration::from_micros(50));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets.len(), BOUNDS_SECS.len() + 1);
        assert_eq!(s.buckets[0], (0.000_05, 2));
        assert_eq!(s.buckets[6], (0.005, 1));
        assert_eq!(s.buckets[16], (f64::INFINITY, 1));
        assert!((s.sum_secs - 60.003_06).abs() < 1e-9, "{}", s.sum_secs);
    }
}
