import pytest

from lictrain.comparison.figures import BDRateUnavailable, CurvePoint, bd_rate, converged_loss, first_reach, median_smooth, to_anchor


def curve(losses, every=100, secs_per_step=0.1):
    return [CurvePoint(i * every, i * every * secs_per_step, l) for i, l in enumerate(losses)]


def test_median_smoothing_by_hand():
    assert median_smooth([10.0, 0.0, 5.0, 7.0]) == pytest.approx([5.0, 5.0, 5.0, 6.0])


def test_target_is_the_minimum_of_the_smoothed_curve_without_step_zero():
    anchor = curve([1.0, 4.0, 3.0, 2.5, 2.2, 2.3])  # step 0 (even if low) is left out
    # medians of 4, 3, 2.5, 2.2, 2.3: 3.5, 3, 2.5, 2.3, 2.25 -> target 2.25
    assert converged_loss(anchor) == pytest.approx(2.25)


def test_steps_and_time_to_anchor_with_known_answers():
    anchor = curve([100.0, 4.0, 3.0, 2.5, 2.2, 2.3])  # target 2.25, first reached at step 400 (2.2)
    fast = curve([100.0, 3.0, 2.2, 2.0], secs_per_step=0.15)  # reaches at step 200, 30 s
    res = to_anchor(fast, anchor)
    assert res.steps == pytest.approx(200 / 400)
    assert res.time == pytest.approx(30.0 / 40.0)


def test_not_reached_is_reported_with_its_gap_not_a_number():
    anchor = curve([100.0, 4.0, 3.0, 2.0, 2.0, 2.0])  # target 2.0
    slow = curve([100.0, 5.0, 4.0, 3.0])
    res = to_anchor(slow, anchor)
    assert res.steps is None and res.time is None
    assert res.final_gap == pytest.approx(3.0 - 2.0)
    assert res.describe("steps").startswith("not reached")


def test_a_tie_counts_as_reached():
    assert first_reach(curve([5.0, 2.0]), 2.0).step == 100


def test_a_lucky_dip_does_not_set_an_unreachable_target():
    noisy = curve([100.0, 3.0, 2.5, 2.4, 2.1, 2.4, 2.4])  # one lucky validation at 2.1 on a 2.4 plateau
    target = converged_loss(noisy)
    assert target == pytest.approx(2.4)
    steady = curve([100.0, 2.4, 2.4, 2.4])  # a recipe that settles where the anchor settles reaches it
    assert to_anchor(steady, noisy).steps is not None


def test_bd_rate_of_a_uniform_rate_saving_is_that_saving():
    # Same PSNR at 90% of the rate everywhere: log-rate shifts by log10(0.9), so BD-rate is exactly -10%.
    bpp = [0.1, 0.2, 0.4, 0.8]
    psnr = [26.0, 29.0, 32.0, 35.0]
    assert bd_rate((bpp, psnr), ([0.9 * b for b in bpp], psnr)) == pytest.approx(-10.0, abs=1e-6)
    assert bd_rate((bpp, psnr), ([1.05 * b for b in bpp], psnr), method="pchip") == pytest.approx(5.0, abs=1e-6)


def test_bd_rate_sorts_points_by_psnr():
    bpp, psnr = [0.4, 0.1, 0.8, 0.2], [32.0, 26.0, 35.0, 29.0]
    assert bd_rate((bpp, psnr), ([0.9 * b for b in bpp], psnr)) == pytest.approx(-10.0, abs=1e-6)


@pytest.mark.parametrize("anchor,test,why", [
    (([0.1, 0.2, 0.4], [26.0, 29.0, 32.0]), ([0.1, 0.2, 0.4], [26.5, 29.5, 32.5]), "<4"),
    (([0.1, 0.2, 0.4, 0.8], [26.0, 29.0, 32.0, 35.0]), ([0.3, 0.4, 0.5, 0.7], [36.0, 37.0, 38.0, 39.0]), "overlap"),
    (([0.1, 0.2, 0.4, 0.8], [26.0, 29.0, 29.0, 35.0]), ([0.1, 0.2, 0.4, 0.8], [26.0, 29.0, 32.0, 35.0]), "repeated"),
    # the miniature benchmark's case: the anchor spans 0.17 dB and the curves share 0.03 dB of it
    (([0.30, 0.27, 0.37, 0.34], [23.31, 23.41, 23.47, 23.48]), ([0.07, 0.15, 0.18, 0.23], [22.54, 22.92, 23.11, 23.34]),
     "overlap by 0.03 dB only"),
])
def test_bd_rate_is_unavailable_rather_than_extrapolated(anchor, test, why):
    with pytest.raises(BDRateUnavailable, match=why):
        bd_rate(anchor, test)
