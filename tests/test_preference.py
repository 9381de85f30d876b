"""Preference tuning: losses against hand-computed values, the frozen reference, and the
reward / DPO / RL tasks running end to end from a pretrained run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import preference_data
from t5x_like.core import config as config_lib
from t5x_like.modeling import model
from t5x_like.training import preference
from t5x_like.training import preference_losses
from t5x_like.core import metrics as metrics_lib
from t5x_like.modeling import partitioning
from t5x_like.evaluation import reward_model
from t5x_like.core import runs
from t5x_like.training import trainer
from t5x_like.training import state as state_lib
from t5x_like.core.errors import UserError

LN2, LN4 = math.log(2), math.log(4)


def test_bradley_terry_and_dpo_formulas():
    bt = preference_losses.bradley_terry(jnp.array([2.0, 0.5]), jnp.array([1.0, 1.5]))
    np.testing.assert_allclose(bt, [math.log(1 + math.exp(-1)), math.log(1 + math.e)], rtol=1e-6)
    # ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; margin 2; beta 0.5 -> h = 1.
    args = (jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]))
    loss, chosen, rejected = preference_losses.dpo(*args, beta=0.5)
    np.testing.assert_allclose(loss, [math.log(1 + math.exp(-1))], rtol=1e-6)
    np.testing.assert_allclose([chosen[0], rejected[0]], [0.5, -0.5], rtol=1e-6)
    cdpo, _, _ = preference_losses.dpo(*args, beta=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(cdpo, [0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.e)],
                               rtol=1e-6)
    ipo, _, _ = preference_losses.dpo(*args, beta=0.5, loss_type="ipo")
    np.testing.assert_allclose(ipo, [(2 - 1 / (2 * 0.5)) ** 2], rtol=1e-6)


def crafted_pairs():
    """Two pairs [2, 2, T=4] over a vocab of 4; pair 1 is padding (every weight 0).

    Pair 0: chosen has 2 reply targets (ids 1, 2), rejected 1 reply target (id 3)."""
    T = 4
    batch = {k: np.zeros((2, 2, T), np.float32 if k == "weights" else np.int32)
             for k in preference_data.PAIR_FEATURES}
    batch["targets"][0, 0] = [0, 1, 2, 0]
    batch["weights"][0, 0] = [0, 1, 1, 0]
    batch["targets"][0, 1] = [0, 3, 0, 0]
    batch["weights"][0, 1] = [0, 1, 0, 0]
    batch["segment_ids"][0] = 1
    return {k: jnp.asarray(v) for k, v in batch.items()}


def boosted_logits(batch, boost_rows):
    """Logits [4 rows, T, 4]: zeros (every token 1/4), except the target of the rows in
    `boost_rows` raised by ln 3 (its probability 3 / (3 + 3) = 1/2)."""
    targets = batch["targets"].reshape(4, -1)
    logits = np.zeros((4, targets.shape[1], 4), np.float32)
    for r in boost_rows:
        for t in range(targets.shape[1]):
            logits[r, t, int(targets[r, t])] = math.log(3)
    return jnp.asarray(logits)


def test_dpo_loss_on_a_crafted_batch(monkeypatch):
    batch = crafted_pairs()
    # Policy: chosen targets at 1/2 each (log p = -2 ln 2); rejected uniform (-ln 4).
    # Reference: uniform everywhere (chosen -2 ln 4, rejected -ln 4).
    policy, reference = {"logits": boosted_logits(batch, [0])}, {"logits": boosted_logits(batch, [])}
    monkeypatch.setattr(model, "apply", lambda graphdef, params, tokens, **kw: params["logits"])
    sums = preference.dpo_stats(None, beta=0.5, loss_type="sigmoid", label_smoothing=0.0)(
        policy, reference, batch, None)
    # chosen ratio 2 ln 2, rejected 0: h = 0.5 * 2 ln 2 = ln 2; loss = log(1 + 1/2).
    got = preference.summarize(jax.device_get(sums))
    assert got["pairs"] == 1  # the padding pair counts for nothing
    np.testing.assert_allclose(got["loss"], math.log(1.5), rtol=1e-5)
    np.testing.assert_allclose(got["chosen_reward"], LN2, rtol=1e-5)
    np.testing.assert_allclose(got["rejected_reward"], 0.0, atol=1e-6)
    assert got["accuracy"] == 1.0
    # IPO on length-averaged log-probs: chosen ratio -ln 2 + ln 4 = ln 2; (ln 2 - 1)^2.
    ipo = preference.dpo_stats(None, beta=0.5, loss_type="ipo", label_smoothing=0.0)(
        policy, reference, batch, None)
    np.testing.assert_allclose(float(ipo["loss_sum"]), (LN2 - 1) ** 2, rtol=1e-5)
    # The exact KL on the 3 reply positions: chosen rows are (1/2, 1/6, 1/6, 1/6) vs uniform.
    kl_row = 0.5 * math.log(0.5 * 4) + 3 * (1 / 6) * math.log(4 / 6)
    np.testing.assert_allclose(got["kl"], 2 * kl_row / 3, rtol=1e-5)
    # The chosen reply's NLL per token: 2 targets at 1/2 each -> ln 2. RPO adds alpha times it
    # to the loss of every real pair (not the padding one), and reports it either way.
    np.testing.assert_allclose(got["chosen_nll"], LN2, rtol=1e-5)
    rpo = preference.summarize(jax.device_get(preference.dpo_stats(
        None, beta=0.5, loss_type="sigmoid", label_smoothing=0.0, rpo_alpha=0.5)(
        policy, reference, batch, None)))
    np.testing.assert_allclose(rpo["loss"], math.log(1.5) + 0.5 * LN2, rtol=1e-5)
    np.testing.assert_allclose(rpo["margin"], got["margin"], rtol=1e-6)


def test_bradley_terry_on_a_crafted_batch(monkeypatch):
    batch = crafted_pairs()

    class Scores:  # a reward model whose score at position t of row r is values[r, t]
        def __init__(self, values):
            self.values = values

        def score(self, tokens, last, **kw):
            return self.values[jnp.arange(tokens.shape[0]), last]

    values = np.full((4, 4), -9.0, np.float32)
    values[0, 2], values[1, 1] = 2.0, 1.0  # each reply's last weighted position
    monkeypatch.setattr(model, "bind", lambda graphdef, params: Scores(params))
    got = preference.summarize(jax.device_get(preference.reward_stats(None)(
        jnp.asarray(values), None, batch, None)))
    assert got["pairs"] == 1 and got["accuracy"] == 1.0
    np.testing.assert_allclose(got["loss"], math.log(1 + math.exp(-1)), rtol=1e-6)
    np.testing.assert_allclose([got["margin"], got["chosen_reward"], got["rejected_reward"]],
                               [1.0, 2.0, 1.0], rtol=1e-6)


def test_the_reference_receives_no_updates(tiny_cfg):
    cfg = tiny_cfg.copy_and_resolve_references()
    cfg.task, cfg.init_from, cfg.optimizer.lr, cfg.optimizer.warmup_steps = "dpo", "x", 1e-2, 0
    cfg = config_lib.resolve(cfg, 300)
    mesh = partitioning.make_mesh(cfg.mesh)
    rng = np.random.default_rng(0)
    T = cfg.model.max_len
    batch = {"inputs": rng.integers(3, 300, (8, 2, T)), "targets": rng.integers(3, 300, (8, 2, T)),
             "weights": np.concatenate([np.zeros((8, 2, T // 2)), np.ones((8, 2, T // 2))], -1),
             "segment_ids": np.ones((8, 2, T)), "positions": np.broadcast_to(np.arange(T), (8, 2, T))}
    batch = {k: v.astype(np.float32 if k == "weights" else np.int32) for k, v in batch.items()}
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
        state = state_lib.init_state(cfg, spec)
        reference = jax.tree.map(jnp.copy, state["params"])
        before = jax.device_get(reference)
        initial = jax.device_get(state["params"])
        stats_fn = preference.dpo_stats(spec.graphdef, beta=0.1, loss_type="sigmoid",
                                        label_smoothing=0.0)
        step = jax.jit(preference.make_train_step(stats_fn, spec.tx, spec.schedule, seed=0,
                                                  dropout=0.0),
                       in_shardings=(spec.shardings, None, spec.shardings["params"]),
                       donate_argnums=0)
        for _ in range(3):
            state, metrics = step(state, batch, reference)
        # The loss has no gradient through the reference at all.
        ref_grads = jax.grad(lambda ref: stats_fn(state["params"], ref, batch, None)["loss_sum"])(
            reference)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(ref_grads))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference), before)
    moved = [float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(initial))]
    assert max(moved) > 1e-4  # while the policy did move
    assert float(metrics["kl"]) > 0


def test_pairs_keep_replies_and_drop_identical_ones(tiny_cfg, tmp_path):
    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tokenizer_lib

    tok = tokenizer_lib.train([synthetic.text_document(i) for i in range(200)],
                              str(tmp_path / "t.model"), vocab_size=400)
    encode = preference_data.pair_encoder(tok, max_len=64)
    pair = encode(synthetic.answer_pair(3))
    record = synthetic.answer_pair(3)
    for r, reply in enumerate((record["chosen"], record["rejected"])):
        w = pair["weights"][r] > 0
        # The weighted targets spell the reply and its closing <|end|>.
        assert tok.decode(pair["targets"][r][w][:-1].tolist()) == reply
        assert pair["targets"][r][w][-1] == tok.marker_ids["<|end|>"]
    assert encode({**record, "rejected": record["chosen"]}) is None
    long = {**record, "prompt": [{"role": "user", "content": "1 + 1 " * 100}]}
    cut = encode(long)
    assert cut["weights"][0].any() and cut["segment_ids"][0].all()  # left-truncated, reply kept


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from configs import base

    root = tmp_path_factory.mktemp("pref")
    cfg = base.get_config()
    cfg.steps, cfg.log_every_steps = 2, 1
    cfg.model.update(hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                     max_len=48)
    cfg.data.update(batch_size=8, synthetic_docs=300, vocab_size=300,
                    cache_dir=str(root / "data_cache"))
    cfg.checkpoint.every_steps = 2
    cfg.eval.update(every_steps=0, steps=1)
    trainer.train_and_evaluate(cfg, str(root / "pre"))
    return cfg, root


def follow_up(pretrained, task, **data):
    cfg, root = pretrained
    cfg = cfg.copy_and_resolve_references()
    cfg.task, cfg.init_from, cfg.model_from_init = task, str(root / "pre"), True
    cfg.steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 2, 1, 2
    cfg.optimizer.warmup_steps = 0  # step 2 already sees a moved policy
    cfg.data.update(cache_dir="", synthetic_docs=80, dedup=dict(near=False, exact=True,
                                                               decontaminate=True, threshold=0.8,
                                                               num_perm=128, ngram=5, seed=1))
    cfg.data.update(data)
    cfg.eval.steps = 1
    return cfg, str(root / task)


@pytest.mark.slow  # ~2 minutes on 2 busy cores (a pretraining run, then the task)
def test_dpo_task_runs_from_a_pretrained_model(pretrained):
    cfg, workdir = follow_up(pretrained, "dpo", source="synthetic:arithmetic_pairs")
    result = trainer.train_and_evaluate(cfg, workdir)
    assert {"loss", "accuracy", "margin", "kl", "chosen_reward"} <= set(result)
    train = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]
    # Step 1 starts with the policy equal to the reference: zero KL, the loss exactly log 2.
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[1]["kl"] > 0


@pytest.mark.slow  # ~2 minutes on 2 busy cores (a pretraining run, then the task)
def test_reward_task_trains_a_scalar_head_and_scores(pretrained, tmp_path):
    cfg, workdir = follow_up(pretrained, "reward", source="synthetic:arithmetic_pairs")
    with pytest.raises(UserError, match="model.reward_head"):
        trainer.train_and_evaluate(cfg, workdir)
    cfg.model.reward_head = True
    result = trainer.train_and_evaluate(cfg, workdir)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["pairs"] > 0
    pre, rm = runs.load(pretrained[1] / "pre"), reward_model.RewardModel.load(workdir)
    # The body came from the pretrained run; the head was trained away from zero.
    assert set(rm.run.params) == set(pre.params) | {"reward_head"}
    assert float(np.abs(jax.device_get(rm.run.params["reward_head"])).max()) > 0
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    scores = rm.score([prompt] * 3, ["7", "8", "7"])
    assert scores.shape == (3,) and scores[0] == pytest.approx(scores[2], abs=1e-5)
    assert scores[0] != scores[1]
    # The score entry point's reader: prompts as text or messages, one clear error per bad line.
    from t5x_like import score

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "What is 3 + 4?", "reply": "7"}) + "\n"
                    + json.dumps({"prompt": prompt, "reply": "8"}) + "\n{oops\n")
    with pytest.raises(UserError, match="pairs.jsonl, line 3: not valid JSON"):
        score.read_pairs(str(path))


@pytest.mark.slow  # ~2 minutes on 2 busy cores (a pretraining run, then the task)
def test_rl_task_samples_and_evaluates(pretrained):
    cfg, workdir = follow_up(pretrained, "rl", source="synthetic:arithmetic_chat", batch_size=8)
    cfg.rl.update(group_size=2, max_new_tokens=4, eval_prompts=8)
    result = trainer.train_and_evaluate(cfg, workdir)
    assert {"reward", "accuracy", "reply_length"} <= set(result)
    train = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]
    assert {"reward", "kl", "reply_length", "accuracy", "pg_loss"} <= set(train[0])
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < train[0]["reply_length"] <= 4
