"""metrics.contrast: two-sample and seed-level contrasts, the censoring bound rule, Holm and the symmetric overall
verdict, with expectations worked out by hand (in the comments) or by an independent route (scipy's tests)."""
import math

import numpy as np
import pytest
from scipy import stats

from unlearnbench.metrics.contrast import holm, over_seeds, overall_verdict, two_sample, variance_components


def test_two_sample_is_welch_with_hsu_degrees_of_freedom():
    # ref 1, 2, 3.5: mean 13/6, var 1.58333 -> /3 = 0.527778; other 3, 4, 5.5, 7: mean 4.875, var 3.0625 -> /4 =
    # 0.765625; se = sqrt(1.293403) = 1.137279; Hsu df = min(3, 4) - 1 = 2
    a, b = [1.0, 2.0, 3.5], [3.0, 4.0, 5.5, 7.0]
    r = two_sample(a, b)
    se = math.sqrt(19 / 36 + 0.765625)
    assert r["effect"] == pytest.approx(4.875 - 13 / 6) and r["se"] == pytest.approx(se) and r["df"] == 2
    # the statistic is scipy's Welch statistic; only the degrees of freedom differ
    assert r["effect"] / r["se"] == pytest.approx(stats.ttest_ind(b, a, equal_var=False).statistic)
    half = 4.302652729911275 * se  # t(0.975, 2)
    assert (r["lo"], r["hi"]) == pytest.approx((r["effect"] - half, r["effect"] + half))
    assert r["p"] == pytest.approx(2 * stats.t.sf(r["effect"] / se, 2))
    assert r["direction"] is None and r["n_unit"] == "groups" and (r["n_ref"], r["n_other"]) == (3, 4)


def test_over_seeds_uses_the_seed_as_the_unit():
    # the case: seeds with values 10, 10.1, 9.9 and 20, 20.1, 19.9 (reference 0): seed contrasts 10 and 20,
    # mean 15, sd sqrt(50), se 5, t(0.975, 1) = 12.7062 -> [-48.53, 78.53] (pooling the 6 values gave [9.25, 20.75])
    r = over_seeds([([0.0] * 3, [10.0, 10.1, 9.9], None, None), ([0.0] * 3, [20.0, 20.1, 19.9], None, None)])
    assert (r["effect"], r["se"], r["df"], r["n"], r["n_unit"]) == pytest.approx((15.0, 5.0, 1.0, 2, "seeds"))
    assert (r["lo"], r["hi"]) == pytest.approx((15 - 12.706204736 * 5, 15 + 12.706204736 * 5))
    assert r["lo"] == pytest.approx(-48.531, abs=1e-3) and r["hi"] == pytest.approx(78.531, abs=1e-3)
    ref = stats.ttest_1samp([10.0, 20.0], 0.0)
    assert r["p"] == pytest.approx(ref.pvalue)


def test_a_seed_without_both_sides_is_left_out_and_counted():
    r = over_seeds([([0.0], [1.0], None, None), ([], [5.0], None, None), ([0.0], [1.2], None, None),
                    ([0.0, 0.2], [1.5], None, None)])
    # seed contrasts 1.0, 1.2, 1.4 (the second seed has no reference group)
    assert r["seed_effects"] == pytest.approx([1.0, 1.2, 1.4]) and r["seeds_without_both_sides"] == 1
    assert r["n"] == 3 and r["effect"] == pytest.approx(1.2)


def test_identical_values_are_never_evidence():
    # [2, 2, 2]: three identical seed contrasts (or identical groups on each side) give a zero-width interval
    r = over_seeds([([0.0], [2.0], None, None)] * 3)
    assert r["p"] is None and r["lo"] is None and "no spread" in r["reason"] and r["effect"] == 2.0
    r = two_sample([1.0, 1.0, 1.0], [3.0, 3.0, 3.0])
    assert r["p"] is None and r["direction"] is None and "no spread" in r["reason"]


def test_too_few_groups_on_a_side_is_no_interval():
    r = two_sample([1.0], [2.0, 3.0, 4.0])
    assert r["p"] is None and r["reason"] == "fewer than 2 usable groups on a side"


def test_censored_reference_leaves_the_upward_direction_untested():
    # the case in two-sample form: ID 10, 10, 10, 10 steps and one ID request censored at 100; OOD 13, 13.2,
    # 13.4, 13.6 and 99.9. Read as a pair difference it said "reproduced"; the censored ID request needed more than
    # 100 steps (had it needed 600, OOD would be much faster), so "OOD slower" has no bound: lo = -inf
    ref = np.log1p([10, 10, 10, 10, 100.0])
    other = np.log1p([13.0, 13.2, 13.4, 13.6, 99.9])
    r = two_sample(ref, other, [0, 0, 0, 0, 1], None)
    assert r["lo"] == -math.inf and r["p_up"] == 1.0 and r["untested"] == "up" and r["direction"] is None
    se = math.sqrt(ref.var(ddof=1) / 5 + other.var(ddof=1) / 5)
    effect = other.mean() - ref.mean()
    assert r["hi"] == pytest.approx(effect + stats.t.ppf(0.975, 4) * se)
    assert effect > 0 and r["p"] == min(1.0, 2 * stats.t.cdf(effect / se, 4)) == 1.0  # OOD a hair slower
    assert (r["n_bound_ref"], r["n_bound_other"]) == (1, 0)


