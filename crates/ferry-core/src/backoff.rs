//! Retry delays with jitter, shared by the sink's bulk retries and the
//! engine's restart loop.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays for one run of failures, forever: step `n` doubles from `first` up
/// to `max`, and each delay is drawn at random from `[step / 2, step)` so
/// processes failing together do not all come back at the same instant.
pub fn jittered(first: Duration, max: Duration) -> ExponentialBackoff {
    // backon adds a random 0–100 % to each step, so halving both ends gives
    // delays in [step / 2, step) that never pass `max`.
    ExponentialBuilder::default()
        .with_min_delay(first / 2)
        .with_max_delay(max.max(first) / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_with_jitter_and_never_pass_the_cap() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut delays = jittered(first, max);
        let mut step = first;
        for _ in 0..40 {
            let d = delays.next().expect("forever");
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
    }
}
