//! The BG/NBD purchase model (Fader, Hardie & Lee 2005, "Counting your customers the easy
//! way"): fit by maximum likelihood, then per customer the probability of being alive, the
//! expected purchases in a coming horizon, and the population's expected purchases.
//!
//! The model: while alive, a customer buys at rate lambda ~ Gamma(r, alpha) (shape, rate);
//! after each repeat purchase they drop out with probability p ~ Beta(a, b). A customer is
//! seen through (x, t_x, T) ([`PurchaseHistory`]). The fit maximises the full
//! log-likelihood over `ln r, ln alpha, ln a, ln b` with analytic gradients (BFGS, see
//! [`crate::value::fit`]). It works on [`AggregatedHistories`]: identical (x, t_x, T) triples
//! are one group with a count, every `ln Gamma`/`psi` is computed once per distinct x and
//! every `ln(alpha + t)` once per distinct time, so a million customers cost one pass
//! over a few hundred thousand groups per evaluation. Times are in whatever unit the
//! histories use; `alpha` comes out in that unit.

use super::data::PurchaseHistory;
use super::fit::{maximize_likelihood, FitError};
use super::hypergeometric::{expected_purchases_while_alive, AliveShape};
use super::special::{digamma, ln_gamma, ln_one_plus_exp, ln_one_plus_exp_and_logistic, logistic};
use serde::Serialize;

/// Parameter names in the order of the log-parameter vector.
const PARAMETER_NAMES: [&str; 4] = ["r", "alpha", "a", "b"];

/// Fitted BG/NBD parameters. `alpha` is in the time unit of the data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BgNbdParams {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
}

/// A converged BG/NBD fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BgNbdFit {
    pub params: BgNbdParams,
    /// The full log-likelihood (sum over customers), in the data's time unit.
    pub log_likelihood: f64,
    pub iterations: usize,
    /// Standard errors of `ln r, ln alpha, ln a, ln b`.
    pub log_parameter_standard_errors: [f64; 4],
}

impl BgNbdParams {
    fn from_log(log: &[f64; 4]) -> BgNbdParams {
        BgNbdParams {
            r: log[0].exp(),
            alpha: log[1].exp(),
            a: log[2].exp(),
            b: log[3].exp(),
        }
    }

    /// The posterior shapes of a customer with `frequency` repeat purchases.
    pub fn alive_shape(&self, frequency: u32) -> AliveShape {
        let x = f64::from(frequency);
        AliveShape {
            rate_shape: self.r + x,
            dropout_alpha: self.a,
            dropout_beta: self.b + x,
        }
    }

    /// `ln` of the odds "dropped out right after the last purchase" : "still alive", the
    /// `d` in both the likelihood and [`Self::probability_alive`]; `-inf` when x = 0.
    fn log_dropout_odds(&self, history: &PurchaseHistory) -> f64 {
        if history.frequency == 0 {
            return f64::NEG_INFINITY;
        }
        let x = f64::from(history.frequency);
        let gap = (history.age - history.recency) / (self.alpha + history.recency);
        self.a.ln() - (self.b + x - 1.0).ln() + (self.r + x) * gap.ln_1p()
    }

    /// One customer's log-likelihood `ln L(r, alpha, a, b | x, t_x, T)`.
    pub fn log_likelihood(&self, history: &PurchaseHistory) -> f64 {
        let BgNbdParams { r, alpha, a, b } = *self;
        let x = f64::from(history.frequency);
        let rate_term = ln_gamma(r + x) - ln_gamma(r) + r * alpha.ln();
        let dropout_term = ln_gamma(a + b) + ln_gamma(b + x) - ln_gamma(b) - ln_gamma(a + b + x);
        let alive_term = -(r + x) * (alpha + history.age).ln();
        let either = if history.frequency == 0 {
            0.0
        } else {
            ln_one_plus_exp(self.log_dropout_odds(history))
        };
        rate_term + dropout_term + alive_term + either
    }

