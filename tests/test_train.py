"""End to end: a tiny run trains, evaluates, checkpoints, resumes, and samples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from t5x_like.core import metrics as metrics_lib
from t5x_like.modeling import decoding
from t5x_like.core import runs
from t5x_like.training import trainer
from t5x_like.training import loop as loop_lib


def records(workdir, split):
    return [r for r in metrics_lib.read_metrics(str(workdir)) if r["split"] == split]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run on the synthetic task, shared by the tests below."""
    from configs import base

    workdir = tmp_path_factory.mktemp("run")
    cfg = base.get_config()
    cfg.steps = 40
    cfg.log_every_steps = 5
    cfg.model.update(dict(hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                          max_len=64))
    cfg.data.update(dict(batch_size=16, synthetic_docs=2000, vocab_size=400))
    cfg.optimizer.update(dict(lr=3e-3, warmup_steps=5))
    cfg.checkpoint.every_steps = 20
    cfg.eval.update(dict(every_steps=20, steps=4))
    result = trainer.train_and_evaluate(cfg, str(workdir))
    return cfg, workdir, result


def test_tiny_run_learns_and_writes_its_run_directory(trained):
    cfg, workdir, result = trained
    train = records(workdir, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["loss"] < 0.6 * train[0]["loss"]
    for r in train:
        assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0 and r["learning_rate"] > 0
    valid = records(workdir, "validation")
    assert [r["step"] for r in valid] == [20, 40]
    assert valid[-1]["loss"] < valid[0]["loss"]
    assert valid[-1]["perplexity"] == pytest.approx(np.exp(valid[-1]["loss"]), rel=1e-6)
    assert 0 < valid[-1]["bits_per_byte"] < 8 and 0 < valid[-1]["accuracy"] < 1
    assert result["loss"] == pytest.approx(valid[-1]["loss"])
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["model"]["vocab_size"] % 128 == 0 and saved["model"]["head_dim"] == 16
    assert sorted(os.listdir(workdir / "checkpoints")) == ["20", "40"]
    assert os.listdir(workdir / "tensorboard")
    assert (workdir / "tokenizer.model").exists()


def test_sample_continues_a_prompt(trained):
    _, workdir, _ = trained
    run = runs.load(str(workdir))
    assert run.step == 40
    tok = run.tokenizer
    ids = [tok.bos_id, *tok.encode("What is 12 + 30? ")]
    decoder = decoding.Decoder.from_run(run, max_batch=4)
    greedy = [decoding.Sampling(max_new_tokens=8, seed=s) for s in (0, 5)]
    a, b = decoder.generate([ids, ids], greedy)
    assert a.tokens == b.tokens and len(a.tokens) == 8 and a.text  # greedy ignores the seed
    hot = [decoding.Sampling(max_new_tokens=8, temperature=2.0, seed=s) for s in range(3)]
    assert len({tuple(c.tokens) for c in decoder.generate([ids] * 3, hot)}) > 1


def test_sample_cli(trained):
    _, workdir, _ = trained
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.sample", f"--workdir={workdir}", "--prompt=What is",
         "--max_new_tokens=5", "--step=40"], cwd=ROOT, capture_output=True, text=True,
        timeout=300)  # --step: the old name of --checkpoint
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("What is") and len(result.stdout.strip()) > len("What is")


def test_resume_continues_from_the_saved_step(trained, tmp_path):
    """A run stopped at step 20 and restarted ends exactly where an uninterrupted run does."""
    cfg, _, _ = trained
    cfg = cfg.copy_and_resolve_references()
    cfg.optimizer.schedule = "constant"  # so the learning rate does not depend on cfg.steps
    straight = trainer.train_and_evaluate(cfg, str(tmp_path / "straight"))
    first_half = cfg.copy_and_resolve_references()
    first_half.steps = 20
    trainer.train_and_evaluate(first_half, str(tmp_path / "resumed"))
    resumed = trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    train_a, train_b = records(tmp_path / "straight", "train"), records(tmp_path / "resumed", "train")
    assert [r["step"] for r in train_b] == list(range(5, 41, 5))
    assert [r["loss"] for r in train_b] == [r["loss"] for r in train_a]  # bit-identical on CPU
    assert resumed == straight
    # A third run has nothing left to train: it evaluates the final checkpoint again.
    again = trainer.train_and_evaluate(cfg, str(tmp_path / "resumed"))
    assert again["loss"] == straight["loss"]


