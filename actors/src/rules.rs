//! The rules file (`cluster-config/rules.toml`): earning, pending and expiring points, tiers,
//! rewards, retention thresholds, the per-customer limits and the identity rules (blocked
//! identifier values), validated once at load.
//!
//! The node calls [`Rules::load`] at start (and on a hot reload); [`crate::apply::apply`],
//! [`crate::loyalty`], [`crate::retention`] and [`crate::view`] read the validated [`Rules`].
//! Decimals from the file (money, multipliers, factors) become integers here (minor units,
//! basis points, milliseconds) so that no float ever reaches customer state. A rules file is
//! either fully valid or refused with a [`RulesError`] that names the field, the problem and
//! the fix; nothing downstream re-checks it, and this module never touches customer state.

use crate::identity::blocked::{BlockedIdentities, Pattern};
use crate::identity::{Identity, IdentityKind};
use crate::money::{parse_decimal_minor, Money};
use crate::time::DAY_MS;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// 1.0x as basis points.
pub const BASIS_POINTS_ONE: i64 = 10_000;
/// The largest multiplier or factor the file may hold (100x).
const MULTIPLIER_MAX_BASIS_POINTS: i64 = 100 * BASIS_POINTS_ONE;
/// The longest period in days any `*_days` field may hold (100 years).
const DAYS_MAX: i64 = 36_500;

/// Validated rules. Every amount is in minor units, every period in ms or days as named.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The rules version; stamped into state and events so replays can be explained.
    pub version: u32,
    /// The loyalty currency (ISO 4217); points are earned on amounts in it.
    pub currency: String,
    /// Currencies ingest accepts (always contains `currency`).
    pub accepted_currencies: Vec<String>,
    pub limits: Limits,
    pub earning: Earning,
    /// Days after earning at which a points lot expires; 0 = points never expire.
    pub expiry_days: i64,
    pub tiering: Tiering,
    /// Tiers, ascending by threshold; `tiers[0]` is the base tier (threshold 0).
    pub tiers: Vec<Tier>,
    /// The rewards catalogue, by id.
    pub rewards: BTreeMap<String, Reward>,
    pub retention: Retention,
    pub next_best_action: NextBestAction,
    /// Identity rules: the identifier values never linked to a customer.
    pub identity: IdentityRules,
}

/// Identity rules (`[identity]`, `[identity.<kind>]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRules {
    /// Most `blocked` patterns one kind may list, patterns.
    pub blocked_max_per_kind: usize,
    /// Per kind, in [`IdentityKind::ALL`] order: how many one customer may hold and
    /// whether the kind may join two known customers (see [`KindRules`]).
    pub kinds: [KindRules; 5],
    /// Most merges one customer may absorb per UTC day of the linking events' time; a
    /// merge beyond it is refused (`identity.merge_refused`), so that a shared identifier
    /// (a store's own email typed at the till) cannot collapse many customers into one.
    pub merges_max_per_day: u32,
    /// Values and `*` patterns per kind that are never linked and never merge: ingest drops
    /// them from an event (which then applies to the customer its other identifiers
    /// resolve to, or is dead-lettered `blocked_identity` when none is left), and a query
    /// by one alone is refused.
    pub blocked: BlockedIdentities,
}

/// The rules of one identifier kind (`[identity.<kind>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindRules {
    /// Most identifiers of this kind one customer may hold (`max_per_customer`): an event
    /// that would link one more (by itself or by a merge) has it dropped and
    /// `identity.conflict` says why.
    pub max_per_customer: u32,
    /// May an identifier of this kind join two known customers into one (`merge`)?
    pub merge: bool,
}

impl KindRules {
    /// The defaults: one loyalty card and one customer id, five emails and five phones,
    /// 1,000 devices; devices never merge (they are shared), the others do.
    pub const fn default_for(kind: IdentityKind) -> KindRules {
        match kind {
            IdentityKind::LoyaltyCard | IdentityKind::CustomerId => KindRules {
                max_per_customer: 1,
                merge: true,
            },
            IdentityKind::Email | IdentityKind::Phone => KindRules {
                max_per_customer: 5,
                merge: true,
            },
            IdentityKind::DeviceId => KindRules {
                max_per_customer: 1000,
                merge: false,
            },
        }
    }
}

/// `identity.merges_max_per_day` when the file leaves it out, merges.
pub const MERGES_MAX_PER_DAY_DEFAULT: u32 = 10;

impl Default for IdentityRules {
    fn default() -> Self {
        IdentityRules {
            blocked_max_per_kind: BLOCKED_MAX_PER_KIND_DEFAULT,
            kinds: IdentityKind::ALL.map(KindRules::default_for),
            merges_max_per_day: MERGES_MAX_PER_DAY_DEFAULT,
            blocked: BlockedIdentities::default(),
        }
    }
}

impl IdentityRules {
    /// The rules of `kind`.
    pub fn kind(&self, kind: IdentityKind) -> KindRules {
        self.kinds[kind as usize]
    }

    /// Is `identity` (normalised) blocked by these rules?
    pub fn is_blocked(&self, identity: &Identity) -> bool {
        self.blocked.is_blocked(identity)
    }
}

/// The value segments of [`crate::value::live`], best first.
pub const VALUE_SEGMENTS: [&str; 5] =
    ["top_1_percent", "top_20_percent", "middle", "low", "lapsed"];

/// Which next best actions the 360 view proposes (see [`crate::value::live`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NextBestAction {
    /// Value segments whose customers at risk get a win-back offer.
    pub winback_segments: Vec<String>,
    /// A customer is at risk when their probability of being alive is below this, basis
    /// points of 1.
    pub at_risk_p_alive_basis_points: i64,
    /// Nudge towards the next tier when the spend still needed is at most this (minor
    /// units); 0 = never.
    pub tier_nudge_within_minor: i64,
    /// Propose the last browsed category when the customer never bought in it.
    pub cross_sell: bool,
}

