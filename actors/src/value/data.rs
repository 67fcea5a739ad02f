//! Data preparation for the customer-value models: transactions in, one recency /
//! frequency / monetary summary per customer out, plus the CSV reader for
//! `customer_id,date,amount` files.
//!
//! The rules ([`summarize`]): transactions dated after the as-of date are ignored; all of a
//! customer's transactions on one calendar day are one purchase with the amounts summed;
//! the first purchase day starts the customer's clock. Then, per customer,
//! * `frequency` x: purchase days after the first (repeat purchases);
//! * `recency` t_x: first to last purchase day;
//! * `age` T: first purchase day to the as-of date;
//! * `monetary`: mean amount of the repeat purchase days (the first day excluded, as the
//!   Gamma-Gamma model expects), 0 without repeat purchases.
//!
//! Times are in the chosen [`TimeUnit`] (weeks are days / 7). Amounts are read exactly as
//! minor units ([`crate::money`]) and turned into major units only for the mean. The CSV
//! reader ([`read_transactions_csv`], the `csv` crate: quoted fields, columns found by name)
//! names the line, the column and the problem of every bad row; it reads from any
//! `BufRead`, so the caller owns the file and its name.

use crate::money::{parse_decimal_minor, AmountError, MINOR_PER_MAJOR};
use serde::Serialize;
use std::io::BufRead;
use time::Date;

/// The header the CSV reader expects (column order is free, extra columns are ignored).
pub const CSV_HEADER: &str = "customer_id,date,amount";

/// Days in a week, for [`TimeUnit::Weeks`].
const DAYS_PER_WEEK: f64 = 7.0;

/// The unit of every time in the models: recency, age, horizons, rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeUnit {
    Days,
    Weeks,
}

impl TimeUnit {
    /// Calendar days in one unit.
    pub fn days(self) -> f64 {
        match self {
            TimeUnit::Days => 1.0,
            TimeUnit::Weeks => DAYS_PER_WEEK,
        }
    }

    /// The default CLV horizon in this unit: one year (365 days or 52 weeks).
    pub fn default_horizon_periods(self) -> u32 {
        match self {
            TimeUnit::Days => 365,
            TimeUnit::Weeks => 52,
        }
    }

    /// The unit's name, singular (`day`, `week`).
    pub fn singular(self) -> &'static str {
        match self {
            TimeUnit::Days => "day",
            TimeUnit::Weeks => "week",
        }
    }
}

/// One purchase line: who, on which day, how much (minor units, e.g. cents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub customer_id: String,
    pub date: Date,
    pub amount_minor: i64,
}

/// A customer's purchase history as the purchase model sees it: (x, t_x, T).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PurchaseHistory {
    /// x: repeat purchases (purchase days after the first).
    pub frequency: u32,
    /// t_x: time from the first to the last purchase.
    pub recency: f64,
    /// T: time from the first purchase to the as-of date.
    pub age: f64,
}

/// One customer's summary: the purchase history plus the mean repeat spend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerSummary {
    pub customer_id: String,
    pub frequency: u32,
    pub recency: f64,
    /// T in the literature.
    #[serde(rename = "T")]
    pub age: f64,
    /// Mean amount of the repeat purchase days, major units; 0 without repeat purchases.
    pub monetary: f64,
}

impl CustomerSummary {
    pub fn history(&self) -> PurchaseHistory {
        PurchaseHistory {
            frequency: self.frequency,
            recency: self.recency,
            age: self.age,
        }
    }
}

