//! Customer lifetime value: the two fitted models combined per customer over a horizon,
//! and the report `crm-node clv fit` prints.
//!
//! **Convention.** The horizon is `N` periods of one time unit each (a day or a week; the
//! unit of the data). With `E(i)` the BG/NBD expected purchases in the first `i` periods
//! after the as-of date (`E(0) = 0`), `S` the Gamma-Gamma expected spend per purchase and
//! `d` the discount rate per period,
//!
//! ```text
//! CLV = S * sum_{i=1..N} (E(i) - E(i-1)) / (1 + d)^i
//! ```
//!
//! so purchases expected during period `i` are discounted as if paid at its end. With
//! `d = 0` this is `S * E(N)`. `expected_purchases` in the report is `E(N)`.
//!
//! **Speed.** `E(i) = P(alive | x, t_x, T) * J_i(x, T)`, and the discounted sum of the
//! `J_i` depends on x and T only, so [`Scorer`] computes it once per distinct (x, T) (a
//! walk along the horizon, see [`crate::value::hypergeometric`]) and caches it; each customer
//! then costs P(alive), one cache lookup and the spend formula.

use super::bgnbd::BgNbdParams;
use super::data::CustomerSummary;
use super::gamma_gamma::{GammaGammaParams, SpendHistory};
use super::hypergeometric::{expected_purchases_while_alive, expected_purchases_while_alive_grid};
use super::ClvError;
use serde::Serialize;
use std::collections::HashMap;

/// Longest CLV horizon, periods (about 27 years of days).
pub const HORIZON_MAX_PERIODS: u32 = 10_000;

/// The CLV horizon and discounting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClvSettings {
    /// N: periods of one time unit each.
    pub horizon_periods: u32,
    /// d: discount rate per period (0.01 = 1% per day or week).
    pub discount_rate: f64,
}

impl ClvSettings {
    /// Refuses a horizon outside `1..=HORIZON_MAX_PERIODS` or a negative / non-finite rate.
    pub fn validate(&self) -> Result<(), ClvError> {
        if self.horizon_periods == 0 || self.horizon_periods > HORIZON_MAX_PERIODS {
            return Err(ClvError::BadHorizon {
                horizon: self.horizon_periods,
                max: HORIZON_MAX_PERIODS,
            });
        }
        if !self.discount_rate.is_finite() || self.discount_rate < 0.0 {
            return Err(ClvError::BadDiscountRate {
                rate: self.discount_rate,
            });
        }
        Ok(())
    }
}

/// One customer's scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CustomerScore {
    pub p_alive: f64,
    /// E(N): expected purchases over the horizon.
    pub expected_purchases: f64,
    /// Gamma-Gamma expected spend per purchase.
    pub expected_avg_spend: f64,
    pub clv: f64,
}

/// What an alive customer is expected to buy over the horizon: `J_N` and the discounted sum
/// of the per-period increments of `J`.
#[derive(Debug, Clone, Copy)]
struct AliveValue {
    horizon_purchases: f64,
    discounted_purchases: f64,
}

/// Scores customers under fitted parameters, caching the horizon walk per distinct (x, T).
#[derive(Debug)]
pub struct Scorer {
    purchases: BgNbdParams,
    spend: GammaGammaParams,
    horizon_periods: u32,
    /// `1 / (1 + d)^i` for `i = 1..=N`; empty when `d = 0`.
    discount_factors: Vec<f64>,
    cache: HashMap<(u32, u64), AliveValue>,
    grid: Vec<f64>,
}

impl Scorer {
    pub fn new(
        purchases: BgNbdParams,
        spend: GammaGammaParams,
        settings: ClvSettings,
    ) -> Result<Scorer, ClvError> {
        settings.validate()?;
        let discount_factors = if settings.discount_rate == 0.0 {
            Vec::new()
        } else {
            let per_period = 1.0 / (1.0 + settings.discount_rate);
            (1..=settings.horizon_periods)
                .map(|i| per_period.powf(f64::from(i)))
                .collect()
        };
        Ok(Scorer {
            purchases,
            spend,
            horizon_periods: settings.horizon_periods,
            discount_factors,
            cache: HashMap::new(),
            grid: Vec::new(),
        })
    }