/// Bounds on what one customer's state may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub timeline_max_entries: usize,
    pub orders_max: usize,
    pub redemptions_max: usize,
    pub event_ids_max: usize,
    pub identities_max: usize,
    pub tier_history_max: usize,
    pub lots_max: usize,
    /// Purchase days kept one by one for the customer-value models (older ones folded).
    pub purchase_days_max: usize,
    /// Profile attributes one customer may hold (an identify adding more is refused).
    pub profile_fields_max: usize,
    /// Consent purposes one customer may hold (a consent for one more is refused).
    pub consent_purposes_max: usize,
    /// Channels counted one by one per customer (activity, spend); later ones count as
    /// `other`.
    pub channels_max: usize,
    /// Categories counted one by one in a customer's spend; later ones count as `other`.
    pub categories_max: usize,
    /// Channel events a merge's survivor holds back while it waits for the merged
    /// customers' states (beyond it, it applies them without waiting).
    pub merge_buffer_max: usize,
    /// Customers a survivor remembers having merged (the oldest forgotten beyond it).
    pub merged_from_max: usize,
}

/// How points are earned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Earning {
    /// Points per one major currency unit (1.00 EUR), before multipliers.
    pub points_per_currency_unit: i64,
    /// Channel multipliers in basis points (10 000 = 1.0x); absent channel = 1.0x.
    pub channel_multiplier_basis_points: BTreeMap<String, i64>,
    /// Category multipliers in basis points, applied per item line; absent = 1.0x.
    pub category_multiplier_basis_points: BTreeMap<String, i64>,
    /// Bonus points on a customer's first purchase (pending and reversed with the order).
    pub first_purchase_bonus_points: i64,
    /// Bonus points once the profile holds every field of `profile_completion_fields`.
    pub profile_completion_bonus_points: i64,
    pub profile_completion_fields: Vec<String>,
    /// Days before earned points become spendable; 0 = at once.
    pub pending_days: i64,
}

/// Tier evaluation periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiering {
    /// Net spend counted for tiers: purchases minus returns of the last N days.
    pub rolling_window_days: i64,
    /// A tier is reviewed for downgrade this many days after it was reached, then every
    /// period after that.
    pub review_period_days: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    pub name: String,
    /// Rolling net spend that qualifies, minor units.
    pub threshold_minor: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reward {
    pub id: String,
    pub name: String,
    pub points_cost: i64,
}

/// Retention (lapse and win-back) thresholds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// k: a customer lapses when days since the last purchase exceed k x their mean gap.
    pub lapse_factor_basis_points: i64,
    /// The gap assumed for customers with a single purchase (time), days.
    pub default_gap_days: i64,
    /// The smallest gap ever used (so two purchases a minute apart don't lapse in minutes).
    pub min_gap_days: i64,
    /// Days after lapsing at which the win-back offer is made (once per lapse); 0 = at once.
    pub winback_delay_days: i64,
}

impl Rules {
    /// Days as ms.
    pub fn days_ms(days: i64) -> i64 {
        days.saturating_mul(DAY_MS)
    }

    /// The currencies ingest should accept.
    pub fn currencies(&self) -> Vec<String> {
        self.accepted_currencies.clone()
    }

    /// Index of the tier named `name`, if it still exists in these rules.
    pub fn tier_index(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| t.name == name)
    }

    /// The highest tier whose threshold `net_spend_minor` reaches.
    pub fn qualifying_tier(&self, net_spend_minor: i64) -> usize {
        self.tiers
            .iter()
            .rposition(|t| net_spend_minor >= t.threshold_minor)
            .unwrap_or(0)
    }

    /// Reads and validates a rules file.
    pub fn load(path: &Path) -> Result<Rules, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Rules::parse_named(&text, &path.display().to_string())
    }

    /// Parses and validates rules TOML (errors are prefixed `rules.toml:`).
    pub fn from_toml_str(text: &str) -> Result<Rules, RulesError> {
        Rules::parse_named(text, "rules.toml")
    }

    fn parse_named(text: &str, file: &str) -> Result<Rules, RulesError> {
        let raw: RawRules = toml::from_str(text).map_err(|error| RulesError::Syntax {
            file: file.to_string(),
            message: error.to_string().trim_end().replace('\n', " | "),
        })?;
        raw.validate()
            .map_err(|(field, problem)| RulesError::Invalid {
                file: file.to_string(),
                field,
                problem,
            })
    }
}

/// Why a rules file was refused.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error(
        "{path}: cannot read the rules file ({source}); check the rules path in the node config"
    )]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid rules TOML: {message}")]
    Syntax { file: String, message: String },
    #[error("{file}: {field} {problem}")]
    Invalid {
        file: String,
        field: String,
        problem: String,
    },
}