def test_censored_other_side_is_a_lower_bound_for_the_upward_direction():
    # OOD 40, 45 and censored at 100 (needed > 100) against ID 3, 3.5, 4: "OOD slower" is tested with 100 as the
    # value (an understatement), "OOD faster" is not (its end is +inf)
    ref, other = np.log1p([3.0, 3.5, 4.0]), np.log1p([40.0, 45.0, 100.0])
    r = two_sample(ref, other, None, [0, 0, 1])
    assert r["hi"] == math.inf and r["untested"] == "down" and r["direction"] == "up"
    assert r["p"] == pytest.approx(2 * stats.t.sf(r["effect"] / r["se"], 2))
    both = two_sample(ref, other, [0, 1, 0], [0, 0, 1])
    assert both["p"] is None and "both sides" in both["reason"]


def test_a_censored_reference_in_any_seed_leaves_the_upward_direction_untested():
    fast = ([0.0, 0.1], [2.0, 2.1], None, None)
    r = over_seeds([fast, fast, ([0.0, 3.0], [2.2, 2.0], [0, 1], None)])
    assert r["untested"] == "up" and r["lo"] == -math.inf and r["n_bound_ref"] == 1


def test_holm_by_hand():
    # sorted: d .005, a .01, c .03, b .04 (m = 4): 4 x .005 = .02; max(.02, 3 x .01) = .03; max(.03, 2 x .03) = .06;
    # max(.06, 1 x .04) = .06 -> d and a rejected at .05; e has no p-value and is not in the family
    r = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005, "e": None})
    assert {k: v["p_holm"] for k, v in r.items()} == pytest.approx(
        {"a": 0.03, "b": 0.06, "c": 0.06, "d": 0.02, "e": None})
    assert [k for k, v in r.items() if v["reject"]] == ["a", "d"]
    # adjusted p-values never exceed 1
    assert holm({"x": 0.6, "y": 0.7})["x"]["p_holm"] == 1.0


@pytest.mark.parametrize("cells, informative, verdict", [
    ({"a": "up", "b": "up"}, ["a", "b"], "reproduced"),
    ({"a": "up", "b": None}, ["a", "b"], "partly reproduced"),
    ({"a": "down", "b": "down"}, ["a", "b"], "reversed"),
    ({"a": "down", "b": None}, ["a", "b"], "partly reversed"),  # the old rule called this "not reproduced"
    ({"a": "up", "b": "down"}, ["a", "b"], "mixed"),  # the old rule: "partly reproduced"
    ({"a": None, "b": None}, ["a", "b"], "not reproduced"),
    ({"a": "up", "b": None}, ["a"], "reproduced"),  # b had no usable requests: not in the family
    ({}, [], "inconclusive"),
])
def test_overall_verdict_counts_reversals_like_reproductions(cells, informative, verdict):
    assert overall_verdict(cells, informative)["verdict"] == verdict


def test_overall_verdict_names_the_cells_and_directions():
    o = overall_verdict({"r4 canary": "up", "r16 canary": "down"}, ["r4 canary", "r16 canary"])
    assert o["detail"] == "reproduced in r4 canary; reversed in r16 canary"
    names = ("OOD recovers more", "ID recovers more")
    two = overall_verdict({"a": "down", "b": "down"}, ["a", "b"], two_sided_claim=True, names=names)
    assert two["verdict"] == "reproduced" and two["direction"] == "ID recovers more"
    part = overall_verdict({"a": "up", "b": None}, ["a", "b"], two_sided_claim=True, names=names)
    assert part["verdict"] == "partly reproduced" and part["direction"] == "OOD recovers more"
    mixed = overall_verdict({"a": "up", "b": "down"}, ["a", "b"], two_sided_claim=True, names=names)
    assert mixed["verdict"] == "mixed" and mixed["detail"] == "OOD recovers more in a; ID recovers more in b"


def test_variance_components_by_hand():
    # seeds [1, 2, 3] and [4, 5, 6]: group variance 1 in each; seed means 2 and 5, their variance 4.5, minus what
    # the group variance explains (1 / 3): 4.1667; seed share 4.1667 / 5.1667
    r = variance_components([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert r["within_seed_group_var"] == pytest.approx(1.0) and r["between_seed_var"] == pytest.approx(4.5 - 1 / 3)
    assert r["seed_share"] == pytest.approx((4.5 - 1 / 3) / (5.5 - 1 / 3)) and r["seed_means"] == [2.0, 5.0]
    # seeds that agree better than their groups do: the between-seed part is floored at 0
    assert variance_components([[1.0, 3.0], [2.0, 2.2]])["between_seed_var"] == 0.0
    assert variance_components([[1.0, 2.0]]) is None
