//! Customer value in the live engine: the bridge between the customer state and the
//! customer-value models of [`crate::value`].
//!
//! A cluster-wide fit reads every customer's [`ValueHistory`] as a [`CustomerSummary`] as of
//! one day ([`summary`]), fits BG/NBD and Gamma-Gamma on them and keeps, besides the
//! parameters, the population's cut points (RFM quintiles, CLV percentiles): that is a
//! [`ValueModel`], published as JSON and versioned by the node. The 360 view's `value`
//! block ([`value_block`]) scores one customer under the current model, as of the model's
//! day, so it equals what `crm-node clv fit` reports for the same purchases. Pure: no
//! clock, no NATS.

use crate::actor_event::{ChurnRisk, SegmentChanged};
use crate::emit::Emitter;
use crate::loyalty;
use crate::money::{to_decimal, Money, MINOR_PER_MAJOR};
use crate::rules::{Rules, BASIS_POINTS_ONE};
use crate::state::{CustomerState, RetentionStatus, ValueHistory, ValueStanding};
use crate::value::{
    fit_models, BgNbdParams, ClvError, ClvSettings, CustomerScore, CustomerSummary,
    GammaGammaParams, Scorer, TimeUnit,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The summary of one customer's purchase days on or before `as_of_day` (days since
/// 1970-01-01 UTC), in `unit`; `None` without a purchase by then. Folded days
/// ([`crate::state::FoldedDays`]) count, all of them, when the first of them is on or
/// before `as_of_day`: exact for any as-of day after the last folded day (fits look at the
/// present), approximate for an as-of day among them.
pub fn summary(
    customer_id: &str,
    history: &ValueHistory,
    as_of_day: i32,
    unit: TimeUnit,
) -> Option<CustomerSummary> {
    let folded = history.folded;
    let folded_in = folded.count > 0 && folded.first_day <= as_of_day;
    let mut days = 0u64;
    let mut amount_minor = 0i128;
    let mut first: Option<(i32, i64)> = None;
    let mut last_day: Option<i32> = None;
    if folded_in {
        days = u64::from(folded.count);
        amount_minor = i128::from(folded.amount_minor);
        first = Some((folded.first_day, folded.first_amount_minor));
        last_day = Some(folded.last_day);
    }
    for (&day, &amount) in history.days.range(..=as_of_day) {
        days += 1;
        amount_minor += i128::from(amount);
        if first.is_none_or(|(first_day, _)| day < first_day) {
            first = Some((day, amount));
        }
        last_day = Some(last_day.map_or(day, |last| last.max(day)));
    }
    let (first_day, first_amount) = first?;
    let last_day = last_day.unwrap_or(first_day);
    let frequency = u32::try_from(days - 1).unwrap_or(u32::MAX);
    let monetary = if frequency == 0 {
        0.0
    } else {
        (amount_minor - i128::from(first_amount)) as f64
            / f64::from(frequency)
            / MINOR_PER_MAJOR as f64
    };
    Some(CustomerSummary {
        customer_id: customer_id.to_string(),
        frequency,
        recency: f64::from(last_day - first_day) / unit.days(),
        age: f64::from(as_of_day - first_day) / unit.days(),
        monetary,
    })
}

/// The summary of one customer as of `as_of_day` with their mean spend per purchase day
/// (see [`summary`]), or `None` without a purchase by then (or for a merged-away
/// customer, a tombstone): one row of the input of
/// [`fit_value_model`]. The engine's [`crate::engine::summaries_from_store`] reads the
/// stored customers and calls this for each.
pub fn summary_with_spend(
    state: &CustomerState,
    as_of_day: i32,
    unit: TimeUnit,
) -> Option<(CustomerSummary, f64)> {
    if state.is_tombstone() {
        // Merged away: its purchases are counted with the survivor.
        return None;
    }
    summary(&state.customer_id, &state.value, as_of_day, unit)
        .map(|summary| (summary, mean_spend_per_day(&state.value, as_of_day)))
}

/// Adds a purchase to its UTC calendar day (see [`ValueHistory`]); beyond `days_max` days
/// the oldest day is folded into the running totals.
pub(crate) fn record_purchase_day(
    history: &mut ValueHistory,
    at_ms: i64,
    amount_minor: i64,
    days_max: usize,
) {
    let day = crate::time::day_number(at_ms);
    let folded = &mut history.folded;
    if folded.count > 0 && day == folded.first_day {
        // The first day ever is folded: a late purchase on it adds to it.
        folded.amount_minor = folded.amount_minor.saturating_add(amount_minor);
        folded.first_amount_minor = folded.first_amount_minor.saturating_add(amount_minor);
        return;
    }
    let day_total = history.days.entry(day).or_insert(0);
    *day_total = day_total.saturating_add(amount_minor);
    fold_excess(history, days_max);
}

/// Folds the oldest days beyond `days_max` into [`crate::state::FoldedDays`].
fn fold_excess(history: &mut ValueHistory, days_max: usize) {
    let folded = &mut history.folded;
    while history.days.len() > days_max.max(1) {
        let Some((oldest, amount)) = history.days.pop_first() else {
            break;
        };
        if folded.count == 0 || oldest < folded.first_day {
            // A late purchase before every folded day is the new first day.
            folded.first_day = oldest;
            folded.first_amount_minor = amount;
        }
        folded.last_day = if folded.count == 0 {
            oldest
        } else {
            folded.last_day.max(oldest)
        };
        folded.count += 1;
        folded.amount_minor = folded.amount_minor.saturating_add(amount);
    }
}

/// Merges: `from`'s purchase days join `into`'s, amounts of the same day added up; folded
/// days add up (their counts, amounts; the first day is the earlier one, the last the
/// later), a listed day that is the folded first day joins it, and days beyond `days_max`
/// fold as usual. Exact unless both customers bought on the same folded day (counted
/// twice then, like a late purchase on a folded day).
pub(crate) fn absorb_history(into: &mut ValueHistory, from: ValueHistory, days_max: usize) {
    let (a, b) = (into.folded, from.folded);
    into.folded = match (a.count > 0, b.count > 0) {
        (_, false) => a,
        (false, true) => b,
        (true, true) => {
            let (first_day, first_amount_minor) = match a.first_day.cmp(&b.first_day) {
                std::cmp::Ordering::Less => (a.first_day, a.first_amount_minor),
                std::cmp::Ordering::Greater => (b.first_day, b.first_amount_minor),
                std::cmp::Ordering::Equal => (
                    a.first_day,
                    a.first_amount_minor.saturating_add(b.first_amount_minor),
                ),
            };
            crate::state::FoldedDays {
                count: a.count.saturating_add(b.count) - u32::from(a.first_day == b.first_day),
                amount_minor: a.amount_minor.saturating_add(b.amount_minor),
                first_day,
                first_amount_minor,
                last_day: a.last_day.max(b.last_day),
            }
        }
    };
    for (day, amount) in from.days {
        let total = into.days.entry(day).or_insert(0);
        *total = total.saturating_add(amount);
    }
    let folded = &mut into.folded;
    if folded.count > 0 {
        if let Some(amount) = into.days.remove(&folded.first_day) {
            folded.amount_minor = folded.amount_minor.saturating_add(amount);
            folded.first_amount_minor = folded.first_amount_minor.saturating_add(amount);
        }
    }
    fold_excess(into, days_max);
}

/// How a fit is asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitRequest {
    /// The day the summaries are taken at (days since 1970-01-01 UTC).
    pub as_of_day: i32,
    pub unit: TimeUnit,
    pub settings: ClvSettings,
}

