//! A small quasi-Newton minimiser (BFGS with a strong-Wolfe line search, then a Newton end
//! game once the objective's rounding hides further decrease) and the identification check
//! that follows every model fit.
//!
//! The model fits ([`crate::value::bgnbd`], [`crate::value::gamma_gamma`]) minimise the mean
//! negative log-likelihood over the logarithms of their parameters, with analytic
//! gradients. This module knows nothing about the models: it takes a function returning the
//! value and filling the gradient, a start point and [`MinimizeSettings`], and returns the
//! minimum or says why there is none. A point with a coordinate beyond
//! [`MinimizeSettings::coordinate_limit`] (a parameter below e^-limit or above e^limit)
//! counts as infinitely bad, so a likelihood that keeps improving towards a boundary ends
//! as [`MinimizeError::Diverged`] instead of running away. It never panics on non-finite
//! values: they are treated as infinitely bad too.

/// Sufficient-decrease constant of the Wolfe conditions.
const ARMIJO_SLOPE: f64 = 1e-4;

/// Curvature constant of the strong Wolfe conditions (loose, as usual for quasi-Newton).
const CURVATURE_SLOPE: f64 = 0.9;

/// Trial points per line search (bracketing plus zooming).
const LINE_SEARCH_MAX_EVALUATIONS: usize = 25;

/// Zooming stops when the bracket is this narrow relative to the step.
const LINE_SEARCH_MIN_RELATIVE_WIDTH: f64 = 1e-10;

/// Largest move of any coordinate in one iteration (log space: a factor e^2 per step).
const STEP_MAX_COORDINATE: f64 = 2.0;

/// A coordinate this close to the limit at a failed stop counts as diverging.
const DIVERGENCE_MARGIN: f64 = 1.0;

/// An iteration that lowers the objective by less than this fraction of its value is at
/// the objective's own rounding (with a million terms, ~1e-13 of it): the quasi-Newton phase
/// ends and the Newton end game, which needs only the gradient, takes over.
const STALL_RELATIVE_DECREASE: f64 = 1e-12;

/// Newton steps of the end game (finite-difference Hessian, accepted on the gradient).
const POLISH_STEPS_MAX: usize = 8;

/// Step of the end game's finite-difference Hessian.
const POLISH_HESSIAN_STEP: f64 = 1e-4;

/// Limits and tolerances of one minimisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinimizeSettings {
    /// Converged when every gradient component is at most this.
    pub gradient_tolerance: f64,
    /// BFGS iterations before giving up.
    pub iterations_max: usize,
    /// Coordinates are confined to `[-limit, limit]`.
    pub coordinate_limit: f64,
}

/// A point where the gradient vanished.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Minimum<const D: usize> {
    pub point: [f64; D],
    pub value: f64,
    pub gradient: [f64; D],
    pub iterations: usize,
}

/// Why a minimisation found no minimum.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum MinimizeError {
    #[error("the objective is not finite at the start point")]
    NonFiniteStart,
    #[error(
        "coordinate {coordinate} ran to the limit ({value:.2}): the likelihood keeps \
         improving towards a boundary"
    )]
    Diverged { coordinate: usize, value: f64 },
    #[error(
        "no convergence after {iterations} iterations (largest gradient component \
         {gradient_max:.3e})"
    )]
    NotConverged {
        iterations: usize,
        gradient_max: f64,
    },
}

