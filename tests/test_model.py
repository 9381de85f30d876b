"""The transformer: shapes, causal and document masking, and equivalent execution paths."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from t5x_like.core import config as config_lib
from t5x_like.modeling import model


def model_cfg(**overrides):
    cfg = ml_collections.ConfigDict(dict(
        vocab_size=64, vocab_multiple=64, hidden_dim=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=32, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, dropout=0.0, dtype="float32", param_dtype="float32",
        scan_layers=True, remat="none"))
    cfg.update(overrides)
    return ml_collections.FrozenConfigDict(cfg)  # hashable: a static jit argument below


def build(cfg, seed=0):
    graphdef, _, _ = model.abstract_model(cfg, seed)
    return graphdef, model.init_params(cfg, seed)


# Jitted, as in training: eager op-by-op execution is ~10x slower to run in tests.
apply = jax.jit(model.apply, static_argnums=0)


def logits_of(cfg, params, tokens, **kw):
    graphdef, _, _ = model.abstract_model(cfg)
    return apply(graphdef, params, jnp.asarray(tokens), **kw)


def test_shapes_and_parameter_names():
    cfg = model_cfg()
    graphdef, abstract, names = model.abstract_model(cfg)
    shapes = jax.tree.map(lambda a: a.shape, abstract)
    assert shapes["embed"] == (64, 32) and shapes["lm_head"] == (32, 64)
    assert shapes["layers"]["wq"] == (2, 32, 4, 8)
    assert shapes["layers"]["wk"] == (2, 32, 2, 8)
    assert shapes["layers"]["w_down"] == (2, 48, 32)
    assert names["layers"]["wq"] == ("layers", "embed", "heads", "head_dim")
    assert names["embed"] == ("vocab", "embed")
    # Every parameter is named, one name per dimension.
    jax.tree.map(lambda a, n: len(a.shape) == len(n) or pytest.fail(f"{n} vs {a.shape}"),
                 abstract, names)
    params = model.init_params(cfg, 0)
    out = apply(graphdef, params, jnp.zeros((3, 10), jnp.int32))
    assert out.shape == (3, 10, 64) and out.dtype == jnp.float32
    assert model.count_params(params) == sum(np.prod(s) for s in jax.tree.leaves(
        shapes, is_leaf=lambda x: isinstance(x, tuple)))


def test_causal_mask_hides_the_future():
    cfg = model_cfg()
    _, params = build(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 64, (2, 12))
    changed = tokens.copy()
    changed[:, 7:] = rng.integers(4, 64, (2, 5))
    a, b = logits_of(cfg, params, tokens), logits_of(cfg, params, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


def test_packed_document_logits_equal_the_document_alone():
    cfg = model_cfg()
    _, params = build(cfg)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(4, 64, 5), rng.integers(4, 64, 9)
    packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 9 + [0, 0]])
    positions = np.array([list(range(5)) + list(range(9)) + [0, 0]])
    out = logits_of(cfg, params, packed, segment_ids=jnp.asarray(segments),
                    positions=jnp.asarray(positions))
    alone_a = logits_of(cfg, params, doc_a[None])
    alone_b = logits_of(cfg, params, doc_b[None])
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:14], alone_b[0], atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"),
                                     dict(remat="dots"), dict(attention_block=4),
                                     dict(attention_impl="dot_product_attention")])
def test_execution_variants_match(variant):
    """Unrolled layers, rematerialization, causal attention blocks and jax.nn's attention compute
    the same function (and gradients) as the default, on packed documents."""
    base_cfg, other_cfg = model_cfg(attention_block=0), model_cfg(**variant)
    _, params = build(base_cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, 64, (2, 16)))
    # Two documents per row, the second crossing a block boundary, then padding (segment 0).
    segments = jnp.asarray([[1] * 6 + [2] * 8 + [0] * 2, [1] * 3 + [2] * 13])
    positions = jnp.asarray([list(range(6)) + list(range(8)) + [0, 0],
                             list(range(3)) + list(range(13))])

    def loss(cfg, p):
        graphdef, _, _ = model.abstract_model(cfg)
        logits = model.apply(graphdef, p, tokens, segment_ids=segments, positions=positions)
        return jnp.mean(jnp.where(segments[..., None] > 0, logits, 0) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    l1, g1 = value_and_grad(base_cfg, params)
    l2, g2 = value_and_grad(other_cfg, params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_tied_embeddings_share_the_matrix():
    from flax import nnx

    cfg = model_cfg(tie_embeddings=True)
    graphdef, params = build(cfg)
    assert "lm_head" not in params
    tokens = jnp.asarray([[5, 6, 7]])
    hidden = nnx.merge(graphdef, params).hidden(tokens)
    np.testing.assert_allclose(apply(graphdef, params, tokens), hidden @ params["embed"].T,
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = model_cfg(dtype="bfloat16")
    graphdef, params = build(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = apply(graphdef, params, jnp.asarray([[4, 5, 6]]))
    assert out.dtype == jnp.float32
    ref = apply(*build(model_cfg()), jnp.asarray([[4, 5, 6]]))
    np.testing.assert_allclose(out, ref, atol=0.1)  # same function, bf16 rounding


def test_dropout_is_a_function_of_the_key():
    cfg = model_cfg(dropout=0.5)
    graphdef, params = build(cfg)
    tokens = jnp.asarray([[4, 5, 6, 7]])
    key = jax.random.key(0)
    a = apply(graphdef, params, tokens, dropout_rng=key)
    b = apply(graphdef, params, tokens, dropout_rng=key)
    c = apply(graphdef, params, tokens, dropout_rng=jax.random.key(1))
    d = apply(graphdef, params, tokens)  # no key: deterministic, no dropout
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_allclose(d, apply(*build(model_cfg()), tokens), atol=1e-6)


def test_resolved_config_builds(tiny_cfg):
    cfg = config_lib.resolve(tiny_cfg, 300)
    graphdef, abstract, _ = model.abstract_model(cfg.model)
    assert abstract["embed"].shape == (384, 32)


# Every architecture switch of the open families on at once, local layers alternating with
# global ones (hf.py imports subsets of these; test_hf checks each against transformers).
SWITCHES = dict(qk_norm=True, post_norms=True, norm_plus_one=True, mlp_activation="gelu_tanh",
                embed_scale=True, query_pre_attn_scalar=12.0, attn_logit_softcap=3.0,
                final_logit_softcap=5.0, sliding_window=4, global_every=2,
                rope_local_theta=500.0)


def test_sliding_window_hides_keys_beyond_it():
    cfg = model_cfg(num_layers=1, sliding_window=4)  # one local layer: a query sees 4 keys
    _, params = build(cfg)
    rng = np.random.default_rng(3)
    tokens = rng.integers(4, 64, (2, 16))
    changed = tokens.copy()
    changed[:, 5] = (tokens[:, 5] + 1) % 60 + 4
    a, b = logits_of(cfg, params, tokens), logits_of(cfg, params, changed)
    np.testing.assert_allclose(a[:, 9:], b[:, 9:], atol=1e-6)  # 9 - 5 >= 4: out of sight
    assert not np.allclose(a[:, 5:9], b[:, 5:9], atol=1e-3)
    # New parameters only where a switch asks for them, each named per dimension.
    _, abstract, names = model.abstract_model(model_cfg(**SWITCHES))
    assert names["layers"]["q_norm"] == ("layers", "head_dim")
    assert abstract["layers"]["mlp_post_norm"].shape == (2, 32)
    assert "q_norm" not in model.abstract_model(cfg)[1]["layers"]


def test_packed_documents_with_every_switch_equal_the_documents_alone():
    cfg = model_cfg(**SWITCHES)
    _, params = build(cfg)
    params = jax.tree.map(  # norms start at zero under norm_plus_one: make them matter
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(0), x.shape), params)
    rng = np.random.default_rng(1)
    doc_a, doc_b = rng.integers(4, 64, 5), rng.integers(4, 64, 9)
    packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
    segments = np.array([[1] * 5 + [2] * 9 + [0, 0]])
    positions = np.array([list(range(5)) + list(range(9)) + [0, 0]])
    out = logits_of(cfg, params, packed, segment_ids=jnp.asarray(segments),
                    positions=jnp.asarray(positions))
    np.testing.assert_allclose(out[0, :5], logits_of(cfg, params, doc_a[None])[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:14], logits_of(cfg, params, doc_b[None])[0], atol=1e-5)
    assert np.abs(out[0, :14]).max() < 5.0  # the final softcap bounds the logits


@pytest.mark.parametrize("variant", [dict(scan_layers=False), dict(remat="full"),
                                     dict(attention_block=4)])
def test_execution_variants_match_with_every_switch(variant):
    """Local/global layers as scanned data: unrolled layers and causal blocks agree."""
    base_cfg, other_cfg = model_cfg(attention_block=0, **SWITCHES), model_cfg(**SWITCHES,
                                                                            **variant)
    _, params = build(base_cfg)
    tokens = jnp.asarray(np.random.default_rng(2).integers(4, 64, (2, 16)))
    segments = jnp.asarray([[1] * 6 + [2] * 8 + [0] * 2, [1] * 3 + [2] * 13])

    def loss(cfg, p):
        graphdef, _, _ = model.abstract_model(cfg)
        logits = model.apply(graphdef, p, tokens, segment_ids=segments)
        return jnp.mean(jnp.where(segments[..., None] > 0, logits, 0) ** 2)

    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    l1, g1 = value_and_grad(base_cfg, params)
    l2, g2 = value_and_grad(other_cfg, params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g2)


def test_switch_keys_are_validated():
    from configs import base
    from t5x_like.core.errors import UserError

    for key, value, message in [
            ("mlp_activation", "relu", "model.mlp_activation"),
            ("sliding_window", -1, "model.sliding_window"),
            ("attn_logit_softcap", 50.0, "model.attention_impl")]:
        cfg = base.get_config()
        cfg.model[key] = value
        if key == "attn_logit_softcap":
            cfg.model.attention_impl = "dot_product_attention"  # cannot softcap scores
        with pytest.raises(UserError, match=message):
            config_lib.validate(cfg)
    config_lib.validate(base.get_config())  # every switch off: the defaults pass
