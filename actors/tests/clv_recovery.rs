//! Parameter recovery: customers simulated from the BG/NBD and Gamma-Gamma processes with
//! known (CDNOW-like) parameters are fitted back, and every estimate must lie within four
//! of its own standard errors (from the observed information) of the truth. A seeded
//! generator makes the data, and so the outcome, fixed.
//!
//! The conditional expectation is checked the same way: predictions from each simulated
//! customer's calibration history against what they bought next. Also here: a fit on data with no maximum (one customer, too few repeat buyers, a
//! heavy-tailed spend with q <= 1) is an error, not numbers.

#[path = "support/clv_simulation.rs"]
mod clv_simulation;

use clv_simulation::{simulate_customers, SimulatedCustomer};
use crm_actors::value::{
    bgnbd, gamma_gamma, AggregatedHistories, BgNbdParams, FitError, GammaGammaParams, SpendHistory,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// CDNOW-like purchase parameters, time in weeks (Fader, Hardie & Lee 2005).
const CDNOW_PURCHASES: BgNbdParams = BgNbdParams {
    r: 0.24,
    alpha: 4.41,
    a: 0.79,
    b: 2.43,
};

/// CDNOW-like spend parameters (Fader, Hardie & Lee 2005, "RFM and CLV").
const CDNOW_SPEND: GammaGammaParams = GammaGammaParams {
    p: 6.25,
    q: 3.74,
    gamma: 15.44,
};

/// Customers per recovery sample.
const CUSTOMERS: usize = 30_000;

/// Allowed distance between estimate and truth, in standard errors of the log-parameter.
const STANDARD_ERRORS_ALLOWED: f64 = 4.0;

/// CDNOW's calibration window: first purchases spread over 12 weeks, observed until week 39.
fn cdnow_like_customers(seed: u64, customers: usize) -> Vec<SimulatedCustomer> {
    let mut rng = StdRng::seed_from_u64(seed);
    simulate_customers(&mut rng, &CDNOW_PURCHASES, &CDNOW_SPEND, customers, |rng| {
        39.0 - rng.gen_range(0.0..12.0)
    })
}

/// What the spend model sees of simulated customers.
fn spend_histories(customers: &[SimulatedCustomer]) -> Vec<SpendHistory> {
    customers
        .iter()
        .map(|c| SpendHistory {
            frequency: c.history.frequency,
            mean_spend: c.mean_spend,
        })
        .collect()
}

fn assert_recovered(name: &str, estimate: f64, truth: f64, standard_error: f64) {
    let distance = (estimate.ln() - truth.ln()).abs() / standard_error;
    println!("{name}: estimate {estimate:.4}, truth {truth}, log-scale standard error {standard_error:.4}, distance {distance:.2} SE");
    assert!(
        distance <= STANDARD_ERRORS_ALLOWED,
        "{name} = {estimate} is {distance:.1} standard errors from the true {truth}"
    );
    // The test must have power: a standard error this small still tells wrong from right.
    assert!(
        standard_error < 0.25,
        "{name}: standard error {standard_error} too large to test anything"
    );
}

#[test]
fn bgnbd_fit_recovers_the_simulating_parameters() {
    let customers = cdnow_like_customers(20_240_601, CUSTOMERS);
    let data = AggregatedHistories::from_histories(customers.iter().map(|c| c.history))
        .expect("valid histories");
    let fit = bgnbd::fit(&data).expect("the fit converges");
    let truth = [
        CDNOW_PURCHASES.r,
        CDNOW_PURCHASES.alpha,
        CDNOW_PURCHASES.a,
        CDNOW_PURCHASES.b,
    ];
    let estimate = [fit.params.r, fit.params.alpha, fit.params.a, fit.params.b];
    for (index, name) in ["r", "alpha", "a", "b"].iter().enumerate() {
        assert_recovered(
            name,
            estimate[index],
            truth[index],
            fit.log_parameter_standard_errors[index],
        );
    }
    // The reported log-likelihood is the full sum, and the optimum beats the truth.
    let at_truth: f64 = customers
        .iter()
        .map(|c| CDNOW_PURCHASES.log_likelihood(&c.history))
        .sum();
    let at_fit: f64 = customers
        .iter()
        .map(|c| fit.params.log_likelihood(&c.history))
        .sum();
    assert!((fit.log_likelihood - at_fit).abs() < 1e-9 * at_fit.abs());
    assert!(at_fit >= at_truth);
}

#[test]
fn gamma_gamma_fit_recovers_the_simulating_parameters() {
    let customers = cdnow_like_customers(7, CUSTOMERS);
    let spends = spend_histories(&customers);
    let fit = gamma_gamma::fit(&spends).expect("the fit converges");
    assert_eq!(
        fit.customers,
        spends.iter().filter(|s| s.frequency > 0).count()
    );
    let truth = [CDNOW_SPEND.p, CDNOW_SPEND.q, CDNOW_SPEND.gamma];
    let estimate = [fit.params.p, fit.params.q, fit.params.gamma];
    for (index, name) in ["p", "q", "gamma"].iter().enumerate() {
        assert_recovered(
            name,
            estimate[index],
            truth[index],
            fit.log_parameter_standard_errors[index],
        );
    }
}

#[test]
fn conditional_expectations_predict_what_simulated_customers_buy_next() {
    // Observe customers for a calibration window, predict the next 39 weeks from each one's
    // history alone, and compare with what the simulation had them do, overall and for
    // customers grouped by their calibration frequency (as in Fader, Hardie & Lee, fig. 4).
    let holdout_weeks = 39.0;
    let mut rng = StdRng::seed_from_u64(99);
    let customers =
        simulate_customers(&mut rng, &CDNOW_PURCHASES, &CDNOW_SPEND, CUSTOMERS, |rng| {
            39.0 + holdout_weeks - rng.gen_range(0.0..12.0)
        });
    let mut predicted_by_frequency = [0.0; 4];
    let mut actual_by_frequency = [0.0; 4];
    for customer in &customers {
        let cut = customer.history.age - holdout_weeks;
        let seen = customer.history_until(cut);
        let bucket = (seen.frequency as usize).min(3);
        predicted_by_frequency[bucket] += CDNOW_PURCHASES.expected_purchases(&seen, holdout_weeks);
        actual_by_frequency[bucket] += customer.purchases_after(cut) as f64;
    }
    for bucket in 0..4 {
        let (predicted, actual) = (predicted_by_frequency[bucket], actual_by_frequency[bucket]);
        println!(
            "calibration frequency {bucket}{}: predicted {predicted:.0}, simulated {actual:.0}",
            if bucket == 3 { "+" } else { "" }
        );
        // Each bucket holds thousands of purchases; 10% is several sampling standard
        // deviations, while a wrong expectation formula is off by far more.
        assert!(
            (predicted - actual).abs() < 0.10 * actual,
            "bucket {bucket}: predicted {predicted:.0}, simulated {actual:.0}"
        );
    }
    let (predicted, actual): (f64, f64) = (
        predicted_by_frequency.iter().sum(),
        actual_by_frequency.iter().sum(),
    );
    assert!(
        (predicted - actual).abs() < 0.04 * actual,
        "predicted {predicted:.0}, simulated {actual:.0}"
    );
}

#[test]
fn a_single_customer_has_no_maximum_likelihood_fit() {
    let single = AggregatedHistories::from_histories([crm_actors::value::PurchaseHistory {
        frequency: 3,
        recency: 20.0,
        age: 30.0,
    }])
    .expect("valid history");
    let error = bgnbd::fit(&single).expect_err("one customer cannot identify four parameters");
    assert!(
        matches!(
            error,
            FitError::Diverged { .. }
                | FitError::NotIdentified { .. }
                | FitError::NotConverged { .. }
        ),
        "{error}"
    );
}

#[test]
fn spend_so_heavy_tailed_that_q_is_below_one_is_refused() {
    let heavy_tail = GammaGammaParams {
        p: 2.0,
        q: 0.6,
        gamma: 10.0,
    };
    let mut rng = StdRng::seed_from_u64(3);
    let customers = simulate_customers(&mut rng, &CDNOW_PURCHASES, &heavy_tail, 20_000, |_| 39.0);
    let spends = spend_histories(&customers);
    match gamma_gamma::fit(&spends) {
        Err(FitError::SpendMeanUndefined { q }) => assert!(q <= 1.0),
        other => panic!("expected SpendMeanUndefined, got {other:?}"),
    }
}
