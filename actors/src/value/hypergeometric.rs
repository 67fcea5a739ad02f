//! The Gauss hypergeometric function 2F1 in the one form the BG/NBD model needs: how many
//! purchases a customer who is still alive is expected to make within a horizon.
//!
//! [`crate::value::bgnbd`] calls [`expected_purchases_while_alive`] (one horizon) and
//! [`expected_purchases_while_alive_grid`] (every period of a CLV horizon). Both compute
//!
//! ```text
//! J(s) = E_p[ (1 - (1 + p s)^-n) / p ],   p ~ Beta(a, beta),
//!      = c / (a - 1) * (1 - (1 - z)^n * 2F1(n, beta; c; z))     (the textbook form)
//! ```
//!
//! with `n = r + x`, `beta = b + x`, `c = a + beta - 1`, `s = t / (alpha + T)` and
//! `z = s / (1 + s)`. The textbook form cancels catastrophically (it is 0/0 at `a = 1`, its
//! 2F1 is ~(1 - z)^-n for thousands of purchases, and `c` may be zero), so it is never
//! evaluated as written. Four evaluations are tried in order; each refuses (and the next is
//! tried) when it has not converged within [`SERIES_MAX_TERMS`] terms or its terms add up
//! to more than [`SERIES_MAX_CANCELLATION`] times its value (three digits lost):
//!
//! 1. **Euler series** (the usual path). An Euler transformation moves the large
//!    parameters into the denominator: `J = c E1 - (1+s)^(1-a) K(z)` with
//!    `E1 = (1 - (1+s)^(1-a)) / (a-1)` (through `expm1`, so `a = 1` is exact) and
//!    `K(z) = sum_{k>=1} (c-n)_k (a)_{k-1} / ((c+1)_{k-1} k!) z^k`. The terms fall like
//!    `k^(a-n-2) z^k`: fast for large `x` at any `z`; slow for few purchases with `z` near 1;
//!    cancelling when `c` is far from `n` (`b` much larger than `r + x`: low churn).
//! 2. **Difference series**, for `c > n`: subtracting the exact `2F1(c, a-1; c; z)` leaves
//!    `J = c (1+s)^(1-a) sum_{k>=1} d_k (a)_{k-1} / k! z^k` with
//!    `d_k = 1 - prod_{j<k} (1 - n / (c + j))` in `(0, 1)`: every term positive, so no
//!    cancellation however large `b` is.
//! 3. **Alternating series** in `s`, for `s < 1`:
//!    `J = sum_{k>=1} (-1)^(k+1) (n)_k (a)_{k-1} / ((a+beta)_{k-1} k!) s^k`, good for small
//!    horizons and large `r`.
//! 4. **ODE continuation**. `J' = n F(-s)` with `F = 2F1(n+1, a; a+beta; .)`, which
//!    satisfies the hypergeometric differential equation. Start at `s0 <= 1 / (2 (n + 2))`,
//!    where the alternating series of `J`, `F` and `F'` shrink at least by half per term
//!    (no cancellation), then walk to the target with Taylor steps whose coefficients come
//!    from the equation's three-term recurrence. Each step is at most `min(1/4, 4/M)` of
//!    the distance to the singular point `s = 0`, where `M` bounds the local exponents
//!    (`a + beta`, `n + 1`, `a`), so rounding errors grow at most ~55-fold within a step
//!    (and decay afterwards) and each expansion needs at most ~28 terms. Always
//!    applicable; slow only when `M` is large, which the series above cover. A CLV grid of
//!    period ends is walked this way when `M <= 64`, one expansion serving every period end
//!    within its reach.
//!
//! All paths agree with mpmath to ~1e-14 relative (unit tests below and
//! `actors/tests/clv_vectors.rs`).

use super::special::expm1_ratio;

/// Terms after which a series gives up and the next evaluation takes over.
pub const SERIES_MAX_TERMS: usize = 2_000;

/// A series whose absolute terms add up to more than this multiple of its value lost more
/// than three digits; the next evaluation is used instead.
pub const SERIES_MAX_CANCELLATION: f64 = 1e3;

/// A series or Taylor step stops when the bound on its remaining terms is below this
/// fraction of the sum.
const TERM_RELATIVE_TOLERANCE: f64 = 1e-17;