/// Minimises `objective` (value returned, gradient written) from `start`.
pub fn minimize<const D: usize, F>(
    mut objective: F,
    start: [f64; D],
    settings: &MinimizeSettings,
) -> Result<Minimum<D>, MinimizeError>
where
    F: FnMut(&[f64; D], &mut [f64; D]) -> f64,
{
    let limit = settings.coordinate_limit;
    let mut evaluate = |point: &[f64; D], gradient: &mut [f64; D]| -> f64 {
        if point.iter().any(|c| c.abs() > limit || !c.is_finite()) {
            return f64::INFINITY;
        }
        let value = objective(point, gradient);
        if value.is_finite() && gradient.iter().all(|g| g.is_finite()) {
            value
        } else {
            f64::INFINITY
        }
    };

    let mut point = start;
    let mut gradient = [0.0; D];
    let mut value = evaluate(&point, &mut gradient);
    if !value.is_finite() {
        return Err(MinimizeError::NonFiniteStart);
    }
    let tolerance = settings.gradient_tolerance;
    let mut inverse_hessian = identity::<D>();
    let mut fresh_hessian = true;
    let mut iterations = 0;
    while iterations < settings.iterations_max && max_abs(&gradient) > tolerance {
        iterations += 1;
        let mut direction = mat_vec(&inverse_hessian, &gradient).map(|c| -c);
        if dot(&direction, &gradient) >= 0.0 {
            inverse_hessian = identity::<D>();
            fresh_hessian = true;
            direction = gradient.map(|c| -c);
        }
        let longest = max_abs(&direction);
        let step_max = if longest > 0.0 {
            STEP_MAX_COORDINATE / longest
        } else {
            1.0
        };
        let Some(accepted) = line_search(
            &mut evaluate,
            &point,
            value,
            &gradient,
            &direction,
            step_max,
        ) else {
            if fresh_hessian {
                break;
            }
            // A stale curvature model can point badly; retry once along steepest descent.
            inverse_hessian = identity::<D>();
            fresh_hessian = true;
            continue;
        };
        let step: [f64; D] = std::array::from_fn(|i| accepted.point[i] - point[i]);
        let change: [f64; D] = std::array::from_fn(|i| accepted.gradient[i] - gradient[i]);
        let curvature = dot(&step, &change);
        if curvature > 1e-12 * dot(&step, &step).sqrt() * dot(&change, &change).sqrt() {
            if fresh_hessian {
                // Nocedal & Wright (6.20): scale the first matrix to the observed curvature.
                let scale = curvature / dot(&change, &change);
                inverse_hessian = identity::<D>().map(|row| row.map(|c| c * scale));
            }
            bfgs_update(&mut inverse_hessian, &step, &change, curvature);
            fresh_hessian = false;
        }
        let decrease = value - accepted.value;
        point = accepted.point;
        value = accepted.value;
        gradient = accepted.gradient;
        if decrease <= STALL_RELATIVE_DECREASE * value.abs() {
            break;
        }
    }

    // End game: when the line search can no longer see the objective decrease through its
    // rounding, Newton steps on the (accurate) analytic gradient still converge
    // quadratically. A step is kept only if it shrinks the gradient.
    let mut polish_steps = 0;
    while max_abs(&gradient) > tolerance && polish_steps < POLISH_STEPS_MAX {
        polish_steps += 1;
        let curvature = hessian(&mut evaluate, &point, POLISH_HESSIAN_STEP);
        let Some(newton) = solve_positive_definite(&curvature, &gradient) else {
            break;
        };
        let longest = max_abs(&newton);
        let shrink = if longest > STEP_MAX_COORDINATE {
            STEP_MAX_COORDINATE / longest
        } else {
            1.0
        };
        let trial: [f64; D] = std::array::from_fn(|i| point[i] - shrink * newton[i]);
        let mut trial_gradient = [0.0; D];
        let trial_value = evaluate(&trial, &mut trial_gradient);
        if !trial_value.is_finite() || max_abs(&trial_gradient) >= max_abs(&gradient) {
            break;
        }
        point = trial;
        value = trial_value;
        gradient = trial_gradient;
    }

    if max_abs(&gradient) <= tolerance {
        return Ok(Minimum {
            point,
            value,
            gradient,
            iterations: iterations + polish_steps,
        });
    }
    if let Some((coordinate, value)) = point
        .iter()
        .enumerate()
        .find(|(_, c)| c.abs() >= limit - DIVERGENCE_MARGIN)
    {
        return Err(MinimizeError::Diverged {
            coordinate,
            value: *value,
        });
    }
    Err(MinimizeError::NotConverged {
        iterations: iterations + polish_steps,
        gradient_max: max_abs(&gradient),
    })
}

