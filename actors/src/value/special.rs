//! Special functions the customer-value models need: the log-gamma function and its
//! derivative, the digamma function, plus two small helpers for expressions that lose
//! digits when written naively (`(e^u - 1) / u` and `ln(1 + e^d)`).
//!
//! Both gamma functions shift their argument up by recurrence until the asymptotic
//! (Stirling) series is accurate to the last bit, so they are exact to a few units in the
//! last place of the larger of the two terms combined (ln Gamma: ~4e-15 absolute below 15,
//! ~2e-16 relative above); arguments must be positive and
//! finite (the models only ever pass parameters and counts). Nothing here allocates.

/// Below this argument the functions shift up by recurrence before using the series.
const ASYMPTOTIC_MIN_ARGUMENT: f64 = 15.0;

/// `ln(2 pi) / 2`.
const HALF_LN_TWO_PI: f64 = 0.918_938_533_204_672_8;

/// `ln Gamma(x)` for `x > 0`.
pub fn ln_gamma(x: f64) -> f64 {
    debug_assert!(x > 0.0, "ln_gamma needs a positive argument, got {x}");
    if x >= ASYMPTOTIC_MIN_ARGUMENT {
        return ln_gamma_asymptotic(x);
    }
    // Gamma(x) = Gamma(x + k) / (x (x + 1) ... (x + k - 1)); ln x is kept apart so that a
    // tiny x cannot underflow the product.
    let mut shifted = x + 1.0;
    let mut product = 1.0;
    while shifted < ASYMPTOTIC_MIN_ARGUMENT {
        product *= shifted;
        shifted += 1.0;
    }
    ln_gamma_asymptotic(shifted) - product.ln() - x.ln()
}

/// Stirling's series; at `x >= 15` the last term kept is below 1e-18 relative.
fn ln_gamma_asymptotic(x: f64) -> f64 {
    let inverse = 1.0 / x;
    let inverse_squared = inverse * inverse;
    let correction = inverse
        * (1.0 / 12.0
            + inverse_squared
                * (-1.0 / 360.0
                    + inverse_squared
                        * (1.0 / 1260.0
                            + inverse_squared
                                * (-1.0 / 1680.0
                                    + inverse_squared
                                        * (1.0 / 1188.0
                                            + inverse_squared * (-691.0 / 360_360.0))))));
    (x - 0.5) * x.ln() - x + HALF_LN_TWO_PI + correction
}

/// The digamma function `psi(x) = d/dx ln Gamma(x)` for `x > 0`.
pub fn digamma(x: f64) -> f64 {
    debug_assert!(x > 0.0, "digamma needs a positive argument, got {x}");
    // psi(x) = psi(x + 1) - 1/x.
    let mut shifted = x;
    let mut reciprocal_sum = 0.0;
    while shifted < ASYMPTOTIC_MIN_ARGUMENT {
        reciprocal_sum += 1.0 / shifted;
        shifted += 1.0;
    }
    let inverse = 1.0 / shifted;
    let inverse_squared = inverse * inverse;
    let series = inverse_squared
        * (1.0 / 12.0
            - inverse_squared
                * (1.0 / 120.0
                    - inverse_squared
                        * (1.0 / 252.0
                            - inverse_squared
                                * (1.0 / 240.0
                                    - inverse_squared
                                        * (1.0 / 132.0 - inverse_squared * 691.0 / 32_760.0)))));
    shifted.ln() - 0.5 * inverse - series - reciprocal_sum
}

/// `(e^u - 1) / u`, equal to 1 at `u = 0` and accurate for every `u` (no 0/0 near 0).
pub fn expm1_ratio(u: f64) -> f64 {
    if u.abs() < 1e-8 {
        // Two terms of the Taylor series; the next one is below 1e-17.
        1.0 + 0.5 * u
    } else {
        u.exp_m1() / u
    }
}

/// `ln(1 + e^d)` without overflow for large `d` or lost digits for very negative `d`.
pub fn ln_one_plus_exp(d: f64) -> f64 {
    if d > 0.0 {
        d + (-d).exp().ln_1p()
    } else {
        d.exp().ln_1p()
    }
}

/// `(ln(1 + e^d), e^d / (1 + e^d))` with one exponential: [`ln_one_plus_exp`] and its
/// derivative [`logistic`] together, for the likelihood's inner loop.
pub fn ln_one_plus_exp_and_logistic(d: f64) -> (f64, f64) {
    let small = (-d.abs()).exp();
    let softplus = d.max(0.0) + small.ln_1p();
    let logistic = if d > 0.0 {
        1.0 / (1.0 + small)
    } else {
        small / (1.0 + small)
    };
    (softplus, logistic)
}

/// The logistic function `e^d / (1 + e^d)`, the derivative of [`ln_one_plus_exp`].
pub fn logistic(d: f64) -> f64 {
    if d > 0.0 {
        1.0 / (1.0 + (-d).exp())
    } else {
        let e = d.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(actual: f64, expected: f64, tolerance: f64) {
        let scale = expected.abs().max(1.0);
        assert!(
            (actual - expected).abs() <= tolerance * scale,
            "got {actual:e}, expected {expected:e}"
        );
    }

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        // Below 15 the shift costs a few ulps of ln Gamma(15) ~ 25 in absolute terms.
        assert_close(ln_gamma(1.0), 0.0, 1e-14);
        assert_close(ln_gamma(2.0), 0.0, 1e-14);
        assert_close(ln_gamma(5.0), 24f64.ln(), 1e-14);
        assert_close(ln_gamma(0.5), std::f64::consts::PI.sqrt().ln(), 1e-14);
        // ln(170!) and ln Gamma(1e-10) (about -ln x) from mpmath.
        assert_close(ln_gamma(171.0), 706.573_062_245_787_3, 1e-15);
        assert_close(ln_gamma(1e-10), 23.025_850_929_882_735, 1e-15);
        assert_close(ln_gamma(2000.24), 13_200.747_619_042_579, 1e-15);
    }

    #[test]
    fn digamma_matches_known_values() {
        let euler_gamma = 0.577_215_664_901_532_9;
        assert_close(digamma(1.0), -euler_gamma, 1e-15);
        assert_close(digamma(0.5), -euler_gamma - 2.0 * 2f64.ln(), 1e-15);
        assert_close(digamma(10.0), 2.251_752_589_066_721, 1e-15);
        assert_close(digamma(1e-6), -1_000_000.577_214_02, 1e-15);
    }

    #[test]
    fn helpers_are_exact_at_their_awkward_points() {
        assert_eq!(expm1_ratio(0.0), 1.0);
        assert_close(expm1_ratio(1e-9), 1.0 + 5e-10, 1e-16);
        assert_close(expm1_ratio(2.0), (2f64.exp() - 1.0) / 2.0, 1e-15);
        assert_close(ln_one_plus_exp(800.0), 800.0, 1e-16);
        assert_close(ln_one_plus_exp(-800.0), 0.0, 1e-16);
        assert_close(ln_one_plus_exp(0.0), 2f64.ln(), 1e-16);
        assert_close(logistic(0.0), 0.5, 1e-16);
        for d in [-800.0, -3.0, 0.0, 0.5, 40.0, 800.0] {
            assert_eq!(
                ln_one_plus_exp_and_logistic(d),
                (ln_one_plus_exp(d), logistic(d))
            );
        }
        assert_eq!(logistic(-1000.0), 0.0);
        assert_eq!(logistic(1000.0), 1.0);
    }
}
