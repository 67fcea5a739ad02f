//! The one retry pause of the node: exponential backoff with jitter.
//!
//! Every loop in the node that retries a failed NATS request (stream and KV set-up, the
//! identity directory's KV operations, watches started again, the connection at start, the
//! session and the shard-log reader reopened) asks a [`Backoff`] how long to wait before the
//! next attempt, so the pauses grow the same way everywhere and nodes that failed together (a
//! NATS server restart) do not retry in lockstep. It only computes delays: the caller keeps
//! its own attempt bound and its own shutdown `select!`, and this module never sleeps. Two
//! pauses stay fixed on purpose, because something waits on them: a shard worker whose batch
//! failed answers no query while it pauses (1 s), and a query for a moving shard polls
//! every 100 ms until its timeout.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;

/// How a delay is spread around the exponential step it is drawn for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Exactly the step (tests, or a pause that must not shrink).
    None,
    /// Uniform in `[0, step]`: the widest spread, for many clients retrying one server.
    Full,
    /// Uniform in `[step / 2, step]`: spread, but never much shorter than the step.
    Equal,
    /// Uniform in `[step, 3 * step / 2]` (at most the cap): spread, and never shorter than
    /// the step, so a loop bounded by an attempt count keeps at least the window its steps
    /// add up to (the default).
    Longer,
}

/// Exponential backoff: the `n`th delay (0-based) is drawn around
/// `min(initial * factor^n, cap)` according to [`Jitter`]; [`Backoff::reset`] starts again
/// from `initial` (after a success).
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    factor: u32,
    cap: Duration,
    jitter: Jitter,
    /// Delays handed out since the last reset.
    attempts: u32,
    rng: ChaCha8Rng,
}

impl Backoff {
    /// A backoff starting at `initial`, multiplied by `factor` after each delay up to `cap`,
    /// with [`Jitter::Longer`] and a randomly seeded generator.
    pub fn new(initial: Duration, factor: u32, cap: Duration) -> Backoff {
        Backoff::seeded(initial, factor, cap, rand::thread_rng().gen())
    }

    /// [`Backoff::new`] with a fixed seed: the same seed gives the same delays (tests).
    pub fn seeded(initial: Duration, factor: u32, cap: Duration, seed: u64) -> Backoff {
        Backoff {
            initial,
            factor: factor.max(1),
            cap: cap.max(initial),
            jitter: Jitter::Longer,
            attempts: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The same backoff with another jitter.
    pub fn with_jitter(mut self, jitter: Jitter) -> Backoff {
        self.jitter = jitter;
        self
    }

    /// The step (before jitter) of delay number `attempt` (0-based): `initial *
    /// factor^attempt`, at most `cap`.
    pub fn step(&self, attempt: u32) -> Duration {
        let mut step = self.initial;
        for _ in 0..attempt {
            if step >= self.cap {
                break;
            }
            step = step.saturating_mul(self.factor);
        }
        step.min(self.cap)
    }

    /// The delay before the next attempt; the one after it is `factor` times longer (up to
    /// the cap).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        // Never past the cap: it is documented as the longest wait (e.g.
        // `connect_retry_max_ms`). The ramp below it is jittered, which already spreads nodes
        // that failed together.
        self.jittered(step).min(self.cap)
    }

    /// Starts again from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// Delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    fn jittered(&mut self, step: Duration) -> Duration {
        let nanos = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
        let drawn = match self.jitter {
            Jitter::None => nanos,
            Jitter::Full => self.rng.gen_range(0..=nanos),
            Jitter::Equal => nanos / 2 + self.rng.gen_range(0..=nanos - nanos / 2),
            Jitter::Longer => nanos.saturating_add(self.rng.gen_range(0..=nanos / 2)),
        };
        Duration::from_nanos(drawn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn backoff(jitter: Jitter) -> Backoff {
        Backoff::seeded(100 * MS, 2, 1000 * MS, 7).with_jitter(jitter)
    }

    #[test]
    fn steps_grow_by_the_factor_up_to_the_cap() {
        let mut plain = backoff(Jitter::None);
        let delays: Vec<u128> = (0..7).map(|_| plain.next_delay().as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(plain.attempts(), 7);
        assert_eq!(plain.step(u32::MAX), 1000 * MS);
    }

    #[test]
    fn jittered_delays_stay_within_their_bounds() {
        for (jitter, low_share) in [(Jitter::Full, 0), (Jitter::Equal, 2)] {
            let mut backoff = backoff(jitter);
            for attempt in 0..50 {
                let step = backoff.step(attempt);
                let delay = backoff.next_delay();
                assert!(delay <= step, "{jitter:?} {attempt}: {delay:?} > {step:?}");
                if low_share > 0 {
                    assert!(delay >= step / low_share, "{attempt}: {delay:?}");
                }
            }
        }
    }

    #[test]
    fn the_default_jitter_never_shortens_a_step_so_bounded_loops_keep_their_window() {
        // A loop that stops after 5 attempts of 200 ms doubling waited 3.0 s unjittered; with
        // jitter it must wait at least that long (a 2 s leader election is still survived).
        for seed in 0..100 {
            let mut backoff = Backoff::seeded(200 * MS, 2, 5000 * MS, seed);
            let window: Duration = (0..4).map(|_| backoff.next_delay()).sum();
            assert!(
                window >= 3000 * MS && window <= 4500 * MS,
                "{seed}: {window:?}"
            );
        }
        // The cap stays the longest wait.
        let mut capped = Backoff::seeded(200 * MS, 2, 500 * MS, 3);
        for _ in 0..20 {
            assert!(capped.next_delay() <= 500 * MS);
        }
    }

    #[test]
    fn jitter_spreads_the_delays_and_a_seed_repeats_them() {
        let draw = |seed| {
            let mut backoff = Backoff::seeded(100 * MS, 1, 1000 * MS, seed);
            (0..20).map(|_| backoff.next_delay()).collect::<Vec<_>>()
        };
        let first = draw(1);
        assert_eq!(first, draw(1));
        assert_ne!(first, draw(2));
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert!(distinct.len() > 10, "{first:?}");
    }

    #[test]
    fn reset_starts_again_from_the_initial_delay() {
        let mut backoff = backoff(Jitter::None);
        for _ in 0..5 {
            backoff.next_delay();
        }
        backoff.reset();
        assert_eq!(backoff.attempts(), 0);
        assert_eq!(backoff.next_delay(), 100 * MS);
        assert_eq!(backoff.next_delay(), 200 * MS);
    }

    #[test]
    fn a_zero_factor_or_a_cap_below_the_start_do_not_shrink_the_delay() {
        let mut backoff = Backoff::seeded(50 * MS, 0, 10 * MS, 0).with_jitter(Jitter::None);
        assert_eq!(backoff.next_delay(), 50 * MS);
        assert_eq!(backoff.next_delay(), 50 * MS);
    }
}
