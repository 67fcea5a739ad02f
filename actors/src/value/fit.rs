//! The model-independent half of a maximum-likelihood fit: try the start points, minimise
//! the mean negative log-likelihood over log-parameters, refuse a flat optimum, and derive
//! standard errors. Also [`FitError`], the one error type of both model fits.
//!
//! [`crate::value::bgnbd::fit`] and [`crate::value::gamma_gamma::fit`] supply the objective
//! (value and analytic gradient in log space) and their start points; this module turns
//! "no minimum" into a [`FitError`] that names the parameter, so a fit that does not
//! converge is an error and never a set of numbers.

use super::optimize::{
    flat_direction, hessian, inverse_diagonal, minimize, MinimizeError, MinimizeSettings,
};

/// Convergence and search limits of every model fit. The objective is a mean per
/// customer, so the tolerance does not depend on the number of customers. At a gradient
/// of 1e-7 the distance to the exact optimum is ~1e-7 / curvature in log-parameters, a
/// few thousandths of a standard error even for millions of customers; much tighter and
/// the objective's own rounding (1e-16 of ~3) hides the remaining decrease along the
/// flat r-alpha ridge. The limit keeps every parameter within e^-25 .. e^25
/// (1.4e-11 .. 7.2e10).
const SETTINGS: MinimizeSettings = MinimizeSettings {
    gradient_tolerance: 1e-7,
    iterations_max: 500,
    coordinate_limit: 25.0,
};

/// Step in log-parameters of the finite-difference Hessian.
const HESSIAN_STEP: f64 = 1e-4;

/// A Cholesky pivot of the Hessian below this fraction of its largest diagonal entry means
/// a flat direction: the data do not identify that parameter.
const FLAT_RELATIVE_FLOOR: f64 = 1e-10;

/// Why a model could not be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("no customers to fit")]
    NoCustomers,
    #[error(
        "no customer has a repeat purchase, so the data say nothing about how often customers \
         buy again (use a longer history or an earlier first purchase date)"
    )]
    NoRepeatBuyers,
    #[error(
        "the log-likelihood is not finite at any start point (check the inputs for huge values)"
    )]
    NonFiniteLikelihood,
    #[error("history #{index} is invalid: {problem}")]
    InvalidHistory { index: usize, problem: &'static str },
    #[error(
        "parameter {parameter} runs to {towards}: the likelihood has no maximum inside the \
         parameter space (too few customers, or too little variety among them)"
    )]
    Diverged {
        parameter: &'static str,
        towards: &'static str,
    },
    #[error(
        "the optimiser stopped after {iterations} iterations without reaching the optimum \
         (largest gradient component {gradient_max:.2e}); too few customers, or too little \
         variety among them, usually cause this"
    )]
    NotConverged {
        iterations: usize,
        gradient_max: f64,
    },
    #[error(
        "parameter {parameter} is not identified: the likelihood is flat along it at the optimum"
    )]
    NotIdentified { parameter: &'static str },
    #[error(
        "the fitted q = {q:.4} is not above 1, so the expected spend is infinite under this fit \
         (a few extreme spenders dominate; check the amounts)"
    )]
    SpendMeanUndefined { q: f64 },
}

/// A converged, identified fit in log-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogParameterFit<const D: usize> {
    pub log_parameters: [f64; D],
    pub mean_negative_log_likelihood: f64,
    pub iterations: usize,
    /// Standard errors of the log-parameters (inverse observed information of the total).
    pub log_parameter_standard_errors: [f64; D],
}

/// Minimises `objective` (mean negative log-likelihood over `customers` customers, in
/// log-parameters) from each start in turn; the first converged and identified optimum wins.
pub fn maximize_likelihood<const D: usize, F>(
    mut objective: F,
    starts: &[[f64; D]],
    names: [&'static str; D],
    customers: f64,
) -> Result<LogParameterFit<D>, FitError>
where
    F: FnMut(&[f64; D], &mut [f64; D]) -> f64,
{
    let mut failure = FitError::NonFiniteLikelihood;
    for start in starts {
        let minimum = match minimize(&mut objective, *start, &SETTINGS) {
            Ok(minimum) => minimum,
            Err(error) => {
                failure = match error {
                    MinimizeError::NonFiniteStart => failure,
                    MinimizeError::Diverged { coordinate, value } => FitError::Diverged {
                        parameter: names[coordinate],
                        towards: if value < 0.0 { "0" } else { "infinity" },
                    },
                    MinimizeError::NotConverged {
                        iterations,
                        gradient_max,
                    } => FitError::NotConverged {
                        iterations,
                        gradient_max,
                    },
                };
                continue;
            }
        };
        let curvature = hessian(&mut objective, &minimum.point, HESSIAN_STEP);
        if let Some(flat) = flat_direction(&curvature, FLAT_RELATIVE_FLOOR) {
            failure = FitError::NotIdentified {
                parameter: names[flat],
            };
            continue;
        }
        let information = curvature.map(|row| row.map(|entry| entry * customers));
        let Some(variances) = inverse_diagonal(&information) else {
            failure = FitError::NotIdentified {
                parameter: names[0],
            };
            continue;
        };
        return Ok(LogParameterFit {
            log_parameters: minimum.point,
            mean_negative_log_likelihood: minimum.value,
            iterations: minimum.iterations,
            log_parameter_standard_errors: variances.map(f64::sqrt),
        });
    }
    Err(failure)
}