/// The ODE path starts at a scaled horizon no larger than this.
const ODE_START_MAX_SCALED_HORIZON: f64 = 0.5;

/// A grid of horizons is walked with the ODE when the local exponents are at most this;
/// above it the steps get short and the series converge in a few terms at every point.
const GRID_ODE_MAX_ORDER: f64 = 64.0;

/// Largest Taylor step as a fraction of the distance to the singular point `s = 0` (~28
/// terms for 1e-17).
const STEP_MAX_RATIO: f64 = 0.25;

/// Rounding errors may grow by at most `e^4` (~55) within one Taylor step; the parasitic
/// solutions they excite decay as `s` grows, so errors do not accumulate.
const STEP_MAX_GROWTH_EXPONENT: f64 = 4.0;

/// Taylor expansions never need more terms than this (the step ratio is at most 1/4, so
/// ~28 terms reach 1e-17).
const TAYLOR_MAX_TERMS: usize = 64;

/// The posterior shapes of an alive customer's purchase rate and dropout probability after
/// `x` repeat purchases: everything the expectation depends on besides the horizon.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AliveShape {
    /// `r + x`: shape of the gamma posterior of the purchase rate.
    pub rate_shape: f64,
    /// `a`: first shape of the beta posterior of the dropout probability.
    pub dropout_alpha: f64,
    /// `b + x`: second shape of the beta posterior of the dropout probability.
    pub dropout_beta: f64,
}

impl AliveShape {
    /// `c = a + beta - 1`, the third parameter of the textbook 2F1.
    fn c(&self) -> f64 {
        self.dropout_alpha + self.dropout_beta - 1.0
    }

    /// `c - n = a + b - 1 - r`: the small numerator parameter after the Euler transform.
    fn c_minus_n(&self) -> f64 {
        self.c() - self.rate_shape
    }

    /// The largest local exponent of the differential equation; bounds the Taylor step.
    fn order(&self) -> f64 {
        (self.dropout_alpha + self.dropout_beta)
            .max(self.rate_shape + 1.0)
            .max(self.dropout_alpha)
            .max(1.0)
    }

    /// Largest Taylor step as a fraction of the current scaled horizon: at most
    /// [`STEP_MAX_RATIO`], and small enough that a local solution `~ s^-M` (the parasitic
    /// ones rounding errors excite) varies by at most `e^STEP_MAX_GROWTH_EXPONENT` over a step.
    fn step_ratio(&self) -> f64 {
        STEP_MAX_RATIO.min(STEP_MAX_GROWTH_EXPONENT / self.order())
    }
}

/// `J(s)`: expected purchases in a horizon `t` of a customer known to be alive, where
/// `scaled_horizon = t / (alpha + T)`. Zero for a non-positive horizon.
pub fn expected_purchases_while_alive(shape: AliveShape, scaled_horizon: f64) -> f64 {
    if scaled_horizon <= 0.0 || scaled_horizon.is_nan() {
        return 0.0;
    }
    euler_series(&shape, scaled_horizon)
        .or_else(|| difference_series(&shape, scaled_horizon))
        .or_else(|| alternating_series(&shape, scaled_horizon))
        .unwrap_or_else(|| OdeState::at(&shape, scaled_horizon).purchases)
}

/// `J(i * scaled_step)` for `i = 1..=out.len()`, written to `out[i - 1]`: the expected
/// cumulative purchases at the end of each period of a horizon.
pub fn expected_purchases_while_alive_grid(shape: AliveShape, scaled_step: f64, out: &mut [f64]) {
    if out.is_empty() {
        return;
    }
    if scaled_step <= 0.0 || scaled_step.is_nan() {
        out.fill(0.0);
        return;
    }
    if shape.order() > GRID_ODE_MAX_ORDER {
        for (index, value) in out.iter_mut().enumerate() {
            *value = expected_purchases_while_alive(shape, (index + 1) as f64 * scaled_step);
        }
        return;
    }
    // One Taylor expansion serves every period end within its reach.
    let ratio = shape.step_ratio();
    let mut state = OdeState::at(&shape, scaled_step);
    out[0] = state.purchases;
    let mut index = 1;
    while index < out.len() {
        let reach = ratio * state.scaled_horizon;
        let next = (index + 1) as f64 * scaled_step;
        if next - state.scaled_horizon > reach {
            // The next period end is more than one step away: walk to it.
            state.advance(&shape, next, ratio);
            out[index] = state.purchases;
            index += 1;
            continue;
        }
        let expansion = state.expand(&shape, reach);
        let mut last = index;
        while last < out.len() {
            let delta = (last + 1) as f64 * scaled_step - state.scaled_horizon;
            if delta > reach {
                break;
            }
            out[last] = state.purchases_after(&shape, &expansion, delta);
            last += 1;
        }
        let target = last as f64 * scaled_step;
        state.move_by(&shape, &expansion, target - state.scaled_horizon);
        state.scaled_horizon = target;
        index = last;
    }
}

