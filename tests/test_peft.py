"""PEFT: LoRA starts at the base and merges exactly, only trainable parameters learn and get
optimizer state, adapter checkpoints know their base, export --merge, plan."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import ROOT
from configs import base as base_config
from t5x_like import export
from t5x_like.core import config as config_lib
from t5x_like.modeling import decoding
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.core import runs
from t5x_like.training import trainer
from t5x_like.training import state as state_lib
from t5x_like.core.errors import UserError


def tiny(cache_dir, **peft_keys):
    cfg = base_config.get_config()
    cfg.steps = 4
    cfg.log_every_steps = 2
    cfg.model.hidden_dim = 32
    cfg.model.num_layers = 2
    cfg.model.num_heads = 4
    cfg.model.num_kv_heads = 2
    cfg.model.mlp_dim = 64
    cfg.model.max_len = 32
    cfg.data.batch_size = 8
    cfg.data.synthetic_docs = 400
    cfg.data.vocab_size = 300
    cfg.data.cache_dir = str(cache_dir)
    cfg.optimizer.warmup_steps = 0
    cfg.checkpoint.every_steps = 2
    cfg.eval.every_steps = 0
    cfg.eval.steps = 2
    for key, value in peft_keys.items():
        cfg.peft[key] = value
    return cfg


def one_device_mesh():
    one = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    return partitioning.make_mesh(one, jax.devices()[:1])


def leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


@pytest.mark.parametrize("tie,targets", [(False, "all,embed,head"), (True, "attention,embed")])
def test_lora_starts_at_the_base_and_merges_exactly(tmp_path, tie, targets):
    cfg = tiny(tmp_path, method="lora", targets=targets, rank=4, alpha=8.0)
    cfg.model.tie_embeddings = tie
    cfg.model.vocab_size = 256
    mesh = one_device_mesh()
    with jax.set_mesh(mesh):
        graphdef, abstract, names = model.abstract_model(cfg.model)
        adapt = peft.build(cfg, abstract, names)
        base = model.init_params(cfg.model, 0)
        shardings = partitioning.tree_shardings(mesh, adapt.abstract, adapt.names)
        trainable = peft.init_trainable(adapt, base, 0, shardings)
        tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
        forward = peft.forward(graphdef, adapt)
        # B = 0: at step 0 the LoRA model *is* the base model, bit for bit.
        assert np.array_equal(forward(trainable, base, tokens), model.apply(graphdef, base, tokens))

        # Trained adapters (random B): merged weights give the unmerged model's logits.
        trained = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                               trainable)
        full, lora = peft.combine(adapt, trained, base)
        unmerged = forward(trained, base, tokens)
        merged_params = peft.merge(full, lora)
        merged = model.apply(graphdef, merged_params, tokens)
        assert float(jnp.abs(unmerged - model.apply(graphdef, base, tokens)).max()) > 0.1
        np.testing.assert_allclose(unmerged, merged, atol=2e-5, rtol=1e-5)
        # The KV-cache decoder (serving without merging) adds the same updates.
        cache = model.init_cache(cfg.model, 2, 16)
        net = model.bind(graphdef, full)
        decoded, _ = net.decode(tokens, jnp.broadcast_to(jnp.arange(16), (2, 16)),
                                jnp.ones_like(tokens), cache, 0, lora=lora)
        np.testing.assert_allclose(decoded, merged, atol=2e-5, rtol=1e-5)


def test_optimizer_state_matches_the_trainable_parameters(tmp_path):
    mesh = one_device_mesh()
    counts = {}
    for name, keys in (("lora", {"method": "lora", "targets": "q,v,down", "rank": 3}),
                       ("freeze", {"trainable": "lm_head,final_norm", "trainable_layers": 1})):
        cfg = config_lib.resolve(tiny(tmp_path, **keys), 300)
        with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
            spec = state_lib.state_spec(cfg, mesh)
        n = counts[name] = peft.count(spec.adapt.abstract)
        moments = sum(x.size for x in jax.tree.leaves(spec.abstract["opt_state"]) if x.ndim)
        assert moments == 2 * n  # AdamW mu and nu, for what trains only
        assert peft.count(spec.abstract["params"]) == n < model.count_params(spec.base_abstract)
    # LoRA rank 3 on q (32 -> 4x8), v (32 -> 2x8) and down (64 -> 32), in each of 2 layers.
    assert counts["lora"] == 2 * 3 * ((32 + 32) + (32 + 16) + (64 + 32))
    # lm_head (32 x 384), final_norm (32), and the last of 2 layers in full.
    layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert counts["freeze"] == 32 * 384 + 32 + layer


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """A 4-step base, a LoRA run and a partial fine-tuning run on it, and a second base."""
    root = tmp_path_factory.mktemp("peft")
    cache = root / "cache"
    trainer.train_and_evaluate(tiny(cache), str(root / "pre"))
    other = tiny(cache)
    other.seed = 1  # same shapes and step, other weights
    trainer.train_and_evaluate(other, str(root / "other"))
    lora = tiny(cache, method="lora", targets="attention,head", rank=4)
    lora.init_from, lora.optimizer.lr = str(root / "pre"), 1e-2
    trainer.train_and_evaluate(lora, str(root / "lora"))
    freeze = tiny(cache, trainable="lm_head", trainable_layers=1)
    freeze.init_from = str(root / "pre")
    trainer.train_and_evaluate(freeze, str(root / "freeze"))
    return root, lora


def test_lora_training_changes_only_the_adapters(runs_dir):
    root, _ = runs_dir
    pre = leaves(runs.load(str(root / "pre")).params)
    ref = json.loads((root / "lora" / "base.json").read_text())
    assert ref["path"] == str(root / "pre") and ref["step"] == 4
    # The checkpoint holds the adapters only.
    cfg = config_lib.load_json(str(root / "lora" / "config.json"))
    stored = peft.load_trainable(cfg, str(root / "lora"), None)
    assert set(stored) == {"lora"} and set(stored["lora"]) == {"layers", "lm_head"}
    assert all(np.abs(ad["b"]).max() > 0 for ad in stored["lora"]["layers"].values())
    # Unmerged: the base is exactly the pretrained model.
    unmerged = runs.load(str(root / "lora"), merge=False)
    assert unmerged.lora is not None
    for k, v in leaves(unmerged.params).items():
        np.testing.assert_array_equal(v, pre[k])
    # Merged: the adapted projections moved, nothing else did.
    merged = leaves(runs.load(str(root / "lora")).params)
    adapted = {"['layers']['wq']", "['layers']['wk']", "['layers']['wv']", "['layers']['wo']",
               "['lm_head']"}
    for k, v in merged.items():
        assert (not np.array_equal(v, pre[k])) == (k in adapted), k
    # Serving base + adapters unmerged samples what the merged model samples.
    run = runs.load(str(root / "lora"))
    prompt = [run.tokenizer.bos_id, *run.tokenizer.encode("What is 3 + 4? ")]
    sampling = decoding.Sampling(max_new_tokens=6)
    assert ([c.tokens for c in decoding.Decoder.from_run(run).generate([prompt], sampling)]
            == [c.tokens for c in decoding.Decoder.from_run(unmerged).generate([prompt],
                                                                               sampling)])


def test_partial_fine_tuning_trains_only_the_named_parameters(runs_dir):
    root, _ = runs_dir
    pre = leaves(runs.load(str(root / "pre")).params)
    after = leaves(runs.load(str(root / "freeze")).params)
    for k, v in after.items():
        if k == "['lm_head']":
            assert not np.array_equal(v, pre[k])
        elif k.startswith("['layers']"):  # the first layer frozen, the last one trained
            np.testing.assert_array_equal(v[0], pre[k][0])
            assert not np.array_equal(v[1], pre[k][1]), k
        else:
            np.testing.assert_array_equal(v, pre[k])


def test_adapters_refuse_a_different_base(runs_dir):
    root, lora = runs_dir
    with pytest.raises(UserError, match="is not the base these adapters were trained on"):
        runs.load(str(root / "lora"), base=str(root / "other"))
    resumed = lora.copy_and_resolve_references()
    resumed.init_from, resumed.steps = str(root / "other"), 6
    with pytest.raises(UserError, match="config key 'init_from' is .*other' but this workdir's "
                       "checkpoints were trained with .*pre'"):
        trainer.train_and_evaluate(resumed, str(root / "lora"))
    with pytest.raises(UserError, match="is not the base these adapters were trained on"):
        trainer.train_and_evaluate(resumed, str(root / "lora"), allow_changes=["init_from"])
    # Adapters are not a base themselves, and a plain run's workdir does not take adapters.
    stacked = lora.copy_and_resolve_references()
    stacked.init_from = str(root / "lora")
    with pytest.raises(UserError, match="holds adapters, not a whole model.*--merge"):
        trainer.train_and_evaluate(stacked, str(root / "stacked"))
    onto_plain = lora.copy_and_resolve_references()
    with pytest.raises(UserError, match="checkpoints of a run without peft"):
        trainer.train_and_evaluate(onto_plain, str(root / "pre"))
    no_base = tiny(root / "cache", method="lora")
    with pytest.raises(UserError, match="'init_from': PEFT"):
        trainer.train_and_evaluate(no_base, str(root / "no_base"))


def test_export_merges_or_keeps_the_adapters(runs_dir):
    root, _ = runs_dir
    merged_dir = export.export(str(root / "lora"), str(root / "merged"), merge=True)
    adapter_dir = export.export(str(root / "lora"), str(root / "adapters"))
    assert not os.path.exists(os.path.join(merged_dir, "base.json"))
    assert config_lib.load_json(os.path.join(merged_dir, "config.json")).peft.method == "none"
    assert os.path.isfile(os.path.join(adapter_dir, "base.json"))
    want = leaves(runs.load(str(root / "lora")).params)
    for got in (runs.load(merged_dir).params, runs.load(adapter_dir).params):
        for k, v in leaves(got).items():
            np.testing.assert_allclose(v, want[k], atol=1e-6)


def test_plan_reports_the_memory_lora_saves_on_7b():
    out = subprocess.run(
        [sys.executable, "-m", "t5x_like.plan", "--config=configs/llama_7b.py",
         "--topology=8xh100", "--compile=false", "--config.peft.method=lora",
         "--config.peft.rank=16", "--config.peft.base_dtype=bfloat16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    # rank 16 on q, k, v, o: 32 layers x 4 x (4096 x 16 + 16 x 4096).
    assert "16,777,216 trainable parameters" in out.stdout
    assert "frozen base 1.57 GiB (bfloat16)" in out.stdout  # 6.74e9 x 2 bytes / 8 devices
    assert "full fine-tuning 12.55 GiB -> PEFT 1.71 GiB" in out.stdout


def test_adapters_shard_with_their_weights(tmp_path):
    cfg = tiny(tmp_path, method="lora", targets="q,o,down,head", rank=4, base_dtype="bfloat16")
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    cfg = config_lib.resolve(cfg, 300)
    mesh = partitioning.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
    P = jax.sharding.PartitionSpec
    lora = jax.tree.map(lambda s: s.spec, spec.shardings["params"]["lora"])
    # wq [L, embed, heads, head_dim] = (None, fsdp, tensor, None): A keeps embed, B heads.
    assert lora["layers"]["wq"] == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor", None)}
    assert lora["layers"]["wo"] == {"a": P(None, "tensor", None, None), "b": P(None, None, "fsdp")}
    assert lora["layers"]["w_down"] == {"a": P(None, "tensor", None), "b": P(None, None, "fsdp")}
    assert lora["lm_head"] == {"a": P("fsdp", None), "b": P(None, "tensor")}
    # AdamW moments shard like the adapters; the frozen base like the model.
    mu = optax.tree_utils.tree_get(spec.shardings["opt_state"], "mu")
    assert mu["lora"]["layers"]["wq"]["b"].spec == P(None, None, "tensor", None)
    assert spec.base_shardings["layers"]["wq"].spec == P(None, "fsdp", "tensor", None)
    # The frozen base can be half the size; what trains stays float32.
    assert {x.dtype for x in jax.tree.leaves(spec.base_abstract)} == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(spec.abstract["params"])} == {jnp.dtype("float32")}


def pair_batch(cfg, rng):
    T = cfg.model.max_len
    batch = {"inputs": rng.integers(3, 300, (8, 2, T)), "targets": rng.integers(3, 300, (8, 2, T)),
             "weights": np.concatenate([np.zeros((8, 2, T // 2)), np.ones((8, 2, T // 2))], -1),
             "segment_ids": np.ones((8, 2, T)), "positions": np.broadcast_to(np.arange(T), (8, 2, T))}
    return {k: v.astype(np.float32 if k == "weights" else np.int32) for k, v in batch.items()}


def test_lora_dpo_trains_the_adapters_against_the_base_as_reference(tmp_path):
    from t5x_like.training import preference

    cfg = tiny(tmp_path, method="lora", targets="attention,head", rank=4)
    cfg.task, cfg.init_from, cfg.optimizer.lr = "dpo", "x", 1e-2
    cfg = config_lib.resolve(cfg, 300)
    config_lib.validate(cfg)  # PEFT is accepted for task=dpo
    mesh = partitioning.make_mesh(cfg.mesh)
    batch = pair_batch(cfg, np.random.default_rng(0))
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
        base = model.init_params(cfg.model, 0, spec.base_shardings)
        params = peft.init_trainable(spec.adapt, base, cfg.seed, spec.shardings["params"])
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": jax.jit(spec.tx.init)(params)}
        before_base, before_params = leaves(base), leaves(params)
        stats_fn = preference.dpo_stats(spec.graphdef, beta=0.1, loss_type="sigmoid",
                                        label_smoothing=0.0, adapt=spec.adapt)
        step = jax.jit(preference.make_train_step(stats_fn, spec.tx, spec.schedule, seed=0,
                                                  dropout=0.0),
                       in_shardings=(spec.shardings, None, spec.base_shardings), donate_argnums=0)
        history = []
        for _ in range(3):
            state, metrics = step(state, batch, base)
            history.append(jax.device_get(metrics))
    # Step 0: the policy (base + adapters with B = 0) is exactly the reference (the base).
    assert float(history[0]["loss"]) == pytest.approx(np.log(2), abs=1e-6)
    assert float(history[0]["kl"]) == pytest.approx(0.0, abs=1e-7)
    assert float(history[-1]["kl"]) > 0 and float(history[-1]["loss"]) < np.log(2)
    # The base, which is the reference, is byte-identical; only adapters are trained at all.
    for k, v in leaves(base).items():
        np.testing.assert_array_equal(v, before_base[k])
    after = leaves(state["params"])
    assert set(after) == set(before_params) and all("['lora']" in k for k in after)
    assert all(np.abs(v).max() > 0 for k, v in after.items() if k.endswith("['b']"))


@pytest.mark.slow  # DPO then RL on the tiny base of runs_dir (~1 minute on 2 busy cores)
def test_lora_dpo_and_rl_runs_keep_the_base(runs_dir):
    from t5x_like.core import metrics as metrics_lib

    root, _ = runs_dir
    pre = leaves(runs.load(str(root / "pre")).params)

    def follow_up(task, **data):
        cfg = tiny("", method="lora", targets="attention", rank=4)
        cfg.task, cfg.init_from, cfg.model_from_init = task, str(root / "pre"), True
        cfg.steps, cfg.log_every_steps, cfg.optimizer.lr = 2, 1, 1e-2
        cfg.data.update(synthetic_docs=80, dedup=dict(near=False, exact=True,
                                                      decontaminate=True, threshold=0.8,
                                                      num_perm=128, ngram=5, seed=1), **data)
        cfg.eval.steps = 1
        return cfg, str(root / f"lora_{task}")

    cfg, workdir = follow_up("dpo", source="synthetic:arithmetic_pairs")
    result = trainer.train_and_evaluate(cfg, workdir)
    assert {"loss", "accuracy", "kl"} <= set(result)
    train = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]
    assert train[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and train[1]["kl"] > 0
    assert json.loads((root / "lora_dpo" / "base.json").read_text())["path"] == str(root / "pre")
    unmerged = runs.load(workdir, merge=False)
    assert set(unmerged.lora["layers"]) == {"wq", "wk", "wv", "wo"}
    for k, v in leaves(unmerged.params).items():  # the checkpoint holds adapters only
        np.testing.assert_array_equal(v, pre[k])

    cfg, workdir = follow_up("rl", source="synthetic:arithmetic_chat")
    cfg.rl.update(group_size=2, max_new_tokens=4, eval_prompts=8)
    result = trainer.train_and_evaluate(cfg, workdir)
    assert {"reward", "accuracy", "reply_length"} <= set(result)
    train = [r for r in metrics_lib.read_metrics(workdir) if r["split"] == "train"]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6) and 0 < train[0]["reply_length"] <= 4
    stored = peft.load_trainable(config_lib.load_json(f"{workdir}/config.json"), workdir, None)
    assert set(stored) == {"lora"}


@pytest.mark.slow  # a LoRA reward model on the tiny base of runs_dir (~1 minute)
def test_lora_reward_model_trains_adapters_and_its_new_head(runs_dir):
    from t5x_like.evaluation import reward_model

    root, _ = runs_dir
    cfg = tiny("", method="lora", targets="attention", rank=4)
    cfg.task, cfg.init_from, cfg.model_from_init = "reward", str(root / "pre"), True
    cfg.model.reward_head = True
    cfg.steps, cfg.log_every_steps, cfg.optimizer.lr = 2, 1, 1e-2
    cfg.data.update(synthetic_docs=80, source="synthetic:arithmetic_pairs",
                    dedup=dict(near=False, exact=True, decontaminate=True, threshold=0.8,
                               num_perm=128, ngram=5, seed=1))
    cfg.eval.steps = 1
    workdir = str(root / "lora_reward")
    result = trainer.train_and_evaluate(cfg, workdir)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["pairs"] > 0
    stored = peft.load_trainable(config_lib.load_json(f"{workdir}/config.json"), workdir, None)
    # The checkpoint: adapters plus the head (zeros in the chat base), which learned.
    assert set(stored) == {"lora", "tuned"} and set(stored["tuned"]) == {"reward_head"}
    assert float(np.abs(jax.device_get(stored["tuned"]["reward_head"])).max()) > 0
    pre = leaves(runs.load(str(root / "pre")).params)
    unmerged = leaves(runs.load(workdir, merge=False).params)
    for k, v in pre.items():
        np.testing.assert_array_equal(unmerged[k], v)
    rm = reward_model.RewardModel.load(workdir)  # merged: a plain reward model
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    scores = rm.score([prompt] * 3, ["7", "8", "7"])
    assert scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] != scores[1]
