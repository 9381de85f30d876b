"""The decoder-only transformer (Llama-style), in Flax NNX.

    tokens [B, T] -> embed -> L x (RMSNorm -> GQA attention with RoPE -> +residual,
                                   RMSNorm -> SwiGLU MLP -> +residual) -> RMSNorm -> logits [B, T, V]

Parameters are stacked over layers (leading axis "layers") so the layer body is compiled once
and scanned (`model.scan_layers`); unrolled layers read the same stacked parameters, so
checkpoints do not depend on that switch. Every parameter carries logical axis names (its
`logical_axes` metadata); partitioning.py maps them to mesh axes. (Not NNX's own `out_sharding`
key: NNX would resolve that against the mesh by itself, bypassing the rules table.)

Initialization (fan-in scaled; residual outputs further scaled by 1/sqrt(2L), as in GPT-2):

    parameter            shape          logical axes                      init std
    embed                [V, d]         (vocab, embed)                    1 (untied), 1/sqrt(d) (tied)
    layers.attn_norm     [L, d]         (layers, norm)                    ones
    layers.wq            [L, d, H, D]   (layers, embed, heads, head_dim)  1/sqrt(d)
    layers.wk, wv        [L, d, K, D]   (layers, embed, kv_heads, head_dim) 1/sqrt(d)
    layers.wo            [L, H, D, d]   (layers, heads, head_dim, embed)  1/sqrt(H*D)/sqrt(2L)
    layers.mlp_norm      [L, d]         (layers, norm)                    ones
    layers.w_gate, w_up  [L, d, F]      (layers, embed, mlp)              1/sqrt(d)
    layers.w_down        [L, F, d]      (layers, mlp, embed)              1/sqrt(F)/sqrt(2L)
    layers.q_norm, k_norm [L, D]        (layers, head_dim)                ones   model.qk_norm
    layers.attn_post_norm, mlp_post_norm [L, d] (layers, norm)            ones   model.post_norms
    final_norm           [d]            (norm,)                           ones
    lm_head              [d, V]         (embed, vocab)                    1/sqrt(d) (absent if tied)
    reward_head          [d]            (embed,)                          zeros (model.reward_head)

Optional biases (for imported Qwen2-style or biased Llama models; absent by default), all zeros:

    layers.q_bias        [L, H, D]      (layers, heads, head_dim)         model.attn_qkv_bias
    layers.k_bias, v_bias [L, K, D]     (layers, kv_heads, head_dim)      model.attn_qkv_bias
    layers.o_bias        [L, d]         (layers, embed)                   model.attn_out_bias
    layers.gate_bias, up_bias [L, F]    (layers, mlp)                     model.mlp_bias
    layers.down_bias     [L, d]         (layers, embed)                   model.mlp_bias

Architecture switches of imported families (all off by default; t5x_like/interop/hf.py sets them):

    model.qk_norm              RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    model.post_norms           RMSNorm also after attention and after the MLP, before each
                               residual add (Gemma 2 and 3; HF calls the MLP's pre-norm
                               pre_feedforward_layernorm)
    model.norm_plus_one        every RMSNorm scales by (1 + w), its weights starting at zero (Gemma)
    model.mlp_activation       silu (SwiGLU) or gelu_tanh (GeGLU with tanh-approximate GELU, Gemma)
    model.embed_scale          embeddings times sqrt(hidden_dim), rounded to the compute dtype
    model.query_pre_attn_scalar  scores scaled by its -1/2 power instead of head_dim's (Gemma)
    model.attn_logit_softcap   scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    model.final_logit_softcap  the same on the output logits (Gemma 2)
    model.sliding_window       W > 0: "local" layers attend only to the W most recent keys
                               (query index - key index < W, HF's convention), within the
                               segment as always; model.global_every = n makes every n-th layer
                               (i + 1) % n == 0 global (Gemma 2: 2, Gemma 3: 6), 0 makes all local
    model.rope_local_theta     > 0: local layers use RoPE with this base and no scaling, global
                               ones model.rope_theta with model.rope_scaling (Gemma 3)

Which layers are local is data ([L] flags scanned with the weights), so alternating local and
global layers still compile one layer body.

RoPE frequencies can be rescaled for long contexts as HF transformers does ("linear" and
"llama3", `model.rope_scaling`). When `model.unpadded_vocab_size` is set (imported models), the
logits of the padding rows at or above it are masked, so they are never predicted or sampled.

A reward model (`model.reward_head`, task=reward) is the same transformer with one more vector:
its score of a sequence is reward_head . h[last], the final hidden state at the last token of the
reply. It starts at zero, so every reply scores 0 until training separates them.

Dropout is functional (an explicit key per call, folded per layer), so a step's randomness is a
pure function of (seed, step): nothing random needs saving for an exact resume.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from t5x_like.core import defaults
from t5x_like.modeling import partitioning

_MASK_VALUE = -1e9  # finite, so a fully masked row (padding) gives a uniform softmax, not NaN

_ZEROS = lambda d, H, K, D, F, L: 0.0  # noqa: E731 (biases start at zero)

# name -> (logical axes without "layers", init std as a function of (d, H, K, D, F, L); None =
# ones, 0 = zeros). The biases exist only when the model config asks for them.
_LAYER_PARAMS: dict[str, tuple[tuple[str, ...], Any]] = {
    "attn_norm": (("norm",), None),
    "wq": (("embed", "heads", "head_dim"), lambda d, H, K, D, F, L: d ** -0.5),
    "wk": (("embed", "kv_heads", "head_dim"), lambda d, H, K, D, F, L: d ** -0.5),
    "wv": (("embed", "kv_heads", "head_dim"), lambda d, H, K, D, F, L: d ** -0.5),
    "wo": (("heads", "head_dim", "embed"), lambda d, H, K, D, F, L: (H * D * 2 * L) ** -0.5),
    "mlp_norm": (("norm",), None),
    "w_gate": (("embed", "mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "w_up": (("embed", "mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "w_down": (("mlp", "embed"), lambda d, H, K, D, F, L: (F * 2 * L) ** -0.5),
    "q_bias": (("heads", "head_dim"), _ZEROS),
    "k_bias": (("kv_heads", "head_dim"), _ZEROS),
    "v_bias": (("kv_heads", "head_dim"), _ZEROS),
    "o_bias": (("embed",), _ZEROS),
    "gate_bias": (("mlp",), _ZEROS),
    "up_bias": (("mlp",), _ZEROS),
    "down_bias": (("embed",), _ZEROS),
    "q_norm": (("head_dim",), None),
    "k_norm": (("head_dim",), None),
    "attn_post_norm": (("norm",), None),
    "mlp_post_norm": (("norm",), None),
}


def _layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, H, K, D, F = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg), cfg.mlp_dim
    shapes = {"attn_norm": (d,), "wq": (d, H, D), "wk": (d, K, D), "wv": (d, K, D),
              "wo": (H, D, d), "mlp_norm": (d,), "w_gate": (d, F), "w_up": (d, F),
              "w_down": (F, d)}
    if cfg.attn_qkv_bias:
        shapes.update(q_bias=(H, D), k_bias=(K, D), v_bias=(K, D))
    if cfg.attn_out_bias:
        shapes.update(o_bias=(d,))
    if cfg.mlp_bias:
        shapes.update(gate_bias=(F,), up_bias=(F,), down_bias=(d,))
    if cfg.get("qk_norm"):
        shapes.update(q_norm=(D,), k_norm=(D,))
    if cfg.get("post_norms"):
        shapes.update(attn_post_norm=(d,), mlp_post_norm=(d,))
    return shapes


def _head_dim(cfg) -> int:
    return cfg.head_dim or cfg.hidden_dim // cfg.num_heads



def _norm_init(cfg):
    """A norm scale's init (see _param): ones, or zeros when it is applied as (1 + w)."""
    return 0 if cfg.get("norm_plus_one") else None


