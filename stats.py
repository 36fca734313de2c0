"""How sure an accuracy is: the Wilson score interval of one accuracy, and McNemar's exact test for two
models scored on the same images.

On 300 val images the 95% interval around 88% is about +-3.7 points, so single figures such as 86.00,
87.33 and 89.00 cannot be told apart by their intervals alone; on the same images a paired test sees more,
as it counts only the images where the two models disagree.
"""
import math
from statistics import NormalDist

import numpy as np


def wilson_interval(correct, n, confidence=0.95):
    """(low, high) in percent: the Wilson score interval (no continuity correction) of `correct` right out
    of `n`. Unlike p +- z * sqrt(p(1-p)/n) it stays inside [0, 100] and is not empty at 0/n or n/n."""
    if n < 1 or not 0 <= correct <= n:
        raise ValueError(f"wilson_interval needs 0 <= correct <= n and n >= 1, got {correct}/{n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be between 0 and 1")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # the bounds are exactly 0 at 0/n and 100 at n/n, where the formula leaves a rounding error
    low = 0.0 if correct == 0 else max(0.0, 100 * (centre - half))
    high = 100.0 if correct == n else min(100.0, 100 * (centre + half))
    return low, high


def accuracy_interval(acc, n, confidence=0.95):
    """The Wilson interval of an accuracy (%) measured on n images: acc is 100 * correct / n, so the count
    of right images is recovered exactly by rounding."""
    return wilson_interval(round(acc * n / 100), n, confidence)


def accuracy_fields(key, correct, n):
    """{key: accuracy (%), key_low, key_high: its 95% Wilson interval}, as history.csv and metrics.json
    hold them."""
    low, high = wilson_interval(correct, n)
    return {key: 100 * correct / n, f"{key}_low": low, f"{key}_high": high}


def interval_text(low, high):
    return f"[{low:.1f}, {high:.1f}]"


def accuracy_text(acc, low, high):
    """'87.33 [83.1, 90.6]': an accuracy (%) and its interval, as every script prints them."""
    return f"{acc:.2f} {interval_text(low, high)}"


def discordant_pairs(a_correct, b_correct):
    """(images a gets right and b wrong, images b gets right and a wrong), from two boolean per-image
    arrays (numpy, torch or lists) over the same images in the same order."""
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"discordant_pairs needs two 1-D arrays over the same images, got {a.shape} and {b.shape}")
    return int((a & ~b).sum()), int((b & ~a).sum())


def mcnemar_exact(a_only, b_only):
    """Two-sided p-value of McNemar's exact test: under 'both models are equally good' each of the
    a_only + b_only discordant images goes either way with probability 1/2, so the smaller count is a
    binomial tail. Computed in integers (the tail's binomial coefficients, divided by 2^n once): exact for
    any n, with no float overflow or underflow before the last division."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact: C(n, i) * (n - i) is divisible by i + 1
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(a_correct, b_correct):
    """McNemar's exact p-value for two models' boolean per-image correctness over the same images."""
    return mcnemar_exact(*discordant_pairs(a_correct, b_correct))


def paired_text(a, b, a_only, b_only, p):
    """The comparison in words: '{a} is right on X images {b} gets wrong and wrong on Y it gets right
    (McNemar exact p = ...): within noise' (p >= 0.05) or '...: a difference beyond noise (p < 0.05)'."""
    verdict = "within noise" if p >= 0.05 else "a difference beyond noise (p < 0.05)"
    return (f"{a} is right on {a_only} image{'s' * (a_only != 1)} {b} gets wrong and wrong on {b_only} it gets "
            f"right (McNemar exact p = {p:.3g}): {verdict}")
