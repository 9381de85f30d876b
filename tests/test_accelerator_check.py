"""benchmarks/accelerator_check.py: rehearsed on the CPU so it cannot rot before a GPU is at hand.

The whole --tiny check runs once, in a fresh interpreter where grain, tensorflow_datasets and
array_record cannot be imported (the GPU image has none of them) and ml_collections comes only
from a wheel on PYTHONPATH (as launch/accelerator_check.sh carries it there), from the source
tree; its JSON is then checked field by field. The sweep's order and its
budget rule are checked without compiling anything.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from conftest import ROOT

BLOCKED = ("grain", "tensorflow_datasets", "array_record", "tensorflow")
CARRIED = "ml_collections"  # absent there too: its wheel is carried

# A meta-path finder that refuses the blocked packages and finds the carried one only in the
# wheels on PYTHONPATH, then the check as `python -m` runs it.
_RUN = textwrap.dedent(f"""
    import importlib.machinery, runpy, sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"{{name}} is not on the GPU image")
            if name == {CARRIED!r}:
                wheels = [p for p in sys.path if p.endswith(".whl")]
                spec = importlib.machinery.PathFinder.find_spec(name, wheels)
                if spec is None:
                    raise ImportError(f"{{name}} is not on the GPU image and no wheel carries it")
                return spec

    sys.meta_path.insert(0, Refuse())
    runpy.run_module("benchmarks.accelerator_check", run_name="__main__", alter_sys=True)