impl RulesError {
    /// The offending field for validation errors (`tiers[1].threshold`).
    pub fn field(&self) -> Option<&str> {
        match self {
            RulesError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

// ---- raw file shape -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    version: i64,
    currency: String,
    #[serde(default)]
    accepted_currencies: Option<Vec<String>>,
    #[serde(default)]
    limits: RawLimits,
    earning: RawEarning,
    #[serde(default)]
    expiry: RawExpiry,
    #[serde(default)]
    tiering: RawTiering,
    tiers: Vec<RawTier>,
    #[serde(default)]
    rewards: Vec<RawReward>,
    #[serde(default)]
    retention: RawRetention,
    #[serde(default)]
    next_best_action: RawNextBestAction,
    /// `blocked_max_per_kind` and one `[identity.<kind>]` table per kind, read by hand so
    /// that an unknown kind is named with the kinds there are.
    #[serde(default)]
    identity: BTreeMap<String, toml::Value>,
}

/// One `[identity.<kind>]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentityKind {
    #[serde(default)]
    blocked: Vec<String>,
    max_per_customer: Option<i64>,
    merge: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawNextBestAction {
    winback_segments: Vec<String>,
    at_risk_p_alive: f64,
    tier_nudge_within: toml::Value,
    cross_sell: bool,
}

impl Default for RawNextBestAction {
    fn default() -> Self {
        RawNextBestAction {
            winback_segments: vec!["top_1_percent".to_string(), "top_20_percent".to_string()],
            at_risk_p_alive: 0.5,
            tier_nudge_within: toml::Value::Integer(100),
            cross_sell: true,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    timeline_max_entries: i64,
    orders_max: i64,
    redemptions_max: i64,
    event_ids_max: i64,
    identities_max: i64,
    tier_history_max: i64,
    lots_max: i64,
    purchase_days_max: i64,
    profile_fields_max: i64,
    consent_purposes_max: i64,
    channels_max: i64,
    categories_max: i64,
    merge_buffer_max: i64,
    merged_from_max: i64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            timeline_max_entries: 50,
            orders_max: 200,
            redemptions_max: 100,
            event_ids_max: 1000,
            identities_max: 32,
            tier_history_max: 20,
            lots_max: 500,
            purchase_days_max: 1000,
            profile_fields_max: 64,
            consent_purposes_max: 32,
            channels_max: 16,
            categories_max: 100,
            merge_buffer_max: 1000,
            merged_from_max: 1000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarning {
    points_per_currency_unit: i64,
    #[serde(default)]
    pending_days: i64,
    #[serde(default)]
    first_purchase_bonus_points: i64,
    #[serde(default)]
    channel_multipliers: BTreeMap<String, f64>,
    #[serde(default)]
    category_multipliers: BTreeMap<String, f64>,
    #[serde(default)]
    profile_completion: Option<RawProfileCompletion>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfileCompletion {
    bonus_points: i64,
    fields: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawExpiry {
    expiry_days: i64,
}

impl Default for RawExpiry {
    fn default() -> Self {
        RawExpiry { expiry_days: 365 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTiering {
    rolling_window_days: i64,
    review_period_days: i64,
}

impl Default for RawTiering {
    fn default() -> Self {
        RawTiering {
            rolling_window_days: 365,
            review_period_days: 365,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    name: String,
    threshold: toml::Value,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReward {
    id: String,
    name: String,
    points_cost: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRetention {
    lapse_factor: f64,
    default_gap_days: i64,
    min_gap_days: i64,
    winback_delay_days: i64,
}

impl Default for RawRetention {
    fn default() -> Self {
        RawRetention {
            lapse_factor: 2.0,
            default_gap_days: 90,
            min_gap_days: 7,
            winback_delay_days: 0,
        }
    }
}

type Check<T> = Result<T, (String, String)>;

fn fail<T>(field: impl Into<String>, problem: impl Into<String>) -> Check<T> {
    Err((field.into(), problem.into()))
}

fn is_token(text: &str) -> bool {
    (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn in_range(field: &str, value: i64, min: i64, max: i64, unit: &str) -> Check<i64> {
    if value < min || value > max {
        return fail(
            field,
            format!("({value}) must be from {min} to {max} {unit}; set it in that range"),
        );
    }
    Ok(value)
}

fn limit(field: &str, value: i64) -> Check<usize> {
    ENTRIES
        .check(&format!("limits.{field}"), value)
        .map(|v| v as usize)
}

fn currency_code(field: &str, code: &str) -> Check<String> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(code.to_string())
    } else {
        fail(
            field,
            format!(
                "('{code}') is not an ISO 4217 code; write three capital letters, e.g. \"EUR\""
            ),
        )
    }
}

/// A multiplier or factor (`1.5`) as basis points (`15000`), exact to 4 decimals.
fn basis_points(field: &str, value: f64, min_basis_points: i64) -> Check<i64> {
    if !value.is_finite() {
        return fail(field, "is not a finite number; write a decimal such as 1.5");
    }
    let scaled = value * BASIS_POINTS_ONE as f64;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return fail(
            field,
            format!("({value}) has more than 4 decimals; round it, e.g. 1.25"),
        );
    }
    let bp = rounded as i64;
    if bp < min_basis_points || bp > MULTIPLIER_MAX_BASIS_POINTS {
        return fail(
            field,
            format!(
                "({value}) must be from {} to 100; use 1.0 for no change",
                min_basis_points as f64 / BASIS_POINTS_ONE as f64
            ),
        );
    }
    Ok(bp)
}

/// A money amount in major units (`500`, `499.99` or `"499.99"`) as minor units.
fn money(field: &str, value: &toml::Value) -> Check<i64> {
    let text = match value {
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => format!("{f}"),
        toml::Value::String(s) => s.clone(),
        other => {
            return fail(
                field,
                format!(
                    "is a {}; write an amount in major units, e.g. 500 or 499.99",
                    other.type_str()
                ),
            )
        }
    };
    match parse_decimal_minor(&text) {
        Ok(minor) if minor >= 0 => Ok(minor),
        Ok(_) => fail(field, format!("({text}) is negative; write 0 or more")),
        Err(error) => fail(field, format!("({text}) {error}")),
    }
}

fn multipliers(section: &str, raw: &BTreeMap<String, f64>) -> Check<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for (key, value) in raw {
        let field = format!("{section}.{key}");
        if key.is_empty() || key.len() > 256 {
            return fail(
                field,
                "has an empty or over-long name; name a channel or category",
            );
        }
        out.insert(key.clone(), basis_points(&field, *value, 0)?);
    }
    Ok(out)
}

/// The allowed range of one integer setting and its unit, for the message.
#[derive(Debug, Clone, Copy)]
struct Range {
    min: i64,
    max: i64,
    unit: &'static str,
}

/// The integer settings' ranges: each check names the field, the value and the range.
const VERSION: Range = Range {
    min: 1,
    max: u32::MAX as i64,
    unit: "",
};
const ENTRIES: Range = Range {
    min: 1,
    max: 1_000_000,
    unit: "entries",
};
const BONUS_POINTS: Range = Range {
    min: 0,
    max: 1_000_000,
    unit: "points",
};
const POINTS_PER_UNIT: Range = Range {
    min: 0,
    max: 10_000,
    unit: "points",
};
const COST_POINTS: Range = Range {
    min: 1,
    max: 100_000_000,
    unit: "points",
};
const PENDING_DAYS: Range = Range {
    min: 0,
    max: 365,
    unit: "days",
};
const DAYS_OR_NONE: Range = Range {
    min: 0,
    max: DAYS_MAX,
    unit: "days",
};
const DAYS: Range = Range {
    min: 1,
    max: DAYS_MAX,
    unit: "days",
};
const BLOCKED_PATTERNS: Range = Range {
    min: 1,
    max: 100_000,
    unit: "patterns",
};

/// `identity.blocked_max_per_kind` when the file leaves it out, patterns.
pub const BLOCKED_MAX_PER_KIND_DEFAULT: usize = 1000;
const IDENTIFIERS_PER_CUSTOMER: Range = Range {
    min: 1,
    max: 100_000,
    unit: "identifiers",
};
const MERGES_PER_DAY: Range = Range {
    min: 0,
    max: 1_000_000,
    unit: "merges",
};

impl Range {
    fn check(self, field: &str, value: i64) -> Check<i64> {
        in_range(field, value, self.min, self.max, self.unit)
    }
}

/// `Limits { name: limit("name", raw.name)?, ... }`: every limit spelled once.
macro_rules! limits {
    ($raw:expr; $($name:ident),* $(,)?) => {
        Limits {
            $( $name: limit(stringify!($name), $raw.$name)?, )*
        }
    };
}

impl RawRules {
    /// Checks every setting in file order and converts it (decimals to basis points and
    /// minor units); the first problem found is the error, naming its field and the fix.
    fn validate(self) -> Check<Rules> {
        let version = VERSION.check("version", self.version)? as u32;
        let currency = currency_code("currency", &self.currency)?;
        let accepted_currencies = self.accepted_currencies(&currency)?;
        let l = &self.limits;
        let limits = limits!(l;
            timeline_max_entries, orders_max, redemptions_max, event_ids_max, identities_max,
            tier_history_max, lots_max, purchase_days_max, profile_fields_max,
            consent_purposes_max, channels_max, categories_max, merge_buffer_max,
            merged_from_max,
        );
        let earning = self.earning.validate()?;
        let expiry_days = self.expiry_days(earning.pending_days)?;
        let tiering = Tiering {
            rolling_window_days: DAYS.check(
                "tiering.rolling_window_days",
                self.tiering.rolling_window_days,
            )?,
            review_period_days: DAYS.check(
                "tiering.review_period_days",
                self.tiering.review_period_days,
            )?,
        };
        let tiers = validate_tiers(&self.tiers)?;
        let rewards = validate_rewards(&self.rewards)?;
        let retention = self.retention.validate()?;
        let next_best_action = self.next_best_action.validate()?;
        let identity = validate_identity(&self.identity)?;
        Ok(Rules {
            version,
            currency,
            accepted_currencies,
            limits,
            earning,
            expiry_days,
            tiering,
            tiers,
            rewards,
            retention,
            next_best_action,
            identity,
        })
    }

    /// `accepted_currencies` (default: just `currency`), each once, `currency` among them.
    fn accepted_currencies(&self, currency: &str) -> Check<Vec<String>> {
        let Some(list) = &self.accepted_currencies else {
            return Ok(vec![currency.to_string()]);
        };
        let mut accepted: Vec<String> = Vec::new();
        for (index, code) in list.iter().enumerate() {
            let code = currency_code(&format!("accepted_currencies[{index}]"), code)?;
            if accepted.contains(&code) {
                return fail(
                    format!("accepted_currencies[{index}]"),
                    format!("('{code}') is listed twice; list each currency once"),
                );
            }
            accepted.push(code);
        }
        if !accepted.iter().any(|code| code == currency) {
            return fail(
                "accepted_currencies",
                format!("does not contain currency ('{currency}'); add \"{currency}\" to the list"),
            );
        }
        Ok(accepted)
    }

    /// `expiry.expiry_days`: 0 (never) or longer than the pending period.
    fn expiry_days(&self, pending_days: i64) -> Check<i64> {
        let expiry_days = DAYS_OR_NONE.check("expiry.expiry_days", self.expiry.expiry_days)?;
        if expiry_days != 0 && expiry_days <= pending_days {
            return fail(
                "expiry.expiry_days",
                format!(
                    "({expiry_days}) must be greater than earning.pending_days ({pending_days}), or points would expire before they can be spent; raise it or set 0 for no expiry"
                ),
            );
        }
        Ok(expiry_days)
    }
}

impl RawEarning {
    fn validate(&self) -> Check<Earning> {
        let (profile_completion_bonus_points, profile_completion_fields) =
            match &self.profile_completion {
                None => (0, Vec::new()),
                Some(profile) => profile.validate()?,
            };
        Ok(Earning {
            points_per_currency_unit: POINTS_PER_UNIT.check(
                "earning.points_per_currency_unit",
                self.points_per_currency_unit,
            )?,
            channel_multiplier_basis_points: multipliers(
                "earning.channel_multipliers",
                &self.channel_multipliers,
            )?,
            category_multiplier_basis_points: multipliers(
                "earning.category_multipliers",
                &self.category_multipliers,
            )?,
            first_purchase_bonus_points: BONUS_POINTS.check(
                "earning.first_purchase_bonus_points",
                self.first_purchase_bonus_points,
            )?,
            profile_completion_bonus_points,
            profile_completion_fields,
            pending_days: PENDING_DAYS.check("earning.pending_days", self.pending_days)?,
        })
    }
}

impl RawProfileCompletion {
    /// The bonus points and the attributes that complete a profile (each once).
    fn validate(&self) -> Check<(i64, Vec<String>)> {
        let points =
            BONUS_POINTS.check("earning.profile_completion.bonus_points", self.bonus_points)?;
        if self.fields.is_empty() {
            return fail(
                "earning.profile_completion.fields",
                "is empty; list the profile attributes that complete a profile, e.g. [\"first_name\", \"birthday\"]",
            );
        }
        let mut seen = BTreeSet::new();
        for (index, name) in self.fields.iter().enumerate() {
            if name.trim().is_empty() || !seen.insert(name.clone()) {
                return fail(
                    format!("earning.profile_completion.fields[{index}]"),
                    format!("('{name}') is empty or listed twice; list each attribute once"),
                );
            }
        }
        Ok((points, self.fields.clone()))
    }
}

/// The tiers, lowest first: names unique tokens, the first at threshold 0, thresholds
/// strictly rising.
fn validate_tiers(raw_tiers: &[RawTier]) -> Check<Vec<Tier>> {
    if raw_tiers.is_empty() {
        return fail(
            "tiers",
            "is empty; add at least a base tier: [[tiers]] name = \"member\" threshold = 0",
        );
    }
    let mut tiers: Vec<Tier> = Vec::with_capacity(raw_tiers.len());
    for (index, raw) in raw_tiers.iter().enumerate() {
        let field = format!("tiers[{index}]");
        if !is_token(&raw.name) {
            return fail(
                format!("{field}.name"),
                format!(
                    "('{}') must be 1 to 64 of [A-Za-z0-9_.-]; rename it",
                    raw.name
                ),
            );
        }
        if let Some(previous) = tiers.iter().position(|t| t.name == raw.name) {
            return fail(
                format!("{field}.name"),
                format!(
                    "('{}') repeats tiers[{previous}].name; give each tier its own name",
                    raw.name
                ),
            );
        }
        let threshold_minor = money(&format!("{field}.threshold"), &raw.threshold)?;
        if index == 0 && threshold_minor != 0 {
            return fail(
                format!("{field}.threshold"),
                format!(
                    "({:#}) must be 0: the first tier is the base tier every customer starts in",
                    Money(threshold_minor)
                ),
            );
        }
        if let Some(previous) = tiers.last() {
            if threshold_minor <= previous.threshold_minor {
                return fail(
                    format!("{field}.threshold"),
                    format!(
                        "({:#}) must be greater than tiers[{}].threshold ({:#}); list tiers from lowest to highest",
                        Money(threshold_minor),
                        index - 1,
                        Money(previous.threshold_minor)
                    ),
                );
            }
        }
        tiers.push(Tier {
            name: raw.name.clone(),
            threshold_minor,
        });
    }
    Ok(tiers)
}

/// The reward catalogue by id: ids unique tokens, names given, costs in range.
fn validate_rewards(raw_rewards: &[RawReward]) -> Check<BTreeMap<String, Reward>> {
    let mut rewards = BTreeMap::new();
    for (index, raw) in raw_rewards.iter().enumerate() {
        let field = format!("rewards[{index}]");
        if !is_token(&raw.id) {
            return fail(
                format!("{field}.id"),
                format!(
                    "('{}') must be 1 to 64 of [A-Za-z0-9_.-]; rename it",
                    raw.id
                ),
            );
        }
        if rewards.contains_key(&raw.id) {
            return fail(
                format!("{field}.id"),
                format!(
                    "('{}') is used by an earlier reward; give each reward its own id",
                    raw.id
                ),
            );
        }
        if raw.name.trim().is_empty() {
            return fail(
                format!("{field}.name"),
                "is empty; name the reward for the customer",
            );
        }
        let points_cost = COST_POINTS.check(&format!("{field}.points_cost"), raw.points_cost)?;
        rewards.insert(
            raw.id.clone(),
            Reward {
                id: raw.id.clone(),
                name: raw.name.clone(),
                points_cost,
            },
        );
    }
    Ok(rewards)
}

impl RawRetention {
    fn validate(&self) -> Check<Retention> {
        let retention = Retention {
            lapse_factor_basis_points: basis_points(
                "retention.lapse_factor",
                self.lapse_factor,
                BASIS_POINTS_ONE,
            )?,
            default_gap_days: DAYS.check("retention.default_gap_days", self.default_gap_days)?,
            min_gap_days: DAYS_OR_NONE.check("retention.min_gap_days", self.min_gap_days)?,
            winback_delay_days: DAYS_OR_NONE
                .check("retention.winback_delay_days", self.winback_delay_days)?,
        };
        if retention.min_gap_days > retention.default_gap_days {
            return fail(
                "retention.min_gap_days",
                format!(
                    "({}) must not exceed retention.default_gap_days ({}); lower it",
                    retention.min_gap_days, retention.default_gap_days
                ),
            );
        }
        Ok(retention)
    }
}

/// The `[identity]` table: `blocked_max_per_kind` and `[identity.<kind>] blocked`, each
/// pattern normalised like its kind's values and listed once, at most the limit per kind.
fn validate_identity(raw: &BTreeMap<String, toml::Value>) -> Check<IdentityRules> {
    const MAX_FIELD: &str = "blocked_max_per_kind";
    const MERGES_FIELD: &str = "merges_max_per_day";
    let merges_max_per_day = match raw.get(MERGES_FIELD) {
        None => MERGES_MAX_PER_DAY_DEFAULT,
        Some(toml::Value::Integer(max)) => {
            MERGES_PER_DAY.check("identity.merges_max_per_day", *max)? as u32
        }
        Some(other) => {
            return fail(
                "identity.merges_max_per_day",
                format!(
                    "is a {}; write a whole number of merges per customer per day, e.g. 10 (0: no merges)",
                    other.type_str()
                ),
            )
        }
    };
    let mut kinds = IdentityKind::ALL.map(KindRules::default_for);
    let blocked_max_per_kind = match raw.get(MAX_FIELD) {
        None => BLOCKED_MAX_PER_KIND_DEFAULT,
        Some(toml::Value::Integer(max)) => {
            BLOCKED_PATTERNS.check("identity.blocked_max_per_kind", *max)? as usize
        }
        Some(other) => {
            return fail(
                "identity.blocked_max_per_kind",
                format!(
                    "is a {}; write a whole number of patterns, e.g. 1000",
                    other.type_str()
                ),
            )
        }
    };
    let mut blocked = BlockedIdentities::default();
    for (name, value) in raw {
        if name == MAX_FIELD || name == MERGES_FIELD {
            continue;
        }
        let field = format!("identity.{name}");
        let Some(kind) = IdentityKind::parse(name) else {
            return fail(
                field,
                format!(
                    "is not an identifier kind; write [identity.<kind>] with one of {}, or {MAX_FIELD} = <patterns>, or {MERGES_FIELD} = <merges>",
                    IdentityKind::ALL.map(IdentityKind::as_str).join(", ")
                ),
            );
        };
        let table: RawIdentityKind = value.clone().try_into().map_err(|error| {
            (
                field.clone(),
                format!(
                    "must be a table holding only blocked (a list of strings), max_per_customer (a whole number) and merge (true or false) ({}); write e.g. [identity.{kind}] blocked = [\"value\", \"prefix*\"]",
                    error.to_string().trim_end().replace('\n', " | ")
                ),
            )
        })?;
        let rules = &mut kinds[kind as usize];
        if let Some(max) = table.max_per_customer {
            rules.max_per_customer =
                IDENTIFIERS_PER_CUSTOMER.check(&format!("{field}.max_per_customer"), max)? as u32;
        }
        if let Some(merge) = table.merge {
            rules.merge = merge;
        }
        if table.blocked.len() > blocked_max_per_kind {
            return fail(
                format!("{field}.blocked"),
                format!(
                    "lists {} patterns, above identity.{MAX_FIELD} = {blocked_max_per_kind} patterns; use * patterns for families of values, or raise the limit",
                    table.blocked.len()
                ),
            );
        }
        for (index, raw) in table.blocked.iter().enumerate() {
            let field = format!("{field}.blocked[{index}]");
            let pattern = Pattern::parse(kind, raw).map_err(|problem| (field.clone(), problem))?;
            let normalised = pattern.as_str().to_string();
            if !blocked.insert(kind, pattern) {
                return fail(
                    field,
                    format!("('{normalised}') is listed twice (once normalised); list each value or pattern once"),
                );
            }
        }
    }
    Ok(IdentityRules {
        blocked_max_per_kind,
        kinds,
        merges_max_per_day,
        blocked,
    })
}

impl RawNextBestAction {
    fn validate(&self) -> Check<NextBestAction> {
        for (index, segment) in self.winback_segments.iter().enumerate() {
            if !VALUE_SEGMENTS.contains(&segment.as_str()) {
                return fail(
                    format!("next_best_action.winback_segments[{index}]"),
                    format!("('{segment}') is not a value segment; use one of {VALUE_SEGMENTS:?}"),
                );
            }
        }
        if !(self.at_risk_p_alive > 0.0 && self.at_risk_p_alive < 1.0) {
            return fail(
                "next_best_action.at_risk_p_alive",
                format!(
                    "({}) must be a probability between 0 and 1 (exclusive), e.g. 0.5",
                    self.at_risk_p_alive
                ),
            );
        }
        Ok(NextBestAction {
            winback_segments: self.winback_segments.clone(),
            at_risk_p_alive_basis_points: basis_points(
                "next_best_action.at_risk_p_alive",
                self.at_risk_p_alive,
                1,
            )?,
            tier_nudge_within_minor: money(
                "next_best_action.tier_nudge_within",
                &self.tier_nudge_within,
            )?,
            cross_sell: self.cross_sell,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The rules file shipped in `cluster-config/`.
    pub(crate) const SHIPPED: &str = include_str!("../../cluster-config/rules.toml");

    /// A small rules file for unit tests: 1 point per EUR, no pending, 365-day expiry.
    pub(crate) const MINIMAL: &str = r#"
version = 1
currency = "EUR"

[earning]
points_per_currency_unit = 1

[[tiers]]
name = "member"
threshold = 0

[[tiers]]
name = "silver"
threshold = 500

[[tiers]]
name = "gold"
threshold = 1000.00
"#;

    fn error_for(text: &str) -> RulesError {
        Rules::from_toml_str(text).expect_err("the rules should be refused")
    }

    #[test]
    fn the_shipped_rules_file_is_valid() {
        let rules = Rules::from_toml_str(SHIPPED).unwrap();
        assert!(rules.tiers.len() >= 3);
        assert_eq!(rules.currencies(), vec!["EUR".to_string()]);
        assert!(!rules.rewards.is_empty());
    }

    #[test]
    fn decimals_become_integers_at_load() {
        let text = MINIMAL.replace(
            "points_per_currency_unit = 1",
            "points_per_currency_unit = 1\n[earning.channel_multipliers]\napp = 1.5",
        );
        let text = format!("{text}\n[retention]\nlapse_factor = 2.5\n");
        let rules = Rules::from_toml_str(&text).unwrap();
        assert_eq!(rules.earning.channel_multiplier_basis_points["app"], 15_000);
        assert_eq!(rules.retention.lapse_factor_basis_points, 25_000);
        assert_eq!(rules.tiers[2].threshold_minor, 100_000);
    }

    #[test]
    fn tiers_out_of_order_name_both_thresholds() {
        let text = MINIMAL.replace("threshold = 1000.00", "threshold = 400");
        let error = error_for(&text);
        assert_eq!(error.field(), Some("tiers[2].threshold"));
        let message = error.to_string();
        assert!(
            message.contains("rules.toml: tiers[2].threshold (400) must be greater than tiers[1].threshold (500)"),
            "{message}"
        );
    }

    #[test]
    fn next_best_action_settings_are_checked_and_defaulted() {
        let rules = Rules::from_toml_str(MINIMAL).unwrap();
        assert_eq!(rules.next_best_action.at_risk_p_alive_basis_points, 5_000);
        assert_eq!(rules.next_best_action.tier_nudge_within_minor, 10_000);
        let bad_segment = format!("{MINIMAL}\n[next_best_action]\nwinback_segments = [\"vip\"]\n");
        let error = error_for(&bad_segment);
        assert_eq!(error.field(), Some("next_best_action.winback_segments[0]"));
        assert!(error.to_string().contains("top_20_percent"), "{error}");
        let bad_p = format!("{MINIMAL}\n[next_best_action]\nat_risk_p_alive = 1.5\n");
        assert_eq!(
            error_for(&bad_p).field(),
            Some("next_best_action.at_risk_p_alive")
        );
    }

    #[test]
    fn a_base_tier_above_zero_is_refused() {
        let text = MINIMAL.replacen("threshold = 0", "threshold = 10", 1);
        assert_eq!(error_for(&text).field(), Some("tiers[0].threshold"));
    }

    #[test]
    fn an_unknown_field_is_named() {
        let text = MINIMAL.replace(
            "points_per_currency_unit = 1",
            "points_per_currency_unit = 1\npoints_per_euro = 2",
        );
        let message = error_for(&text).to_string();
        assert!(message.contains("points_per_euro"), "{message}");
    }

    #[test]
    fn a_missing_section_is_named() {
        let text = MINIMAL.replace("[earning]\npoints_per_currency_unit = 1\n", "");
        let message = error_for(&text).to_string();
        assert!(message.contains("earning"), "{message}");
    }

    #[test]
    fn a_negative_multiplier_is_refused_with_its_path() {
        let text = MINIMAL.replace(
            "points_per_currency_unit = 1",
            "points_per_currency_unit = 1\n[earning.category_multipliers]\nshoes = -2.0",
        );
        let error = error_for(&text);
        assert_eq!(error.field(), Some("earning.category_multipliers.shoes"));
    }

    #[test]
    fn every_range_check_names_the_field_the_value_and_the_range() {
        let cases = [
            (
                "[limits]\norders_max = 0",
                "limits.orders_max",
                "(0) must be from 1 to 1000000 entries",
            ),
            (
                "[limits]\ncategories_max = 1000001",
                "limits.categories_max",
                "(1000001) must be from 1 to 1000000 entries",
            ),
            (
                "[expiry]\nexpiry_days = -1",
                "expiry.expiry_days",
                "(-1) must be from 0 to 36500 days",
            ),
            (
                "[tiering]\nreview_period_days = 0",
                "tiering.review_period_days",
                "(0) must be from 1 to 36500 days",
            ),
            (
                "[retention]\nwinback_delay_days = 40000",
                "retention.winback_delay_days",
                "(40000) must be from 0 to 36500 days",
            ),
            (
                "[[rewards]]\nid = \"r\"\nname = \"R\"\npoints_cost = 0",
                "rewards[0].points_cost",
                "(0) must be from 1 to 100000000 points",
            ),
        ];
        for (section, field, problem) in cases {
            let error = error_for(&format!("{MINIMAL}\n{section}\n"));
            assert_eq!(error.field(), Some(field), "{section}");
            assert!(
                error
                    .to_string()
                    .contains(&format!("{field} {problem}; set it in that range")),
                "{error}"
            );
        }
    }

    #[test]
    fn a_lapse_factor_below_one_is_refused() {
        let text = format!("{MINIMAL}\n[retention]\nlapse_factor = 0.5\n");
        let error = error_for(&text);
        assert_eq!(error.field(), Some("retention.lapse_factor"));
        assert!(
            error.to_string().contains("must be from 1 to 100"),
            "{error}"
        );
    }

    #[test]
    fn expiry_not_after_pending_is_refused() {
        let text = MINIMAL.replace(
            "points_per_currency_unit = 1",
            "points_per_currency_unit = 1\npending_days = 30",
        );
        let text = format!("{text}\n[expiry]\nexpiry_days = 30\n");
        assert_eq!(error_for(&text).field(), Some("expiry.expiry_days"));
    }

    #[test]
    fn duplicate_reward_ids_and_zero_costs_are_refused() {
        let reward = "\n[[rewards]]\nid = \"coffee\"\nname = \"Coffee\"\npoints_cost = 100\n";
        let text = format!("{MINIMAL}{reward}{reward}");
        assert_eq!(error_for(&text).field(), Some("rewards[1].id"));
        let text = format!("{MINIMAL}{}", reward.replace("100", "0"));
        assert_eq!(error_for(&text).field(), Some("rewards[0].points_cost"));
    }

    #[test]
    fn a_currency_must_be_an_iso_code_and_accepted() {
        let text = MINIMAL.replace("currency = \"EUR\"", "currency = \"euro\"");
        assert_eq!(error_for(&text).field(), Some("currency"));
        let text = MINIMAL.replace(
            "currency = \"EUR\"",
            "currency = \"EUR\"\naccepted_currencies = [\"USD\"]",
        );
        assert_eq!(error_for(&text).field(), Some("accepted_currencies"));
    }

    #[test]
    fn a_zero_limit_is_refused() {
        let text = format!("{MINIMAL}\n[limits]\ntimeline_max_entries = 0\n");
        let error = error_for(&text);
        assert_eq!(error.field(), Some("limits.timeline_max_entries"));
    }

    #[test]
    fn the_shipped_rules_block_placeholder_addresses_and_numbers() {
        let rules = Rules::from_toml_str(SHIPPED).unwrap();
        assert_eq!(rules.identity.blocked_max_per_kind, 1000);
        let blocked = |kind, raw| {
            rules
                .identity
                .is_blocked(&Identity::normalise(kind, raw).unwrap())
        };
        assert!(blocked(IdentityKind::Email, "Test@Test.com"));
        assert!(blocked(IdentityKind::Email, "noreply@shop.example"));
        assert!(blocked(IdentityKind::Email, "No-Reply@shop.example"));
        assert!(blocked(IdentityKind::Phone, "+1 (000) 000-0000"));
        assert!(!blocked(IdentityKind::Email, "ann.lee@example.com"));
        assert!(!blocked(IdentityKind::Phone, "+4915112345678"));
        assert!(!blocked(IdentityKind::LoyaltyCard, "LC-42"));
    }

    #[test]
    fn without_an_identity_table_nothing_is_blocked() {
        let rules = Rules::from_toml_str(MINIMAL).unwrap();
        assert!(rules.identity.blocked.is_empty());
        assert_eq!(
            rules.identity.blocked_max_per_kind,
            BLOCKED_MAX_PER_KIND_DEFAULT
        );
    }

    #[test]
    fn blocked_patterns_are_normalised_like_their_kind() {
        let text = format!(
            "{MINIMAL}\n[identity.email]\nblocked = [\"NoReply@*\"]\n[identity.phone]\nblocked = [\"+49 (0)151 0000*\"]\n[identity.loyalty_card]\nblocked = [\"STORE-0000\"]\n"
        );
        let rules = Rules::from_toml_str(&text).unwrap();
        let blocked = |kind, raw| {
            rules
                .identity
                .is_blocked(&Identity::normalise(kind, raw).unwrap())
        };
        assert!(blocked(IdentityKind::Email, "NOREPLY@shop.example"));
        assert!(blocked(IdentityKind::Phone, "+49 151 0000 1234"));
        assert!(blocked(IdentityKind::LoyaltyCard, "STORE-0000"));
        assert!(!blocked(IdentityKind::LoyaltyCard, "store-0000"));
    }

    #[test]
    fn unusable_identity_rules_name_the_field_and_the_fix() {
        let many: Vec<String> = (0..3).map(|i| format!("\"c{i}\"")).collect();
        let cases = [
            (
                "[identity.emial]\nblocked = [\"a@b.co\"]".to_string(),
                "identity.emial",
                "is not an identifier kind; write [identity.<kind>] with one of loyalty_card, customer_id, email, phone, device_id",
            ),
            (
                "[identity.email]\nblocked = [\"a@b.co\", \" \"]".to_string(),
                "identity.email.blocked[1]",
                "is empty",
            ),
            (
                "[identity.email]\nblocked = [\"*\"]".to_string(),
                "identity.email.blocked[0]",
                "would block every email",
            ),
            (
                "[identity.phone]\nblocked = [\"555-0100\"]".to_string(),
                "identity.phone.blocked[0]",
                "is not an E.164 phone number",
            ),
            (
                "[identity.email]\nblocked = [\"A@B.co\", \"a@b.CO\"]".to_string(),
                "identity.email.blocked[1]",
                "('a@b.co') is listed twice",
            ),
            (
                format!("[identity]\nblocked_max_per_kind = 2\n[identity.customer_id]\nblocked = [{}]", many.join(", ")),
                "identity.customer_id.blocked",
                "lists 3 patterns, above identity.blocked_max_per_kind = 2 patterns",
            ),
            (
                "[identity]\nblocked_max_per_kind = 0".to_string(),
                "identity.blocked_max_per_kind",
                "(0) must be from 1 to 100000 patterns",
            ),
            (
                "[identity]\nblocked_max_per_kind = \"many\"".to_string(),
                "identity.blocked_max_per_kind",
                "is a string; write a whole number of patterns",
            ),
            (
                "[identity.email]\nblock = [\"a@b.co\"]".to_string(),
                "identity.email",
                "unknown field `block`",
            ),
            (
                "[identity.email]\nblocked = \"a@b.co\"".to_string(),
                "identity.email",
                "must be a table holding only blocked (a list of strings), max_per_customer (a whole number) and merge (true or false) (invalid type: string",
            ),
            (
                "[identity.loyalty_card]\nmax_per_customer = 0".to_string(),
                "identity.loyalty_card.max_per_customer",
                "(0) must be from 1 to 100000 identifiers",
            ),
            (
                "[identity]\nmerges_max_per_day = -1".to_string(),
                "identity.merges_max_per_day",
                "(-1) must be from 0 to 1000000 merges",
            ),
            (
                "[identity.email]\nmerge = \"yes\"".to_string(),
                "identity.email",
                "invalid type: string",
            ),
        ];
        for (section, field, problem) in cases {
            let error = error_for(&format!("{MINIMAL}\n{section}\n"));
            assert_eq!(error.field(), Some(field), "{section}: {error}");
            assert!(error.to_string().contains(problem), "{section}: {error}");
        }
    }

    #[test]
    fn identity_kind_rules_default_per_kind_and_read_from_the_file() {
        let rules = Rules::from_toml_str(MINIMAL).expect("minimal rules");
        let kind = |k| rules.identity.kind(k);
        assert_eq!(kind(IdentityKind::LoyaltyCard).max_per_customer, 1);
        assert_eq!(kind(IdentityKind::CustomerId).max_per_customer, 1);
        assert_eq!(kind(IdentityKind::Email).max_per_customer, 5);
        assert_eq!(kind(IdentityKind::Phone).max_per_customer, 5);
        assert_eq!(kind(IdentityKind::DeviceId).max_per_customer, 1000);
        assert!(!kind(IdentityKind::DeviceId).merge && kind(IdentityKind::Email).merge);
        assert_eq!(rules.identity.merges_max_per_day, 10);
        let rules = Rules::from_toml_str(&format!(
            "{MINIMAL}\n[identity]\nmerges_max_per_day = 0\n[identity.email]\nmax_per_customer = 2\nmerge = false\n"
        ))
        .expect("identity rules");
        assert_eq!(rules.identity.kind(IdentityKind::Email).max_per_customer, 2);
        assert!(!rules.identity.kind(IdentityKind::Email).merge);
        assert!(rules.identity.kind(IdentityKind::Phone).merge);
        assert_eq!(rules.identity.merges_max_per_day, 0);
    }

    /// docs/rules.md quotes these two messages.
    #[test]
    fn the_identity_errors_read_as_documented() {
        let docs = include_str!("../../docs/rules.md");
        for section in [
            "[identity.emial]\nblocked = [\"a@b.co\"]",
            "[identity.email]\nblocked = [\"*\"]",
        ] {
            let message = error_for(&format!("{MINIMAL}\n{section}\n")).to_string();
            assert!(docs.contains(&format!("\n{message}\n")), "{message}");
        }
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let error = Rules::load(Path::new("/nonexistent/rules.toml")).unwrap_err();
        assert!(
            error.to_string().contains("/nonexistent/rules.toml"),
            "{error}"
        );
    }
}