def test_resume_refuses_a_different_model(trained, tmp_path):
    from t5x_like.core.errors import UserError

    cfg, _, _ = trained
    small = cfg.copy_and_resolve_references()
    small.steps = 2
    small.checkpoint.every_steps = 2
    small.data.cache_dir = str(trained[1] / "data")  # prepared already, by `trained`
    trainer.train_and_evaluate(small, str(tmp_path))
    small.model.num_layers = 3
    with pytest.raises(UserError, match="model.num_layers: 2 in this workdir's checkpoints, 3 in config"):
        trainer.train_and_evaluate(small, str(tmp_path))
    small.model.num_layers = 2
    saved = (tmp_path / "config.json").read_bytes()
    small.data.batch_size = 8  # another data order: refused, unless asked for by name
    with pytest.raises(UserError, match=r"^config key 'data.batch_size' is 8 but this workdir's "
                       r"checkpoints were trained with 16 .*--allow_config_change=data.batch_size"):
        trainer.train_and_evaluate(small, str(tmp_path))
    small.data.batch_size = 16
    small.data.source = "text:README.md"  # named as such, not as a vocab_size mismatch
    with pytest.raises(UserError, match="^config key 'data.source' is 'text:README.md' but"):
        trainer.train_and_evaluate(small, str(tmp_path))
    assert (tmp_path / "config.json").read_bytes() == saved  # a refused config is never saved
    small.data.source = cfg.data.source
    small.data.batch_size, small.steps = 8, 3
    trainer.train_and_evaluate(small, str(tmp_path), allow_changes=["data.batch_size"])
    assert json.loads((tmp_path / "config.json").read_text())["data"]["batch_size"] == 8
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]


def test_a_failed_start_does_not_bind_the_workdir(trained, tmp_path, monkeypatch):
    """Mesh and model-size checks come before the data and before anything is written; what an
    earlier version (or a later failure) left without a checkpoint refuses nothing."""
    from t5x_like.core.errors import UserError

    cfg, workdir, _ = trained
    good = cfg.copy_and_resolve_references()
    good.data.cache_dir = str(workdir / "data")  # prepared already, by `trained`
    good.steps = 1
    good.eval.steps = 1
    bad = good.copy_and_resolve_references()
    bad.model.num_layers = 3
    bad.mesh.update(dict(data=1, tensor=8))  # 2 kv heads over 8 devices
    with monkeypatch.context() as m:
        m.setattr(trainer, "prepare_data", lambda *a: pytest.fail("data prepared before checks"))
        with pytest.raises(UserError, match="which mesh axis tensor of size 8 does not divide"):
            trainer.train_and_evaluate(bad, str(tmp_path))
    assert os.listdir(tmp_path) == []
    # Leftovers of a start that failed after preparing the data, before its first checkpoint.
    (tmp_path / "config.json").write_text(json.dumps({"model": {"num_layers": 3}}))
    (tmp_path / "tokenizer.model").write_bytes(b"not this run's tokenizer")
    trainer.train_and_evaluate(good, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["model"]["num_layers"] == 2
    assert os.listdir(tmp_path / "checkpoints") == ["1"]


def test_model_from_init_refuses_a_conflicting_override(trained, tmp_path):
    from t5x_like.core.errors import UserError

    cfg, workdir, _ = trained
    child = cfg.copy_and_resolve_references()
    child.update(dict(init_from=str(workdir), model_from_init=True))
    child.model.num_layers = 3  # the source has 2
    with pytest.raises(UserError) as e:
        trainer.train_and_evaluate(child, str(tmp_path / "child"),
                                   overrides={"model.num_layers", "steps"})
    assert str(e.value).startswith(
        f"config key 'model.num_layers': 3 was set explicitly, but model_from_init takes the "
        f"model from init_from, and {workdir}/config.json has 2;")
    assert not os.path.exists(tmp_path / "child")
    # Left at the recipe's value, it is inherited (and logged).
    assert trainer._inherit_model(child, str(workdir)).model.num_layers == 2


def test_sft_recipe_with_a_conflicting_model_override_is_refused(trained, tmp_path):
    _, workdir, _ = trained
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.train", "--config=configs/sft_chat.py",
         f"--workdir={tmp_path}/sft", f"--config.init_from={workdir}",
         "--config.model.num_layers=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert ("error: config key 'model.num_layers': 3 was set explicitly, but model_from_init "
            f"takes the model from init_from, and {workdir}/config.json has 2;") in result.stderr
    assert not os.path.exists(tmp_path / "sft")


def test_dropping_many_examples_warns_once(tiny_cfg, caplog):
    import collections
    import logging

    loop = loop_lib.Loop.__new__(loop_lib.Loop)
    tiny_cfg.task = "sft"
    loop.cfg, loop.warned = tiny_cfg, set()
    loop.example_counts = collections.Counter(encoded=1000, dropped=40, truncated=10)
    with caplog.at_level(logging.WARNING):
        loop.warn_lost(5)  # 4% dropped: below the threshold
        assert not caplog.records
        loop.example_counts.update(encoded=100, dropped=60)
        loop.warn_lost(10)
        loop.warn_lost(15)
    assert [r.getMessage() for r in caplog.records] == [
        "Step 10: 100 of the 1,100 examples encoded so far (9%) were dropped because they are "
        "longer than the 32 tokens they may take (model.max_len); raise --config.model.max_len "
        "(data.on_long=split keeps long conversations whole, in pieces), or use data with "
        "shorter examples."]