""")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator_check")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    # One CPU device, XLA's cheap optimization level (the tests' own), this session's
    # compilation cache.
    # The carried wheel, made from the installed package (tests download nothing): a zip of
    # ml_collections/, which is all a pure-Python wheel's import needs.
    wheel = shutil.make_archive(str(out / "wheels" / "ml_collections"), "zip",
                                os.path.dirname(os.path.dirname(ml_collections.__file__)),
                                "ml_collections")
    os.replace(wheel, wheel[:-4] + "-1.1.0-py3-none-any.whl")
    env.update(PYTHONPATH=f"{ROOT}:{wheel[:-4]}-1.1.0-py3-none-any.whl", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    # The sweep kept to one point here (its order is tested below without compiling).
    args = ["--tiny", f"--out={out}", "--impls=dot_product_attention", "--remats=dots_no_batch",
            "--max_batch=2", "--decode_batches=1"]
    result = subprocess.run([sys.executable, "-c", _RUN, *args], cwd=str(out), env=env,
                            capture_output=True, text=True, timeout=600)
    path = out / "accelerator_check_tiny.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return result, report


def test_tiny_check_runs_without_grain_or_tfds_and_a_carried_ml_collections(tiny_run):
    result, report = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert report is not None and "errors" not in report, report and report.get("errors")
    assert report["tiny"] and report["device"]["backend"] == "cpu"


def test_tiny_check_json_fields(tiny_run):
    _, report = tiny_run
    device = report["device"]
    assert device["peak_tflops"] is None and device["hbm_tbps"] is None  # a CPU: no table entry
    assert device["matmul_tflops_bf16"] > 0 and device["copy_tbps"] > 0
    assert report["machine"]["jax"] == device["jax"]

    correctness = report["correctness"]
    assert correctness["passed"] is True and report["passed"] is True
    names = {c["name"] for c in correctness["checks"]}
    for dtype in ("float32", "bfloat16"):
        assert {f"logits_{dtype}", f"loss_{dtype}", f"train_loss_{dtype}", f"grad_norm_{dtype}",
                f"loss_after_update_{dtype}", f"greedy_decode_{dtype}"} <= names
    decode_checks = [c for c in correctness["checks"] if c["name"].startswith("greedy")]
    assert all(c["tokens"] > 0 and c["match"] == "exact" for c in decode_checks)

    attention = {row["impl"]: row for row in report["attention"]}
    assert attention["einsum_blocks"]["ms"] > 0 and attention["xla_masked"]["ms"] > 0
    # XLA's attention computes what the einsum blocks compute (bfloat16 inputs).
    assert attention["xla_masked"]["max_abs_diff_vs_einsum"] < 0.05
    assert "skipped" in attention["cudnn_*"]

    rows = report["decode"]["rows"]
    assert [r["batch"] for r in rows] == [1]
    assert all(r["decode_tok_s"] > 0 and r["weights_dtype"] == "bfloat16" for r in rows)
    assert "bound_tok_s" not in rows[0]  # no bandwidth to bound a CPU by

    [point] = report["training"]["points"]
    assert point["attention_impl"] == "dot_product_attention" and point["seq"] == 64
    assert point["tokens_per_s"] > 0 and point["tflops_per_device"] > 0
    assert point["tflops_per_device"] < point["tflops_per_device_palm"]  # causal halved
    assert point["mfu"] is None and point["mfu_vs_measured_matmul"] > 0
    assert point["loss"] > 0 and point["xla_device_gib"] > 0
    assert report["training"]["best"] == point
    assert set(report["section_s"]) == {"correctness", "attention", "decode", "training"}


class _FakeReport:
    def __init__(self):
        self.data = {"training": {"points": []}}

    def save(self):
        pass


def _sweep(monkeypatch, rates: dict, budget_s: float = 600.0, fits: int = 64):
    """A Sweep whose points are looked up in `rates` ((impl, remat, batch) -> tokens/s)
    instead of compiled; batches above `fits` do not fit."""
    from benchmarks import accelerator_check as ac

    args = ac.parse(["--tiny", "--batch=8", "--max_batch=64"])
    cfg = ac.job_config(tiny=True)
    sweep = ac.Sweep(cfg, args, ac.Budget(budget_s), _FakeReport(), matmul_tflops=1.0,
                     peak=None)
    tried = []

    def point(impl, remat, batch):
        tried.append((impl, remat, batch))
        if batch > fits:
            return None
        row = {"attention_impl": impl, "remat": remat, "batch": batch,
               "tokens_per_s": rates.get((impl, remat, batch), 1.0)}
        sweep.add(row)
        return row

    monkeypatch.setattr(sweep, "point", point)
    return sweep, tried


def test_sweep_compares_attention_then_remat_then_grows_the_best_batch(monkeypatch):
    remat = "dots_no_batch"  # configs/llama_1b.py's
    rates = {("einsum", remat, 8): 100.0, ("dot_product_attention", remat, 8): 90.0,
             ("einsum", "none", 8): 120.0, ("einsum", "full", 8): 80.0,
             ("einsum", "none", 16): 150.0, ("einsum", "none", 32): 151.0}
    sweep, tried = _sweep(monkeypatch, rates)
    sweep.run(["dot_product_attention", "einsum"], [remat, "none", "full"], 8, 64)
    assert tried == [("dot_product_attention", remat, 8), ("einsum", remat, 8),
                     ("einsum", "none", 8), ("einsum", "full", 8),
                     ("einsum", "none", 16), ("einsum", "none", 32)]  # +0.7%: stop growing
    assert sweep.report.data["training"]["best"]["batch"] == 32


def test_sweep_stops_growing_where_the_batch_no_longer_fits(monkeypatch):
    remat = "dots_no_batch"
    rates = {("einsum", remat, b): float(b) for b in (8, 16, 32, 64)}
    sweep, tried = _sweep(monkeypatch, rates, fits=16)
    sweep.run(["einsum"], [remat], 8, 64)
    assert tried == [("einsum", remat, 8), ("einsum", remat, 16), ("einsum", remat, 32)]
    assert sweep.report.data["training"]["best"]["batch"] == 16


def test_a_point_predicted_past_the_budget_is_skipped_not_started():
    from benchmarks import accelerator_check as ac

    args = ac.parse(["--tiny"])
    report = _FakeReport()
    sweep = ac.Sweep(ac.job_config(tiny=True), args, ac.Budget(1e-3), report,
                     matmul_tflops=1e-9, peak=None)  # a step predicted to take hours
    assert sweep.point("einsum", "none", 2) is None
    [row] = report.data["training"]["points"]
    assert row["skipped"].startswith("predicted") and "tokens_per_s" not in row
