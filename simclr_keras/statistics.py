"""Seed statistics of a study: mean, standard deviation, t intervals of a difference (Welch's for two
sets of runs, the paired one for two measurements of the same runs) and Holm's adjustment.

Plain Python (no scipy): the Student t quantile comes from its CDF, written with the regularised
incomplete beta function (continued fraction, evaluated by the modified Lentz method), inverted by
bisection. A study has a few seeds per variation, so the intervals are wide and must be exact in the
small degrees of freedom that Welch's approximation gives (often between 2 and 4, not an integer).
"""

import dataclasses
import math


def mean_and_std(values):
    """(mean, sample standard deviation with n - 1) of a non-empty sequence; the std of one value is nan."""
    values = [float(value) for value in values]
    if not values:
        raise ValueError("mean_and_std needs at least one value, received an empty sequence.")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, math.nan
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def _beta_continued_fraction(x, a, b, iterations=300, tolerance=1e-15):
    """The continued fraction of I_x(a, b) (its even and odd terms), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, iterations + 1):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < tolerance:
            break
    return result


def regularized_incomplete_beta(x, a, b, one_minus_x=None):
    """I_x(a, b) = B(x; a, b) / B(a, b) for x in [0, 1] and a, b > 0.

    `one_minus_x`, when given, is 1 - x computed without cancellation (x near 1 loses it).
    """
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], received x={x}.")
    complement = 1.0 - x if one_minus_x is None else one_minus_x
    if x == 0.0 or complement == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(complement)
    # The fraction converges fast below the mean a / (a + b); above it, use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(complement, b, a) / b


def student_t_cdf(t, degrees_of_freedom):
    """P(T <= t) for Student's t with `degrees_of_freedom` > 0 (any real number; math.inf: the normal)."""
    if not degrees_of_freedom > 0:
        raise ValueError(f"degrees_of_freedom must be > 0, received degrees_of_freedom={degrees_of_freedom}.")
    if math.isinf(degrees_of_freedom):
        return 0.5 * math.erfc(-t / math.sqrt(2.0))
    # P(|T| > |t|) = I_{v / (v + t^2)}(v / 2, 1 / 2).
    denominator = degrees_of_freedom + t * t
    two_sided_tail = regularized_incomplete_beta(
        degrees_of_freedom / denominator, degrees_of_freedom / 2, 0.5, one_minus_x=t * t / denominator
    )
    return 1.0 - 0.5 * two_sided_tail if t >= 0 else 0.5 * two_sided_tail


def student_t_quantile(probability, degrees_of_freedom):
    """The t with P(T <= t) = probability, for probability in (0, 1); math.inf degrees: the normal's."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), received probability={probability}.")
    if probability < 0.5:
        return -student_t_quantile(1.0 - probability, degrees_of_freedom)
    low, high = 0.0, 1.0
    while student_t_cdf(high, degrees_of_freedom) < probability:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection to float precision
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, degrees_of_freedom) < probability:
            low = middle
        else:
            high = middle
        if high - low <= 1e-14 * high:
            break
    return 0.5 * (low + high)


@dataclasses.dataclass(frozen=True)
class Interval:
    """A difference of two means with its confidence interval [low, high], the t statistic's degrees
    of freedom, and the two-sided p-value of "no difference" (for multiple-comparison adjustments)."""

    difference: float
    low: float
    high: float
    degrees_of_freedom: float
    p_value: float


def _t_interval(difference, standard_error, degrees_of_freedom, confidence):
    """The Interval difference +- t_{(1 + confidence) / 2, df} x standard_error; zero width without spread."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), received confidence={confidence}.")
    if standard_error == 0.0:
        return Interval(difference, difference, difference, math.inf, 1.0 if difference == 0.0 else 0.0)
    half_width = student_t_quantile(0.5 + confidence / 2, degrees_of_freedom) * standard_error
    # Two-sided: P(|T| >= |t|) = 2 P(T <= -|t|).
    p_value = 2.0 * student_t_cdf(-abs(difference) / standard_error, degrees_of_freedom)
    return Interval(difference, difference - half_width, difference + half_width, degrees_of_freedom, p_value)


def welch_interval(values, baseline_values, confidence=0.95):
    """Welch's t interval of mean(values) - mean(baseline_values) (unequal variances).

    The standard error is sqrt(s_a^2 / n_a + s_b^2 / n_b), the degrees of freedom those of
    Welch-Satterthwaite, and the half-width t_{(1 + confidence) / 2, df} times the standard error.
    Two sets without any spread give the zero-width interval at their difference.

    Raises ValueError when either side has fewer than two values (no spread to estimate).
    """
    if len(values) < 2 or len(baseline_values) < 2:
        raise ValueError(
            f"Welch's interval needs at least two values on each side, received {len(values)} and {len(baseline_values)}."
        )
    mean_a, std_a = mean_and_std(values)
    mean_b, std_b = mean_and_std(baseline_values)
    share_a, share_b = std_a**2 / len(values), std_b**2 / len(baseline_values)  # squared standard errors
    if share_a + share_b == 0.0:
        return _t_interval(mean_a - mean_b, 0.0, math.inf, confidence)
    degrees = (share_a + share_b) ** 2 / (share_a**2 / (len(values) - 1) + share_b**2 / (len(baseline_values) - 1))
    return _t_interval(mean_a - mean_b, math.sqrt(share_a + share_b), degrees, confidence)


def paired_interval(values, baseline_values, confidence=0.95):
    """The paired t interval of mean(values - baseline_values), pair i being two measurements of one run.

    With d_i = values[i] - baseline_values[i] over n pairs: mean(d) +- t_{(1 + confidence) / 2, n - 1}
    x s_d / sqrt(n). Narrower than Welch's when the two measurements share the run's luck (the same
    encoder evaluated two ways): the seed-to-seed spread cancels in d.

    Raises ValueError for fewer than two pairs or sequences of different lengths.
    """
    if len(values) != len(baseline_values):
        raise ValueError(
            f"a paired interval needs one baseline value per value, received {len(values)} and {len(baseline_values)}."
        )
    if len(values) < 2:
        raise ValueError(f"a paired interval needs at least two pairs, received {len(values)}.")
    mean, std = mean_and_std([float(a) - float(b) for a, b in zip(values, baseline_values)])
    return _t_interval(mean, std / math.sqrt(len(values)), len(values) - 1, confidence)


def holm_adjusted_p_values(p_values):
    """Holm's step-down adjusted p-values, in the order given (Holm, Scand. J. Statist. 6, 1979).

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the j-th adjusted one is
    max over i <= j of min(1, (m - i + 1) p_(i)); a hypothesis is rejected at family-wise error
    alpha when its adjusted p-value is <= alpha.
    """
    order = sorted(range(len(p_values)), key=lambda index: p_values[index])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