/// One summary per customer with a transaction on or before `as_of`, sorted by customer id.
pub fn summarize(
    transactions: &[Transaction],
    as_of: Date,
    unit: TimeUnit,
) -> Vec<CustomerSummary> {
    let as_of_day = as_of.to_julian_day();
    let mut lines: Vec<(&str, i32, i64)> = transactions
        .iter()
        .map(|t| {
            (
                t.customer_id.as_str(),
                t.date.to_julian_day(),
                t.amount_minor,
            )
        })
        .filter(|(_, day, _)| *day <= as_of_day)
        .collect();
    lines.sort_unstable_by(|left, right| (left.0, left.1).cmp(&(right.0, right.1)));

    let days_per_unit = unit.days();
    let mut summaries = Vec::new();
    let mut start = 0;
    while start < lines.len() {
        let customer = lines[start].0;
        let end = start
            + lines[start..]
                .iter()
                .take_while(|l| l.0 == customer)
                .count();
        let first_day = lines[start].1;
        let last_day = lines[end - 1].1;
        // Days after the first: each new day is one purchase; amounts on one day add up.
        let mut repeat_days: u32 = 0;
        let mut repeat_amount_minor: i128 = 0;
        let mut previous_day = first_day;
        for &(_, day, amount) in &lines[start..end] {
            if day == first_day {
                continue;
            }
            if day != previous_day {
                repeat_days += 1;
                previous_day = day;
            }
            repeat_amount_minor += i128::from(amount);
        }
        let monetary = if repeat_days == 0 {
            0.0
        } else {
            repeat_amount_minor as f64 / f64::from(repeat_days) / MINOR_PER_MAJOR as f64
        };
        summaries.push(CustomerSummary {
            customer_id: customer.to_string(),
            frequency: repeat_days,
            recency: f64::from(last_day - first_day) / days_per_unit,
            age: f64::from(as_of_day - first_day) / days_per_unit,
            monetary,
        });
        start = end;
    }
    summaries
}

/// What is wrong with a transactions CSV; every row problem names its line (the header is
/// line 1).
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    #[error("the file is empty: expected the header `{CSV_HEADER}` and one transaction per line")]
    Empty,
    #[error("line 1: the header has no `{column}` column (expected `{CSV_HEADER}`)")]
    MissingHeaderColumn { column: &'static str },
    #[error("no transactions: the file has a header but no rows (expected `{CSV_HEADER}` rows)")]
    NoRows,
    #[error("line {line}: missing column `{column}` (expected `{CSV_HEADER}`)")]
    MissingColumn { line: usize, column: &'static str },
    #[error(
        "line {line}: {found} fields where the header has {expected}; quote a field that holds a comma (write 1234.50 or \"1234.50\", not 1,234.50)"
    )]
    ExtraFields {
        line: usize,
        found: usize,
        expected: usize,
    },
    #[error("line {line}: empty customer_id")]
    EmptyCustomerId { line: usize },
    #[error(
        "line {line}: date `{text}` is not a calendar date (write YYYY-MM-DD, e.g. 2024-03-01)"
    )]
    BadDate { line: usize, text: String },
    #[error("line {line}: amount `{text}` {reason}")]
    BadAmount {
        line: usize,
        text: String,
        reason: AmountError,
    },
    #[error(
        "line {line}: amount `{text}` is negative (refunds are not purchases; leave them out)"
    )]
    NegativeAmount { line: usize, text: String },
    #[error("line {line}: not a CSV row: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("line {line}: cannot read the file: {error}")]
    Read { line: usize, error: std::io::Error },
}

