//! `crm-node clv fit` run as a process on small CSV files: `--json` prints exactly the
//! documented report shape, the summary shows the models, deciles and top customers, and
//! bad input (a bad row, a missing file, data without repeat buyers, a bad date or rate)
//! exits non-zero with a message naming the file and, for a bad row, the line.
//!
//! The transactions are generated from a fixed seed: customers with gamma-distributed
//! purchase rates, a dropout chance after each repeat purchase, and spends scattered around
//! a per-customer mean, so both models have something to fit.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
#[path = "support/process.rs"]
mod process;

use process::{run_crm_node, Finished};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest a `clv fit` run may take; a few hundred customers take milliseconds.
const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Customers in the generated file.
const CUSTOMERS: usize = 400;

/// Keys of each customer object in the JSON report, as documented in docs/clv.md.
const CUSTOMER_KEYS: [&str; 9] = [
    "customer_id",
    "frequency",
    "recency",
    "T",
    "monetary",
    "p_alive",
    "expected_purchases",
    "expected_avg_spend",
    "clv",
];

/// Runs `crm-node <args>`; fails the test if it is still running after
/// [`PROCESS_TIMEOUT`].
fn crm_node(args: &[&str]) -> Finished {
    run_crm_node(args, PROCESS_TIMEOUT)
}

/// Runs `crm-node clv fit --transactions <transactions> --as-of <as_of> <extra>`.
fn clv_fit(transactions: &str, as_of: &str, extra: &[&str]) -> Finished {
    let mut args = vec![
        "clv",
        "fit",
        "--transactions",
        transactions,
        "--as-of",
        as_of,
    ];
    args.extend_from_slice(extra);
    crm_node(&args)
}

/// Writes `customer_id,date,amount` rows for [`CUSTOMERS`] customers who first buy in
/// January-March 2024 and are followed until 2024-09-30.
fn write_transactions(dir: &Path) -> PathBuf {
    let mut rng = StdRng::seed_from_u64(42);
    let start = time::macros::date!(2024 - 01 - 01);
    let end_day = 273;
    let mut csv = String::from("customer_id,date,amount\n");
    for customer in 0..CUSTOMERS {
        // Gamma(2, 1/40)-like rate per day: the sum of two exponentials.
        let rate = (-(1.0 - rng.gen::<f64>()).ln() - (1.0 - rng.gen::<f64>()).ln()) / 40.0;
        let dropout = rng.gen::<f64>() * 0.5;
        let mean_spend = 15.0 + 60.0 * rng.gen::<f64>();
        let first_day = rng.gen_range(0..90);
        let mut day = f64::from(first_day);
        loop {
            let amount = mean_spend * (0.6 + 0.8 * rng.gen::<f64>());
            let date = start + time::Duration::days(day as i64);
            csv.push_str(&format!("cust{customer:04},{date},{amount:.2}\n"));
            day += -(1.0 - rng.gen::<f64>()).ln() / rate;
            if day > f64::from(end_day)
                || (day > f64::from(first_day) + 1.0 && rng.gen::<f64>() < dropout)
            {
                break;
            }
        }
    }
    let path = dir.join("transactions.csv");
    std::fs::write(&path, csv).expect("write the CSV");
    path
}