/// Four cut points splitting a population into quintiles (20 %, 40 %, 60 %, 80 %).
pub type Quintiles = [f64; 4];

/// A fitted model as the cluster publishes it: parameters, settings and the population's
/// cut points. JSON in the value-model KV bucket; `version` grows by one per fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueModel {
    pub version: u64,
    /// The as-of day of the fit (days since 1970-01-01 UTC), and as a date.
    pub as_of_day: i32,
    pub as_of: String,
    /// `days` or `weeks`.
    pub time_unit: String,
    pub horizon_periods: u32,
    pub discount_rate: f64,
    pub bgnbd: BgNbdJson,
    pub gamma_gamma: GammaGammaJson,
    pub log_likelihood: f64,
    /// Customers with a purchase by the as-of day (the population of the fit).
    pub customers: u64,
    /// Repeat buyers (those the spend model was fitted on).
    pub repeat_buyers: u64,
    /// Days since the last purchase, purchase days and mean spend per purchase day.
    pub recency_days_quintiles: Quintiles,
    pub frequency_quintiles: Quintiles,
    pub monetary_quintiles: Quintiles,
    /// CLV at the 99th, 80th and 50th percentiles: the top 1 %, top 20 % and middle bounds.
    pub clv_p99: f64,
    pub clv_p80: f64,
    pub clv_p50: f64,
}

