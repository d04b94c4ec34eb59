//! A byte-rate limit shared by every connection of a session (`--bwlimit`).

use governor::{DefaultDirectRateLimiter, Quota};
use std::num::NonZeroU32;

/// Tokens are KiB so that one `u32` quota covers any sane rate.
const UNIT: u64 = 1024;

pub struct RateLimiter {
    inner: DefaultDirectRateLimiter,
    burst_units: u32,
}

impl RateLimiter {
    /// `bytes_per_sec` must be at least 1 KiB/s.
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        let units = u32::try_from((bytes_per_sec / UNIT).max(1)).ok()?;
        let per_sec = NonZeroU32::new(units)?;
        // A burst of 1/4 s keeps the rate smooth yet lets a 1 MiB frame through.
        let burst = NonZeroU32::new((units / 4).max(1024))?;
        Some(RateLimiter {
            inner: DefaultDirectRateLimiter::direct(Quota::per_second(per_sec).allow_burst(burst)),
            burst_units: burst.get(),
        })
    }

    /// Wait until `bytes` may be sent.
    pub async fn take(&self, bytes: u64) {
        let mut units = bytes.div_ceil(UNIT);
        while units > 0 {
            let n = units.min(u64::from(self.burst_units)) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                // `until_n_ready` only fails when n exceeds the burst, which `min` rules out.
                let _ = self.inner.until_n_ready(n).await;
            }
            units -= u64::from(n);
        }
    }
}