    /// P(alive at T | x, t_x, T); 1 without repeat purchases.
    pub fn probability_alive(&self, history: &PurchaseHistory) -> f64 {
        logistic(-self.log_dropout_odds(history))
    }

    /// E[Y(t) | x, t_x, T]: expected purchases in the next `horizon` time units.
    pub fn expected_purchases(&self, history: &PurchaseHistory, horizon: f64) -> f64 {
        self.probability_alive(history) * self.expected_purchases_if_alive(history, horizon)
    }

    /// Expected purchases in the next `horizon` of a customer known to be alive (the
    /// conditional expectation without its P(alive) factor). Depends on x and T only.
    pub fn expected_purchases_if_alive(&self, history: &PurchaseHistory, horizon: f64) -> f64 {
        expected_purchases_while_alive(
            self.alive_shape(history.frequency),
            horizon / (self.alpha + history.age),
        )
    }

    /// E[X(t)]: expected repeat purchases of a new customer in their first `horizon` time
    /// units (the unconditional population expectation).
    pub fn expected_purchases_population(&self, horizon: f64) -> f64 {
        expected_purchases_while_alive(self.alive_shape(0), horizon / self.alpha)
    }
}

/// One group of identical histories.
#[derive(Debug, Clone, Copy, PartialEq)]
struct HistoryGroup {
    frequency_index: u32,
    recency_index: u32,
    age_index: u32,
    count: f64,
}

/// Histories with identical (x, t_x, T) merged into counted groups, with the distinct
/// frequencies and times the likelihood tabulates.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatedHistories {
    frequencies: Vec<u32>,
    times: Vec<f64>,
    groups: Vec<HistoryGroup>,
    customers: f64,
    repeat_buyers: f64,
}

impl AggregatedHistories {
    /// Aggregates one history per customer.
    pub fn from_histories<I>(histories: I) -> Result<AggregatedHistories, FitError>
    where
        I: IntoIterator<Item = PurchaseHistory>,
    {
        AggregatedHistories::from_counted(histories.into_iter().map(|h| (h, 1)))
    }

    /// Aggregates histories that each stand for `count` customers.
    pub fn from_counted<I>(histories: I) -> Result<AggregatedHistories, FitError>
    where
        I: IntoIterator<Item = (PurchaseHistory, u64)>,
    {
        let mut rows: Vec<(u32, u64, u64, u64)> = Vec::new();
        for (index, (history, count)) in histories.into_iter().enumerate() {
            let problem = if !history.recency.is_finite() || history.recency < 0.0 {
                Some("recency must be a finite number >= 0")
            } else if !history.age.is_finite() || history.age < history.recency {
                Some("age T must be finite and at least the recency")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(FitError::InvalidHistory { index, problem });
            }
            if count == 0 {
                continue;
            }
            // t_x does not enter the likelihood without repeat purchases; `+ 0.0` turns -0
            // into +0 so that bit patterns order like the values.
            let recency = if history.frequency == 0 {
                0.0
            } else {
                history.recency + 0.0
            };
            rows.push((
                history.frequency,
                recency.to_bits(),
                (history.age + 0.0).to_bits(),
                count,
            ));
        }
        rows.sort_unstable_by_key(|row| (row.0, row.1, row.2));

        let mut times: Vec<u64> = rows.iter().flat_map(|row| [row.1, row.2]).collect();
        times.sort_unstable();
        times.dedup();
        let mut frequencies: Vec<u32> = rows.iter().map(|row| row.0).collect();
        frequencies.dedup();

        let time_index = |bits: u64| times.binary_search(&bits).unwrap_or_default() as u32;
        let mut groups: Vec<HistoryGroup> = Vec::new();
        let mut previous: Option<(u32, u64, u64)> = None;
        let mut frequency_index = 0u32;
        let (mut customers, mut repeat_buyers) = (0.0, 0.0);
        for &(frequency, recency, age, count) in &rows {
            let count = count as f64;
            customers += count;
            if frequency > 0 {
                repeat_buyers += count;
            }
            if previous == Some((frequency, recency, age)) {
                if let Some(last) = groups.last_mut() {
                    last.count += count;
                }
                continue;
            }
            while frequencies[frequency_index as usize] != frequency {
                frequency_index += 1;
            }
            groups.push(HistoryGroup {
                frequency_index,
                recency_index: time_index(recency),
                age_index: time_index(age),
                count,
            });
            previous = Some((frequency, recency, age));
        }
        Ok(AggregatedHistories {
            frequencies,
            times: times.into_iter().map(f64::from_bits).collect(),
            groups,
            customers,
            repeat_buyers,
        })
    }

