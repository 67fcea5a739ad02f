//! The customer-value benchmark: simulated CDNOW-like transaction logs of 100,000 and
//! 1,000,000 customers go through the whole pipeline (data preparation, BG/NBD and
//! Gamma-Gamma fits, scoring), each step timed, plus a harder 1,000,000-customer log whose
//! first purchases spread over three years (many more distinct histories); prints a table
//! and writes `bench/clv_results.json`. Not a test: run it in release,
//!
//! ```text
//! cargo run --release -p crm-actors --example clv_bench -- --customers 1000000
//! ```
//!
//! `--customers N` sets the large size (default 1,000,000; 100,000 CDNOW-like always runs),
//! `--seed S` the generator seed, `--output PATH` the JSON file. The data: purchase rates
//! Gamma(0.24, 30.87 days), dropout Beta(0.79, 2.43), spend Gamma-Gamma(6.25, 3.74, 15.44)
//! (Fader, Hardie & Lee's CDNOW estimates, in days); first purchases spread over 84 days,
//! observed to day 273 (39 weeks) -- or, in the `wide` scenario, spread over 1,095 days and
//! observed to day 1,095 -- at daily resolution with cents. The models are fitted in weeks,
//! as in the paper. Scoring is timed with a fresh cache per run and several horizon
//! settings; fits and scoring run on one thread.

#[path = "../tests/support/clv_simulation.rs"]
mod clv_simulation;

use crm_actors::value::{
    fit_models, summarize, ClvSettings, CustomerSummary, FittedModels, Scorer, TimeUnit,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::json;
use std::time::Instant;

/// The small size, always measured.
const SMALL_CUSTOMERS: usize = 100_000;

/// One simulated transaction log.
struct Scenario {
    label: &'static str,
    /// Days over which first purchases are spread.
    cohort_days: u32,
    /// Days from the first possible purchase to the as-of date.
    observed_days: i64,
}

/// CDNOW's calibration window: first purchases over 12 weeks, observed for 39.
const CDNOW: Scenario = Scenario {
    label: "cdnow",
    cohort_days: 84,
    observed_days: 273,
};

/// Three years of acquisition and history: many distinct (x, T) to score.
const WIDE: Scenario = Scenario {
    label: "wide",
    cohort_days: 1_095,
    observed_days: 1_095,
};

/// One scoring configuration.
struct ScoringCase {
    label: &'static str,
    unit: TimeUnit,
    horizon_periods: u32,
    discount_rate: f64,
}

const SCORING_CASES: [ScoringCase; 3] = [
    ScoringCase {
        label: "weeks, 52, undiscounted",
        unit: TimeUnit::Weeks,
        horizon_periods: 52,
        discount_rate: 0.0,
    },
    ScoringCase {
        label: "weeks, 52, 0.2%/week",
        unit: TimeUnit::Weeks,
        horizon_periods: 52,
        discount_rate: 0.002,
    },
    ScoringCase {
        label: "days, 365, 0.03%/day",
        unit: TimeUnit::Days,
        horizon_periods: 365,
        discount_rate: 0.0003,
    },
];

struct Options {
    customers: usize,
    seed: u64,
    output: std::path::PathBuf,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        customers: 1_000_000,
        seed: 2005,
        output: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("bench/clv_results.json"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--customers" => {
                options.customers = value()?.parse().map_err(|e| format!("--customers: {e}"))?
            }
            "--seed" => options.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--output" => options.output = value()?.into(),
            other => {
                return Err(format!(
                    "unknown flag {other} (use --customers N, --seed S, --output PATH)"
                ))
            }
        }
    }
    Ok(options)
}

/// Timings of one size.
struct Measured {
    scenario: &'static str,
    customers: usize,
    transactions: usize,
    distinct_histories: usize,
    prepare_s: f64,
    fit_s: f64,
    fitted: FittedModels,
    scoring_customers_per_s: Vec<f64>,
}

fn measure(scenario: &Scenario, customers: usize, seed: u64) -> Measured {
    let purchases_in_days = crm_actors::value::BgNbdParams {
        r: 0.24,
        alpha: 4.41 * 7.0,
        a: 0.79,
        b: 2.43,
    };
    let spend = crm_actors::value::GammaGammaParams {
        p: 6.25,
        q: 3.74,
        gamma: 15.44,
    };
    let start = time::macros::date!(2024 - 01 - 01);
    let as_of = start + time::Duration::days(scenario.observed_days);
    let mut rng = StdRng::seed_from_u64(seed);
    let transactions = clv_simulation::simulate_transactions(
        &mut rng,
        &purchases_in_days,
        &spend,
        customers,
        start,
        scenario.cohort_days,
        as_of,
    );

    let clock = Instant::now();
    let summaries = summarize(&transactions, as_of, TimeUnit::Weeks);
    let prepare_s = clock.elapsed().as_secs_f64();
    let distinct_histories = crm_actors::value::AggregatedHistories::from_histories(
        summaries.iter().map(CustomerSummary::history),
    )
    .map(|data| data.distinct_histories())
    .unwrap_or(0);

    let clock = Instant::now();
    let fitted = fit_models(&summaries).unwrap_or_else(|error| panic!("fit failed: {error}"));
    let fit_s = clock.elapsed().as_secs_f64();

    let days = summarize(&transactions, as_of, TimeUnit::Days);
    let in_days = crm_actors::value::BgNbdParams {
        alpha: fitted.purchases.params.alpha * 7.0,
        ..fitted.purchases.params
    };
    let scoring_customers_per_s = SCORING_CASES
        .iter()
        .map(|case| {
            let (params, customers) = match case.unit {
                TimeUnit::Weeks => (fitted.purchases.params, &summaries),
                TimeUnit::Days => (in_days, &days),
            };
            let settings = ClvSettings {
                horizon_periods: case.horizon_periods,
                discount_rate: case.discount_rate,
            };
            let clock = Instant::now();
            let mut scorer =
                Scorer::new(params, fitted.spend.params, settings).expect("valid settings");
            let mut total = 0.0;
            for customer in customers {
                total += scorer.score(customer).clv;
            }
            let elapsed = clock.elapsed().as_secs_f64();
            assert!(total.is_finite() && total > 0.0);
            customers.len() as f64 / elapsed
        })
        .collect();
    Measured {
        scenario: scenario.label,
        customers,
        transactions: transactions.len(),
        distinct_histories,
        prepare_s,
        fit_s,
        fitted,
        scoring_customers_per_s,
    }
}

fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("clv_bench: {message}");
            std::process::exit(2);
        }
    };
    let mut plan = vec![(&CDNOW, SMALL_CUSTOMERS)];
    if options.customers > SMALL_CUSTOMERS {
        plan.push((&CDNOW, options.customers));
    }
    plan.push((&WIDE, options.customers));
    let runs: Vec<Measured> = plan
        .iter()
        .map(|(scenario, size)| measure(scenario, *size, options.seed))
        .collect();

    println!(
        "{:<6} {:>9} {:>12} {:>9} {:>9} {:>7} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6}",
        "data",
        "customers",
        "transactions",
        "distinct",
        "prepare_s",
        "fit_s",
        "r",
        "alpha_w",
        "a",
        "b",
        "p",
        "q",
        "gamma"
    );
    for run in &runs {
        let (purchase, spend) = (run.fitted.purchases.params, run.fitted.spend.params);
        println!(
            "{:<6} {:>9} {:>12} {:>9} {:>9.3} {:>7.3} {:>6.4} {:>7.3} {:>6.4} {:>6.3} {:>6.3} {:>6.3} {:>6.2}",
            run.scenario,
            run.customers,
            run.transactions,
            run.distinct_histories,
            run.prepare_s,
            run.fit_s,
            purchase.r,
            purchase.alpha,
            purchase.a,
            purchase.b,
            spend.p,
            spend.q,
            spend.gamma
        );
    }
    println!();
    println!("scoring, customers/s (fresh cache, one thread)");
    let heading: Vec<String> = runs
        .iter()
        .map(|run| format!("{} {}", run.scenario, run.customers))
        .collect();
    println!(
        "  {:<26} {}",
        "horizon",
        heading
            .iter()
            .map(|h| format!("{h:>14}"))
            .collect::<String>()
    );
    for (index, case) in SCORING_CASES.iter().enumerate() {
        let rates: String = runs
            .iter()
            .map(|run| format!("{:>14.3e}", run.scoring_customers_per_s[index]))
            .collect();
        println!("  {:<26} {rates}", case.label);
    }

    let find = |scenario: &str, customers: usize| {
        runs.iter()
            .find(|run| run.scenario == scenario && run.customers == customers)
    };
    let slowest_scoring = runs
        .iter()
        .filter(|run| run.customers == options.customers)
        .flat_map(|run| run.scoring_customers_per_s.iter().copied())
        .fold(f64::INFINITY, f64::min);
    let results = json!({
        "clv_fit_100k_s": find("cdnow", SMALL_CUSTOMERS).map(|run| round3(run.fit_s)),
        "clv_fit_1m_s": find("cdnow", 1_000_000).map(|run| round3(run.fit_s)),
        "clv_fit_1m_wide_s": find("wide", 1_000_000).map(|run| round3(run.fit_s)),
        "clv_scoring_customers_per_s": slowest_scoring.round(),
        "method": "cargo run --release -p crm-actors --example clv_bench -- --customers 1000000; \
                   simulated CDNOW-like transactions at daily resolution (cdnow: first purchases \
                   over 84 days, observed 273 days; wide: over 1095 days, observed 1095 days); \
                   fit_s = BG/NBD aggregation + fit + Gamma-Gamma fit on the summaries, in weeks, \
                   one thread; prepare_s = transactions -> summaries; scoring = a fresh Scorer \
                   over every customer, one thread; clv_scoring_customers_per_s is the slowest \
                   scoring case over the large runs (both data sets)",
        "runs": runs.iter().map(|run| json!({
            "data": run.scenario,
            "customers": run.customers,
            "transactions": run.transactions,
            "distinct_histories": run.distinct_histories,
            "prepare_s": round3(run.prepare_s),
            "fit_s": round3(run.fit_s),
            "bgnbd_weeks": {
                "r": run.fitted.purchases.params.r,
                "alpha": run.fitted.purchases.params.alpha,
                "a": run.fitted.purchases.params.a,
                "b": run.fitted.purchases.params.b,
                "iterations": run.fitted.purchases.iterations,
            },
            "gamma_gamma": {
                "p": run.fitted.spend.params.p,
                "q": run.fitted.spend.params.q,
                "gamma": run.fitted.spend.params.gamma,
                "iterations": run.fitted.spend.iterations,
            },
            "scoring_customers_per_s": SCORING_CASES.iter().zip(&run.scoring_customers_per_s)
                .map(|(case, rate)| (case.label.to_string(), json!(rate.round())))
                .collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    });
    let text = serde_json::to_string_pretty(&results).expect("results serialise");
    match std::fs::write(&options.output, text + "\n") {
        Ok(()) => println!("\nwrote {}", options.output.display()),
        Err(error) => {
            eprintln!(
                "clv_bench: cannot write {}: {error}",
                options.output.display()
            );
            std::process::exit(1);
        }
    }
}

fn round3(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}
