//! `crm-node clv fit`: the command-line front end of the customer-value models in
//! [`crm_actors::value`]. Reads a transactions CSV, fits BG/NBD and Gamma-Gamma, scores every
//! customer and renders either the JSON report (`--json`) or a readable summary (model
//! parameters, log-likelihoods, value deciles, top customers).
//!
//! It needs no NATS and touches nothing but the file it is given; [`run`] returns the text
//! to print and `main.rs` prints it. Every error names the file (and, for bad rows, the
//! line) and how to fix it. Docs: `docs/clv.md`.

use clap::{Args, Subcommand, ValueEnum};
use crm_actors::value::{self, ClvError, ClvReport, ClvSettings, CsvError, TimeUnit};
use std::fmt::Write as _;
use std::io::BufReader;
use std::path::PathBuf;
use time::Date;

/// Customers listed in the summary's top table.
const TOP_CUSTOMERS: usize = 10;

#[derive(Args, Debug)]
pub struct ClvCommand {
    #[command(subcommand)]
    pub action: ClvAction,
}

#[derive(Subcommand, Debug)]
pub enum ClvAction {
    /// Fit BG/NBD (purchases) and Gamma-Gamma (spend) on a transactions CSV and score
    /// every customer: P(alive), expected purchases and spend, CLV.
    Fit(FitArgs),
}

/// The unit of every time: recency, T, horizon, discount rate.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeUnitArg {
    Days,
    Weeks,
}

impl From<TimeUnitArg> for TimeUnit {
    fn from(unit: TimeUnitArg) -> TimeUnit {
        match unit {
            TimeUnitArg::Days => TimeUnit::Days,
            TimeUnitArg::Weeks => TimeUnit::Weeks,
        }
    }
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// CSV with the header `customer_id,date,amount` (date YYYY-MM-DD, amount a decimal
    /// >= 0 with at most 2 decimals).
    #[arg(long)]
    pub transactions: PathBuf,
    /// Transactions after this date are ignored and customer ages run to it (YYYY-MM-DD).
    #[arg(long)]
    pub as_of: String,
    /// Unit of recency, T, the horizon and the discount rate (weeks = days / 7).
    #[arg(long, value_enum, default_value = "days")]
    pub time_unit: TimeUnitArg,
    /// CLV horizon in time units [default: 365 for days, 52 for weeks].
    #[arg(long)]
    pub horizon: Option<u32>,
    /// Discount rate per time unit (e.g. 0.0003 per day, 0.002 per week).
    #[arg(long, default_value_t = 0.0)]
    pub discount_rate: f64,
    /// Print the report as one JSON object instead of the summary.
    #[arg(long)]
    pub json: bool,
}