/// A converged series: its value and the sum of its absolute terms.
#[derive(Debug, Clone, Copy)]
struct SeriesSum {
    value: f64,
    magnitude: f64,
}

impl SeriesSum {
    /// The value, unless cancellation cost more than three digits.
    fn well_conditioned(self, scale: f64) -> Option<f64> {
        let value = self.value * scale;
        let magnitude = self.magnitude * scale.abs();
        (value.is_finite() && magnitude <= SERIES_MAX_CANCELLATION * value.abs()).then_some(value)
    }
}

/// Sums `t_0 + t_1 + ...` with `t_{k+1} = t_k * ratio(k)`. Stops once the remaining terms are
/// bounded below tolerance, assuming later ratios are at most `max(|ratio(k)|,
/// ratio_limit)` (`ratio_limit` is the ratio's limit as k grows); never before term
/// `min_terms`, so that a term made small by a numerator parameter near a negative
/// integer does not pass for convergence. `None` when not converged within
/// [`SERIES_MAX_TERMS`] terms.
fn sum_series(
    first: f64,
    min_terms: usize,
    ratio_limit: f64,
    ratio: impl Fn(f64) -> f64,
) -> Option<SeriesSum> {
    let mut term = first;
    let mut sum = SeriesSum {
        value: first,
        magnitude: first.abs(),
    };
    for k in 0..SERIES_MAX_TERMS {
        let step = ratio(k as f64);
        term *= step;
        sum.value += term;
        sum.magnitude += term.abs();
        if k + 1 >= min_terms {
            let bound = step.abs().max(ratio_limit);
            if term == 0.0
                || (bound < 1.0
                    && term.abs() * bound / (1.0 - bound)
                        <= TERM_RELATIVE_TOLERANCE * sum.value.abs())
            {
                return Some(sum);
            }
        }
    }
    None
}

/// Terms needed before a numerator `parameter + k` is positive for good.
fn terms_past(parameter: f64) -> usize {
    if parameter >= 0.0 {
        1
    } else {
        (-parameter).ceil() as usize + 2
    }
}

/// `(1 - (1+s)^(1-a)) / (a - 1)` and `(1+s)^(1-a)`.
fn never_dropping_and_power(a: f64, scaled_horizon: f64) -> (f64, f64) {
    let ln_one_plus_s = scaled_horizon.ln_1p();
    // (1 - (1+s)^(1-a)) / (a - 1) = ln(1+s) * expm1(u) / u with u = (1-a) ln(1+s).
    let exponent = (1.0 - a) * ln_one_plus_s;
    (ln_one_plus_s * expm1_ratio(exponent), exponent.exp())
}

/// Evaluation 1, the Euler-transformed series in `z`.
fn euler_series(shape: &AliveShape, scaled_horizon: f64) -> Option<f64> {
    let a = shape.dropout_alpha;
    let c = shape.c();
    let first = shape.c_minus_n();
    let z = scaled_horizon / (1.0 + scaled_horizon);
    let (never_dropping, power) = never_dropping_and_power(a, scaled_horizon);
    let k_series = sum_series(first * z, terms_past(first).max(terms_past(a)), z, |k| {
        (first + k + 1.0) * (a + k) / ((c + k + 1.0) * (k + 2.0)) * z
    })?;
    let value = c * never_dropping - power * k_series.value;
    let magnitude = (c * never_dropping).abs() + power * k_series.magnitude;
    (value.is_finite() && magnitude <= SERIES_MAX_CANCELLATION * value.abs()).then_some(value)
}

