//! Synthetic customers drawn from the BG/NBD and Gamma-Gamma generative processes, shared
//! by the clv tests and the `clv_bench` example (each includes this file with `#[path]`).
//!
//! The processes, as in Fader, Hardie & Lee (2005): a customer's purchase rate is
//! lambda ~ Gamma(r, alpha) (alpha a rate) and their dropout probability p ~ Beta(a, b); from
//! the first purchase at time 0 they buy at exponential gaps of mean 1 / lambda and, after
//! each repeat purchase, drop out with probability p. Each purchase is worth
//! z ~ Gamma(p_spend, nu) with nu ~ Gamma(q, gamma) per customer. Everything is drawn from
//! the caller's seeded generator, so a seed fixes the data.

#![allow(dead_code)]

use crm_actors::value::{BgNbdParams, GammaGammaParams, PurchaseHistory, Transaction};
use rand::Rng;
use rand_distr::{Beta, Distribution, Gamma};

/// A simulated customer as the models see them, plus their repeat purchase times.
#[derive(Debug, Clone)]
pub struct SimulatedCustomer {
    pub history: PurchaseHistory,
    /// Mean value of the repeat purchases; 0 without repeat purchases.
    pub mean_spend: f64,
    /// Times of the repeat purchases since the first, ascending, all within the age.
    pub repeat_times: Vec<f64>,
}

impl SimulatedCustomer {
    /// The history as it looked `cut` time units after the first purchase.
    pub fn history_until(&self, cut: f64) -> PurchaseHistory {
        let seen: Vec<f64> = self
            .repeat_times
            .iter()
            .copied()
            .filter(|t| *t <= cut)
            .collect();
        PurchaseHistory {
            frequency: seen.len() as u32,
            recency: seen.last().copied().unwrap_or(0.0),
            age: cut,
        }
    }

    /// Repeat purchases made after `cut`.
    pub fn purchases_after(&self, cut: f64) -> usize {
        self.repeat_times.iter().filter(|t| **t > cut).count()
    }
}

/// The per-customer latent draws.
struct Latent {
    rate: f64,
    dropout: f64,
    spend_rate: f64,
}

fn draw_latent<R: Rng>(rng: &mut R, purchases: &BgNbdParams, spend: &GammaGammaParams) -> Latent {
    let rate = Gamma::new(purchases.r, 1.0 / purchases.alpha)
        .expect("valid r, alpha")
        .sample(rng);
    let dropout = Beta::new(purchases.a, purchases.b)
        .expect("valid a, b")
        .sample(rng);
    let spend_rate = Gamma::new(spend.q, 1.0 / spend.gamma)
        .expect("valid q, gamma")
        .sample(rng);
    Latent {
        rate,
        dropout,
        spend_rate,
    }
}

/// Times of the repeat purchases within `(0, age]` of a customer first buying at 0.
fn repeat_purchase_times<R: Rng>(rng: &mut R, latent: &Latent, age: f64) -> Vec<f64> {
    let mut times = Vec::new();
    let mut time = 0.0;
    loop {
        // Inverse transform; a rate that underflowed to 0 gives an infinite gap.
        time += -(1.0 - rng.gen::<f64>()).ln() / latent.rate;
        if time > age {
            return times;
        }
        times.push(time);
        if rng.gen::<f64>() < latent.dropout {
            return times;
        }
    }
}

/// `customers` continuous-time histories, each observed for an age drawn by `age`.
pub fn simulate_customers<R: Rng>(
    rng: &mut R,
    purchases: &BgNbdParams,
    spend: &GammaGammaParams,
    customers: usize,
    mut age: impl FnMut(&mut R) -> f64,
) -> Vec<SimulatedCustomer> {
    (0..customers)
        .map(|_| {
            let latent = draw_latent(rng, purchases, spend);
            let observed_for = age(rng);
            let times = repeat_purchase_times(rng, &latent, observed_for);
            let frequency = times.len() as u32;
            let mean_spend = if frequency == 0 {
                0.0
            } else {
                // The mean of x Gamma(p, nu) values is Gamma(p x, nu x).
                let x = f64::from(frequency);
                Gamma::new(spend.p * x, 1.0 / (latent.spend_rate * x))
                    .expect("valid spend shape")
                    .sample(rng)
            };
            SimulatedCustomer {
                history: PurchaseHistory {
                    frequency,
                    recency: times.last().copied().unwrap_or(0.0),
                    age: observed_for,
                },
                mean_spend,
                repeat_times: times,
            }
        })
        .collect()
}

/// A transaction log at daily resolution: customer `i` is `c<i>`, first buys on a day drawn
/// uniformly from the first `cohort_days` days after `start`, and keeps buying (parameters in
/// days) until `end`; amounts are rounded to cents (at least 1 cent).
pub fn simulate_transactions<R: Rng>(
    rng: &mut R,
    purchases: &BgNbdParams,
    spend: &GammaGammaParams,
    customers: usize,
    start: time::Date,
    cohort_days: u32,
    end: time::Date,
) -> Vec<Transaction> {
    let start_day = start.to_julian_day();
    let end_day = end.to_julian_day();
    let mut transactions = Vec::new();
    for index in 0..customers {
        let latent = draw_latent(rng, purchases, spend);
        let amount = Gamma::new(spend.p, 1.0 / latent.spend_rate).expect("valid spend shape");
        let first_day = start_day + rng.gen_range(0..cohort_days.max(1)) as i32;
        let customer_id = format!("c{index}");
        let mut push = |rng: &mut R, day: i32| {
            let cents = (amount.sample(rng) * 100.0).round().max(1.0) as i64;
            transactions.push(Transaction {
                customer_id: customer_id.clone(),
                date: time::Date::from_julian_day(day).expect("simulated day is a date"),
                amount_minor: cents,
            });
        };
        push(rng, first_day);
        for time in repeat_purchase_times(rng, &latent, f64::from(end_day - first_day)) {
            push(rng, first_day + time.floor() as i32);
        }
    }
    transactions
}