def _param(key, shape, std, names, dtype) -> nnx.Param:
    if std is None:
        value = jnp.ones(shape, dtype)
    elif std == 0:
        value = jnp.zeros(shape, dtype)
    else:
        value = std * jax.random.normal(key, shape, dtype)
    return nnx.Param(value, logical_axes=tuple(names))


class Layers(nnx.Module):
    """All transformer layers' parameters, stacked along a leading "layers" axis."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        L, dtype = cfg.num_layers, jnp.dtype(cfg.param_dtype)
        dims = (cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg), cfg.mlp_dim, L)
        for name, shape in _layer_shapes(cfg).items():
            names, std_fn = _LAYER_PARAMS[name]
            std = std_fn(*dims) if std_fn else _norm_init(cfg)
            setattr(self, name, _param(rngs.params(), (L, *shape), std, ("layers", *names), dtype))

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in _LAYER_PARAMS if hasattr(self, name)}


class Transformer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        # Frozen: hashable, so the graphdef can be a static jit argument. Keys added to the model
        # config later get their defaults (the original model) when a config predates them.
        self.cfg = cfg = ml_collections.FrozenConfigDict(
            {**defaults.LATER_MODEL_KEYS, **cfg})
        d, V, dtype = cfg.hidden_dim, cfg.vocab_size, jnp.dtype(cfg.param_dtype)
        embed_std = d ** -0.5 if cfg.tie_embeddings else 1.0
        self.embed = _param(rngs.params(), (V, d), embed_std, ("vocab", "embed"), dtype)
        self.layers = Layers(cfg, rngs=rngs)
        self.final_norm = _param(None, (d,), _norm_init(cfg), ("norm",), dtype)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs.params(), (d, V), d ** -0.5, ("embed", "vocab"), dtype)
        if cfg.reward_head:
            self.reward_head = _param(None, (d,), 0, ("embed",), dtype)

    def __call__(self, tokens, *, positions=None, segment_ids=None, dropout_rng=None, lora=None,
                 lora_dropout=0.0):
        """tokens [B, T] -> float32 logits [B, T, V].

        lora: LoRA adapters added to the weights they adapt (t5x_like/modeling/peft.py `combine`):
        {"layers": {"wq": {"a": [L, d, r], "b": [L, r, H, D]}, ...}, "embed": {"a", "b"},
        "lm_head": {"a", "b"}}, b already scaled by alpha / rank; lora_dropout applies to the
        adapters' inputs when dropout_rng is given.
        """
        return self.logits(self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                                       dropout_rng=dropout_rng, lora=lora,
                                       lora_dropout=lora_dropout), lora)

    def score(self, tokens, last, *, positions=None, segment_ids=None, dropout_rng=None,
              lora=None, lora_dropout=0.0):
        """Reward model: tokens [B, T], last [B] (index of each row's last reply token) ->
        float32 scores [B]."""
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                        dropout_rng=dropout_rng, lora=lora, lora_dropout=lora_dropout)
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, T, d] -> [B, d]
        return h_last.astype(jnp.float32) @ self.reward_head[...].astype(jnp.float32)

    def hidden(self, tokens, *, positions=None, segment_ids=None, dropout_rng=None, lora=None,
               lora_dropout=0.0):
        """tokens [B, T] -> final-normed hidden states [B, T, d] in the compute dtype."""
        cfg = self.cfg
        lora = lora or {}
        dtype = jnp.dtype(cfg.dtype)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        rate = cfg.dropout if dropout_rng is not None else 0.0
        keys = (jax.random.split(dropout_rng, cfg.num_layers + 1) if rate
                else jnp.zeros((cfg.num_layers + 1, 2), jnp.uint32))

        x = self._embed_tokens(tokens, lora)
        x = _dropout(x, rate, keys[-1])
        lora_rate = lora_dropout if dropout_rng is not None else 0.0
        lora_keys = (jax.random.split(jax.random.fold_in(dropout_rng, 1), cfg.num_layers)
                     if lora_rate else jnp.zeros((cfg.num_layers, 2), jnp.uint32))
        context = layer_context(cfg, positions, attention_mask(segment_ids, segment_ids))

        def body(x, xs):
            params, key, adapters, lora_key, *local = xs
            sin, cos, mask = context(*local)
            return layer(params, x, sin, cos, mask, cfg, rate, key,
                         lora=(adapters, lora_rate, lora_key))[0], None

        body = _remat(body, cfg.remat)
        xs = (self.layers.arrays(), keys[:-1], lora.get("layers", {}), lora_keys,
              *context.flags)
        if cfg.scan_layers:
            x, _ = jax.lax.scan(body, x, xs)
        else:
            for i in range(cfg.num_layers):
                x, _ = body(x, jax.tree.map(lambda a: a[i], xs))
        return rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_plus_one)

    def _embed_tokens(self, tokens, lora):
        """tokens [B, T] -> embeddings [B, T, d] in the compute dtype (scaled, if the model is)."""
        dtype = jnp.dtype(self.cfg.dtype)
        x = _embed(self.embed[...], tokens, lora.get("embed")).astype(dtype)
        if self.cfg.embed_scale:  # the scale rounded to the compute dtype first, as Gemma does
            x = x * jnp.asarray(math.sqrt(self.cfg.hidden_dim), dtype)
        return partitioning.constrain(x, ("act_batch", "act_len", "act_embed"))

    def decode(self, tokens, positions, segment_ids, cache: dict, index, lora=None,
               layers=None):
        """One incremental step with a KV cache (prefill is the same call with T > 1).

        tokens, positions, segment_ids [B, T]; cache {"k": [L, B, K, S, D], "v": [L, B, K, D, S],
        "segments": [B, S]} from `init_cache`; index: the cache slot of tokens[:, 0] (the same
        for every row: prompts are left-padded, padding has segment 0 and is never attended).
        lora: unmerged LoRA adapters, as in `__call__`. Returns float32 logits [B, T, V] and the
        updated cache.

        With `layers` (`unstack_layers(params)`: one dict of arrays per layer) and a per-layer
        cache (`init_cache(per_layer=True)`: "k", "v" tuples of L arrays) the layers run
        unrolled on their own buffers. A scan over stacked layers slices every layer's weights
        and cache out of the stacks each step, and XLA's CPU backend copies those slices:
        for one token of a small model that copy costs more than the matmuls.
        """
        cfg = self.cfg
        lora = lora or {}
        x = self._embed_tokens(tokens, lora)
        segments = jax.lax.dynamic_update_slice(cache["segments"], segment_ids, (0, index))
        context = layer_context(cfg, positions, attention_mask(segment_ids, segments,
                                                              q_offset=index), q_offset=index)

        def body(x, xs):
            params, k_cache, v_cache, adapters, *local = xs
            sin, cos, mask = context(*local)
            x, (k_cache, v_cache) = layer(params, x, sin, cos, mask, cfg, 0.0, None,
                                          kv_cache=(k_cache, v_cache, index),
                                          lora=(adapters, 0.0, None))
            return x, (k_cache, v_cache)

        if layers is not None:  # per-layer weights and cache: unrolled, nothing sliced
            outs = []
            for i, params in enumerate(layers):
                adapters = jax.tree.map(lambda a, i=i: a[i], lora.get("layers", {}))
                local = tuple(f[i] for f in context.flags)
                x, kv = body(x, (params, cache["k"][i], cache["v"][i], adapters, *local))
                outs.append(kv)
            k, v = (tuple(parts) for parts in zip(*outs))
        else:
            xs = (self.layers.arrays(), cache["k"], cache["v"], lora.get("layers", {}),
                  *context.flags)
            if cfg.scan_layers:
                x, (k, v) = jax.lax.scan(body, x, xs)
            else:
                outs = []
                for i in range(cfg.num_layers):
                    x, kv = body(x, jax.tree.map(lambda a, i=i: a[i], xs))
                    outs.append(kv)
                k, v = (jnp.stack(parts) for parts in zip(*outs))
        h = rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_plus_one)
        return self.logits(h, lora), {"k": k, "v": v, "segments": segments}

    def logits(self, h, lora=None):
        """hidden [B, T, d] -> float32 logits [B, T, V] (plus the output LoRA, if any)."""
        return output_logits(self.output_head(lora), h, self.cfg.unpadded_vocab_size,
                             self.cfg.final_logit_softcap)

    def output_head(self, lora=None):
        """(w [d, V], its LoRA adapter or None): the output projection, tied or not."""
        lora = lora or {}
        if self.cfg.tie_embeddings:
            ad = lora.get("embed")  # the tied output weight is embed.T, so (A B).T = B.T A.T
            return self.embed[...].T, ad and {"a": ad["b"].T, "b": ad["a"].T}
        return self.lm_head[...], lora.get("lm_head")


def output_logits(head, h, unpadded_vocab_size: int = 0, softcap: float = 0.0):
    """(w [d, V], LoRA or None), hidden [B, T, d] -> float32 logits [B, T, V]; vocab rows past
    `unpadded_vocab_size` (padding: never a target, never sampled) get the mask value; softcap
    > 0 bounds the others to (-softcap, softcap) (model.final_logit_softcap)."""
    w, ad = head
    out = dense(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
    if ad:
        out = out + lora_delta(h, ad).astype(jnp.float32)
    out = _softcap(out, softcap)
    rows = out.shape[-1]
    if 0 < unpadded_vocab_size < rows:
        out = jnp.where(jnp.arange(rows) < unpadded_vocab_size, out, _MASK_VALUE)
    return partitioning.constrain(out, ("act_batch", "act_len", "act_vocab"))


def layer(p, x, sin, cos, mask, cfg, rate, key, kv_cache=None, lora=None):
    """One transformer layer on per-layer parameters `p` (dict of arrays without "layers").

    With kv_cache=(k_cache, v_cache, index) the new keys/values are written into the caches at
    slot `index` and attention reads the whole cache (mask [B, T, S]). lora=(adapters of this
    layer, dropout rate, key) adds the low-rank updates. Returns (x, caches).
    """
    dtype = x.dtype
    k_attn, k_mlp = jax.random.split(key) if rate else (None, None)
    scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    h = _norm(x, p, "attn_norm", cfg)
    q = _bias(_proj(h, p, "wq", lora), p, "q_bias")
    k = _bias(_proj(h, p, "wk", lora), p, "k_bias")
    v = _bias(_proj(h, p, "wv", lora), p, "v_bias")
    if cfg.qk_norm:  # per head, over head_dim, before RoPE
        q, k = _norm(q, p, "q_norm", cfg), _norm(k, p, "k_norm", cfg)
    q = partitioning.constrain(q, ("act_batch", "act_len", "act_heads", None))
    k = partitioning.constrain(k, ("act_batch", "act_len", "act_kv_heads", None))
    v = partitioning.constrain(v, ("act_batch", "act_len", "act_kv_heads", None))
    q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
    if kv_cache is not None:
        # The cache holds keys [.., S, D] and values [.., D, S] (init_cache): each with the
        # contracted dim last, the layouts XLA's CPU dots take as they are; any other is copied
        # whole, every layer and step. A per-layer cache also merges batch and kv heads
        # ([B * K, ...]): the dots' one batch dim, so no reshape sits between the in-place
        # update and the dot (XLA fuses the update into each reader, copying the cache).
        k_cache, v_cache, index = kv_cache
        B, T, K, D = k.shape
        new_k, new_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)  # [B, K, T, D], [.., D, T]
        merged = k_cache.ndim == 3
        if merged:
            new_k, new_v = new_k.reshape(B * K, T, D), new_v.reshape(B * K, D, T)
        lead = (0,) if merged else (0, 0)
        kv_cache = (
            jax.lax.dynamic_update_slice(k_cache, new_k.astype(k_cache.dtype), (*lead, index, 0)),
            jax.lax.dynamic_update_slice(v_cache, new_v.astype(v_cache.dtype), (*lead, 0, index)))
        k_heads, v_heads = (c.astype(dtype) for c in kv_cache)
        if cfg.attention_impl == "dot_product_attention":
            S = k_heads.shape[-2]
            k_bskd = k_heads.reshape(B, K, S, D).transpose(0, 2, 1, 3)
            v_bskd = v_heads.reshape(B, K, D, S).transpose(0, 3, 1, 2)
            o = jax.nn.dot_product_attention(q, k_bskd, v_bskd, mask=mask[:, None],
                                             scale=scale)
        else:
            o = _attend_cache(q, k_heads, v_heads, mask, scale, cfg.attn_logit_softcap)
    elif cfg.attention_impl == "dot_product_attention":
        o = jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask=mask[:, None],
                                         scale=scale)
    else:  # blocks only in self-attention over whole sequences (training, scoring)
        o = attention(q, k.astype(dtype), v.astype(dtype), mask, block=cfg.attention_block,
                      scale=scale, softcap=cfg.attn_logit_softcap)
    o = _bias(_proj(o, p, "wo", lora, n_in=2), p, "o_bias")
    if cfg.post_norms:
        o = _norm(o, p, "attn_post_norm", cfg)
    x = x + _dropout(o, rate, k_attn)
    x = partitioning.constrain(x, ("act_batch", "act_len", "act_embed"))

    h = _norm(x, p, "mlp_norm", cfg)
    gate = _bias(_proj(h, p, "w_gate", lora), p, "gate_bias")
    up = _bias(_proj(h, p, "w_up", lora), p, "up_bias")
    act = (jax.nn.gelu(gate, approximate=True) if cfg.mlp_activation == "gelu_tanh"
           else jax.nn.silu(gate))
    hidden = partitioning.constrain(act * up, ("act_batch", "act_len", "act_mlp"))
    out = _bias(_proj(hidden, p, "w_down", lora), p, "down_bias")
    if cfg.post_norms:
        out = _norm(out, p, "mlp_post_norm", cfg)
    x = x + _dropout(out, rate, k_mlp)
    return partitioning.constrain(x, ("act_batch", "act_len", "act_embed")), kv_cache


def init_cache(cfg, batch: int, length: int, per_layer: bool = False) -> dict:
    """An empty KV cache for `batch` rows of `length` slots, in the compute dtype, in the
    layouts the attention dots read without a copy (layer()): keys [L, B, K, S, D] and values
    [L, B, K, D, S], or per_layer (for `decode(layers=...)`) tuples of L keys [B * K, S, D]
    and values [B * K, D, S]."""
    K, D, dtype = cfg.num_kv_heads, _head_dim(cfg), jnp.dtype(cfg.dtype)

    def zeros(shape, names):
        if per_layer:
            return tuple(partitioning.constrain(jnp.zeros(shape, dtype), names)
                         for _ in range(cfg.num_layers))
        return partitioning.constrain(jnp.zeros((cfg.num_layers, *shape), dtype),
                                      ("layers", *names))

    if per_layer:  # batch and kv heads merged: rows of one batch row's heads stay together
        return {"k": zeros((batch * K, length, D), ("act_batch", "act_len", None)),
                "v": zeros((batch * K, D, length), ("act_batch", None, "act_len")),
                "segments": jnp.zeros((batch, length), jnp.int32)}
    return {"k": zeros((batch, K, length, D), ("act_batch", "act_kv_heads", "act_len", None)),
            "v": zeros((batch, K, D, length), ("act_batch", "act_kv_heads", None, "act_len")),
            "segments": jnp.zeros((batch, length), jnp.int32)}


def unstack_layers(params) -> list[dict]:
    """The stacked layer parameters of `params` as one dict of arrays per layer (copies, made
    once, for `Transformer.decode(layers=...)`)."""
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers)]


# Projections LoRA can adapt, each with its own dropout stream (the index folded into the key).
LORA_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def dense(x, w, n_in: int = 1, preferred_element_type=None):
    """x [..., *in] @ w [*in, *out] -> [..., *out]: the last n_in dims of x contracted with the
    first n_in of w, as one 2-D matmul between reshapes.

    Why not an einsum: for "btd,dv->btv" XLA's CPU backend writes the weight gradient as a
    transposed copy of the whole output gradient plus a slower dot; flattened, the same gradient
    is one dot, 2.3x faster on the issue's S head ([4096, 256] x [256, 8192], BENCHMARKS.md).
    The reshapes only merge neighbouring dims, so they cost nothing and keep the shardings.
    """
    lead, out = x.shape[:x.ndim - n_in], w.shape[n_in:]
    y = jnp.dot(x.reshape(math.prod(lead), -1), w.reshape(-1, math.prod(out)),
                preferred_element_type=preferred_element_type)
    return y.reshape(*lead, *out)


def _proj(x, p, name, lora, n_in: int = 1):
    """x @ p[name] (see `dense`), plus the LoRA update when `lora` adapts `name`."""
    y = dense(x, p[name].astype(x.dtype), n_in)
    if lora is None or name not in lora[0]:
        return y
    adapters, rate, key = lora
    if rate:
        x = _dropout(x, rate, jax.random.fold_in(key, LORA_PROJECTIONS.index(name)))
    return y + lora_delta(x, adapters[name])


def lora_delta(x, ad):
    """(x @ A) @ B: A [in..., r] contracts x's trailing input dims, B [r, out...] expands them;
    never forms the full-size A @ B."""
    a, b = ad["a"].astype(x.dtype), ad["b"].astype(x.dtype)
    return jnp.tensordot(jnp.tensordot(x, a, a.ndim - 1), b, 1)


def _embed(table, tokens, ad):
    """Embedding rows of `tokens`, plus A[tokens] @ B when the embedding has a LoRA adapter."""
    x = jnp.take(table, tokens, axis=0)
    if ad:  # in float32: a bfloat16 base would round small updates away
        x = x.astype(jnp.float32) + (jnp.take(ad["a"], tokens, axis=0) @ ad["b"]).astype(jnp.float32)
    return x


def _bias(y, p, name):
    """y + p[name] when the model has that bias (decided at trace time), else y."""
    return y + p[name].astype(y.dtype) if name in p else y


def attention(q, k, v, mask, block: int = 0, scale=None, softcap: float = 0.0):
    """Grouped-query attention. q [B,T,H,D], k/v [B,S,K,D], mask [B,T,S] bool -> [B,T,H,D].

    Query heads are grouped onto their K shared key/value heads (G = H // K per group), so
    K/V are never repeated in memory. Softmax runs in float32.

    scale: of the scores (default head_dim ** -0.5); softcap > 0: scores -> softcap *
    tanh(scores / softcap) before the mask (model.attn_logit_softcap).

    block > 0 (causal self-attention, S == T, a multiple of block): query block i reads only
    keys of blocks <= i, skipping the upper triangle the causal mask would zero anyway: at
    T = 512, block 128 does 62% of the score and value matmuls and softmax, and the score
    tensors of the backward pass shrink alike (2.5x faster on a CPU, BENCHMARKS.md).
    """
    T, S = q.shape[1], k.shape[1]
    if not block or T != S or T <= block or T % block:
        return _attend(q, k, v, mask, scale, softcap)
    outs = [_attend(q[:, i:i + block], k[:, :i + block], v[:, :i + block],
                    mask[:, i:i + block, :i + block], scale, softcap)
            for i in range(0, T, block)]
    return jnp.concatenate(outs, axis=1)


def _attend(q, k, v, mask, scale=None, softcap=0.0):
    B, T, H, D = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores * (D ** -0.5 if scale is None else scale), softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(B, T, H, D)


def _attend_cache(q, k, v, mask, scale=None, softcap=0.0):
    """attention() of q [B, T, H, D] over a KV cache in init_cache's layouts: k [B, K, S, D]
    and v [B, K, D, S], or per layer k [B * K, S, D] and v [B * K, D, S]."""
    B, T, H, D = q.shape
    S = k.shape[-2]
    K = k.shape[1] if k.ndim == 4 else k.shape[0] // B
    G = H // K
    q = q.reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    if k.ndim == 3:
        scores = jnp.einsum("nqd,nsd->nqs", q.reshape(B * K, G * T, D), k,
                            preferred_element_type=jnp.float32).reshape(B, K, G, T, S)
    else:
        scores = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = _softcap(scores * (D ** -0.5 if scale is None else scale), softcap)
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if v.ndim == 3:
        out = jnp.einsum("nqs,nds->nqd", probs.reshape(B * K, G * T, S), v).reshape(B, K, G, T, D)
    else:
        out = jnp.einsum("bkgts,bkds->bkgtd", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)


def attention_mask(q_segments, kv_segments, q_offset=0):
    """[B, T, S] bool: causal within a sequence and never across packed documents.

    Query t sits at index q_offset + t of the key sequence (0 in training; the cache position
    when decoding), and attends to keys at indices <= its own with the same segment id.
    """
    T, S = q_segments.shape[1], kv_segments.shape[1]
    causal = (jnp.arange(T)[:, None] + q_offset) >= jnp.arange(S)[None, :]
    same_doc = q_segments[:, :, None] == kv_segments[:, None, :]
    return causal[None] & same_doc


def _softcap(x, cap: float):
    """cap * tanh(x / cap): smooth, bounded to (-cap, cap); x itself when cap is 0 (off)."""
    return jnp.tanh(x / cap) * cap if cap else x


def local_layers(cfg) -> np.ndarray:
    """[L] bool: the layers that attend within model.sliding_window (none without one)."""
    i = np.arange(cfg.num_layers)
    if not cfg.get("sliding_window"):
        return np.zeros(cfg.num_layers, bool)
    if cfg.get("global_every"):
        return (i + 1) % cfg.global_every != 0
    return np.ones(cfg.num_layers, bool)


class _LayerContext:
    """What each layer attends with: (sin, cos, mask), chosen per layer by `flags` ([L] bool,
    local or not; an empty tuple when every layer is alike), which the layer loop scans as data
    beside the weights."""

    def __init__(self, cfg, positions, mask, q_offset):
        self.sin, self.cos = rope_for(cfg, positions)
        self.mask = mask
        self.flags: tuple = ()
        window = cfg.get("sliding_window", 0)
        if not window:
            return
        self.flags = (jnp.asarray(local_layers(cfg)),)
        T, S = mask.shape[1], mask.shape[2]
        # HF's convention: query index i sees key index j when i - window < j <= i. Indices,
        # not positions: the same within a packed document or after left padding.
        self.near = (jnp.arange(T)[:, None] + q_offset) - jnp.arange(S)[None, :] < window
        self.local_rope = None
        if cfg.get("rope_local_theta"):
            self.local_rope = rope(positions, _head_dim(cfg), cfg.rope_local_theta)

    def __call__(self, local=None):
        if local is None:
            return self.sin, self.cos, self.mask
        mask = self.mask & (self.near | ~local)[None]
        if self.local_rope is None:
            return self.sin, self.cos, mask
        sin, cos = (jnp.where(local, a, b) for a, b in zip(self.local_rope, (self.sin, self.cos)))
        return sin, cos, mask


def layer_context(cfg, positions, mask, q_offset=0) -> _LayerContext:
    """The per-layer attention inputs for positions [B, T] and mask [B, T, S] (see
    _LayerContext); q_offset: the key index of the first query (the cache slot, decoding)."""
    return _LayerContext(cfg, positions, mask, q_offset)


def rope(positions, head_dim: int, theta: float, inv_freq=None):
    """sin, cos tables [B, T, head_dim // 2] (float32) for integer positions [B, T].

    Unscaled frequencies unless `inv_freq` is given; a model's own are `rope_for(cfg, ...)`.
    """
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def rope_for(cfg, positions):
    """The model's sin, cos tables: RoPE with `cfg.rope_theta` and `cfg.rope_scaling` applied."""
    return rope(positions, _head_dim(cfg), cfg.rope_theta, rope_frequencies(cfg))


def rope_frequencies(cfg):
    """Inverse frequencies [head_dim // 2], rescaled as HF transformers' rope_type does.

    linear: every frequency divided by the factor (positions stretched uniformly).
    llama3: long wavelengths (beyond original_max_len / low_freq_factor) divided by the factor,
            short ones (below original_max_len / high_freq_factor) kept, and a smooth blend
            between (Llama 3.1's `_compute_llama3_parameters`).
    """
    D = _head_dim(cfg)
    inv_freq = cfg.rope_theta ** (-jnp.arange(0, D, 2, dtype=jnp.float32) / D)
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "linear":
        return inv_freq / factor
    if cfg.rope_scaling == "llama3":
        low, high, old_len = (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                              cfg.rope_original_max_len)
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, blended, scaled)
    return inv_freq


def apply_rope(x, sin, cos):
    """Rotates x [B, T, heads, D] by position; halves convention (as HF Llama's rotate_half)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x, scale, eps, plus_one: bool = False):
    """RMSNorm over the last dim, in float32; scaled by (1 + scale) when plus_one (Gemma)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    scale = scale.astype(jnp.float32)
    return (normed * (1.0 + scale if plus_one else scale)).astype(x.dtype)


def _norm(x, p, name, cfg):
    return rms_norm(x, p[name], cfg.norm_eps, cfg.norm_plus_one)


def _dropout(x, rate, key):
    if not rate:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], prevent_cse=False)