    /// P(alive), expected purchases over the horizon, expected spend and CLV of a customer.
    pub fn score(&mut self, customer: &CustomerSummary) -> CustomerScore {
        let history = customer.history();
        let p_alive = self.purchases.probability_alive(&history);
        let key = (customer.frequency, customer.age.to_bits());
        let alive = match self.cache.get(&key) {
            Some(value) => *value,
            None => {
                let value = self.alive_value(customer.frequency, customer.age);
                self.cache.insert(key, value);
                value
            }
        };
        let expected_avg_spend = self.spend.expected_average_spend(&SpendHistory {
            frequency: customer.frequency,
            mean_spend: customer.monetary,
        });
        CustomerScore {
            p_alive,
            expected_purchases: p_alive * alive.horizon_purchases,
            expected_avg_spend,
            clv: p_alive * alive.discounted_purchases * expected_avg_spend,
        }
    }

    fn alive_value(&mut self, frequency: u32, age: f64) -> AliveValue {
        let shape = self.purchases.alive_shape(frequency);
        let scaled_period = 1.0 / (self.purchases.alpha + age);
        if self.discount_factors.is_empty() {
            let total = expected_purchases_while_alive(
                shape,
                f64::from(self.horizon_periods) * scaled_period,
            );
            return AliveValue {
                horizon_purchases: total,
                discounted_purchases: total,
            };
        }
        self.grid.resize(self.horizon_periods as usize, 0.0);
        expected_purchases_while_alive_grid(shape, scaled_period, &mut self.grid);
        let mut previous = 0.0;
        let mut discounted = 0.0;
        for (cumulative, factor) in self.grid.iter().zip(&self.discount_factors) {
            discounted += (cumulative - previous) * factor;
            previous = *cumulative;
        }
        AliveValue {
            horizon_purchases: previous,
            discounted_purchases: discounted,
        }
    }
}

/// Name and fit of the purchase model, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PurchaseModelReport {
    pub name: &'static str,
    pub params: BgNbdParams,
    pub log_likelihood: f64,
    /// Always true: a fit that does not converge is an error, not a report.
    pub converged: bool,
}

/// Name and fit of the spend model, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpendModelReport {
    pub name: &'static str,
    pub params: GammaGammaParams,
    pub log_likelihood: f64,
}

/// One customer's line of the report: the summary and the scores, side by side in one
/// JSON object.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerValue {
    #[serde(flatten)]
    pub summary: CustomerSummary,
    #[serde(flatten)]
    pub score: CustomerScore,
}

impl CustomerValue {
    pub fn new(summary: CustomerSummary, score: CustomerScore) -> CustomerValue {
        CustomerValue { summary, score }
    }
}

/// Everything `crm-node clv fit --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClvReport {
    pub purchase_model: PurchaseModelReport,
    pub spend_model: SpendModelReport,
    pub customers: Vec<CustomerValue>,
}

/// Number of value deciles.
const DECILES: usize = 10;

impl ClvReport {
    /// Sum of every customer's CLV.
    pub fn total_clv(&self) -> f64 {
        self.customers.iter().map(|c| c.score.clv).sum()
    }

    /// Share of the total CLV held by each tenth of the customers, most valuable tenth
    /// first (customers ranked by CLV; tenths as equal as the count allows). All zero when
    /// the total is zero.
    pub fn value_decile_shares(&self) -> [f64; DECILES] {
        let mut values: Vec<f64> = self.customers.iter().map(|c| c.score.clv).collect();
        values.sort_unstable_by(|left, right| right.total_cmp(left));
        let total: f64 = values.iter().sum();
        let count = values.len();
        std::array::from_fn(|decile| {
            let range = decile * count / DECILES..(decile + 1) * count / DECILES;
            if total > 0.0 {
                values[range].iter().sum::<f64>() / total
            } else {
                0.0
            }
        })
    }

