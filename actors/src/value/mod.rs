//! Customer-value models: from a transaction log to, per customer, the probability of still
//! being a customer, the expected purchases and spend over a horizon, and the discounted
//! customer lifetime value (CLV). Pure computation: no clock, no NATS, no files (the CSV
//! reader takes any `BufRead`); `crm-node clv fit` is the command-line front end.
//!
//! Map: [`data`] turns transactions into per-customer (frequency, recency, T, monetary)
//! summaries and reads the CSV; [`bgnbd`] is the BG/NBD purchase model and
//! [`gamma_gamma`] the spend model, both fitted by [`fit`] (maximum likelihood in log
//! space) with the BFGS minimiser in [`optimize`]; [`hypergeometric`] evaluates the 2F1
//! behind the BG/NBD expectation; [`special`] holds ln Gamma and digamma; [`value`]
//! combines the models into CLV and the report. [`fit_and_score`] is the one-call path.
//! Docs: `docs/clv.md`.

pub mod bgnbd;
pub mod data;
pub mod fit;
pub mod gamma_gamma;
pub mod hypergeometric;
pub mod lifetime;
pub mod live;
pub mod optimize;
pub mod special;

pub use bgnbd::{AggregatedHistories, BgNbdFit, BgNbdParams};
pub use data::{
    read_transactions_csv, summarize, CsvError, CustomerSummary, PurchaseHistory, TimeUnit,
    Transaction,
};
pub use fit::FitError;
pub use gamma_gamma::{GammaGammaFit, GammaGammaParams, SpendHistory};
pub use lifetime::{
    ClvReport, ClvSettings, CustomerScore, CustomerValue, Scorer, HORIZON_MAX_PERIODS,
};

use lifetime::{PurchaseModelReport, SpendModelReport};
use time::Date;

/// Why no CLV report could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClvError {
    #[error(
        "no transactions on or before the as-of date {as_of}: nothing to model \
         (pick a later as-of date)"
    )]
    NoCustomers { as_of: Date },
    #[error("the horizon must be 1 to {max} periods, got {horizon}")]
    BadHorizon { horizon: u32, max: u32 },
    #[error(
        "the discount rate must be a finite number >= 0 per time unit (e.g. 0.01), got {rate}"
    )]
    BadDiscountRate { rate: f64 },
    #[error("published model: {field} {problem}")]
    BadModel {
        field: &'static str,
        problem: String,
    },
    #[error("purchase model (BG/NBD): {0}")]
    PurchaseModel(FitError),
    #[error("spend model (Gamma-Gamma): {0}")]
    SpendModel(FitError),
}

/// Both fitted models.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FittedModels {
    pub purchases: BgNbdFit,
    pub spend: GammaGammaFit,
}

/// Fits BG/NBD on every customer and Gamma-Gamma on the repeat buyers.
pub fn fit_models(customers: &[CustomerSummary]) -> Result<FittedModels, ClvError> {
    let histories =
        AggregatedHistories::from_histories(customers.iter().map(CustomerSummary::history))
            .map_err(ClvError::PurchaseModel)?;
    let purchases = bgnbd::fit(&histories).map_err(ClvError::PurchaseModel)?;
    let spends: Vec<SpendHistory> = customers
        .iter()
        .map(|c| SpendHistory {
            frequency: c.frequency,
            mean_spend: c.monetary,
        })
        .collect();
    let spend = gamma_gamma::fit(&spends).map_err(ClvError::SpendModel)?;
    Ok(FittedModels { purchases, spend })
}

/// Scores every customer under fitted models and builds the report.
pub fn score_customers(
    models: &FittedModels,
    customers: Vec<CustomerSummary>,
    settings: ClvSettings,
) -> Result<ClvReport, ClvError> {
    let mut scorer = Scorer::new(models.purchases.params, models.spend.params, settings)?;
    let customers = customers
        .into_iter()
        .map(|customer| {
            let score = scorer.score(&customer);
            CustomerValue::new(customer, score)
        })
        .collect();
    Ok(ClvReport {
        purchase_model: PurchaseModelReport {
            name: "bgnbd",
            params: models.purchases.params,
            log_likelihood: models.purchases.log_likelihood,
            converged: true,
        },
        spend_model: SpendModelReport {
            name: "gamma_gamma",
            params: models.spend.params,
            log_likelihood: models.spend.log_likelihood,
        },
        customers,
    })
}

/// The one-call path: summarise `transactions` as of `as_of` in `unit`, fit both models,
/// score every customer over `horizon_periods` units discounted at `discount_rate` per unit.
pub fn fit_and_score(
    transactions: &[Transaction],
    as_of: Date,
    unit: TimeUnit,
    horizon_periods: u32,
    discount_rate: f64,
) -> Result<ClvReport, ClvError> {
    let settings = ClvSettings {
        horizon_periods,
        discount_rate,
    };
    settings.validate()?;
    let customers = summarize(transactions, as_of, unit);
    if customers.is_empty() {
        return Err(ClvError::NoCustomers { as_of });
    }
    let models = fit_models(&customers)?;
    score_customers(&models, customers, settings)
}