/// BG/NBD parameters as published.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BgNbdJson {
    pub r: f64,
    pub alpha: f64,
    pub a: f64,
    pub b: f64,
}

/// Gamma-Gamma parameters as published.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GammaGammaJson {
    pub p: f64,
    pub q: f64,
    pub gamma: f64,
}

impl ValueModel {
    fn unit(&self) -> TimeUnit {
        match self.time_unit.as_str() {
            "weeks" => TimeUnit::Weeks,
            _ => TimeUnit::Days,
        }
    }

    /// Whether the model can score customers (parameters and settings usable). A model
    /// only a fit wrote passes; this guards against one written by hand or by another build.
    pub fn validate(&self) -> Result<(), ClvError> {
        if !matches!(self.time_unit.as_str(), "days" | "weeks") {
            return Err(ClvError::BadModel {
                field: "time_unit",
                problem: format!("'{}' is not days or weeks", self.time_unit),
            });
        }
        let parameters = [
            ("bgnbd.r", self.bgnbd.r),
            ("bgnbd.alpha", self.bgnbd.alpha),
            ("bgnbd.a", self.bgnbd.a),
            ("bgnbd.b", self.bgnbd.b),
            ("gamma_gamma.p", self.gamma_gamma.p),
            ("gamma_gamma.q", self.gamma_gamma.q),
            ("gamma_gamma.gamma", self.gamma_gamma.gamma),
        ];
        for (field, value) in parameters {
            if !(value.is_finite() && value > 0.0) {
                return Err(ClvError::BadModel {
                    field,
                    problem: format!("{value} is not a positive number"),
                });
            }
        }
        if self.gamma_gamma.q <= 1.0 {
            return Err(ClvError::BadModel {
                field: "gamma_gamma.q",
                problem: format!(
                    "{} is not above 1 (the expected spend p gamma / (q - 1) is undefined)",
                    self.gamma_gamma.q
                ),
            });
        }
        self.scorer().map(|_| ())
    }

    fn scorer(&self) -> Result<Scorer, ClvError> {
        Scorer::new(
            BgNbdParams {
                r: self.bgnbd.r,
                alpha: self.bgnbd.alpha,
                a: self.bgnbd.a,
                b: self.bgnbd.b,
            },
            GammaGammaParams {
                p: self.gamma_gamma.p,
                q: self.gamma_gamma.q,
                gamma: self.gamma_gamma.gamma,
            },
            ClvSettings {
                horizon_periods: self.horizon_periods,
                discount_rate: self.discount_rate,
            },
        )
    }
}

/// RFM inputs of one summary: days since the last purchase, purchase days, mean spend per
/// purchase day (major units).
fn rfm_inputs(summary: &CustomerSummary, unit: TimeUnit, mean_spend: f64) -> [f64; 3] {
    let days = f64::from(summary.frequency) + 1.0;
    let recency_days = (summary.age - summary.recency) * unit.days();
    [recency_days, days, mean_spend]
}