/// Reads `customer_id,date,amount` rows (dates `YYYY-MM-DD`, amounts decimal with at most
/// two decimals, not negative) with the `csv` crate: fields may be quoted (`"c,1"` is one
/// field), the header names the columns in any order (extra columns are ignored), blank
/// lines are skipped and fields are trimmed. A row with more fields than the header is
/// refused (an unquoted `1,234.50` would otherwise read as 1.00).
pub fn read_transactions_csv<R: BufRead>(mut reader: R) -> Result<Vec<Transaction>, CsvError> {
    // Read whole, so that line numbers count every line (the csv reader's own count skips
    // blank lines); the transactions are held in memory anyway.
    let mut bytes = Vec::new();
    if let Err(error) = reader.read_to_end(&mut bytes) {
        let line = Lines::new(&bytes).line_at(bytes.len() as u64);
        return Err(CsvError::Read { line, error });
    }
    let mut lines = Lines::new(&bytes);
    let mut rows = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes.as_slice());
    let mut records = rows.records().filter(|record| match record {
        // A line of blanks is one empty field: skipped like an empty line.
        Ok(record) => !(record.len() == 1 && record[0].is_empty()),
        Err(_) => true,
    });
    let header = match records.next() {
        None => return Err(CsvError::Empty),
        Some(record) => record.map_err(|error| CsvError::from_csv(error, &mut lines))?,
    };
    let columns: Vec<String> = header
        .iter()
        .map(|name| {
            name.trim_start_matches('\u{feff}')
                .trim()
                .to_ascii_lowercase()
        })
        .collect();
    let position = |column: &'static str| {
        columns
            .iter()
            .position(|name| name == column)
            .ok_or(CsvError::MissingHeaderColumn { column })
    };
    let id_column = position("customer_id")?;
    let date_column = position("date")?;
    let amount_column = position("amount")?;

    let mut transactions = Vec::new();
    for record in records {
        let record = record.map_err(|error| CsvError::from_csv(error, &mut lines))?;
        let line = lines.line_at(record.position().map_or(0, csv::Position::byte));
        if record.len() > columns.len() {
            return Err(CsvError::ExtraFields {
                line,
                found: record.len(),
                expected: columns.len(),
            });
        }
        let field = |column: usize, name: &'static str| {
            record
                .get(column)
                .ok_or(CsvError::MissingColumn { line, column: name })
        };
        transactions.push(transaction(
            line,
            field(id_column, "customer_id")?,
            field(date_column, "date")?,
            field(amount_column, "amount")?,
        )?);
    }
    if transactions.is_empty() {
        return Err(CsvError::NoRows);
    }
    Ok(transactions)
}

/// Line numbers (1-based) of byte offsets, asked in increasing order.
struct Lines<'a> {
    bytes: &'a [u8],
    offset: usize,
    line: usize,
}

