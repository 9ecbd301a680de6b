//! When a follow is pulled next: a fixed interval with jitter while the origin answers, and
//! capped exponential backoff while it does not. Pure (the caller supplies the randomness),
//! so the schedule is tested without clocks.

use std::time::Duration;

/// How often each follow is pulled by default.
pub const DEFAULT_PULL_INTERVAL: Duration = Duration::from_secs(30);
/// First retry delay after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts while the origin is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The pull timing of a follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PullSchedule {
    pub interval: Duration,
    pub max_backoff: Duration,
}

impl Default for PullSchedule {
    fn default() -> Self {
        PullSchedule {
            interval: DEFAULT_PULL_INTERVAL,
            max_backoff: MAX_BACKOFF,
        }
    }
}

impl PullSchedule {
    /// The wait before the next attempt after `failures` consecutive failures (0: the last
    /// attempt succeeded). `unit` in [0, 1) picks the jitter: the wait is spread over
    /// [3/4, 5/4] of the nominal delay (so followers of one origin do not pull in lockstep),
    /// and never exceeds `max_backoff`.
    pub fn next_delay(&self, failures: u32, unit: f64) -> Duration {
        let nominal = if failures == 0 {
            self.interval
        } else {
            let doubled = FIRST_BACKOFF
                .checked_mul(1u32 << (failures - 1).min(20))
                .unwrap_or(self.max_backoff);
            doubled
                .min(self.max_backoff)
                .min((self.interval * 16).max(FIRST_BACKOFF))
        };
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.5
        };
        nominal
            .mul_f64(0.75 + unit / 2.0)
            .min(self.max_backoff.max(self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn success_waits_an_interval_failures_back_off_to_a_cap() {
        let s = PullSchedule {
            interval: Duration::from_secs(30),
            max_backoff: Duration::from_secs(300),
        };
        assert_eq!(s.next_delay(0, 0.5), Duration::from_secs(30));
        assert_eq!(s.next_delay(1, 0.5), Duration::from_secs(1));
        assert_eq!(s.next_delay(2, 0.5), Duration::from_secs(2));
        assert_eq!(s.next_delay(5, 0.5), Duration::from_secs(16));
        assert_eq!(s.next_delay(30, 0.5), Duration::from_secs(300));
        assert_eq!(s.next_delay(0, 0.0), Duration::from_millis(22_500));
        assert_eq!(s.next_delay(0, 1.0), Duration::from_millis(37_500));
    }

    #[test]
    fn a_short_interval_keeps_backoff_short() {
        // A test-sized interval: backoff is capped at 16 intervals.
        let s = PullSchedule {
            interval: Duration::from_millis(200),
            max_backoff: Duration::from_secs(300),
        };
        assert_eq!(s.next_delay(30, 0.5), Duration::from_millis(3200));
    }

    proptest! {
        #[test]
        fn delays_are_bounded(failures in 0u32..100, unit in any::<f64>(), secs in 1u64..1000) {
            let s = PullSchedule { interval: Duration::from_secs(secs), max_backoff: MAX_BACKOFF };
            let d = s.next_delay(failures, unit);
            prop_assert!(d <= MAX_BACKOFF.max(s.interval));
            prop_assert!(d >= Duration::from_millis(750).min(s.interval));
        }
    }
}
