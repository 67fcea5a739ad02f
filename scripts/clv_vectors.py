#!/usr/bin/env python3
"""Independent high-precision reference values for the customer-value models.

Writes JSON to stdout; the committed copy is actors/tests/data/clv_vectors.json, checked by
actors/tests/clv_vectors.rs:

    python3 scripts/clv_vectors.py > actors/tests/data/clv_vectors.json

Every value is computed with mpmath straight from the textbook formulas (Fader, Hardie &
Lee 2005 for BG/NBD, the Gamma-Gamma note of Fader & Hardie 2013), including the Gauss
hypergeometric 2F1 as mpmath.hyp2f1 -- none of the transformations the Rust code uses.
Each value is computed at two working precisions (WORKING_DIGITS and CHECK_DIGITS) and the
script fails if they disagree beyond AGREEMENT, so a printed value is correct to far more
than the 17 significant digits written.

The cases include the extremes: x = 0, x = 2000 with t_x close to (and equal to) T,
T == t_x, a = 0.999 and a = 1.0001, a + b < 1 (the 2F1's c below 0 for x = 0), tiny and
huge alpha, large r, horizons from one period to far beyond alpha + T.
"""

import json
import sys

import mpmath

WORKING_DIGITS = 50
CHECK_DIGITS = 80
AGREEMENT = mpmath.mpf("1e-30")

# BG/NBD parameter sets: (label, r, alpha, a, b).
BGNBD_PARAMS = [
    ("cdnow_weeks", "0.243", "4.414", "0.793", "2.426"),
    ("a_just_below_one", "1.5", "10", "0.999", "3"),
    ("a_just_above_one", "0.5", "2.5", "1.0001", "0.8"),
    ("a_plus_b_below_one", "0.8", "3", "0.3", "0.4"),
    ("tiny_alpha", "0.3", "0.001", "0.6", "1.2"),
    ("huge_alpha_large_r", "50", "10000", "2.5", "8"),
    ("large_r", "30", "5", "0.79", "2.43"),
    ("cdnow_days", "0.243", "30.898", "0.793", "2.426"),
]

# Customers: (x, t_x, T).
CUSTOMERS = [
    (0, "0", "0"),
    (0, "0", "38.86"),
    (1, "1.71", "38.86"),
    (2, "30.43", "38.86"),
    (7, "29.43", "38.86"),
    (12, "35", "35"),
    (3, "0.5", "0.5"),
    (50, "10", "100"),
    (2000, "30", "30.1"),
    (2000, "30", "30"),
]

# Horizons t for the expectations.
HORIZONS = ["1", "52", "1000"]

# Gamma-Gamma parameter sets: (label, p, q, gamma) and customers (x, mean spend).
GAMMA_GAMMA_PARAMS = [
    ("cdnow", "6.25", "3.74", "15.44"),
    ("spread_out", "0.5", "1.5", "100"),
    ("tight", "50", "20", "0.3"),
]
SPEND_CUSTOMERS = [(1, "20"), (3, "35.5"), (12, "0.01"), (1, "100000"), (2000, "41.3")]

# CLV cases: (bgnbd label, gamma-gamma label, x, t_x, T, mean spend, horizon, discount).
CLV_CASES = [
    ("cdnow_weeks", "cdnow", 2, "30.43", "38.86", "35.5", 52, "0.01"),
    ("cdnow_weeks", "cdnow", 0, "0", "38.86", "0", 52, "0.01"),
    ("cdnow_weeks", "cdnow", 7, "29.43", "38.86", "20", 52, "0"),
    ("cdnow_weeks", "cdnow", 2000, "30", "30.1", "41.3", 52, "0.02"),
    ("tiny_alpha", "cdnow", 3, "0.5", "0.5", "12", 52, "0.01"),
    ("a_just_below_one", "spread_out", 1, "5", "20", "60", 104, "0.005"),
    ("cdnow_days", "cdnow", 9, "200", "250", "30", 365, "0.0003"),
    ("cdnow_days", "cdnow", 50, "240", "250", "30", 365, "0.0003"),
    ("cdnow_days", "cdnow", 0, "0", "2", "0", 365, "0.0003"),
]


def mp(text):
    return mpmath.mpf(text)


def bgnbd_log_likelihood(r, alpha, a, b, x, t_x, T):
    """ln of the BG/NBD likelihood (Fader, Hardie & Lee 2005, eq. 6)."""
    beta = mpmath.beta
    common = mpmath.gamma(r + x) * alpha**r / mpmath.gamma(r)
    alive = beta(a, b + x) / beta(a, b) * common / (alpha + T) ** (r + x)
    dropped = 0
    if x > 0:
        dropped = beta(a + 1, b + x - 1) / beta(a, b) * common / (alpha + t_x) ** (r + x)
    return mpmath.log(alive + dropped)


def bgnbd_p_alive(r, alpha, a, b, x, t_x, T):
    if x == 0:
        return mpmath.mpf(1)
    odds = a / (b + x - 1) * ((alpha + T) / (alpha + t_x)) ** (r + x)
    return 1 / (1 + odds)