def test_gradient_accumulation_matches_one_big_batch(tiny_cfg):
    import jax

    from t5x_like.core import config as config_lib
    from test_sharding import run_steps

    def losses(accum):
        cfg = tiny_cfg.copy_and_resolve_references()
        cfg.optimizer.grad_accum_steps = accum
        return run_steps(config_lib.resolve(cfg, 300), jax.devices()[:1], n=2,
                         keys=("loss", "grad_norm"))[0]

    np.testing.assert_allclose(losses(4), losses(1), rtol=1e-5)


def test_early_stopping_stops_and_stays_stopped(tiny_cfg, tmp_path):
    tiny_cfg.steps = 20
    tiny_cfg.log_every_steps = 1
    tiny_cfg.optimizer.update(dict(lr=1e-12, schedule="constant", warmup_steps=0))
    tiny_cfg.eval.update(dict(every_steps=1, early_stop_by="loss", patience=2, min_delta=1e-3))
    tiny_cfg.checkpoint.every_steps = 100
    result = trainer.train_and_evaluate(tiny_cfg, str(tmp_path))
    assert result["early_stopped"] and result["step"] == 3  # best at 1, no gain at 2 and 3
    stops = records(tmp_path, "early_stopping")
    assert [(r["step"], r["evals_without_improvement"]) for r in stops] == [(1, 0), (2, 1), (3, 2)]
    assert stops[-1]["best_step"] == 1
    assert os.listdir(tmp_path / "checkpoints") == ["3"]  # saved where it stopped
    again = trainer.train_and_evaluate(tiny_cfg, str(tmp_path))  # a rerun does not train on
    assert again["early_stopped"] and again["step"] == 3
    assert len(records(tmp_path, "train")) == len(records(tmp_path, "validation")) == 3


def test_chunked_loss_equals_the_full_logits_loss():
    """losses.chunked_loss against token_stats of the whole logits, with an output LoRA, masked
    padding rows, z-loss and byte counts; chunks that divide T and ones that do not."""
    import functools

    import jax
    import jax.numpy as jnp

    from t5x_like.training import losses
    from t5x_like.modeling import model

    rng = np.random.default_rng(0)
    B, T, d, V = 3, 10, 8, 40
    h = jnp.asarray(rng.normal(size=(B, T, d)), jnp.float32)
    head = (jnp.asarray(rng.normal(size=(d, V)), jnp.float32),
            {"a": jnp.asarray(rng.normal(size=(d, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(2, V)), jnp.float32)})
    targets = jnp.asarray(rng.integers(0, V - 5, (B, T)))
    weights = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32)
    token_bytes = jnp.asarray(rng.integers(0, 4, V))
    logits_fn = functools.partial(model.output_logits, unpadded_vocab_size=V - 5)

    def full(head, h):
        s = losses.token_stats(logits_fn(head, h), targets, weights, token_bytes)
        return s["nll_sum"] + 0.1 * s["z_sum"], s

    (want, want_stats), want_grads = jax.value_and_grad(full, (0, 1), has_aux=True)(head, h)
    assert float(want_stats["weight_sum"]) > 0 and float(want_stats["bytes_sum"]) > 0
    for chunk in (1, 3, 16):  # one position; chunks that do not divide T; one padded chunk
        fn = functools.partial(losses.chunked_loss, logits_fn, chunk=chunk, z_loss=0.1,
                               token_bytes=token_bytes)
        (got, stats), grads = jax.jit(jax.value_and_grad(
            lambda head, h: fn(head, h, targets, weights), (0, 1), has_aux=True))(head, h)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"chunk {chunk}")
        for k in want_stats:
            np.testing.assert_allclose(stats[k], want_stats[k], rtol=1e-5, err_msg=k)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads, want_grads)
        # A cotangent other than 1 scales the gradients taken in the forward pass.
        scaled = jax.jit(jax.grad(lambda head, h: 2.5 * fn(head, h, targets, weights)[0],
                                  (0, 1)))(head, h)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2.5 * b, rtol=1e-5, atol=1e-6),
                     scaled, want_grads)
        # Without a gradient (evaluation) the forward alone gives the same sums.
        np.testing.assert_allclose(jax.jit(fn)(head, h, targets, weights)[0], want, rtol=1e-6)


def test_train_step_with_loss_chunk_matches_the_full_loss(tiny_cfg):
    """model.loss_chunk through the real train step (tied output layer: the head is embed.T; a
    chunk that does not divide max_len): same losses, gradient norms and parameters. The untied
    head is checked on meshes in test_sharding and by the eval suite's fixture."""
    import jax

    from t5x_like.core import config as config_lib
    from test_sharding import run_steps

    def run(chunk):
        cfg = tiny_cfg.copy_and_resolve_references()
        cfg.model.tie_embeddings, cfg.model.loss_chunk = True, chunk
        cfg.optimizer.z_loss = 1e-3
        metrics, params, _ = run_steps(config_lib.resolve(cfg, 300), jax.devices()[:1], n=3,
                                       keys=("loss", "accuracy", "grad_norm", "z_loss"),
                                       vary_batch=True)
        return metrics, params

    want, want_params = run(0)
    got, params = run(12)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, want_params)