/// The Hessian by central differences of the analytic gradient, symmetrised.
pub fn hessian<const D: usize, F>(mut gradient_at: F, point: &[f64; D], step: f64) -> [[f64; D]; D]
where
    F: FnMut(&[f64; D], &mut [f64; D]) -> f64,
{
    let mut columns = [[0.0; D]; D];
    for (j, column) in columns.iter_mut().enumerate() {
        let mut forward = *point;
        forward[j] += step;
        let mut backward = *point;
        backward[j] -= step;
        let mut gradient_forward = [0.0; D];
        let mut gradient_backward = [0.0; D];
        gradient_at(&forward, &mut gradient_forward);
        gradient_at(&backward, &mut gradient_backward);
        for i in 0..D {
            column[i] = (gradient_forward[i] - gradient_backward[i]) / (2.0 * step);
        }
    }
    std::array::from_fn(|i| std::array::from_fn(|j| 0.5 * (columns[j][i] + columns[i][j])))
}

/// The first coordinate along which `matrix` is not safely positive definite (Cholesky
/// pivot at most `relative_floor` times the largest diagonal entry), if any. A fitted
/// model whose Hessian fails this is not identified by the data.
pub fn flat_direction<const D: usize>(
    matrix: &[[f64; D]; D],
    relative_floor: f64,
) -> Option<usize> {
    let largest = matrix
        .iter()
        .enumerate()
        .map(|(i, row)| row[i].abs())
        .fold(0.0, f64::max);
    cholesky(matrix, relative_floor * largest).err()
}

/// The diagonal of the inverse of a positive definite `matrix` (through its Cholesky
/// factor), or `None` when it is not positive definite. With the Hessian of a total
/// negative log-likelihood this is the squared standard errors of the coordinates.
pub fn inverse_diagonal<const D: usize>(matrix: &[[f64; D]; D]) -> Option<[f64; D]> {
    let lower = cholesky(matrix, 0.0).ok()?;
    // A^-1 = L^-T L^-1; column c of L^-1 by forward substitution.
    let mut diagonal = [0.0; D];
    for (column, entry) in diagonal.iter_mut().enumerate() {
        let mut solution = [0.0; D];
        for i in column..D {
            let known: f64 = (column..i).map(|k| lower[i][k] * solution[k]).sum();
            let unit = if i == column { 1.0 } else { 0.0 };
            solution[i] = (unit - known) / lower[i][i];
        }
        // (A^-1)_cc is the squared norm of column c of L^-1, which is `solution`.
        *entry = solution.iter().map(|v| v * v).sum();
    }
    Some(diagonal)
}

/// `x` with `matrix x = rhs` for a positive definite `matrix`, or `None` when it is not.
fn solve_positive_definite<const D: usize>(
    matrix: &[[f64; D]; D],
    rhs: &[f64; D],
) -> Option<[f64; D]> {
    let lower = cholesky(matrix, 0.0).ok()?;
    let mut forward = [0.0; D];
    for i in 0..D {
        let known: f64 = (0..i).map(|k| lower[i][k] * forward[k]).sum();
        forward[i] = (rhs[i] - known) / lower[i][i];
    }
    let mut solution = [0.0; D];
    for i in (0..D).rev() {
        let known: f64 = (i + 1..D).map(|k| lower[k][i] * solution[k]).sum();
        solution[i] = (forward[i] - known) / lower[i][i];
    }
    Some(solution)
}

/// The lower Cholesky factor of a symmetric `matrix`, or the index of the first pivot that
/// is not above `floor`.
fn cholesky<const D: usize>(matrix: &[[f64; D]; D], floor: f64) -> Result<[[f64; D]; D], usize> {
    let mut lower = [[0.0; D]; D];
    for j in 0..D {
        let pivot = matrix[j][j] - (0..j).map(|k| lower[j][k] * lower[j][k]).sum::<f64>();
        // NaN fails `pivot > floor`, so it counts as not positive.
        if !pivot.is_finite() || pivot.partial_cmp(&floor) != Some(std::cmp::Ordering::Greater) {
            return Err(j);
        }
        lower[j][j] = pivot.sqrt();
        for i in j + 1..D {
            let off = matrix[i][j] - (0..j).map(|k| lower[i][k] * lower[j][k]).sum::<f64>();
            lower[i][j] = off / lower[j][j];
        }
    }
    Ok(lower)
}