/// Fits the models on `summaries` (one per customer with a purchase by the as-of day, with
/// `mean_spend` its mean spend per purchase day) and computes the cut points.
pub fn fit_value_model(
    summaries: &[(CustomerSummary, f64)],
    request: FitRequest,
    version: u64,
) -> Result<ValueModel, ClvError> {
    request.settings.validate()?;
    if summaries.is_empty() {
        return Err(ClvError::NoCustomers {
            as_of: crate::time::date_of_day(request.as_of_day),
        });
    }
    let customers: Vec<CustomerSummary> = summaries.iter().map(|(s, _)| s.clone()).collect();
    let fitted = fit_models(&customers)?;
    let purchases = fitted.purchases.params;
    let spend = fitted.spend.params;
    let mut model = ValueModel {
        version,
        as_of_day: request.as_of_day,
        as_of: day_text(request.as_of_day),
        time_unit: match request.unit {
            TimeUnit::Days => "days",
            TimeUnit::Weeks => "weeks",
        }
        .to_string(),
        horizon_periods: request.settings.horizon_periods,
        discount_rate: request.settings.discount_rate,
        bgnbd: BgNbdJson {
            r: purchases.r,
            alpha: purchases.alpha,
            a: purchases.a,
            b: purchases.b,
        },
        gamma_gamma: GammaGammaJson {
            p: spend.p,
            q: spend.q,
            gamma: spend.gamma,
        },
        log_likelihood: fitted.purchases.log_likelihood,
        customers: summaries.len() as u64,
        repeat_buyers: summaries.iter().filter(|(s, _)| s.frequency > 0).count() as u64,
        recency_days_quintiles: [0.0; 4],
        frequency_quintiles: [0.0; 4],
        monetary_quintiles: [0.0; 4],
        clv_p99: 0.0,
        clv_p80: 0.0,
        clv_p50: 0.0,
    };
    let mut scorer = model.scorer()?;
    let mut recency = Vec::with_capacity(summaries.len());
    let mut frequency = Vec::with_capacity(summaries.len());
    let mut monetary = Vec::with_capacity(summaries.len());
    let mut clv = Vec::with_capacity(summaries.len());
    for (summary, mean_spend) in summaries {
        let [r, f, m] = rfm_inputs(summary, request.unit, *mean_spend);
        recency.push(r);
        frequency.push(f);
        monetary.push(m);
        clv.push(scorer.score(summary).clv);
    }
    model.recency_days_quintiles = quintiles(&mut recency);
    model.frequency_quintiles = quintiles(&mut frequency);
    model.monetary_quintiles = quintiles(&mut monetary);
    clv.sort_by(f64::total_cmp);
    model.clv_p99 = percentile(&clv, 0.99);
    model.clv_p80 = percentile(&clv, 0.80);
    model.clv_p50 = percentile(&clv, 0.50);
    Ok(model)
}

/// Mean spend per purchase day of a history on or before `as_of_day`, major units.
pub fn mean_spend_per_day(history: &ValueHistory, as_of_day: i32) -> f64 {
    let folded = history.folded;
    let folded_in = folded.count > 0 && folded.first_day <= as_of_day;
    let (mut days, mut amount) = if folded_in {
        (u64::from(folded.count), i128::from(folded.amount_minor))
    } else {
        (0, 0)
    };
    for (_, &value) in history.days.range(..=as_of_day) {
        days += 1;
        amount += i128::from(value);
    }
    if days == 0 {
        0.0
    } else {
        amount as f64 / days as f64 / MINOR_PER_MAJOR as f64
    }
}

/// A customer under a model, as of the model's day.
#[derive(Debug, Clone, PartialEq)]
pub enum Assessment {
    NoModel,
    /// No purchase by the model's day.
    NoPurchases,
    /// The model's parameters are unusable (a published model that cannot score).
    Unusable(String),
    Scored(Box<Scored>),
}

/// What a model says of one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub summary: CustomerSummary,
    pub score: CustomerScore,
    /// RFM scores, 1 to 5 each.
    pub rfm: [u8; 3],
    pub segment: &'static str,
}

/// Scores `state` under `model` as of the model's day.
pub fn assess(state: &CustomerState, model: Option<&ValueModel>) -> Assessment {
    let Some(model) = model else {
        return Assessment::NoModel;
    };
    let unit = model.unit();
    let Some(summary) = summary(&state.customer_id, &state.value, model.as_of_day, unit) else {
        return Assessment::NoPurchases;
    };
    let score = match model.scorer() {
        Ok(mut scorer) => scorer.score(&summary),
        Err(error) => return Assessment::Unusable(error.to_string()),
    };
    let mean_spend = mean_spend_per_day(&state.value, model.as_of_day);
    let [recency_days, purchase_days, _] = rfm_inputs(&summary, unit, mean_spend);
    let rfm = [
        6 - quintile_score(recency_days, &model.recency_days_quintiles),
        quintile_score(purchase_days, &model.frequency_quintiles),
        quintile_score(mean_spend, &model.monetary_quintiles),
    ];
    let segment = if state.retention.status == RetentionStatus::Lapsed {
        "lapsed"
    } else if score.clv >= model.clv_p99 {
        "top_1_percent"
    } else if score.clv >= model.clv_p80 {
        "top_20_percent"
    } else if score.clv >= model.clv_p50 {
        "middle"
    } else {
        "low"
    };
    Assessment::Scored(Box::new(Scored {
        summary,
        score,
        rfm,
        segment,
    }))
}

