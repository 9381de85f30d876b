"""Mixture-of-experts layers: expert-parallel training equals one device, the router's losses
are reported, capacity-based dispatch counts its drops, KV-cache decoding equals a full
forward, and LoRA adapts the attention of a MoE model."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from t5x_like.core import config as config_lib
from t5x_like.core.errors import UserError
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
import test_sharding
from test_context_parallel import assert_same, resolved
from test_sharding import run_steps

# Layer 0 dense, layer 1 MoE (4 experts of width 16, top 2) with a shared expert: both MLP
# kinds, so the layer scan picks each layer's MLP by its flag.
MOE = dict(num_experts=4, experts_per_token=2, moe_mlp_dim=16, dense_layers="0",
           num_shared_experts=1)
METRICS = ("loss", "moe_load_balance", "moe_router_z")


@pytest.mark.parametrize("mesh", [dict(data=2, expert=4), dict(fsdp=2, expert=2, tensor=2)])
def test_expert_parallel_steps_match_one_device(tiny_cfg, mesh):
    reference = run_steps(resolved(tiny_cfg, **MOE), jax.devices()[:1], keys=METRICS)
    losses, balance, z = np.array(reference[0]).T
    assert losses[-1] < losses[0]
    assert (balance >= 1.0).all() and (balance < 2.0).all() and (z > 0).all()
    run = run_steps(resolved(tiny_cfg, **MOE, **mesh), jax.devices(), keys=METRICS)
    assert_same(run, reference, str(mesh), atol=5e-5)
    # The experts are split over the expert axis; everything else as in a dense model.
    cfg = resolved(tiny_cfg, **MOE, **mesh)
    we_gate = run[2]["params"]["layers"]["we_gate"]  # [1 MoE layer, 4 experts, d, 16]
    experts = 4 // mesh["expert"]
    want = (1, experts, 32 // mesh.get("fsdp", 1), 16 // mesh.get("tensor", 1))
    assert we_gate.sharding.shard_shape(we_gate.shape) == want, cfg.mesh


def test_capacity_dispatch_counts_its_drops(tiny_cfg):
    """Capacity-based dispatch with room for every token computes what dropless dispatch does
    (on the expert axis: all-to-all of fixed buffers); with less room it drops copies and
    says how many."""
    def logits(cfg, devices):
        mesh = partitioning.make_mesh(cfg.mesh, devices)
        with jax.set_mesh(mesh):
            graphdef, abstract, names = model.abstract_model(cfg.model)
            params = model.init_params(cfg.model, 0, partitioning.tree_shardings(
                mesh, abstract, names))
            batch = test_sharding.fake_batch(cfg)
            run = jax.jit(lambda p, b: model.apply(
                graphdef, p, b["inputs"], positions=b["positions"],
                segment_ids=b["segment_ids"], with_aux=True))
            out, aux = run(params, batch)
            return np.asarray(out), {k: float(v) for k, v in aux.items()}

    dropless, _ = logits(resolved(tiny_cfg, **MOE), jax.devices()[:1])
    roomy, aux = logits(resolved(tiny_cfg, **MOE, moe_capacity_factor=2.0, data=2, expert=4),
                        jax.devices())
    assert aux["moe_dropped"] == 0.0
    np.testing.assert_allclose(roomy, dropless, atol=2e-5, rtol=1e-5)
    tight, aux = logits(resolved(tiny_cfg, **MOE, moe_capacity_factor=0.5), jax.devices()[:1])
    assert 0.3 < aux["moe_dropped"] < 0.8 and np.isfinite(tight).all()
    assert np.abs(tight - dropless).max() > 1e-3


@pytest.mark.slow
def test_capacity_dispatch_trains_like_dropless_when_nothing_drops(tiny_cfg):
    reference = run_steps(resolved(tiny_cfg, **MOE), jax.devices()[:1], n=3)
    roomy = run_steps(resolved(tiny_cfg, **MOE, moe_capacity_factor=2.0, data=2, expert=4),
                      jax.devices(), n=3, keys=("loss", "moe_dropped"))
    assert [d for _, d in roomy[0]] == [0.0] * 3
    assert_same(([loss for loss, _ in roomy[0]], *roomy[1:]), reference, "capacity 2.0",
                atol=5e-5)


def small_moe(**keys):
    return ml_collections.FrozenConfigDict(dict(
        vocab_size=256, vocab_multiple=128, hidden_dim=32, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=32, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, dropout=0.0, dtype="float32", param_dtype="float32",
        scan_layers=True, remat="none", **{**MOE, "dense_layers": "1", **keys}))


@pytest.mark.parametrize("per_layer", [False, True])
def test_kv_cache_decoding_equals_a_full_forward(per_layer):
    """A prompt prefilled, then one token at a time through the cache: the logits of every
    position equal the whole sequence's forward pass (layers 0 and 2 MoE, 1 dense)."""
    cfg = small_moe()
    graphdef, _, _ = model.abstract_model(cfg)
    params = model.init_params(cfg, 1)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 256)
    full = model.apply(graphdef, params, tokens)
    layers = model.unstack_layers(params) if per_layer else None
    cache = model.init_cache(cfg, 2, 16, per_layer=per_layer)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    ones = jnp.ones((2, 12), jnp.int32)
    decode = jax.jit(lambda params, layers, *args: model.bind(graphdef, params).decode(
        *args, layers=layers))
    got, cache = decode(params, layers, tokens[:, :8], positions[:, :8], ones[:, :8], cache, 0)
    steps = [got]
    for i in range(8, 12):
        logits, cache = decode(params, layers, tokens[:, i:i + 1], positions[:, i:i + 1],
                               ones[:, :1], cache, i)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=1e-5)


