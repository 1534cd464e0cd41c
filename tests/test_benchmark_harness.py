"""benchmarks/: interleaved side-by-side protocol, ratio statistics, loaded-host flag, and the
profiler's classification of HLO instructions by op kind."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from training_fixtures import REPO
from benchmarks import interleave, profile_step


def test_ratio_stats_match_numpy_percentiles():
    ratios = [0.7, 0.9, 0.8, 1.3, 0.75, 0.85]
    stats = interleave.ratio_stats(ratios)
    np.testing.assert_allclose(
        [stats["ratio_q1"], stats["ratio_median"], stats["ratio_q3"]],
        np.percentile(ratios, [25, 50, 75]), rtol=1e-12)
    assert (stats["ratio_min"], stats["ratio_max"]) == (0.7, 1.3)
    one = interleave.ratio_stats([1.25])
    assert one["ratio_q1"] == one["ratio_median"] == one["ratio_q3"] == 1.25


@pytest.mark.parametrize("loads,cores,loaded", [
    ([0.2, 2.4], 2, False), ([0.2, 2.51], 2, True), ([7.0, 1.0], 2, True), ([15.9], 16, False)])
def test_loaded_host_threshold_is_cores_plus_margin(loads, cores, loaded):
    assert interleave.LOAD_MARGIN == 0.5
    assert interleave.is_loaded(loads, cores) == loaded


def test_run_pair_interleaves_ours_and_theirs(tmp_path):
    log = tmp_path / "calls.log"
    script = os.path.join(REPO, "tests", "bench_fake_worker.py")
    out = interleave.run_pair(script, dict(side="ours", log=str(log)),
                              dict(side="theirs", log=str(log)), rounds=4, calls_per_round=2,
                              cores=2, timeout_s=60)
    assert "error" not in out, out.get("error")
    assert log.read_text().split() == (["ours"] * 2 + ["theirs"] * 2) * 4
    assert out["ours"]["side"] == "ours" and len(out["theirs"]["times_s"]) == 4
    expected = [p["theirs_s"] / p["ours_s"] for p in out["pairs"]]
    np.testing.assert_allclose(out["pair_ratios"], expected, rtol=1e-3)
    assert out["ratio_min"] <= out["ratio_median"] <= out["ratio_max"]
    assert isinstance(out["loaded_host"], bool) and len(out["load_avg_before"]) == 3


def test_run_pair_reports_a_failing_worker(tmp_path):
    out = interleave.run_pair(str(tmp_path / "missing.py"), {}, {}, rounds=1, cores=2,
                              timeout_s=60)
    assert "exited" in out["error"]


def test_classify_hlo_finds_conv_silu_and_transpose():
    def f(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jax.nn.silu(y))

    x, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    text = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w).compile().as_text()
    kinds = profile_step.classify_hlo(text)
    convs = [n for n, k in kinds.items() if k == "convolution"]
    assert len(convs) >= 3  # forward, input gradient, weight gradient
    assert all("convolution" in text.split(f"%{n} = ", 1)[1].split("\n", 1)[0] or
               "fusion" in text.split(f"%{n} = ", 1)[1].split("\n", 1)[0] for n in convs)
    assert "SiLU" in kinds.values()
    assert "matmul (attention, linear)" not in kinds.values()  # no dot in this program