/// The `value` block of the 360 view, tagged by `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ValueBlock {
    /// No customer-value model has been published yet.
    NoModel,
    /// The customer had no purchase by the model's day.
    NoPurchases { model_version: u64, as_of: String },
    /// The published model's parameters cannot score this customer.
    ModelUnusable { model_version: u64, message: String },
    /// The customer scored under the model, as of the model's day.
    Scored(Box<ScoredValue>),
}

/// A customer scored under the published model (the `scored` value block).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScoredValue {
    pub model_version: u64,
    pub as_of: String,
    /// `day` or `week`: the unit of `recency`, `T` and `horizon`.
    pub time_unit: String,
    /// Periods of `time_unit` that `expected_purchases` and `clv` cover.
    pub horizon: u32,
    pub frequency: u32,
    pub recency: f64,
    #[serde(rename = "T")]
    pub age: f64,
    pub monetary: f64,
    pub p_alive: f64,
    pub expected_purchases: f64,
    pub expected_avg_spend: f64,
    pub clv: f64,
    pub rfm: RfmView,
    /// `top_1_percent`, `top_20_percent`, `middle` or `low`.
    pub segment: String,
}

/// RFM quintile scores, 1 (bottom fifth) to 5 (top fifth), and the three digits together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RfmView {
    pub r: u8,
    pub f: u8,
    pub m: u8,
    pub score: String,
}

/// The `value` block of the 360 view: the customer scored under `model` as of the model's
/// day. Without a model: `{"status": "no_model"}`; without a purchase by the model's day:
/// `{"status": "no_purchases", ...}`.
pub fn value_block(state: &CustomerState, model: Option<&ValueModel>) -> ValueBlock {
    let assessment = assess(state, model);
    let Some(model) = model else {
        return ValueBlock::NoModel;
    };
    match assessment {
        Assessment::NoModel => ValueBlock::NoModel,
        Assessment::NoPurchases => ValueBlock::NoPurchases {
            model_version: model.version,
            as_of: model.as_of.clone(),
        },
        Assessment::Unusable(message) => ValueBlock::ModelUnusable {
            model_version: model.version,
            message,
        },
        Assessment::Scored(scored) => {
            let [r, f, m] = scored.rfm;
            ValueBlock::Scored(Box::new(ScoredValue {
                model_version: model.version,
                as_of: model.as_of.clone(),
                time_unit: model.time_unit.clone(),
                horizon: model.horizon_periods,
                frequency: scored.summary.frequency,
                recency: scored.summary.recency,
                age: scored.summary.age,
                monetary: scored.summary.monetary,
                p_alive: scored.score.p_alive,
                expected_purchases: scored.score.expected_purchases,
                expected_avg_spend: scored.score.expected_avg_spend,
                clv: scored.score.clv,
                rfm: RfmView {
                    r,
                    f,
                    m,
                    score: format!("{r}{f}{m}"),
                },
                segment: scored.segment.to_string(),
            }))
        }
    }
}

/// Scores the customer under a newly applied `model` and records where it puts them:
/// `value.segment_changed` when the segment differs from the last model's, `churn.risk`
/// when the customer newly is at risk (probability alive below the rules' threshold, in
/// one of the `winback_segments`). Events are at the customer's rule clock.
pub fn rescore(
    state: &mut CustomerState,
    model: &ValueModel,
    rules: &Rules,
    emitter: &mut Emitter,
) {
    if state.is_tombstone() {
        // Merged away: the survivor is scored instead.
        return;
    }
    let (segment, p_alive, clv) = match assess(state, Some(model)) {
        Assessment::Scored(scored) => (
            Some(scored.segment.to_string()),
            scored.score.p_alive,
            scored.score.clv,
        ),
        _ => (None, 1.0, 0.0),
    };
    let policy = &rules.next_best_action;
    let threshold = policy.at_risk_p_alive_basis_points as f64 / BASIS_POINTS_ONE as f64;
    let at_risk = segment
        .as_ref()
        .is_some_and(|s| p_alive < threshold && policy.winback_segments.contains(s));
    let at = state.clock_ms;
    let standing = &state.value_standing;
    if segment != standing.segment {
        emitter.emit(
            at,
            SegmentChanged {
                from: standing.segment.clone(),
                to: segment.clone(),
                clv,
                p_alive,
                model_version: model.version,
            },
        );
    }
    if at_risk && !standing.at_risk {
        emitter.emit(
            at,
            ChurnRisk {
                p_alive,
                threshold,
                segment: segment.clone(),
                clv,
                model_version: model.version,
            },
        );
    }
    state.value_standing = ValueStanding {
        segment,
        model_version: model.version,
        at_risk,
    };
}

