"""benchmarks/device_check.py: the GPU plan, and its CPU dry run on tiny shapes."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import device_check  # noqa: E402


def test_gpu_plan_covers_the_issue_cases_in_priority_order():
    cases = device_check.plan(dry_run=False)
    keys = [(c["kind"], c["dtype"], c["batch_size"], c["framework"], c.get("torch_compile", False))
            for c in cases]
    sides = [("jax", False), ("torch", False), ("torch", True)]
    assert keys == ([("train", "bf16", 128) + s for s in sides] +
                    [("sd", "bf16", 1) + s for s in sides] +
                    [("sd", "bf16", 8) + s for s in sides] +
                    [("train", "f32", 128) + s for s in sides])
    assert all(c.get("torch_compile_backend", "inductor") == "inductor" for c in cases)
    assert {c["model"] for c in cases if c["kind"] == "train"} == {"ddpm_cifar10"}
    assert {(c["latent"], c["text_len"]) for c in cases if c["kind"] == "sd"} == {(64, 77)}


def test_dry_run_sd_cases_write_results(tmp_path):
    pytest.importorskip("diffusers")
    status = device_check.main(["--dry_run", "--kinds", "sd", "--out_dir", str(tmp_path)])
    assert status == 0
    payload = json.loads((tmp_path / "dry_run_device_check.json").read_text())
    rows = payload["rows"]
    assert [(r["framework"], r.get("torch_compile", False)) for r in rows] == [
        ("jax", False), ("torch", False), ("torch", True)]
    for r in rows:
        assert r["step_ms"] > 0 and r["images_per_s"] > 0, r
        assert 0 < r["mfu"] < 1, r
        assert r["same_num_params_as_ours"], r
    assert rows[0]["flops_per_step"] > 0 and rows[0]["attention"] == "auto"
    table = (tmp_path / "dry_run_device_check.md").read_text()
    assert table.count("| sd bf16 batch 2 |") == 3