# ---------------------------------------------------------------------------------------------
# Building: abstract first (no memory), then materialized directly with its final shardings.


def abstract_model(cfg, seed: int = 0):
    """(graphdef, abstract params as a pure dict of ShapeDtypeStruct, logical names per param)."""
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    names = jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(names)


def init_params(cfg, seed: int, shardings=None):
    """Initialized parameters (pure dict), created directly on their shardings when given."""
    def make():
        return nnx.to_pure_dict(nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed))))
    return jax.jit(make, out_shardings=shardings)()


def bind(graphdef, params) -> Transformer:
    """The model module for parameters `params` (a pure dict), to call its methods."""
    return nnx.merge(graphdef, params)


def apply(graphdef, params, tokens, **kwargs):
    """Functional call: logits of the model `graphdef` with parameters `params` (pure dict)."""
    return nnx.merge(graphdef, params)(tokens, **kwargs)


def apply_hidden(graphdef, params, tokens, lora=None, **kwargs):
    """Functional call without the output layer: (hidden [B, T, d], head, logits_fn) where
    logits_fn(head, h) = the logits of h (`output_logits`). The chunked loss
    (losses.chunked_loss) takes them apart so that the full [B, T, V] logits never exist."""
    m = nnx.merge(graphdef, params)
    h = m.hidden(tokens, lora=lora, **kwargs)
    return h, m.output_head(lora), functools.partial(
        output_logits, unpadded_vocab_size=m.cfg.unpadded_vocab_size,
        softcap=m.cfg.final_logit_softcap)


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