/// One next best action of the 360 view, tagged by `action`; `reason` says why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum NextBestAction {
    /// A valuable customer whose probability of being alive fell below the threshold.
    WinbackOffer {
        reason: String,
        p_alive: f64,
        segment: String,
    },
    /// The spend still needed for the next tier is within reach.
    TierNudge {
        reason: String,
        tier: String,
        spend_needed: Money,
    },
    /// The customer browsed a category they never bought in.
    CrossSell { reason: String, category: String },
}

/// The next best actions for a customer, best first, each with its reason, from the rules'
/// `[next_best_action]` section: a win-back offer for a customer of a valuable segment
/// whose probability of being alive fell below the at-risk threshold; a nudge when the
/// spend still needed for the next tier is within reach; a cross-sell of the last browsed
/// category when the customer never bought in it. `value` is the customer's `value` block
/// ([`value_block`]); `as_of_ms` the view's time.
pub fn next_best_actions(
    state: &CustomerState,
    value: &ValueBlock,
    rules: &Rules,
    as_of_ms: i64,
) -> Vec<NextBestAction> {
    let policy = &rules.next_best_action;
    let mut actions = Vec::new();
    if let ValueBlock::Scored(scored) = value {
        let (p_alive, segment) = (scored.p_alive, &scored.segment);
        let threshold = policy.at_risk_p_alive_basis_points as f64 / BASIS_POINTS_ONE as f64;
        if p_alive < threshold && policy.winback_segments.iter().any(|s| s == segment) {
            actions.push(NextBestAction::WinbackOffer {
                reason: format!(
                    "valuable customer ({segment}, CLV {:.2}) at risk: probability alive {p_alive:.2} is below {threshold}",
                    scored.clv
                ),
                p_alive,
                segment: segment.clone(),
            });
        }
    }
    if policy.tier_nudge_within_minor > 0 && state.purchases.count > 0 {
        let tier_index = loyalty::tier_index(&state.loyalty, rules);
        if let Some(next) = rules.tiers.get(tier_index + 1) {
            let needed =
                next.threshold_minor - loyalty::rolling_spend(&state.loyalty, rules, as_of_ms);
            if needed > 0 && needed <= policy.tier_nudge_within_minor {
                actions.push(NextBestAction::TierNudge {
                    reason: format!(
                        "{} {} more within the rolling window reaches tier {}",
                        to_decimal(needed),
                        rules.currency,
                        next.name
                    ),
                    tier: next.name.clone(),
                    spend_needed: Money(needed),
                });
            }
        }
    }
    if policy.cross_sell {
        if let Some(category) = &state.browsing.last_viewed_category {
            if !state.purchases.by_category_minor.contains_key(category) {
                actions.push(NextBestAction::CrossSell {
                    reason: format!("browsed {category} but never bought in it"),
                    category: category.clone(),
                });
            }
        }
    }
    actions
}

/// 1 (bottom fifth) to 5 (top fifth): how many cut points `value` is above, plus one.
fn quintile_score(value: f64, cuts: &Quintiles) -> u8 {
    1 + cuts.iter().filter(|cut| value > **cut).count() as u8
}

fn quintiles(values: &mut [f64]) -> Quintiles {
    values.sort_by(f64::total_cmp);
    [0.2, 0.4, 0.6, 0.8].map(|q| percentile(values, q))
}

/// The value at quantile `q` of sorted `values` (nearest rank); 0 when empty.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// `YYYY-MM-DD` of a day number.
pub fn day_text(day: i32) -> String {
    crate::time::date_of_day(day).to_string()
}

