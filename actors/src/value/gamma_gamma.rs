//! The Gamma-Gamma spend model (Fader, Hardie & Lee 2005, "RFM and CLV"; Fader & Hardie
//! 2013 note): how much a customer spends per purchase, fitted on repeat buyers.
//!
//! Each purchase of a customer is worth z ~ Gamma(p, nu) (shape, rate); across customers
//! nu ~ Gamma(q, gamma). A customer with x repeat purchases of mean value m is seen through
//! (x, m) ([`SpendHistory`]); the fit maximises the full log-likelihood of the repeat buyers
//! with a positive mean over `ln p, ln q, ln gamma` (analytic gradients, BFGS, see
//! [`crate::value::fit`]). The expected mean spend of a customer,
//! `E[M | x, m] = p (gamma + x m) / (p x + q - 1)`, exists only for `q > 1`, so a fit with
//! `q <= 1` is an error. Amounts are in major units (e.g. dollars).

use super::fit::{maximize_likelihood, FitError};
use super::special::{digamma, ln_gamma};
use serde::Serialize;

/// Parameter names in the order of the log-parameter vector.
const PARAMETER_NAMES: [&str; 3] = ["p", "q", "gamma"];

/// Fitted Gamma-Gamma parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GammaGammaParams {
    pub p: f64,
    pub q: f64,
    pub gamma: f64,
}

/// A converged Gamma-Gamma fit with `q > 1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GammaGammaFit {
    pub params: GammaGammaParams,
    /// The full log-likelihood (sum over the repeat buyers used).
    pub log_likelihood: f64,
    /// Repeat buyers with a positive mean spend: the customers the fit used.
    pub customers: usize,
    pub iterations: usize,
    /// Standard errors of `ln p, ln q, ln gamma`.
    pub log_parameter_standard_errors: [f64; 3],
}

/// What the spend model sees of a customer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpendHistory {
    /// x: repeat purchases.
    pub frequency: u32,
    /// m: mean value of the repeat purchases, major units.
    pub mean_spend: f64,
}

impl GammaGammaParams {
    fn from_log(log: &[f64; 3]) -> GammaGammaParams {
        GammaGammaParams {
            p: log[0].exp(),
            q: log[1].exp(),
            gamma: log[2].exp(),
        }
    }

    /// `ln f(m | p, q, gamma, x)` for a repeat buyer (x > 0, m > 0).
    pub fn log_likelihood(&self, history: &SpendHistory) -> f64 {
        let GammaGammaParams { p, q, gamma } = *self;
        let x = f64::from(history.frequency);
        let m = history.mean_spend;
        ln_gamma(p * x + q) - ln_gamma(p * x) - ln_gamma(q)
            + q * gamma.ln()
            + (p * x - 1.0) * m.ln()
            + p * x * x.ln()
            - (p * x + q) * (gamma + m * x).ln()
    }

    /// E[M | x, m] = p (gamma + x m) / (p x + q - 1): the expected value of this customer's
    /// future purchases. With x = 0 it is the population mean p gamma / (q - 1).
    pub fn expected_average_spend(&self, history: &SpendHistory) -> f64 {
        let x = f64::from(history.frequency);
        self.p * (self.gamma + x * history.mean_spend) / (self.p * x + self.q - 1.0)
    }
}

/// Whether the fit uses a customer: a repeat buyer with a positive, finite mean spend.
fn usable(history: &SpendHistory) -> bool {
    history.frequency > 0 && history.mean_spend > 0.0 && history.mean_spend.is_finite()
}

/// The repeat buyers of a sample, sorted by frequency, with what the likelihood needs.
struct RepeatBuyers {
    /// Per distinct frequency: (x, ln x, customers, sum of ln m, range into `spends`).
    groups: Vec<(f64, f64, f64, f64, std::ops::Range<usize>)>,
    /// x * m per customer, grouped as above.
    spends: Vec<f64>,
}

impl RepeatBuyers {
    fn new(histories: &[SpendHistory]) -> RepeatBuyers {
        let mut buyers: Vec<(u32, f64)> = histories
            .iter()
            .filter(|h| usable(h))
            .map(|h| (h.frequency, h.mean_spend))
            .collect();
        buyers.sort_unstable_by_key(|b| b.0);
        let mut groups = Vec::new();
        let mut start = 0;
        while start < buyers.len() {
            let frequency = buyers[start].0;
            let end = start
                + buyers[start..]
                    .iter()
                    .take_while(|b| b.0 == frequency)
                    .count();
            let x = f64::from(frequency);
            let ln_spend_sum: f64 = buyers[start..end].iter().map(|b| b.1.ln()).sum();
            groups.push((x, x.ln(), (end - start) as f64, ln_spend_sum, start..end));
            start = end;
        }
        let spends = buyers.iter().map(|&(x, m)| f64::from(x) * m).collect();
        RepeatBuyers { groups, spends }
    }

    fn customers(&self) -> usize {
        self.spends.len()
    }

