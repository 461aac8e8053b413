//! The reconnect backoff of the broker backends ([`super::amqp`] and [`super::pubsub`]): 100 ms,
//! doubling up to [`BACKOFF_MAX`], each pause jittered by ±20% so that workers which lost their
//! broker together do not reconnect in lockstep. The schedule is `backon`'s exponential one
//! (already in the tree through lapin); the jitter is ours because backon's only adds (0–100%),
//! which would double the longest pause.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// First pause after a failure.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest pause between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Pauses between reconnect attempts; [`Backoff::reset`] after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    steps: <ExponentialBuilder as BackoffBuilder>::Backoff,
}

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff { steps: Self::schedule() }
    }

    fn schedule() -> <ExponentialBuilder as BackoffBuilder>::Backoff {
        ExponentialBuilder::default()
            .with_min_delay(BACKOFF_FIRST)
            .with_max_delay(BACKOFF_MAX)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// Start again from [`BACKOFF_FIRST`].
    pub(crate) fn reset(&mut self) {
        self.steps = Self::schedule();
    }

    /// The next pause, jittered.
    pub(crate) fn step(&mut self) -> Duration {
        let d = self.steps.next().unwrap_or(BACKOFF_MAX);
        d.mul_f64(rand::random_range(0.8..1.2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_100_ms_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new();
        let mut want = 0.1;
        for _ in 0..12 {
            let d = b.step().as_secs_f64();
            assert!(d >= want * 0.8 - 1e-6 && d <= want * 1.2 + 1e-6, "{d} s, expected {want} s ±20%");
            want = (want * 2.0).min(5.0);
        }
        b.reset();
        assert!(b.step() <= Duration::from_millis(120));
    }
}