    /// Customers represented (sum of counts).
    pub fn customers(&self) -> f64 {
        self.customers
    }

    /// Distinct (x, t_x, T) triples: the cost of one likelihood evaluation.
    pub fn distinct_histories(&self) -> usize {
        self.groups.len()
    }

    /// Mean negative log-likelihood at log-parameters `log`, gradient (with respect to the
    /// log-parameters) written to `gradient`. `tables` is reused between calls.
    fn mean_negative_log_likelihood(
        &self,
        log: &[f64; 4],
        gradient: &mut [f64; 4],
        tables: &mut Tables,
    ) -> f64 {
        let BgNbdParams { r, alpha, a, b } = BgNbdParams::from_log(log);
        tables.fill(self, r, alpha, a, b);
        let ln_alpha = alpha.ln();

        let mut log_likelihood = 0.0;
        let mut rate_slope = 0.0; // d/dr of the time terms
        let mut alpha_slope = 0.0; // d/dalpha of the time terms
        for group in &self.groups {
            let row = &tables.per_frequency[group.frequency_index as usize];
            let (ln_age, inverse_age) = tables.per_time[group.age_index as usize];
            let n = r + row.frequency;
            let alive = -n * ln_age;
            let (either, dropped_weight, ln_recency, inverse_recency) = if row.frequency > 0.0 {
                let (ln_recency, inverse_recency) = tables.per_time[group.recency_index as usize];
                let odds = row.ln_dropout_offset - n * ln_recency - alive;
                let (either, dropped_weight) = ln_one_plus_exp_and_logistic(odds);
                (either, dropped_weight, ln_recency, inverse_recency)
            } else {
                (0.0, 0.0, 0.0, 0.0)
            };
            let count = group.count;
            log_likelihood += count * (alive + either);
            let alive_weight = 1.0 - dropped_weight;
            rate_slope -= count * (alive_weight * ln_age + dropped_weight * ln_recency);
            alpha_slope -=
                count * n * (alive_weight * inverse_age + dropped_weight * inverse_recency);
            let totals = &mut tables.weights[group.frequency_index as usize];
            totals.0 += count;
            totals.1 += count * dropped_weight;
        }

        let (mut d_r, mut d_a, mut d_b) = (rate_slope, 0.0, 0.0);
        for (row, &(count, dropped)) in tables.per_frequency.iter().zip(&tables.weights) {
            log_likelihood += count * (row.ln_gamma_rate + r * ln_alpha + row.ln_beta_ratio);
            d_r += count * (row.digamma_rate + ln_alpha);
            d_a += count * row.digamma_a + dropped / a;
            d_b += count * row.digamma_b - dropped * row.inverse_b_minus_one;
        }
        let d_alpha = alpha_slope + self.customers * r / alpha;

        let scale = -1.0 / self.customers;
        *gradient = [d_r * r, d_alpha * alpha, d_a * a, d_b * b].map(|g| g * scale);
        log_likelihood * scale
    }
}

/// Per-evaluation tables: one row per distinct frequency, one entry per distinct time.
#[derive(Debug, Default)]
struct Tables {
    per_frequency: Vec<FrequencyRow>,
    per_time: Vec<(f64, f64)>,
    /// Per frequency: (customers, customers weighted by P(dropped at t_x | data)).
    weights: Vec<(f64, f64)>,
}