fn keys(value: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

fn sorted<const N: usize>(mut names: [&'static str; N]) -> Vec<&'static str> {
    names.sort_unstable();
    names.to_vec()
}

#[test]
fn json_report_has_exactly_the_documented_keys() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let csv = write_transactions(dir.path());
    let finished = clv_fit(
        csv.to_str().expect("utf-8 path"),
        "2024-09-30",
        &[
            "--time-unit",
            "weeks",
            "--horizon",
            "26",
            "--discount-rate",
            "0.01",
            "--json",
        ],
    );
    assert!(
        finished.status.success(),
        "clv fit failed: {}",
        finished.stderr
    );
    let report: Value = serde_json::from_str(&finished.stdout).expect("stdout is one JSON object");

    assert_eq!(
        keys(&report),
        sorted(["purchase_model", "spend_model", "customers"])
    );
    let purchase = &report["purchase_model"];
    assert_eq!(
        keys(purchase),
        sorted(["name", "params", "log_likelihood", "converged"])
    );
    assert_eq!(purchase["name"], "bgnbd");
    assert_eq!(purchase["converged"], true);
    assert_eq!(keys(&purchase["params"]), sorted(["r", "alpha", "a", "b"]));
    let spend = &report["spend_model"];
    assert_eq!(keys(spend), sorted(["name", "params", "log_likelihood"]));
    assert_eq!(spend["name"], "gamma_gamma");
    assert_eq!(keys(&spend["params"]), sorted(["p", "q", "gamma"]));
    for model in [purchase, spend] {
        assert!(model["log_likelihood"]
            .as_f64()
            .is_some_and(|ll| ll.is_finite() && ll < 0.0));
    }

    let customers = report["customers"]
        .as_array()
        .expect("customers is an array");
    assert_eq!(customers.len(), CUSTOMERS);
    for customer in customers {
        assert_eq!(keys(customer), sorted(CUSTOMER_KEYS));
        let p_alive = customer["p_alive"].as_f64().expect("p_alive is a number");
        assert!((0.0..=1.0).contains(&p_alive));
        for key in ["expected_purchases", "expected_avg_spend", "clv"] {
            assert!(
                customer[key]
                    .as_f64()
                    .is_some_and(|v| v.is_finite() && v >= 0.0),
                "{key} in {customer}"
            );
        }
    }
}

#[test]
fn summary_shows_models_deciles_and_top_customers() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let csv = write_transactions(dir.path());
    let finished = clv_fit(csv.to_str().expect("utf-8 path"), "2024-09-30", &[]);
    assert!(
        finished.status.success(),
        "clv fit failed: {}",
        finished.stderr
    );
    for needle in [
        "time unit day, horizon 365 days, discount rate 0 per day",
        "Purchase model (BG/NBD):",
        "Spend model (Gamma-Gamma):",
        "log-likelihood",
        "Value deciles",
        "Top 10 customers by CLV:",
    ] {
        assert!(
            finished.stdout.contains(needle),
            "summary lacks `{needle}`:\n{}",
            finished.stdout
        );
    }
    let top_rows = finished
        .stdout
        .lines()
        .filter(|line| line.trim_start().starts_with("cust0"))
        .count();
    assert_eq!(top_rows, 10);
}

#[test]
fn a_bad_row_fails_naming_the_file_and_the_line() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let csv = dir.path().join("broken.csv");
    std::fs::write(
        &csv,
        "customer_id,date,amount\nc1,2024-01-02,10\nc1,2024-02-03,12.50\nc2,2024-02-30,7\n",
    )
    .expect("write the CSV");
    let path = csv.to_str().expect("utf-8 path");
    let finished = clv_fit(path, "2024-06-30", &["--json"]);
    assert!(
        !finished.status.success(),
        "a bad date was accepted: {}",
        finished.stdout
    );
    assert!(
        finished.stdout.is_empty(),
        "nothing is printed on stdout: {}",
        finished.stdout
    );
    assert!(
        finished.stderr.contains(&format!(
            "{path}: line 4: date `2024-02-30` is not a calendar date"
        )),
        "{}",
        finished.stderr
    );
}

#[test]
fn unusable_input_fails_with_a_message_naming_the_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let missing = dir.path().join("missing.csv");
    let missing = missing.to_str().expect("utf-8 path");
    let finished = clv_fit(missing, "2024-06-30", &[]);
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains(&format!("{missing}: cannot open")),
        "{}",
        finished.stderr
    );

    let one_time = dir.path().join("one_time.csv");
    std::fs::write(
        &one_time,
        "customer_id,date,amount\nc1,2024-01-02,10\nc2,2024-01-05,12\nc3,2024-03-01,9\n",
    )
    .expect("write the CSV");
    let one_time = one_time.to_str().expect("utf-8 path");
    let finished = clv_fit(one_time, "2024-06-30", &[]);
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains(one_time)
            && finished
                .stderr
                .contains("no customer has a repeat purchase"),
        "{}",
        finished.stderr
    );

    let finished = clv_fit(one_time, "30/06/2024", &[]);
    assert!(!finished.status.success());
    assert!(
        finished
            .stderr
            .contains("--as-of `30/06/2024` is not a date"),
        "{}",
        finished.stderr
    );

    let finished = clv_fit(one_time, "2024-06-30", &["--discount-rate=-0.1"]);
    assert!(!finished.status.success());
    assert!(
        finished
            .stderr
            .contains("the discount rate must be a finite number >= 0"),
        "{}",
        finished.stderr
    );
}