    /// The `limit` customers with the highest CLV, highest first.
    pub fn top_customers(&self, limit: usize) -> Vec<&CustomerValue> {
        let mut ranked: Vec<&CustomerValue> = self.customers.iter().collect();
        ranked.sort_by(|left, right| right.score.clv.total_cmp(&left.score.clv));
        ranked.truncate(limit);
        ranked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURCHASES: BgNbdParams = BgNbdParams {
        r: 0.243,
        alpha: 4.414,
        a: 0.793,
        b: 2.426,
    };
    const SPEND: GammaGammaParams = GammaGammaParams {
        p: 6.25,
        q: 3.74,
        gamma: 15.44,
    };

    fn customer(frequency: u32, recency: f64, age: f64, monetary: f64) -> CustomerSummary {
        CustomerSummary {
            customer_id: format!("c{frequency}"),
            frequency,
            recency,
            age,
            monetary,
        }
    }

    fn settings(horizon_periods: u32, discount_rate: f64) -> ClvSettings {
        ClvSettings {
            horizon_periods,
            discount_rate,
        }
    }

    #[test]
    fn undiscounted_clv_is_expected_purchases_times_expected_spend() {
        let mut scorer = Scorer::new(PURCHASES, SPEND, settings(52, 0.0)).expect("valid");
        let summary = customer(3, 20.0, 30.0, 40.0);
        let score = scorer.score(&summary);
        let expected = PURCHASES.expected_purchases(&summary.history(), 52.0);
        assert!((score.expected_purchases - expected).abs() < 1e-12 * expected);
        assert!((score.clv - expected * score.expected_avg_spend).abs() < 1e-12 * score.clv);
    }

    #[test]
    fn discounted_clv_sums_discounted_period_increments() {
        let mut scorer = Scorer::new(PURCHASES, SPEND, settings(52, 0.01)).expect("valid");
        let summary = customer(3, 20.0, 30.0, 40.0);
        let score = scorer.score(&summary);
        let history = summary.history();
        let mut expected = 0.0;
        for period in 1..=52 {
            let increment = PURCHASES.expected_purchases(&history, f64::from(period))
                - PURCHASES.expected_purchases(&history, f64::from(period - 1));
            expected += increment / 1.01f64.powi(period);
        }
        expected *= score.expected_avg_spend;
        assert!(
            (score.clv - expected).abs() < 1e-11 * expected,
            "{} vs {expected}",
            score.clv
        );
        let undiscounted = Scorer::new(PURCHASES, SPEND, settings(52, 0.0))
            .expect("valid")
            .score(&summary);
        assert!(score.clv < undiscounted.clv);
        let relative = (score.expected_purchases / undiscounted.expected_purchases - 1.0).abs();
        assert!(
            relative < 1e-13,
            "grid and direct horizon values differ by {relative:e}"
        );
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(matches!(
            Scorer::new(PURCHASES, SPEND, settings(0, 0.0)),
            Err(ClvError::BadHorizon { .. })
        ));
        assert!(matches!(
            Scorer::new(PURCHASES, SPEND, settings(52, -0.1)),
            Err(ClvError::BadDiscountRate { .. })
        ));
        assert!(matches!(
            Scorer::new(PURCHASES, SPEND, settings(52, f64::NAN)),
            Err(ClvError::BadDiscountRate { .. })
        ));
    }

    #[test]
    fn deciles_rank_customers_by_value() {
        let values = [
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
            16.0, 17.0, 18.0, 19.0,
        ];
        let report = ClvReport {
            purchase_model: PurchaseModelReport {
                name: "bgnbd",
                params: PURCHASES,
                log_likelihood: 0.0,
                converged: true,
            },
            spend_model: SpendModelReport {
                name: "gamma_gamma",
                params: SPEND,
                log_likelihood: 0.0,
            },
            customers: values
                .iter()
                .map(|&clv| {
                    CustomerValue::new(
                        customer(1, 1.0, 2.0, 3.0),
                        CustomerScore {
                            p_alive: 1.0,
                            expected_purchases: 1.0,
                            expected_avg_spend: 1.0,
                            clv,
                        },
                    )
                })
                .collect(),
        };
        let shares = report.value_decile_shares();
        assert_eq!(report.total_clv(), 190.0);
        assert_eq!(shares[0], 37.0 / 190.0);
        assert_eq!(shares[9], 1.0 / 190.0);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(
            report
                .top_customers(3)
                .iter()
                .map(|c| c.score.clv)
                .collect::<Vec<_>>(),
            [19.0, 18.0, 17.0]
        );
    }
}