#[derive(Debug, Clone, Copy)]
struct FrequencyRow {
    frequency: f64,
    /// ln Gamma(r+x) - ln Gamma(r)
    ln_gamma_rate: f64,
    /// ln B(a, b+x) - ln B(a, b)
    ln_beta_ratio: f64,
    /// ln a - ln(b+x-1), for x > 0
    ln_dropout_offset: f64,
    digamma_rate: f64,
    digamma_a: f64,
    digamma_b: f64,
    inverse_b_minus_one: f64,
}

impl Tables {
    fn fill(&mut self, data: &AggregatedHistories, r: f64, alpha: f64, a: f64, b: f64) {
        let (ln_gamma_r, ln_gamma_b, ln_gamma_ab) = (ln_gamma(r), ln_gamma(b), ln_gamma(a + b));
        let (digamma_r, digamma_b, digamma_ab) = (digamma(r), digamma(b), digamma(a + b));
        let ln_a = a.ln();
        self.per_frequency.clear();
        self.per_frequency
            .extend(data.frequencies.iter().map(|&frequency| {
                let x = f64::from(frequency);
                let (digamma_bx, digamma_abx) = (digamma(b + x), digamma(a + b + x));
                FrequencyRow {
                    frequency: x,
                    ln_gamma_rate: ln_gamma(r + x) - ln_gamma_r,
                    ln_beta_ratio: ln_gamma_ab + ln_gamma(b + x) - ln_gamma_b - ln_gamma(a + b + x),
                    ln_dropout_offset: if frequency > 0 {
                        ln_a - (b + x - 1.0).ln()
                    } else {
                        0.0
                    },
                    digamma_rate: digamma(r + x) - digamma_r,
                    digamma_a: digamma_ab - digamma_abx,
                    digamma_b: digamma_ab + digamma_bx - digamma_b - digamma_abx,
                    inverse_b_minus_one: if frequency > 0 {
                        1.0 / (b + x - 1.0)
                    } else {
                        0.0
                    },
                }
            }));
        self.per_time.clear();
        self.per_time.extend(
            data.times
                .iter()
                .map(|&t| ((alpha + t).ln(), 1.0 / (alpha + t))),
        );
        self.weights.clear();
        self.weights.resize(data.frequencies.len(), (0.0, 0.0));
    }
}