/// A point accepted by the line search.
struct Accepted<const D: usize> {
    point: [f64; D],
    value: f64,
    gradient: [f64; D],
}

/// One trial along the search direction.
#[derive(Clone, Copy)]
struct Trial {
    step: f64,
    value: f64,
    slope: f64,
}

/// Strong-Wolfe line search (Nocedal & Wright, algorithms 3.5 and 3.6) along `direction`,
/// with steps at most `step_max`. Returns the best point satisfying sufficient decrease,
/// or `None` when no trial decreased the objective.
fn line_search<const D: usize, F>(
    evaluate: &mut F,
    point: &[f64; D],
    value: f64,
    gradient: &[f64; D],
    direction: &[f64; D],
    step_max: f64,
) -> Option<Accepted<D>>
where
    F: FnMut(&[f64; D], &mut [f64; D]) -> f64,
{
    let slope0 = dot(gradient, direction);
    let mut best: Option<Accepted<D>> = None;
    let mut try_step = |step: f64, best: &mut Option<Accepted<D>>| -> Trial {
        let trial_point: [f64; D] = std::array::from_fn(|i| point[i] + step * direction[i]);
        let mut trial_gradient = [0.0; D];
        let trial_value = evaluate(&trial_point, &mut trial_gradient);
        let slope = if trial_value.is_finite() {
            dot(&trial_gradient, direction)
        } else {
            f64::NAN
        };
        let sufficient = trial_value <= value + ARMIJO_SLOPE * step * slope0;
        let improves = match &best {
            Some(previous) => trial_value < previous.value,
            None => true,
        };
        if sufficient && improves {
            *best = Some(Accepted {
                point: trial_point,
                value: trial_value,
                gradient: trial_gradient,
            });
        }
        Trial {
            step,
            value: trial_value,
            slope,
        }
    };
    let wolfe = |trial: &Trial| {
        trial.value <= value + ARMIJO_SLOPE * trial.step * slope0
            && trial.slope.abs() <= -CURVATURE_SLOPE * slope0
    };

    let origin = Trial {
        step: 0.0,
        value,
        slope: slope0,
    };
    let mut previous = origin;
    let mut step = step_max.min(1.0);
    let mut evaluations = 0;
    let (mut low, mut high) = loop {
        let trial = try_step(step, &mut best);
        evaluations += 1;
        if !trial.value.is_finite()
            || trial.value > value + ARMIJO_SLOPE * step * slope0
            || (previous.step > 0.0 && trial.value >= previous.value)
        {
            break (previous, trial);
        }
        if wolfe(&trial) {
            return best;
        }
        if trial.slope >= 0.0 {
            break (trial, previous);
        }
        if step >= step_max || evaluations >= LINE_SEARCH_MAX_EVALUATIONS {
            return best;
        }
        previous = trial;
        step = (2.0 * step).min(step_max);
    };
    while evaluations < LINE_SEARCH_MAX_EVALUATIONS {
        let width = high.step - low.step;
        if width.abs() <= LINE_SEARCH_MIN_RELATIVE_WIDTH * low.step.abs().max(high.step.abs()) {
            break;
        }
        // Quadratic through low (value, slope) and high (value), kept inside the middle
        // 80% of the bracket; bisection when high is not finite.
        let mut candidate = low.step + 0.5 * width;
        if high.value.is_finite() && low.slope.is_finite() {
            let curvature = high.value - low.value - low.slope * width;
            if curvature > 0.0 {
                candidate = low.step - low.slope * width * width / (2.0 * curvature);
            }
        }
        let (near, far) = (low.step + 0.1 * width, low.step + 0.9 * width);
        let (lower, upper) = if near < far { (near, far) } else { (far, near) };
        let step = candidate.clamp(lower, upper);
        let trial = try_step(step, &mut best);
        evaluations += 1;
        if !trial.value.is_finite()
            || trial.value > value + ARMIJO_SLOPE * step * slope0
            || trial.value >= low.value
        {
            high = trial;
        } else {
            if wolfe(&trial) {
                return best;
            }
            if trial.slope * (high.step - low.step) >= 0.0 {
                high = low;
            }
            low = trial;
        }
    }
    best
}