/// Evaluation 2, the difference series in `z`, for `c > n` (all terms positive).
fn difference_series(shape: &AliveShape, scaled_horizon: f64) -> Option<f64> {
    let a = shape.dropout_alpha;
    let n = shape.rate_shape;
    let c = shape.c();
    if c <= n {
        return None;
    }
    let z = scaled_horizon / (1.0 + scaled_horizon);
    let (_, power) = never_dropping_and_power(a, scaled_horizon);
    // g_k = (a)_{k-1} / k! z^k; ln prod_{j<k} (1 - n / (c + j)), each factor in (0, 1).
    let mut coefficient = z;
    let mut ln_kept = 0.0;
    let mut sum = 0.0;
    for k in 1..SERIES_MAX_TERMS {
        let kf = k as f64;
        ln_kept += (-n / (c + kf - 1.0)).ln_1p();
        sum += -ln_kept.exp_m1() * coefficient;
        let ratio = (a + kf - 1.0) / (kf + 1.0) * z;
        let bound = ratio.max(z);
        if bound < 1.0 && coefficient * bound / (1.0 - bound) <= TERM_RELATIVE_TOLERANCE * sum {
            let value = c * power * sum;
            return value.is_finite().then_some(value);
        }
        coefficient *= ratio;
    }
    None
}

/// Evaluation 3, the alternating series in `s` (only for `s < 1`).
fn alternating_series(shape: &AliveShape, scaled_horizon: f64) -> Option<f64> {
    if scaled_horizon >= 1.0 {
        return None;
    }
    let (n, a) = (shape.rate_shape, shape.dropout_alpha);
    let upper = a + shape.dropout_beta;
    sum_series(n * scaled_horizon, terms_past(a), scaled_horizon, |k| {
        -(n + k + 1.0) * (a + k) / ((upper + k) * (k + 2.0)) * scaled_horizon
    })?
    .well_conditioned(1.0)
}

/// The ODE path's state at one scaled horizon `s`: `J(s)`, `F(-s)` and `F'(-s)` with
/// `F = 2F1(n+1, a; a+beta; w)`.
#[derive(Debug, Clone, Copy)]
struct OdeState {
    scaled_horizon: f64,
    purchases: f64,
    f: f64,
    f_prime: f64,
}

impl OdeState {
    /// The state at `scaled_horizon`, through the series near 0 and Taylor steps beyond.
    fn at(shape: &AliveShape, scaled_horizon: f64) -> OdeState {
        let start = scaled_horizon
            .min(ODE_START_MAX_SCALED_HORIZON)
            .min(0.5 / (shape.rate_shape + 2.0));
        let mut state = OdeState::start(shape, start);
        state.advance(shape, scaled_horizon, shape.step_ratio());
        state
    }

    /// The state at `s <= 1 / (2 (n + 2))` from the alternating series of `J`, `F` and
    /// `F'`, whose terms shrink at least by half each (ratios at most `(n + 2) s`), so they
    /// converge in under 60 terms and cancel less than a factor 2.
    fn start(shape: &AliveShape, scaled_horizon: f64) -> OdeState {
        let s = scaled_horizon;
        let (n, a) = (shape.rate_shape, shape.dropout_alpha);
        let upper = a + shape.dropout_beta;
        let series = |first: f64, ratio: &dyn Fn(f64) -> f64| {
            sum_series(first, terms_past(a), s, ratio).map_or(f64::NAN, |sum| sum.value)
        };
        let purchases = series(n * s, &|k| {
            -(n + k + 1.0) * (a + k) / ((upper + k) * (k + 2.0)) * s
        });
        // F(-s) = 2F1(n+1, a; a+beta; -s); F'(w) = (n+1) a / (a+beta) 2F1(n+2, a+1; a+beta+1; w).
        let f = series(1.0, &|k| {
            -(n + 1.0 + k) * (a + k) / ((upper + k) * (k + 1.0)) * s
        });
        let f_prime = (n + 1.0) * a / upper
            * series(1.0, &|k| {
                -(n + 2.0 + k) * (a + 1.0 + k) / ((upper + 1.0 + k) * (k + 1.0)) * s
            });
        OdeState {
            scaled_horizon,
            purchases,
            f,
            f_prime,
        }
    }