#[cfg(test)]
impl ValueModel {
    /// A model with the parameters of a real fit (for tests that score customers).
    pub(crate) fn example(version: u64) -> ValueModel {
        ValueModel {
            version,
            as_of_day: 100,
            as_of: "1970-04-11".to_string(),
            time_unit: "days".to_string(),
            horizon_periods: 365,
            discount_rate: 0.0,
            bgnbd: BgNbdJson {
                r: 0.24,
                alpha: 4.4,
                a: 0.79,
                b: 2.4,
            },
            gamma_gamma: GammaGammaJson {
                p: 6.25,
                q: 3.74,
                gamma: 15.4,
            },
            log_likelihood: -1.0,
            customers: 10,
            repeat_buyers: 5,
            recency_days_quintiles: [0.0; 4],
            frequency_quintiles: [0.0; 4],
            monetary_quintiles: [0.0; 4],
            clv_p99: 3.0,
            clv_p80: 2.0,
            clv_p50: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::FoldedDays;
    use crate::value::{summarize, Transaction};
    use std::collections::BTreeMap;

    fn date(day: i32) -> time::Date {
        crate::time::date_of_day(day)
    }

    #[test]
    fn a_summary_from_purchase_days_equals_the_offline_data_preparation() {
        // Days 10 (two purchases), 12, 20, and 40 (after the as-of day 30).
        let history = ValueHistory {
            days: BTreeMap::from([(10, 1_000), (12, 2_550), (20, 450), (40, 9_999)]),
            folded: FoldedDays::default(),
        };
        let transactions: Vec<Transaction> =
            [(10, 400), (10, 600), (12, 2_550), (20, 450), (40, 9_999)]
                .iter()
                .map(|&(day, amount_minor)| Transaction {
                    customer_id: "c".to_string(),
                    date: date(day),
                    amount_minor,
                })
                .collect();
        for unit in [TimeUnit::Days, TimeUnit::Weeks] {
            let offline = summarize(&transactions, date(30), unit);
            assert_eq!(summary("c", &history, 30, unit), Some(offline[0].clone()));
        }
        assert_eq!(summary("c", &history, 9, TimeUnit::Days), None);
    }

    #[test]
    fn folded_days_keep_frequency_recency_and_monetary_exact() {
        let all = ValueHistory {
            days: BTreeMap::from([(1, 100), (3, 300), (7, 700), (9, 900)]),
            folded: FoldedDays::default(),
        };
        let folded = ValueHistory {
            days: BTreeMap::from([(7, 700), (9, 900)]),
            folded: FoldedDays {
                count: 2,
                amount_minor: 400,
                first_day: 1,
                first_amount_minor: 100,
                last_day: 3,
            },
        };
        assert_eq!(
            summary("c", &all, 20, TimeUnit::Days),
            summary("c", &folded, 20, TimeUnit::Days)
        );
        assert_eq!(
            mean_spend_per_day(&all, 20),
            mean_spend_per_day(&folded, 20)
        );
    }

    #[test]
    fn purchases_recorded_with_a_small_cap_summarise_like_an_uncapped_history() {
        // Days out of order, repeats on one kept day, late purchases before folded days
        // (not on a folded day other than the first: that one would count as a new day).
        let days = [50, 52, 52, 60, 45, 70, 71, 71, 40, 90, 91, 92, 41, 40];
        let mut capped = ValueHistory::default();
        let mut uncapped = ValueHistory::default();
        for (i, day) in days.iter().enumerate() {
            let at_ms = i64::from(*day) * crate::time::DAY_MS + 3_600_000;
            let amount = 1_000 + 37 * i as i64;
            record_purchase_day(&mut capped, at_ms, amount, 3);
            record_purchase_day(&mut uncapped, at_ms, amount, 1_000);
        }
        assert_eq!(capped.days.len(), 3);
        assert!(capped.folded.count > 0);
        for as_of in [95, 200] {
            assert_eq!(
                summary("c", &capped, as_of, TimeUnit::Days),
                summary("c", &uncapped, as_of, TimeUnit::Days)
            );
            assert_eq!(
                mean_spend_per_day(&capped, as_of),
                mean_spend_per_day(&uncapped, as_of)
            );
        }
    }

    fn shipped_rules() -> Rules {
        Rules::from_toml_str(include_str!("../../../cluster-config/rules.toml")).expect("rules")
    }

    #[test]
    fn next_best_actions_follow_value_tier_distance_and_browsing() {
        let rules = shipped_rules();
        let mut state = CustomerState::new("c");
        state.browsing.last_viewed_category = Some("shoes".to_string());
        // No purchase, no model: only the cross-sell.
        let none = next_best_actions(&state, &ValueBlock::NoModel, &rules, 0);
        let kinds = |actions: &[NextBestAction]| -> Vec<String> {
            actions
                .iter()
                .map(|a| {
                    serde_json::to_value(a).unwrap()["action"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let scored = |p_alive: f64, segment: &str, clv: f64| {
            ValueBlock::Scored(Box::new(ScoredValue {
                model_version: 1,
                as_of: "2026-01-01T00:00:00Z".to_string(),
                time_unit: "day".to_string(),
                horizon: 365,
                frequency: 2,
                recency: 10.0,
                age: 20.0,
                monetary: 50.0,
                p_alive,
                expected_purchases: 1.0,
                expected_avg_spend: 50.0,
                clv,
                rfm: RfmView {
                    r: 3,
                    f: 3,
                    m: 3,
                    score: "333".to_string(),
                },
                segment: segment.to_string(),
            }))
        };
        assert_eq!(kinds(&none), vec!["cross_sell"]);

        // 450 EUR bought (silver needs 500 within 100): a nudge; a valuable customer at risk.
        let at = 1_767_348_000_000;
        state.purchases.count = 1;
        state
            .purchases
            .by_category_minor
            .insert("bags".to_string(), 45_000);
        crate::loyalty::record_spend(&mut state.loyalty, at, 45_000);
        let at_risk = scored(0.2, "top_20_percent", 812.5);
        let actions = next_best_actions(&state, &at_risk, &rules, at);
        assert_eq!(
            kinds(&actions),
            vec!["winback_offer", "tier_nudge", "cross_sell"]
        );
        let json = serde_json::to_value(&actions).unwrap();
        assert_eq!(json[1]["tier"], "silver");
        assert_eq!(json[1]["spend_needed"], 50.0);
        assert!(json[0]["reason"]
            .as_str()
            .unwrap()
            .contains("top_20_percent"));

        // Alive enough, or not valuable: no win-back; bought shoes: no cross-sell.
        state
            .purchases
            .by_category_minor
            .insert("shoes".to_string(), 1);
        let alive = scored(0.9, "top_20_percent", 812.5);
        assert_eq!(
            kinds(&next_best_actions(&state, &alive, &rules, at)),
            vec!["tier_nudge"]
        );
        let low = scored(0.1, "low", 3.0);
        assert_eq!(
            kinds(&next_best_actions(&state, &low, &rules, at)),
            vec!["tier_nudge"]
        );
    }

    #[test]
    fn quintile_scores_run_from_one_to_five() {
        let cuts = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quintile_score(0.5, &cuts), 1);
        assert_eq!(quintile_score(2.5, &cuts), 3);
        assert_eq!(quintile_score(9.0, &cuts), 5);
        let mut values: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(quintiles(&mut values), [2.0, 4.0, 6.0, 8.0]);
        assert_eq!(day_text(0), "1970-01-01");
    }

    #[test]
    fn a_published_model_with_unusable_parameters_is_refused_naming_the_field() {
        let good = ValueModel::example(1);
        good.validate().expect("a fitted model's parameters");
        let refused = |change: fn(&mut ValueModel), field: &str| {
            let mut model = good.clone();
            change(&mut model);
            let message = model.validate().unwrap_err().to_string();
            assert!(message.contains(field), "{message}");
        };
        refused(|m| m.time_unit = "months".to_string(), "time_unit");
        refused(|m| m.bgnbd.r = 0.0, "bgnbd.r");
        refused(|m| m.bgnbd.alpha = f64::NAN, "bgnbd.alpha");
        refused(|m| m.gamma_gamma.q = 0.9, "gamma_gamma.q");
        refused(|m| m.gamma_gamma.gamma = -1.0, "gamma_gamma.gamma");
    }
}