def bgnbd_conditional(r, alpha, a, b, x, t_x, T, t):
    """E[Y(t) | x, t_x, T] (eq. 10), with mpmath's 2F1."""
    if t == 0:
        return mpmath.mpf(0)
    c = a + b + x - 1
    z = t / (alpha + T + t)
    hyp = mpmath.hyp2f1(r + x, b + x, c, z)
    while_alive = c / (a - 1) * (1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp)
    return bgnbd_p_alive(r, alpha, a, b, x, t_x, T) * while_alive


def bgnbd_population(r, alpha, a, b, t):
    """E[X(t)] (eq. 9)."""
    c = a + b - 1
    hyp = mpmath.hyp2f1(r, b, c, t / (alpha + t))
    return c / (a - 1) * (1 - (alpha / (alpha + t)) ** r * hyp)


def gamma_gamma_log_likelihood(p, q, gamma, x, m):
    lg = mpmath.loggamma
    return (
        lg(p * x + q) - lg(p * x) - lg(q) + q * mpmath.log(gamma) + (p * x - 1) * mpmath.log(m)
        + p * x * mpmath.log(x) - (p * x + q) * mpmath.log(gamma + m * x)
    )


def gamma_gamma_expected_spend(p, q, gamma, x, m):
    return p * (gamma + m * x) / (p * x + q - 1)


def clv(bgnbd, gg, x, t_x, T, m, horizon, discount):
    """spend * sum_{i=1..N} (E(i) - E(i-1)) / (1 + d)^i."""
    r, alpha, a, b = bgnbd
    spend = gamma_gamma_expected_spend(*gg, x, m)
    total = mpmath.mpf(0)
    previous = mpmath.mpf(0)
    for period in range(1, horizon + 1):
        current = bgnbd_conditional(r, alpha, a, b, x, t_x, T, mpmath.mpf(period))
        total += (current - previous) / (1 + discount) ** period
        previous = current
    return spend * total


def at_two_precisions(compute):
    """compute() at WORKING_DIGITS, verified at CHECK_DIGITS; returned as a float."""
    with mpmath.workdps(WORKING_DIGITS):
        value = compute()
    with mpmath.workdps(CHECK_DIGITS):
        check = compute()
    scale = max(abs(check), mpmath.mpf("1e-300"))
    if abs(value - check) > AGREEMENT * scale:
        raise SystemExit(f"precision check failed: {value} vs {check}")
    return float(check)


def main():
    bgnbd_sets = {label: values for label, *values in BGNBD_PARAMS}
    gg_sets = {label: values for label, *values in GAMMA_GAMMA_PARAMS}
    out = {
        "generated_by": "scripts/clv_vectors.py",
        "mpmath_version": mpmath.__version__,
        "digits": WORKING_DIGITS,
        "bgnbd": [],
        "gamma_gamma": [],
        "clv": [],
    }
    for label, *texts in BGNBD_PARAMS:
        params = lambda: [mp(v) for v in texts]  # noqa: E731 (re-read at each precision)
        entry = {
            "label": label,
            "params": dict(zip(["r", "alpha", "a", "b"], (float(v) for v in texts))),
            "customers": [],
            "population": [],
        }
        for x, t_x, T in CUSTOMERS:
            customer = {"x": x, "t_x": float(t_x), "T": float(T)}
            customer["log_likelihood"] = at_two_precisions(
                lambda: bgnbd_log_likelihood(*params(), x, mp(t_x), mp(T))
            )
            customer["p_alive"] = at_two_precisions(lambda: bgnbd_p_alive(*params(), x, mp(t_x), mp(T)))
            customer["expected_purchases"] = [
                {
                    "t": float(t),
                    "value": at_two_precisions(
                        lambda: bgnbd_conditional(*params(), x, mp(t_x), mp(T), mp(t))
                    ),
                }
                for t in HORIZONS
            ]
            entry["customers"].append(customer)
        for t in HORIZONS:
            entry["population"].append(
                {"t": float(t), "value": at_two_precisions(lambda: bgnbd_population(*params(), mp(t)))}
            )
        out["bgnbd"].append(entry)
    for label, *texts in GAMMA_GAMMA_PARAMS:
        params = lambda: [mp(v) for v in texts]  # noqa: E731
        entry = {"label": label, "params": dict(zip(["p", "q", "gamma"], (float(v) for v in texts))), "customers": []}
        for x, m in SPEND_CUSTOMERS:
            entry["customers"].append(
                {
                    "x": x,
                    "mean_spend": float(m),
                    "log_likelihood": at_two_precisions(lambda: gamma_gamma_log_likelihood(*params(), x, mp(m))),
                    "expected_spend": at_two_precisions(lambda: gamma_gamma_expected_spend(*params(), x, mp(m))),
                }
            )
        out["gamma_gamma"].append(entry)
    for bgnbd_label, gg_label, x, t_x, T, m, horizon, discount in CLV_CASES:
        value = at_two_precisions(
            lambda: clv(
                [mp(v) for v in bgnbd_sets[bgnbd_label]],
                [mp(v) for v in gg_sets[gg_label]],
                x,
                mp(t_x),
                mp(T),
                mp(m),
                horizon,
                mp(discount),
            )
        )
        out["clv"].append(
            {
                "bgnbd": bgnbd_label,
                "gamma_gamma": gg_label,
                "x": x,
                "t_x": float(t_x),
                "T": float(T),
                "mean_spend": float(m),
                "horizon": horizon,
                "discount_rate": float(discount),
                "clv": value,
            }
        )
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