    /// Walks to `target` (>= the current point) in Taylor steps of at most `ratio` times
    /// the current scaled horizon.
    fn advance(&mut self, shape: &AliveShape, target: f64, ratio: f64) {
        while self.scaled_horizon < target {
            let limit = ratio * self.scaled_horizon;
            let step = (target - self.scaled_horizon).min(limit);
            let expansion = self.expand(shape, step);
            self.move_by(shape, &expansion, step);
            self.scaled_horizon = if step < limit {
                target
            } else {
                self.scaled_horizon + step
            };
        }
    }

    /// The Taylor expansion of `F(-(s + delta))` in `delta` at the current `s`, with enough
    /// terms for `|delta| <= reach`. The coefficients follow from the hypergeometric
    /// equation `w(1-w) F'' + [C - (A+B+1) w] F' - A B F = 0` (A = n+1, B = a,
    /// C = a+beta) around `w0 = -s` by its three-term recurrence.
    fn expand(&self, shape: &AliveShape, reach: f64) -> Expansion {
        let big_a = shape.rate_shape + 1.0;
        let big_b = shape.dropout_alpha;
        let big_c = shape.dropout_alpha + shape.dropout_beta;
        let d = big_a + big_b + 1.0;
        let ab = big_a * big_b;
        let w0 = -self.scaled_horizon;
        let inverse_p0 = 1.0 / (w0 * (1.0 - w0));
        let p1 = 1.0 - 2.0 * w0;
        let q0 = big_c - d * w0;

        // y_k: coefficients in (w - w0); delta = -(w - w0), so g_k = (-1)^k y_k.
        let mut expansion = Expansion {
            coefficients: [0.0; TAYLOR_MAX_TERMS],
            terms: 2,
        };
        expansion.coefficients[0] = self.f;
        expansion.coefficients[1] = -self.f_prime;
        let (mut previous, mut current) = (self.f, self.f_prime);
        let mut reach_power = reach; // reach^(k+1)
        let mut small_terms = 0;
        for k in 0..TAYLOR_MAX_TERMS - 2 {
            let kf = k as f64;
            let next = (-(kf + 1.0) * (p1 * kf + q0) * current
                + (kf * (kf - 1.0) + d * kf + ab) * previous)
                * inverse_p0
                / ((kf + 2.0) * (kf + 1.0));
            let m = k + 2;
            let derivative_bound = (m as f64) * next.abs() * reach_power;
            reach_power *= reach;
            let value_bound = next.abs() * reach_power;
            expansion.coefficients[m] = if m % 2 == 0 { next } else { -next };
            expansion.terms = m + 1;
            previous = current;
            current = next;
            let small = value_bound <= TERM_RELATIVE_TOLERANCE * self.f.abs()
                && derivative_bound <= TERM_RELATIVE_TOLERANCE * self.f_prime.abs();
            small_terms = if small { small_terms + 1 } else { 0 };
            if small_terms >= 2 {
                break;
            }
        }
        expansion
    }

    /// `J(s + delta)` from an expansion at the current `s`:
    /// `J(s) + n * sum_k g_k delta^(k+1) / (k+1)`.
    fn purchases_after(&self, shape: &AliveShape, expansion: &Expansion, delta: f64) -> f64 {
        let mut integral = 0.0;
        for k in (0..expansion.terms).rev() {
            integral = integral * delta + expansion.coefficients[k] / (k as f64 + 1.0);
        }
        self.purchases + shape.rate_shape * integral * delta
    }

    /// Moves `J`, `F` and `F'` by `delta` along an expansion (the position is the caller's).
    fn move_by(&mut self, shape: &AliveShape, expansion: &Expansion, delta: f64) {
        let (mut f, mut slope) = (0.0, 0.0);
        for k in (0..expansion.terms).rev() {
            f = f * delta + expansion.coefficients[k];
            if k > 0 {
                slope = slope * delta + k as f64 * expansion.coefficients[k];
            }
        }
        self.purchases = self.purchases_after(shape, expansion, delta);
        self.f = f;
        // dF/dw = -dF/d(delta).
        self.f_prime = -slope;
    }
}

/// Taylor coefficients `g_k` of `F(-(s + delta)) = sum_k g_k delta^k` at one `s`.
struct Expansion {
    coefficients: [f64; TAYLOR_MAX_TERMS],
    terms: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDNOW_A: f64 = 0.79;
    const CDNOW_B: f64 = 2.43;
    const CDNOW_R: f64 = 0.24;