def test_moe_stacks_and_active_parameters():
    cfg = small_moe(moe_every=1)
    _, abstract, names = model.abstract_model(cfg)
    layers = abstract["layers"]
    assert layers["wq"].shape[0] == 3 and layers["w_gate"].shape == (1, 32, 64)
    assert layers["we_gate"].shape == (2, 4, 32, 16) and layers["router"].shape == (2, 32, 4)
    assert layers["ws_down"].shape == (2, 16, 32)  # one shared expert of width 16
    assert names["layers"]["we_down"] == ("layers", "experts", "expert_mlp", "embed")
    from t5x_like.modeling import flops

    dense = model.abstract_model(small_moe(num_experts=0))[1]
    per_moe_layer = 32 * 4 + 3 * 32 * 16 * 2 + 3 * 32 * 16  # router, 2 of 4 experts, shared
    assert flops.matmul_params(cfg) == flops.matmul_params(small_moe(num_experts=0)) - 2 * (
        3 * 32 * 64) + 2 * per_moe_layer
    assert model.count_params(dense["layers"]) < model.count_params(layers)


def test_lora_on_the_attention_of_a_moe_model(tiny_cfg):
    """LoRA on q, k, v, o of a model with MoE layers: starts at the base, learns, merges into
    the same function; the MoE layers' MLPs cannot be LoRA targets."""
    cfg = resolved(tiny_cfg, **MOE)
    cfg = ml_collections.ConfigDict(config_lib.to_dict(cfg))
    cfg.peft.update(method="lora", targets="attention", rank=4, alpha=8.0)
    mesh = partitioning.make_mesh(ml_collections.ConfigDict(dict(data=2, expert=4)))
    with jax.set_mesh(mesh):
        graphdef, abstract, names = model.abstract_model(cfg.model)
        adapt = peft.build(cfg, abstract, names)
        assert adapt.targets == ("wq", "wk", "wv", "wo")
        base = model.init_params(cfg.model, 0, partitioning.tree_shardings(mesh, abstract, names))
        trainable = peft.init_trainable(adapt, base, 0, partitioning.tree_shardings(
            mesh, adapt.abstract, adapt.names))
        tokens = jax.random.randint(jax.random.key(0), (8, 32), 0, 300)
        forward = jax.jit(peft.forward(graphdef, adapt))
        apply = jax.jit(model.apply, static_argnums=0)
        np.testing.assert_allclose(forward(trainable, base, tokens),
                                   apply(graphdef, base, tokens), atol=1e-6, rtol=0)

        def loss(t):
            return jax.nn.logsumexp(forward(t, base, tokens), axis=-1).mean()
        grads = jax.grad(loss)(trainable)
        assert all(float(jnp.abs(g["b"]).max()) > 0 for g in grads["lora"]["layers"].values())
        trained = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape),
                               trainable)
        full, lora = peft.combine(adapt, trained, base)
        np.testing.assert_allclose(forward(trained, base, tokens),
                                   apply(graphdef, peft.merge(full, lora), tokens),
                                   atol=2e-5, rtol=1e-5)
    cfg.peft.targets = "attention,mlp"
    with pytest.raises(UserError, match=r"mixture-of-experts layers.*peft.targets=attention"):
        peft.build(cfg, abstract, names)