    /// Mean negative log-likelihood at `ln p, ln q, ln gamma`; gradient in log-parameters.
    fn mean_negative_log_likelihood(&self, log: &[f64; 3], gradient: &mut [f64; 3]) -> f64 {
        let GammaGammaParams { p, q, gamma } = GammaGammaParams::from_log(log);
        let (ln_gamma_q, digamma_q, ln_scale) = (ln_gamma(q), digamma(q), gamma.ln());
        let (mut value, mut d_p, mut d_q, mut d_gamma) = (0.0, 0.0, 0.0, 0.0);
        for (x, ln_x, count, ln_spend_sum, range) in &self.groups {
            let shape = p * x + q;
            let (mut ln_total, mut inverse_total) = (0.0, 0.0);
            for spend in &self.spends[range.clone()] {
                let total = gamma + spend;
                ln_total += total.ln();
                inverse_total += 1.0 / total;
            }
            let px = p * x;
            value += count
                * (ln_gamma(shape) - ln_gamma(px) - ln_gamma_q + q * ln_scale + px * ln_x)
                + (px - 1.0) * ln_spend_sum
                - shape * ln_total;
            let digamma_shape = digamma(shape);
            d_p += x * (count * (digamma_shape - digamma(px) + ln_x) + ln_spend_sum - ln_total);
            d_q += count * (digamma_shape - digamma_q + ln_scale) - ln_total;
            d_gamma += count * q / gamma - shape * inverse_total;
        }
        let scale = -1.0 / self.customers() as f64;
        *gradient = [d_p * p, d_q * q, d_gamma * gamma].map(|g| g * scale);
        value * scale
    }
}

/// Fits the Gamma-Gamma model on the repeat buyers (x > 0) with a positive mean spend.
pub fn fit(histories: &[SpendHistory]) -> Result<GammaGammaFit, FitError> {
    let buyers = RepeatBuyers::new(histories);
    if buyers.customers() == 0 {
        return Err(FitError::NoRepeatBuyers);
    }
    // Starts: shapes of individual and population spread, gamma set so that the population
    // mean p gamma / (q - 1) equals the observed mean.
    let mean_spend = histories
        .iter()
        .filter(|h| usable(h))
        .map(|h| h.mean_spend)
        .sum::<f64>()
        / buyers.customers() as f64;
    let start = |p: f64, q: f64| [p.ln(), q.ln(), (mean_spend * (q - 1.0) / p).ln()];
    let starts = [start(1.0, 2.0), start(5.0, 4.0), start(0.5, 6.0)];

    let fitted = maximize_likelihood(
        |log: &[f64; 3], gradient: &mut [f64; 3]| {
            buyers.mean_negative_log_likelihood(log, gradient)
        },
        &starts,
        PARAMETER_NAMES,
        buyers.customers() as f64,
    )?;
    let params = GammaGammaParams::from_log(&fitted.log_parameters);
    if params.q <= 1.0 {
        return Err(FitError::SpendMeanUndefined { q: params.q });
    }
    Ok(GammaGammaFit {
        params,
        log_likelihood: -fitted.mean_negative_log_likelihood * buyers.customers() as f64,
        customers: buyers.customers(),
        iterations: fitted.iterations,
        log_parameter_standard_errors: fitted.log_parameter_standard_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: GammaGammaParams = GammaGammaParams {
        p: 6.25,
        q: 3.74,
        gamma: 15.44,
    };

    fn spend(frequency: u32, mean_spend: f64) -> SpendHistory {
        SpendHistory {
            frequency,
            mean_spend,
        }
    }

    #[test]
    fn objective_is_the_mean_log_likelihood_and_its_gradient_is_exact() {
        let histories = [
            spend(1, 20.0),
            spend(3, 35.5),
            spend(3, 12.25),
            spend(12, 41.0),
            spend(0, 0.0),
        ];
        let buyers = RepeatBuyers::new(&histories);
        assert_eq!(buyers.customers(), 4);
        let log = [PARAMS.p.ln(), PARAMS.q.ln(), PARAMS.gamma.ln()];
        let mut gradient = [0.0; 3];
        let value = buyers.mean_negative_log_likelihood(&log, &mut gradient);
        let expected: f64 = histories[..4]
            .iter()
            .map(|h| PARAMS.log_likelihood(h))
            .sum::<f64>()
            / 4.0;
        assert!((value + expected).abs() < 1e-12 * expected.abs());
        for i in 0..3 {
            let step = 1e-6;
            let (mut up, mut down) = (log, log);
            up[i] += step;
            down[i] -= step;
            let mut ignored = [0.0; 3];
            let numeric = (buyers.mean_negative_log_likelihood(&up, &mut ignored)
                - buyers.mean_negative_log_likelihood(&down, &mut ignored))
                / (2.0 * step);
            assert!((numeric - gradient[i]).abs() < 1e-6 * (1.0 + numeric.abs()));
        }
    }

    #[test]
    fn expected_spend_shrinks_towards_the_population_mean() {
        let population = PARAMS.p * PARAMS.gamma / (PARAMS.q - 1.0);
        assert!((PARAMS.expected_average_spend(&spend(0, 0.0)) - population).abs() < 1e-12);
        let one = PARAMS.expected_average_spend(&spend(1, 100.0));
        let many = PARAMS.expected_average_spend(&spend(50, 100.0));
        assert!(population < one && one < many && many < 100.0);
    }

    #[test]
    fn identical_spends_have_no_maximum() {
        let histories: Vec<SpendHistory> = (1..=40).map(|i| spend(i % 4 + 1, 25.0)).collect();
        assert!(matches!(
            fit(&histories),
            Err(FitError::Diverged { .. }
                | FitError::NotConverged { .. }
                | FitError::NotIdentified { .. })
        ));
    }

    #[test]
    fn no_repeat_buyer_with_a_positive_spend_is_refused() {
        assert_eq!(
            fit(&[spend(0, 0.0), spend(2, 0.0)]),
            Err(FitError::NoRepeatBuyers)
        );
    }
}