    fn shape(x: f64) -> AliveShape {
        AliveShape {
            rate_shape: CDNOW_R + x,
            dropout_alpha: CDNOW_A,
            dropout_beta: CDNOW_B + x,
        }
    }

    fn relative_error(actual: f64, expected: f64) -> f64 {
        ((actual - expected) / expected).abs()
    }

    #[test]
    fn every_evaluation_agrees_where_it_applies() {
        for x in [0.0, 1.0, 4.0, 20.0] {
            for s in [0.01, 0.3, 0.9, 5.0, 40.0] {
                let shape = shape(x);
                let euler = euler_series(&shape, s).expect("the Euler series converges here");
                let ode = OdeState::at(&shape, s).purchases;
                assert!(
                    relative_error(ode, euler) < 1e-13,
                    "ode x {x} s {s}: {ode} vs {euler}"
                );
                if let Some(difference) = difference_series(&shape, s) {
                    assert!(
                        relative_error(difference, euler) < 1e-13,
                        "difference x {x} s {s}"
                    );
                }
                if let Some(alternating) = alternating_series(&shape, s) {
                    assert!(
                        relative_error(alternating, euler) < 1e-13,
                        "alternating x {x} s {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn values_match_mpmath_on_every_path() {
        // mpmath (60 digits) of the textbook form c/(a-1) (1 - (1-z)^n 2F1(n, beta; c; z)).
        let low_churn = |x: f64| AliveShape {
            rate_shape: CDNOW_R + x,
            dropout_alpha: CDNOW_A,
            dropout_beta: 1000.0 + x,
        };
        let large_r = AliveShape {
            rate_shape: 100.0,
            dropout_alpha: CDNOW_A,
            dropout_beta: CDNOW_B,
        };
        let cases = [
            // Euler series.
            (shape(0.0), 0.5, 0.112_068_659_194_192_32),
            (shape(2000.0), 50.0, 12_232.377_412_519_048),
            // Few purchases, z near 1: the ODE walk.
            (shape(0.0), 100.0, 4.596_076_690_804_715),
            (shape(0.0), 1e6, 77.639_469_008_317_66),
            // Low churn (b = 1000): the difference series, then the ODE walk.
            (low_churn(0.0), 1.6, 0.383_699_944_001_310_6),
            (low_churn(0.0), 20.0, 4.754_216_817_576_111),
            (low_churn(0.0), 200.0, 44.196_515_671_377_21),
            // r = 100 (c - n = -97.8): a short horizon, then the ODE walk.
            (large_r, 0.004, 0.381_260_059_751_957_66),
            (large_r, 3.0, 20.224_956_892_132_025),
        ];
        for (shape, s, expected) in cases {
            let value = expected_purchases_while_alive(shape, s);
            assert!(
                relative_error(value, expected) < 1e-13,
                "{shape:?} s {s}: {value} vs {expected}"
            );
        }
    }

    #[test]
    fn grid_matches_pointwise_values() {
        for x in [0.0, 3.0, 30.0, 60.0, 100.0] {
            let step = 1.0 / 37.0;
            let mut grid = vec![0.0; 365];
            expected_purchases_while_alive_grid(shape(x), step, &mut grid);
            for (index, value) in grid.iter().enumerate() {
                let pointwise = expected_purchases_while_alive(shape(x), (index + 1) as f64 * step);
                assert!(
                    relative_error(*value, pointwise) < 1e-12,
                    "x {x} period {index}"
                );
            }
        }
    }

    #[test]
    fn expectation_is_continuous_through_a_equal_to_one() {
        let at = |a: f64| {
            expected_purchases_while_alive(
                AliveShape {
                    rate_shape: 3.24,
                    dropout_alpha: a,
                    dropout_beta: 5.43,
                },
                1.2,
            )
        };
        let (below, exact, above) = (at(1.0 - 1e-9), at(1.0), at(1.0 + 1e-9));
        assert!(relative_error(below, exact) < 1e-8 && relative_error(above, exact) < 1e-8);
        assert!(relative_error(exact, 2.880_127_568_502_241) < 1e-14);
    }
}
