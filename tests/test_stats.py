"""stats.py: the Wilson score interval against its formula and published values, McNemar's exact test against
the binomial it is."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import stats

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_by_hand(correct, n, z=Z95):
    p = correct / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return 100 * (centre - half), 100 * (centre + half)


def test_wilson_interval_matches_the_formula_and_published_values():
    low, high = stats.wilson_interval(264, 300)  # 88% of the report's 300 val images
    assert (low, high) == pytest.approx(wilson_by_hand(264, 300), abs=1e-9)
    assert (round(low, 2), round(high, 2)) == (83.83, 91.20)
    assert round((high - low) / 2, 1) == 3.7
    # Newcombe (1998), Statistics in Medicine 17, table I: 81/263 -> 0.2553-0.3662, 15/148 -> 0.0624-0.1605
    assert stats.wilson_interval(81, 263) == pytest.approx((25.53, 36.62), abs=0.005)
    assert stats.wilson_interval(15, 148) == pytest.approx((6.24, 16.05), abs=0.005)
    assert stats.wilson_interval(264, 300, confidence=0.99) == pytest.approx(wilson_by_hand(264, 300, 2.5758293035489),
                                                                             abs=1e-9)


def test_wilson_interval_edges_stay_within_0_and_100():
    assert stats.wilson_interval(0, 300) == (0.0, pytest.approx(wilson_by_hand(0, 300)[1]))
    assert stats.wilson_interval(300, 300) == (pytest.approx(wilson_by_hand(300, 300)[0]), 100.0)
    assert stats.wilson_interval(0, 10)[1] == pytest.approx(27.75, abs=0.005)  # Newcombe (1998): 0/10
    for n in (1, 2, 7, 300):
        for correct in range(n + 1):
            low, high = stats.wilson_interval(correct, n)
            assert 0 <= low <= 100 * correct / n <= high <= 100 and low < high
    for correct, n in ((-1, 10), (11, 10), (0, 0)):
        with pytest.raises(ValueError, match="0 <= correct <= n"):
            stats.wilson_interval(correct, n)


def test_accuracy_helpers_recover_the_count():
    assert stats.accuracy_interval(100 * 264 / 300, 300) == stats.wilson_interval(264, 300)
    fields = stats.accuracy_fields("val_acc", 264, 300)
    assert fields == {"val_acc": 88.0, "val_acc_low": stats.wilson_interval(264, 300)[0],
                      "val_acc_high": stats.wilson_interval(264, 300)[1]}
    assert stats.accuracy_text(fields["val_acc"], fields["val_acc_low"], fields["val_acc_high"]) == "88.00 [83.8, 91.2]"


def test_mcnemar_is_the_exact_binomial_of_the_discordant_pairs():
    assert stats.mcnemar_exact(1, 6) == stats.mcnemar_exact(6, 1) == 0.125  # 2 * (1 + 7) / 2^7
    assert stats.mcnemar_exact(0, 0) == 1.0  # no discordant pair: nothing to tell them apart
    assert stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(0, 5) == 2 / 32
    # exact far beyond float range of the binomial coefficients and of 2^n
    assert stats.mcnemar_exact(0, 1000) == 2.0 ** -999
    tail = sum(math.comb(2100, k) for k in range(1001))
    assert stats.mcnemar_exact(1000, 1100) == float(Fraction(2 * tail, 2 ** 2100))
    assert 0.03 < stats.mcnemar_exact(1000, 1100) < 0.031


def test_mcnemar_of_per_image_correctness():
    # 6 images only a gets right, 1 only b, 3 both, 2 neither
    a = [True] * 6 + [False] + [True] * 3 + [False] * 2
    b = [False] * 6 + [True] + [True] * 3 + [False] * 2
    assert stats.discordant_pairs(a, b) == (6, 1) and stats.discordant_pairs(b, a) == (1, 6)
    assert stats.mcnemar(a, b) == stats.mcnemar(torch.tensor(b), np.array(a)) == 0.125
    assert stats.mcnemar(a, a) == 1.0
    with pytest.raises(ValueError, match="same images"):
        stats.mcnemar(a, b[:-1])


def test_paired_text_says_when_it_is_noise():
    assert stats.paired_text("the ensemble", "resnext", 6, 1, 0.125) == (
        "the ensemble is right on 6 images resnext gets wrong and wrong on 1 it gets right (McNemar exact "
        "p = 0.125): within noise")
    assert stats.paired_text("a", "b", 1, 12, stats.mcnemar_exact(1, 12)).endswith(
        "(McNemar exact p = 0.00342): a difference beyond noise (p < 0.05)")