/// Fits the BG/NBD model by maximum likelihood.
pub fn fit(data: &AggregatedHistories) -> Result<BgNbdFit, FitError> {
    if data.customers == 0.0 {
        return Err(FitError::NoCustomers);
    }
    if data.repeat_buyers == 0.0 {
        return Err(FitError::NoRepeatBuyers);
    }
    // Starts: purchase rate matched to the pooled rate sum(x) / sum(T), dropout mean 1/2,
    // then two other shapes of heterogeneity.
    let (mut total_repeats, mut total_age) = (0.0, 0.0);
    for group in &data.groups {
        total_repeats += group.count * f64::from(data.frequencies[group.frequency_index as usize]);
        total_age += group.count * data.times[group.age_index as usize];
    }
    let rate = if total_age > 0.0 {
        total_repeats / total_age
    } else {
        1.0
    };
    let start = |r: f64, a: f64, b: f64| [r.ln(), (r / rate).ln(), a.ln(), b.ln()];
    let starts = [
        start(1.0, 1.0, 1.0),
        start(0.3, 0.8, 2.5),
        start(3.0, 2.0, 6.0),
    ];

    let mut tables = Tables::default();
    let fitted = maximize_likelihood(
        |log: &[f64; 4], gradient: &mut [f64; 4]| {
            data.mean_negative_log_likelihood(log, gradient, &mut tables)
        },
        &starts,
        PARAMETER_NAMES,
        data.customers,
    )?;
    Ok(BgNbdFit {
        params: BgNbdParams::from_log(&fitted.log_parameters),
        log_likelihood: -fitted.mean_negative_log_likelihood * data.customers,
        iterations: fitted.iterations,
        log_parameter_standard_errors: fitted.log_parameter_standard_errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CDNOW: BgNbdParams = BgNbdParams {
        r: 0.243,
        alpha: 4.414,
        a: 0.793,
        b: 2.426,
    };

    fn history(frequency: u32, recency: f64, age: f64) -> PurchaseHistory {
        PurchaseHistory {
            frequency,
            recency,
            age,
        }
    }

    fn sample_histories() -> Vec<PurchaseHistory> {
        vec![
            history(0, 0.0, 38.86),
            history(2, 30.43, 38.86),
            history(1, 1.71, 38.86),
            history(0, 0.0, 38.86),
            history(2, 30.43, 38.86),
            history(7, 29.43, 38.86),
            history(2000, 30.0, 30.1),
            history(4, 4.0, 4.0),
        ]
    }

    #[test]
    fn aggregated_objective_is_the_mean_of_per_customer_log_likelihoods() {
        let histories = sample_histories();
        let data = AggregatedHistories::from_histories(histories.iter().copied()).expect("valid");
        assert_eq!(data.distinct_histories(), 6);
        let log = [CDNOW.r.ln(), CDNOW.alpha.ln(), CDNOW.a.ln(), CDNOW.b.ln()];
        let mut gradient = [0.0; 4];
        let value = data.mean_negative_log_likelihood(&log, &mut gradient, &mut Tables::default());
        let expected: f64 = histories
            .iter()
            .map(|h| CDNOW.log_likelihood(h))
            .sum::<f64>()
            / 8.0;
        assert!(
            (value + expected).abs() < 1e-12 * expected.abs(),
            "{value} vs {expected}"
        );
    }

    #[test]
    fn analytic_gradient_matches_finite_differences() {
        let data = AggregatedHistories::from_histories(sample_histories()).expect("valid");
        let log = [CDNOW.r.ln(), CDNOW.alpha.ln(), CDNOW.a.ln(), CDNOW.b.ln()];
        let mut tables = Tables::default();
        let mut gradient = [0.0; 4];
        data.mean_negative_log_likelihood(&log, &mut gradient, &mut tables);
        for i in 0..4 {
            let step = 1e-6;
            let (mut up, mut down) = (log, log);
            up[i] += step;
            down[i] -= step;
            let mut ignored = [0.0; 4];
            let numeric = (data.mean_negative_log_likelihood(&up, &mut ignored, &mut tables)
                - data.mean_negative_log_likelihood(&down, &mut ignored, &mut tables))
                / (2.0 * step);
            assert!(
                (numeric - gradient[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                "{i}: {numeric} vs {}",
                gradient[i]
            );
        }
    }

    #[test]
    fn probability_alive_follows_the_model() {
        assert_eq!(CDNOW.probability_alive(&history(0, 0.0, 10.0)), 1.0);
        // T == t_x: the odds reduce to a / (b + x - 1).
        let odds = CDNOW.a / (CDNOW.b + 3.0 - 1.0);
        let expected = 1.0 / (1.0 + odds);
        assert!((CDNOW.probability_alive(&history(3, 12.0, 12.0)) - expected).abs() < 1e-15);
        // Many purchases long ago: certainly gone.
        assert_eq!(CDNOW.probability_alive(&history(2000, 1.0, 500.0)), 0.0);
    }

    #[test]
    fn invalid_histories_are_refused_with_their_index() {
        let error =
            AggregatedHistories::from_histories([history(1, 2.0, 3.0), history(1, 5.0, 3.0)])
                .expect_err("age below recency");
        assert_eq!(
            error,
            FitError::InvalidHistory {
                index: 1,
                problem: "age T must be finite and at least the recency"
            }
        );
    }

    #[test]
    fn data_without_repeat_buyers_is_refused() {
        let data = AggregatedHistories::from_histories(
            (0..100).map(|i| history(0, 0.0, f64::from(i % 30 + 1))),
        )
        .expect("valid");
        assert_eq!(fit(&data), Err(FitError::NoRepeatBuyers));
    }
}