impl<'a> Lines<'a> {
    fn new(bytes: &'a [u8]) -> Lines<'a> {
        Lines {
            bytes,
            offset: 0,
            line: 1,
        }
    }

    /// The line of the first byte at or after `byte` that is not a line break (a record
    /// never starts with one; the csv reader may report a record after a blank line at
    /// the blank line).
    fn line_at(&mut self, byte: u64) -> usize {
        let mut target = usize::try_from(byte)
            .unwrap_or(usize::MAX)
            .min(self.bytes.len());
        while self
            .bytes
            .get(target)
            .is_some_and(|b| *b == b'\n' || *b == b'\r')
        {
            target += 1;
        }
        if target < self.offset {
            // Asked out of order: count from the start.
            (self.offset, self.line) = (0, 1);
        }
        self.line += self.bytes[self.offset..target]
            .iter()
            .filter(|b| **b == b'\n')
            .count();
        self.offset = target;
        self.line
    }
}

/// One row's fields checked and read.
fn transaction(
    line: usize,
    customer_id: &str,
    date_text: &str,
    amount_text: &str,
) -> Result<Transaction, CsvError> {
    if customer_id.is_empty() {
        return Err(CsvError::EmptyCustomerId { line });
    }
    let date = crate::time::parse_date(date_text).ok_or_else(|| CsvError::BadDate {
        line,
        text: date_text.to_string(),
    })?;
    let amount_minor = parse_decimal_minor(amount_text).map_err(|reason| CsvError::BadAmount {
        line,
        text: amount_text.to_string(),
        reason,
    })?;
    if amount_minor < 0 {
        return Err(CsvError::NegativeAmount {
            line,
            text: amount_text.to_string(),
        });
    }
    Ok(Transaction {
        customer_id: customer_id.to_string(),
        date,
        amount_minor,
    })
}

impl CsvError {
    /// A read or parse failure of the `csv` reader, with the line it happened on.
    fn from_csv(error: csv::Error, lines: &mut Lines) -> CsvError {
        let line = lines.line_at(error.position().map_or(0, csv::Position::byte));
        match error.into_kind() {
            csv::ErrorKind::Io(error) => CsvError::Read { line, error },
            csv::ErrorKind::Utf8 { err, .. } => CsvError::Malformed {
                line,
                reason: format!("{err}; save the file as UTF-8"),
            },
            other => CsvError::Malformed {
                line,
                reason: format!("{other:?}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn purchase(customer_id: &str, date: Date, amount_minor: i64) -> Transaction {
        Transaction {
            customer_id: customer_id.to_string(),
            date,
            amount_minor,
        }
    }

    fn read(text: &str) -> Result<Vec<Transaction>, CsvError> {
        read_transactions_csv(text.as_bytes())
    }

    #[test]
    fn same_day_purchases_merge_and_later_ones_are_ignored() {
        let transactions = [
            purchase("alice", date!(2024 - 01 - 01), 1_000),
            purchase("alice", date!(2024 - 01 - 01), 500),
            purchase("alice", date!(2024 - 01 - 11), 2_000),
            purchase("alice", date!(2024 - 01 - 11), 1_000),
            purchase("alice", date!(2024 - 01 - 21), 6_000),
            purchase("alice", date!(2024 - 02 - 15), 9_900),
        ];
        let summaries = summarize(&transactions, date!(2024 - 01 - 31), TimeUnit::Days);
        assert_eq!(
            summaries,
            vec![CustomerSummary {
                customer_id: "alice".to_string(),
                frequency: 2,
                recency: 20.0,
                age: 30.0,
                // Repeat days: 2024-01-11 (30.00 merged) and 2024-01-21 (60.00).
                monetary: 45.0,
            }]
        );
    }

    #[test]
    fn a_purchase_on_the_as_of_date_counts() {
        let transactions = [
            purchase("bob", date!(2024 - 01 - 01), 100),
            purchase("bob", date!(2024 - 01 - 31), 300),
        ];
        let summaries = summarize(&transactions, date!(2024 - 01 - 31), TimeUnit::Days);
        assert_eq!(
            (
                summaries[0].frequency,
                summaries[0].recency,
                summaries[0].age
            ),
            (1, 30.0, 30.0)
        );
    }

    #[test]
    fn weeks_are_days_divided_by_seven() {
        let transactions = [
            purchase("carol", date!(2024 - 01 - 01), 100),
            purchase("carol", date!(2024 - 01 - 15), 300),
        ];
        let summaries = summarize(&transactions, date!(2024 - 01 - 25), TimeUnit::Weeks);
        assert_eq!(summaries[0].recency, 2.0);
        assert_eq!(summaries[0].age, 24.0 / 7.0);
    }

    #[test]
    fn one_time_buyers_have_zero_monetary_and_customers_come_out_sorted() {
        let transactions = [
            purchase("zed", date!(2024 - 01 - 05), 2_500),
            purchase("amy", date!(2024 - 01 - 02), 700),
            purchase("amy", date!(2024 - 01 - 02), 800),
            purchase("late", date!(2024 - 03 - 01), 100),
        ];
        let summaries = summarize(&transactions, date!(2024 - 01 - 10), TimeUnit::Days);
        let ids: Vec<&str> = summaries.iter().map(|s| s.customer_id.as_str()).collect();
        assert_eq!(ids, ["amy", "zed"]);
        assert!(summaries
            .iter()
            .all(|s| s.frequency == 0 && s.monetary == 0.0 && s.recency == 0.0));
        assert_eq!((summaries[0].age, summaries[1].age), (8.0, 5.0));
    }

    #[test]
    fn csv_rows_are_read_with_any_column_order_and_blank_lines() {
        let transactions = read(
            "\u{feff}date, amount ,customer_id\r\n2024-01-02,12.5,c1\r\n\r\n2024-01-03,7,c2\n",
        )
        .expect("valid file");
        assert_eq!(
            transactions,
            vec![
                purchase("c1", date!(2024 - 01 - 02), 1_250),
                purchase("c2", date!(2024 - 01 - 03), 700)
            ]
        );
    }

    #[test]
    fn every_csv_problem_names_its_line() {
        let cases = [
            ("", "the file is empty"),
            (
                "customer_id,date\n",
                "line 1: the header has no `amount` column",
            ),
            ("customer_id,date,amount\n", "no transactions"),
            (
                "customer_id,date,amount\nc1,2024-01-02,1\nc1,2024-01-03\n",
                "line 3: missing column `amount`",
            ),
            (
                "customer_id,date,amount\n,2024-01-02,1\n",
                "line 2: empty customer_id",
            ),
            (
                "customer_id,date,amount\nc1,2024-01-02,1\n\nc1,2024-13-01,1\n",
                "line 4: date `2024-13-01` is not a calendar date",
            ),
            (
                "customer_id,date,amount\nc1,02/01/2024,1\n",
                "line 2: date `02/01/2024`",
            ),
            (
                "customer_id,date,amount\nc1,2024-01-02,abc\n",
                "line 2: amount `abc` is not a number",
            ),
            (
                "customer_id,date,amount\nc1,2024-01-02,1,234.50\n",
                "line 2: 4 fields where the header has 3",
            ),
            (
                "customer_id,date,amount\nc1,2024-01-02,1.234\n",
                "line 2: amount `1.234` has more than 2 decimals",
            ),
            (
                "customer_id,date,amount\nc1,2024-01-02,-5\n",
                "line 2: amount `-5` is negative",
            ),
        ];
        for (text, expected) in cases {
            let message = read(text).expect_err(expected).to_string();
            assert!(
                message.starts_with(expected),
                "{text:?}: got `{message}`, expected `{expected}`"
            );
        }
    }

    #[test]
    fn quoted_fields_may_hold_commas_and_quotes() {
        let transactions = read(
            "customer_id,date,amount\n\"c,1\",\"2024-01-02\",\"12.50\"\n\"c \"\"2\"\"\",2024-01-03,7\n",
        )
        .expect("valid file");
        assert_eq!(
            transactions,
            vec![
                purchase("c,1", date!(2024 - 01 - 02), 1_250),
                purchase("c \"2\"", date!(2024 - 01 - 03), 700)
            ]
        );
        // A quoted `1,234.50` is one field (not four fields), and not an amount.
        let message = read("customer_id,date,amount\nc1,2024-01-02,\"1,234.50\"\n")
            .expect_err("thousands separator")
            .to_string();
        assert!(
            message.starts_with("line 2: amount `1,234.50` is not a number"),
            "{message}"
        );
    }

    #[test]
    fn a_reordered_header_with_extra_columns_finds_its_columns_by_name() {
        let transactions = read(
            "store,AMOUNT,Customer_Id,channel,date\ns1,3.5,c9,web,2024-02-29\ns2,1,c8,app,2024-03-01\n",
        )
        .expect("valid file");
        assert_eq!(
            transactions,
            vec![
                purchase("c9", date!(2024 - 02 - 29), 350),
                purchase("c8", date!(2024 - 03 - 01), 100)
            ]
        );
    }

    #[test]
    fn a_bad_line_is_named_after_blank_lines_and_quoted_line_breaks() {
        let text = "customer_id,date,amount\n\n\"c\n1\",2024-01-02,1\n   \nc2,2024-01-02,x\n";
        let message = read(text).expect_err("bad amount").to_string();
        assert!(message.starts_with("line 6: amount `x`"), "{message}");
        let unclosed = read("customer_id,date,amount\nc1,2024-01-02,1\nc2,2024-01-03,5,9\n")
            .expect_err("extra field")
            .to_string();
        assert!(
            unclosed.starts_with("line 3: 4 fields where the header has 3"),
            "{unclosed}"
        );
    }
}
