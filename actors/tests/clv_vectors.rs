//! The models against independent high-precision values: `scripts/clv_vectors.py`
//! computes, with mpmath at 50 (checked at 80) digits and straight from the textbook
//! formulas (mpmath's own 2F1), per-customer log-likelihoods, P(alive), conditional and
//! population expected purchases, Gamma-Gamma log-likelihoods and expected spend, and
//! discounted CLVs, for parameter sets and customers at the extremes (x = 0, x = 2000 with
//! t_x close to T, T == t_x, a = 0.999 / 1.0001, a + b < 1, tiny and huge alpha, large r).
//! Regenerate with `python3 scripts/clv_vectors.py > actors/tests/data/clv_vectors.json`.
//!
//! Every Rust value must match to 1e-9 relative (plus 1e-13 absolute for values that are
//! exactly zero, such as the log-likelihood of a customer with T = 0); the test prints the
//! largest relative error of each quantity, which is the achieved accuracy (~1e-13 or better).

use crm_actors::value::{
    BgNbdParams, ClvSettings, CustomerSummary, GammaGammaParams, PurchaseHistory, Scorer,
    SpendHistory,
};
use serde_json::Value;
use std::collections::BTreeMap;

const RELATIVE_TOLERANCE: f64 = 1e-9;
const ABSOLUTE_FLOOR: f64 = 1e-13;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/clv_vectors.json");
    let text = std::fs::read_to_string(path).expect("tests/data/clv_vectors.json is committed");
    serde_json::from_str(&text).expect("vectors are JSON")
}

fn number(value: &Value, key: &str) -> f64 {
    value[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is a number in {value}"))
}

/// Records the worst relative error per quantity and fails on any beyond tolerance.
#[derive(Default)]
struct Errors {
    worst: BTreeMap<&'static str, f64>,
    failures: Vec<String>,
}

impl Errors {
    fn check(&mut self, quantity: &'static str, case: String, actual: f64, expected: f64) {
        let difference = (actual - expected).abs();
        let relative = if expected == 0.0 {
            difference
        } else {
            difference / expected.abs()
        };
        let worst = self.worst.entry(quantity).or_insert(0.0);
        *worst = worst.max(relative);
        // A NaN difference compares false, so it fails too.
        let within = difference <= RELATIVE_TOLERANCE * expected.abs() + ABSOLUTE_FLOOR;
        if !within {
            self.failures.push(format!(
                "{quantity} {case}: rust {actual:e}, mpmath {expected:e}, relative {relative:.1e}"
            ));
        }
    }

    fn report(self) {
        for (quantity, worst) in &self.worst {
            println!("{quantity:<28} worst relative error {worst:.1e}");
        }
        assert!(
            self.failures.is_empty(),
            "mismatches:\n{}",
            self.failures.join("\n")
        );
    }
}

fn bgnbd_params(value: &Value) -> BgNbdParams {
    BgNbdParams {
        r: number(value, "r"),
        alpha: number(value, "alpha"),
        a: number(value, "a"),
        b: number(value, "b"),
    }
}

fn gamma_gamma_params(value: &Value) -> GammaGammaParams {
    GammaGammaParams {
        p: number(value, "p"),
        q: number(value, "q"),
        gamma: number(value, "gamma"),
    }
}

fn history(value: &Value) -> PurchaseHistory {
    PurchaseHistory {
        frequency: number(value, "x") as u32,
        recency: number(value, "t_x"),
        age: number(value, "T"),
    }
}

#[test]
fn bgnbd_values_match_mpmath() {
    let vectors = vectors();
    let mut errors = Errors::default();
    for set in vectors["bgnbd"].as_array().expect("bgnbd sets") {
        let params = bgnbd_params(&set["params"]);
        let label = set["label"].as_str().unwrap_or("?");
        for customer in set["customers"].as_array().expect("customers") {
            let history = history(customer);
            let case = format!("{label} {history:?}");
            errors.check(
                "log_likelihood",
                case.clone(),
                params.log_likelihood(&history),
                number(customer, "log_likelihood"),
            );
            errors.check(
                "p_alive",
                case.clone(),
                params.probability_alive(&history),
                number(customer, "p_alive"),
            );
            for horizon in customer["expected_purchases"].as_array().expect("horizons") {
                let t = number(horizon, "t");
                errors.check(
                    "expected_purchases",
                    format!("{case} t={t}"),
                    params.expected_purchases(&history, t),
                    number(horizon, "value"),
                );
            }
        }
        for horizon in set["population"].as_array().expect("population") {
            let t = number(horizon, "t");
            errors.check(
                "population_expected",
                format!("{label} t={t}"),
                params.expected_purchases_population(t),
                number(horizon, "value"),
            );
        }
    }
    errors.report();
}

#[test]
fn gamma_gamma_values_match_mpmath() {
    let vectors = vectors();
    let mut errors = Errors::default();
    for set in vectors["gamma_gamma"].as_array().expect("gamma_gamma sets") {
        let params = gamma_gamma_params(&set["params"]);
        for customer in set["customers"].as_array().expect("customers") {
            let spend = SpendHistory {
                frequency: number(customer, "x") as u32,
                mean_spend: number(customer, "mean_spend"),
            };
            let case = format!("{} {spend:?}", set["label"]);
            errors.check(
                "gg_log_likelihood",
                case.clone(),
                params.log_likelihood(&spend),
                number(customer, "log_likelihood"),
            );
            errors.check(
                "gg_expected_spend",
                case,
                params.expected_average_spend(&spend),
                number(customer, "expected_spend"),
            );
        }
    }
    errors.report();
}

#[test]
fn discounted_clv_matches_mpmath() {
    let vectors = vectors();
    let find = |kind: &str, label: &str| -> Value {
        vectors[kind]
            .as_array()
            .and_then(|sets| sets.iter().find(|s| s["label"] == label))
            .map(|s| s["params"].clone())
            .unwrap_or_else(|| panic!("{kind} set {label}"))
    };
    let mut errors = Errors::default();
    for case in vectors["clv"].as_array().expect("clv cases") {
        let purchases = bgnbd_params(&find("bgnbd", case["bgnbd"].as_str().unwrap_or("?")));
        let spend = gamma_gamma_params(&find(
            "gamma_gamma",
            case["gamma_gamma"].as_str().unwrap_or("?"),
        ));
        let settings = ClvSettings {
            horizon_periods: number(case, "horizon") as u32,
            discount_rate: number(case, "discount_rate"),
        };
        let history = history(case);
        let summary = CustomerSummary {
            customer_id: "vector".to_string(),
            frequency: history.frequency,
            recency: history.recency,
            age: history.age,
            monetary: number(case, "mean_spend"),
        };
        let score = Scorer::new(purchases, spend, settings)
            .expect("valid settings")
            .score(&summary);
        errors.check("clv", format!("{case}"), score.clv, number(case, "clv"));
    }
    errors.report();
}
