"""The whole lifecycle, shortened (a few steps per stage), end to end; and its recipe checks."""

import json
import os

import pytest

from t5x_like.experiments import lifecycle
from t5x_like.core.errors import UserError


def demo_config():
    from configs.lifecycle import demo
    return demo.get_config()


def test_order_must_name_defined_stages_in_dependency_order():
    cfg = demo_config()
    cfg.order = "pretrain,sft,eval_sft,dpoo"
    with pytest.raises(UserError, match="'dpoo'"):
        lifecycle.stage_names(cfg)
    cfg.order = "sft,pretrain"  # sft starts from pretrain, which would not exist yet
    with pytest.raises(UserError, match="stages.sft.init_from"):
        lifecycle.stage_names(cfg)
    cfg = demo_config()
    cfg.stages.sft.kind = "trian"
    with pytest.raises(UserError, match="stages.sft.kind"):
        lifecycle.stage_names(cfg)


def test_demo_judge_rates_by_the_exact_answer():
    messages = [{"role": "user", "content": "What is 41 + 7?"}]
    assert lifecycle.demo_judge(messages, ["48", "47", "it is 48."]) == [
        ("up", None), ("down", "48"), ("up", None)]


def test_quick_lifecycle_runs_every_stage_and_writes_the_report(tmp_path, monkeypatch):
    from conftest import TEST_XLA_FLAGS
    # Stage jobs are subprocesses: one CPU device each, the tests' fast compiles and cache.
    monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAGS)
    import jax
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    cfg = demo_config()
    cfg.quick = True
    cfg.order = cfg.order.replace("eval_dpo,", "eval_dpo,rl,eval_rl,")  # every kind of stage
    workdir = tmp_path / "lc"
    state = lifecycle.run_lifecycle(cfg, str(workdir))

    names = lifecycle.stage_names(cfg)
    assert [n for n in names if state["stages"].get(n, {}).get("done")] == names
    for name in ("eval_pretrain", "eval_pretrain_text", "eval_sft", "eval_dpo", "eval_rl",
                 "eval_final"):
        task = state["stages"][name]["results"]["tasks"]["arithmetic"]
        assert task["n"] == 8 and 0.0 <= task["metrics"]["exact_match"] <= 1.0
    fb = state["stages"]["feedback"]["feedback"]
    assert fb["conversations"] == 8 and fb["replies"] == 16 and fb["up"] + fb["down"] == 16
    assert fb["export"] == "unreviewed" and isinstance(fb["preference_left_out"], dict)
    exported = workdir / "feedback" / "preference.jsonl"
    assert fb["preference_records"] == sum(1 for _ in open(exported)) > 0
    # The feedback round's pairs (and the replayed ones) are what the last DPO stage trained on.
    pairs = workdir / "feedback" / "train_pairs.jsonl"
    assert open(pairs).read().startswith(open(exported).read())
    assert sum(1 for _ in open(pairs)) == fb["preference_records"] + fb["replayed_pairs"] == (
        fb["preference_records"] + 40)
    dpo_cfg = json.load(open(workdir / "dpo_feedback" / "config.json"))
    assert dpo_cfg["data"]["source"] == f"preference:{pairs}"
    assert dpo_cfg["init_from"] == str(workdir / "dpo")

    report = (workdir / "report.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert "report_losses.png" in report and os.path.getsize(workdir / "report_losses.png") > 0
    assert "Feedback round" in report and "trained on by: dpo_feedback" in report
    assert "Exported without a review" in report
    assert "exact_match" in report
    # The demo's questions through lm-evaluation-harness (the final evaluation under --quick).
    mc = state["stages"]["eval_final"]["results"]["tasks"]["arithmetic_mc"]
    assert mc["kind"] == "harness" and mc["n"] == 8 and 0.0 <= mc["metrics"]["acc"] <= 1.0
    assert "arithmetic_mc/acc" in report and "Through lm-evaluation-harness" in report

    # A rerun finds every stage done and only rewrites the report.
    before = json.load(open(workdir / "lifecycle.json"))
    again = lifecycle.run_lifecycle(cfg, str(workdir))
    assert again["stages"] == before["stages"]