/// Why `crm-node clv fit` produced no report.
#[derive(Debug, thiserror::Error)]
pub enum ClvCliError {
    #[error("{path}: cannot open the transactions file: {error}")]
    Open { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Csv { path: String, error: CsvError },
    #[error("--as-of `{text}` is not a date (write YYYY-MM-DD, e.g. 2024-06-30)")]
    AsOf { text: String },
    #[error("--horizon / --discount-rate: {0}")]
    Settings(ClvError),
    #[error("{path}: {error}")]
    Model { path: String, error: ClvError },
    #[error("cannot write the JSON report: {0}")]
    Json(String),
}

/// Runs a `clv` subcommand and returns what to print on stdout.
pub fn run(command: ClvCommand) -> Result<String, ClvCliError> {
    match command.action {
        ClvAction::Fit(args) => fit(&args),
    }
}

fn fit(args: &FitArgs) -> Result<String, ClvCliError> {
    let path = args.transactions.display().to_string();
    let as_of = crm_actors::time::parse_date(&args.as_of).ok_or_else(|| ClvCliError::AsOf {
        text: args.as_of.clone(),
    })?;
    let unit = TimeUnit::from(args.time_unit);
    let horizon = args.horizon.unwrap_or(unit.default_horizon_periods());
    ClvSettings {
        horizon_periods: horizon,
        discount_rate: args.discount_rate,
    }
    .validate()
    .map_err(ClvCliError::Settings)?;
    let file = std::fs::File::open(&args.transactions).map_err(|error| ClvCliError::Open {
        path: path.clone(),
        error,
    })?;
    let transactions =
        value::read_transactions_csv(BufReader::new(file)).map_err(|error| ClvCliError::Csv {
            path: path.clone(),
            error,
        })?;
    let report = value::fit_and_score(&transactions, as_of, unit, horizon, args.discount_rate)
        .map_err(|error| ClvCliError::Model {
            path: path.clone(),
            error,
        })?;
    if args.json {
        let mut text =
            serde_json::to_string(&report).map_err(|e| ClvCliError::Json(e.to_string()))?;
        text.push('\n');
        return Ok(text);
    }
    Ok(summary(
        &report,
        &path,
        as_of,
        unit,
        horizon,
        args.discount_rate,
    ))
}

/// The readable report.
fn summary(
    report: &ClvReport,
    path: &str,
    as_of: Date,
    unit: TimeUnit,
    horizon: u32,
    discount_rate: f64,
) -> String {
    let customers = report.customers.len();
    let repeat_buyers = report
        .customers
        .iter()
        .filter(|c| c.summary.frequency > 0)
        .count();
    let spend_buyers = report
        .customers
        .iter()
        .filter(|c| c.summary.frequency > 0 && c.summary.monetary > 0.0)
        .count();
    let purchase = &report.purchase_model.params;
    let spend = &report.spend_model.params;
    let singular = unit.singular();
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "Customer value for {path} as of {as_of}: time unit {singular}, horizon {horizon} {singular}s, \
         discount rate {discount_rate} per {singular}"
    );
    let _ = writeln!(
        out,
        "Customers: {customers} ({repeat_buyers} with repeat purchases)"
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Purchase model (BG/NBD):     r = {}  alpha = {}  a = {}  b = {}",
        significant(purchase.r),
        significant(purchase.alpha),
        significant(purchase.a),
        significant(purchase.b)
    );
    let _ = writeln!(
        out,
        "                             log-likelihood {:.4} (sum over {customers} customers)",
        report.purchase_model.log_likelihood
    );
    let _ = writeln!(
        out,
        "Spend model (Gamma-Gamma):   p = {}  q = {}  gamma = {}",
        significant(spend.p),
        significant(spend.q),
        significant(spend.gamma)
    );
    let _ = writeln!(
        out,
        "                             log-likelihood {:.4} (sum over {spend_buyers} repeat buyers)",
        report.spend_model.log_likelihood
    );
    let _ = writeln!(out);
    let _ = writeln!(out, "Total CLV over the horizon: {:.2}", report.total_clv());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Value deciles (customers ranked by CLV, most valuable tenth first):"
    );
    let _ = writeln!(out, "  decile  share of total CLV");
    for (index, share) in report.value_decile_shares().iter().enumerate() {
        let _ = writeln!(out, "  {:>6}  {:>17.1}%", index + 1, share * 100.0);
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "Top {TOP_CUSTOMERS} customers by CLV:");
    let _ = writeln!(
        out,
        "  {:<20} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10} {:>10} {:>12}",
        "customer_id",
        "frequency",
        "recency",
        "T",
        "monetary",
        "p_alive",
        "purchases",
        "avg_spend",
        "clv"
    );
    for customer in report.top_customers(TOP_CUSTOMERS) {
        let _ = writeln!(
            out,
            "  {:<20} {:>9} {:>9.2} {:>9.2} {:>10.2} {:>8.4} {:>10.3} {:>10.2} {:>12.2}",
            customer.summary.customer_id,
            customer.summary.frequency,
            customer.summary.recency,
            customer.summary.age,
            customer.summary.monetary,
            customer.score.p_alive,
            customer.score.expected_purchases,
            customer.score.expected_avg_spend,
            customer.score.clv
        );
    }
    out
}

/// A parameter with four significant digits, in scientific notation when very small or
/// very large.
fn significant(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude == 0.0 {
        return format!("{value:.3}");
    }
    if !(1e-3..1e6).contains(&magnitude) {
        return format!("{value:.3e}");
    }
    let decimals = (3 - magnitude.log10().floor() as i32).max(0) as usize;
    format!("{value:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::significant;

    #[test]
    fn parameters_print_with_four_significant_digits() {
        assert_eq!(significant(0.24301), "0.2430");
        assert_eq!(significant(30.898), "30.90");
        assert_eq!(significant(2.426), "2.426");
        assert_eq!(significant(15440.2), "15440");
        assert_eq!(significant(0.00001234), "1.234e-5");
        assert_eq!(significant(0.0), "0.000");
    }
}
