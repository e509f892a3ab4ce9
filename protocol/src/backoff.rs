//! The one retry policy both sides of the protocol use: exponential back-off from a base delay,
//! doubling per failure up to a cap, optionally with "full jitter" (a random fraction of the
//! delay, passed in: this crate reads no clock and no random source).
//!
//! Agents reconnecting to the broker, the controller reconnecting to it, and the agent retrying
//! a failed hypervisor operation or restarting a crashed instance all back off with it.

use core::time::Duration;

/// Exponential back-off state: how many failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A back-off starting at `base` and never waiting longer than `max`.
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            failures: 0,
        }
    }

    /// The delay before the next attempt (the full delay: base, 2 base, 4 base... up to max),
    /// counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1 << self.failures.min(20))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        d
    }

    /// The same with full jitter: `unit` in [0, 1) picks a point between 0 and the delay, so
    /// that many clients failing together do not retry together.
    pub fn next_jittered(&mut self, unit: f64) -> Duration {
        self.next_delay().mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Failures in a row so far.
    pub const fn failures(&self) -> u32 {
        self.failures
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        assert_eq!(b.next_delay(), Duration::from_millis(200));
        assert_eq!(b.next_delay(), Duration::from_millis(400));
        assert_eq!(b.next_jittered(0.5), Duration::from_millis(400));
        for _ in 0..40 {
            assert!(b.next_delay() <= Duration::from_secs(30));
        }
        assert_eq!(b.next_delay(), Duration::from_secs(30));
        assert_eq!(b.next_jittered(0.0), Duration::ZERO);
        assert!(b.failures() > 40);
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }
}