/// `H <- (I - rho s y^T) H (I - rho y s^T) + rho s s^T` with `rho = 1 / (y . s)`.
fn bfgs_update<const D: usize>(
    inverse: &mut [[f64; D]; D],
    step: &[f64; D],
    change: &[f64; D],
    curvature: f64,
) {
    let rho = 1.0 / curvature;
    let h_y = mat_vec(inverse, change);
    let y_h_y = dot(change, &h_y);
    for i in 0..D {
        for j in 0..D {
            inverse[i][j] += rho
                * ((1.0 + rho * y_h_y) * step[i] * step[j] - h_y[i] * step[j] - step[i] * h_y[j]);
        }
    }
}

fn identity<const D: usize>() -> [[f64; D]; D] {
    std::array::from_fn(|i| std::array::from_fn(|j| if i == j { 1.0 } else { 0.0 }))
}

fn mat_vec<const D: usize>(matrix: &[[f64; D]; D], vector: &[f64; D]) -> [f64; D] {
    std::array::from_fn(|i| dot(&matrix[i], vector))
}

fn dot<const D: usize>(left: &[f64; D], right: &[f64; D]) -> f64 {
    left.iter().zip(right).map(|(l, r)| l * r).sum()
}

fn max_abs<const D: usize>(vector: &[f64; D]) -> f64 {
    vector.iter().fold(0.0, |m, c| m.max(c.abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: MinimizeSettings = MinimizeSettings {
        gradient_tolerance: 1e-10,
        iterations_max: 500,
        coordinate_limit: 30.0,
    };

    #[test]
    fn rosenbrock_valley_is_followed_to_its_minimum() {
        let rosenbrock = |p: &[f64; 2], g: &mut [f64; 2]| {
            let (x, y) = (p[0], p[1]);
            g[0] = -2.0 * (1.0 - x) - 400.0 * x * (y - x * x);
            g[1] = 200.0 * (y - x * x);
            (1.0 - x).powi(2) + 100.0 * (y - x * x).powi(2)
        };
        let minimum = minimize(rosenbrock, [-1.2, 1.0], &SETTINGS).expect("converges");
        assert!((minimum.point[0] - 1.0).abs() < 1e-8 && (minimum.point[1] - 1.0).abs() < 1e-8);
    }

    #[test]
    fn an_objective_improving_towards_infinity_is_reported_as_diverging() {
        // exp(-x) + y^2 has no minimum: x runs away.
        let runaway = |p: &[f64; 2], g: &mut [f64; 2]| {
            g[0] = -(-p[0]).exp();
            g[1] = 2.0 * p[1];
            (-p[0]).exp() + p[1] * p[1]
        };
        let settings = MinimizeSettings {
            gradient_tolerance: 1e-30,
            ..SETTINGS
        };
        assert!(matches!(
            minimize(runaway, [0.0, 1.0], &settings),
            Err(MinimizeError::Diverged { coordinate: 0, .. })
        ));
    }

    #[test]
    fn a_flat_direction_is_found_by_the_hessian_check() {
        let flat_in_y = |p: &[f64; 2], g: &mut [f64; 2]| {
            g[0] = 2.0 * p[0];
            g[1] = 0.0;
            p[0] * p[0]
        };
        let curvature = hessian(flat_in_y, &[0.0, 3.0], 1e-4);
        assert_eq!(flat_direction(&curvature, 1e-10), Some(1));
        let bowl = |p: &[f64; 2], g: &mut [f64; 2]| {
            g[0] = 2.0 * p[0];
            g[1] = 6.0 * p[1];
            p[0] * p[0] + 3.0 * p[1] * p[1]
        };
        assert_eq!(
            flat_direction(&hessian(bowl, &[1.0, 1.0], 1e-4), 1e-10),
            None
        );
    }
}
