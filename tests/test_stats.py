import math

import numpy as np
import pytest

from augment.stats import paired_difference, summarize


def test_summarize_known_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0
    # t(0.975, df=2) = 4.302653; half-width = 4.302653 / sqrt(3)
    assert s["ci_low"] == pytest.approx(2 - 2.484138, abs=1e-5)
    assert s["ci_high"] == pytest.approx(2 + 2.484138, abs=1e-5)


def test_single_value_has_no_interval():
    s = summarize([0.5])
    assert s["std"] == 0.0 and math.isnan(s["ci_low"])


def test_paired_difference_on_fixed_numbers():
    a = [0.90, 0.92, 0.91, 0.93, 0.94]
    b = [0.88, 0.89, 0.90, 0.90, 0.91]
    d = paired_difference(a, b)
    diffs = np.array(a) - np.array(b)  # 0.02 0.03 0.01 0.03 0.03
    assert d["mean"] == pytest.approx(0.024)
    assert d["std"] == pytest.approx(diffs.std(ddof=1))
    half = 2.776445 * diffs.std(ddof=1) / math.sqrt(5)  # t(0.975, df=4)
    assert d["ci_low"] == pytest.approx(0.024 - half, abs=1e-6)
    assert d["verdict"] == "significant gain"
    from scipy.stats import ttest_rel
    assert d["p_value"] == pytest.approx(ttest_rel(a, b).pvalue)


def test_interval_containing_zero_says_no_gain():
    d = paired_difference([0.9, 0.8, 0.95], [0.85, 0.85, 0.9])
    assert d["ci_low"] < 0 < d["ci_high"]
    assert d["verdict"] == "no significant gain"
    assert paired_difference([0.1, 0.2, 0.1], [0.3, 0.35, 0.32])["verdict"] == "significant loss"


def test_unequal_lengths_rejected():
    with pytest.raises(ValueError, match="unequal"):
        paired_difference([1, 2], [1])
