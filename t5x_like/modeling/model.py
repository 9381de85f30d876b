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

Mixture of experts (model.num_experts = E > 0; Mixtral, Qwen3-MoE, DeepSeek-style). A MoE
layer's MLP is E SwiGLU experts of width Fe = model.moe_mlp_dim (0 = mlp_dim); a router sends
each token to its model.experts_per_token = k best experts (softmax, top k, renormalized over
the k when model.router_norm_topk) and sums their outputs weighted by those probabilities;
model.num_shared_experts S > 0 adds one always-on SwiGLU of width S * Fe (DeepSeek's shared
experts). Layer i is MoE when (i + 1) % model.moe_every == 0 and i is not in
model.dense_layers (comma-separated indices, e.g. DeepSeek's first dense layers); the others
keep the dense MLP. Dense and MoE MLP weights are stacked over their own layers, so a model
with both has [L_dense, ...] and [L_moe, ...] stacks beside the [L, ...] attention stacks:

    layers.router        [Lm, d, E]  (layers, embed, None)                 1/sqrt(d)
    layers.we_gate, we_up [Lm, E, d, Fe]  (layers, experts, embed, expert_mlp)  1/sqrt(d)
    layers.we_down       [Lm, E, Fe, d]  (layers, experts, expert_mlp, embed)  1/sqrt(Fe)/sqrt(2L)
    layers.ws_gate, ws_up [Lm, d, S*Fe]  (layers, embed, mlp)                  1/sqrt(d)
    layers.ws_down       [Lm, S*Fe, d]  (layers, mlp, embed)                  1/sqrt(S*Fe)/sqrt(2L)

Dispatch is dropless by default: the token copies are sorted by expert and multiplied with
`jax.lax.ragged_dot` (a grouped matmul), so no token is ever dropped; with
model.moe_capacity_factor c > 0 each expert instead takes at most c * tokens * k / E copies of
a device's tokens (GShard), the rest are dropped (counted: the metric moe_dropped) and the
expert axis exchanges fixed-size buffers with all-to-all. Expert parallelism (mesh.expert = e):
each device holds E / e of the experts; dropless, the tokens of the expert group are
all-gathered, each device runs its experts' grouped matmul over all e * n * k gathered copies
(the other devices' come out zero: e times the rows of its share, in compute and activations)
and the results are reduce-scattered back (moe_dispatch); capacity-based, each device runs
c * n * k rows. The router's load-balancing loss (Switch Transformer: E * sum_e f_e P_e
over the batch's tokens, 1.0 when perfectly balanced) and z-loss (mean logsumexp(logits)^2)
are returned with `with_aux=True`, averaged over the MoE layers; training adds them with the
weights model.moe_aux_loss_weight and model.router_z_loss_weight and logs them
(moe_load_balance, moe_router_z).

Context parallelism (mesh.sequence > 1): activations are split along the sequence, and each
layer's attention runs in shard_map (context_attention): keys, values and segment ids are
all-gathered over the sequence axis, each device attends its own queries (global positions
from its shard index, so causal masking, packed documents and sliding windows are exact
across shard boundaries; RoPE uses the positions fed in). KV-cache decoding does not split
the sequence. model.attention_impl = "chunked" computes attention in tiles of
model.attention_block queries x keys with an online softmax and a FlashAttention-style
backward pass (chunked_attention), skipping the tiles the causal mask or a window removes whole:
no [T, S] score matrix is ever kept, memory linear in the context, with or without the
sequence axis.

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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

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
    # MoE layers (F is the expert width Fe for we_*, the shared width S * Fe for ws_*).
    "router": (("embed", None), lambda d, H, K, D, F, L: d ** -0.5),
    "we_gate": (("experts", "embed", "expert_mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "we_up": (("experts", "embed", "expert_mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "we_down": (("experts", "expert_mlp", "embed"), lambda d, H, K, D, F, L: (F * 2 * L) ** -0.5),
    "ws_gate": (("embed", "mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "ws_up": (("embed", "mlp"), lambda d, H, K, D, F, L: d ** -0.5),
    "ws_down": (("mlp", "embed"), lambda d, H, K, D, F, L: (F * 2 * L) ** -0.5),
}
# The MLP weights of dense layers and of MoE layers: each group stacked over its own layers.
DENSE_MLP = ("w_gate", "w_up", "w_down", "gate_bias", "up_bias", "down_bias")
MOE_MLP = ("router", "we_gate", "we_up", "we_down", "ws_gate", "ws_up", "ws_down")


def _layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes of the layer parameters (without the stacking axis, see stack_sizes)."""
    d, H, K, D, F = cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg), cfg.mlp_dim
    moe = moe_layers(cfg)
    shapes = {"attn_norm": (d,), "wq": (d, H, D), "wk": (d, K, D), "wv": (d, K, D),
              "wo": (H, D, d), "mlp_norm": (d,)}
    if not moe.all():
        shapes.update(w_gate=(d, F), w_up=(d, F), w_down=(F, d))
    if cfg.attn_qkv_bias:
        shapes.update(q_bias=(H, D), k_bias=(K, D), v_bias=(K, D))
    if cfg.attn_out_bias:
        shapes.update(o_bias=(d,))
    if cfg.mlp_bias and not moe.all():
        shapes.update(gate_bias=(F,), up_bias=(F,), down_bias=(d,))
    if cfg.get("qk_norm"):
        shapes.update(q_norm=(D,), k_norm=(D,))
    if cfg.get("post_norms"):
        shapes.update(attn_post_norm=(d,), mlp_post_norm=(d,))
    if moe.any():
        E, Fe, Fs = cfg.num_experts, moe_mlp_dim(cfg), shared_mlp_dim(cfg)
        shapes.update(router=(d, E), we_gate=(E, d, Fe), we_up=(E, d, Fe), we_down=(E, Fe, d))
        if Fs:
            shapes.update(ws_gate=(d, Fs), ws_up=(d, Fs), ws_down=(Fs, d))
    return shapes


def moe_layers(cfg) -> np.ndarray:
    """[L] bool: the layers whose MLP is a mixture of experts (none when num_experts is 0)."""
    L = cfg.num_layers
    if not cfg.get("num_experts"):
        return np.zeros(L, bool)
    i = np.arange(L)
    flags = (i + 1) % max(cfg.get("moe_every", 1), 1) == 0
    flags[list(dense_layer_indices(cfg))] = False
    return flags


def dense_layer_indices(cfg) -> tuple[int, ...]:
    """model.dense_layers ("0,1") as indices; config.validate checks the text."""
    text = cfg.get("dense_layers", "") or ""
    return tuple(int(part) for part in text.split(",") if part.strip())


def moe_mlp_dim(cfg) -> int:
    return cfg.get("moe_mlp_dim", 0) or cfg.mlp_dim


def shared_mlp_dim(cfg) -> int:
    return cfg.get("num_shared_experts", 0) * moe_mlp_dim(cfg)


def stack_sizes(cfg) -> dict[str, int]:
    """Leading ("layers") size of each layer parameter: L, or the number of dense or MoE
    layers for the MLP weights of each kind."""
    moe = moe_layers(cfg)
    counts = {name: int(moe.sum()) for name in MOE_MLP}
    counts.update({name: int((~moe).sum()) for name in DENSE_MLP})
    return {name: counts.get(name, cfg.num_layers) for name in _layer_shapes(cfg)}


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
        sizes = stack_sizes(cfg)
        for name, shape in _layer_shapes(cfg).items():
            names, std_fn = _LAYER_PARAMS[name]
            F = (moe_mlp_dim(cfg) if name.startswith("we_") else
                 shared_mlp_dim(cfg) if name.startswith("ws_") else cfg.mlp_dim)
            dims = (cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, _head_dim(cfg), F, L)
            std = std_fn(*dims) if std_fn else _norm_init(cfg)
            setattr(self, name, _param(rngs.params(), (sizes[name], *shape), std,
                                       ("layers", *names), dtype))

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
                 lora_dropout=0.0, with_aux=False):
        """tokens [B, T] -> float32 logits [B, T, V] (with_aux: (logits, aux), see `hidden`).

        lora: LoRA adapters added to the weights they adapt (t5x_like/modeling/peft.py `combine`):
        {"layers": {"wq": {"a": [L, d, r], "b": [L, r, H, D]}, ...}, "embed": {"a", "b"},
        "lm_head": {"a", "b"}}, b already scaled by alpha / rank; lora_dropout applies to the
        adapters' inputs when dropout_rng is given.
        """
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                        dropout_rng=dropout_rng, lora=lora, lora_dropout=lora_dropout,
                        with_aux=with_aux)
        if with_aux:
            return self.logits(h[0], lora), h[1]
        return self.logits(h, lora)

    def score(self, tokens, last, *, positions=None, segment_ids=None, dropout_rng=None,
              lora=None, lora_dropout=0.0):
        """Reward model: tokens [B, T], last [B] (index of each row's last reply token) ->
        float32 scores [B]."""
        h = self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                        dropout_rng=dropout_rng, lora=lora, lora_dropout=lora_dropout)
        h_last = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]  # [B, T, d] -> [B, d]
        return h_last.astype(jnp.float32) @ self.reward_head[...].astype(jnp.float32)

    def hidden(self, tokens, *, positions=None, segment_ids=None, dropout_rng=None, lora=None,
               lora_dropout=0.0, with_aux=False):
        """tokens [B, T] -> final-normed hidden states [B, T, d] in the compute dtype.

        with_aux: (hidden, aux), aux the MoE router's statistics averaged over the MoE layers
        ({} for a dense model): moe_load_balance, moe_router_z, moe_dropped (the share of token
        copies dropped for capacity), and moe_aux_loss, their weighted sum that training adds.
        """
        cfg = self.cfg
        lora = lora or {}
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
        context = layer_context(cfg, positions, attention_mask(segment_ids, segment_ids),
                                segment_ids=segment_ids)
        stacks = _LayerStacks(cfg, self.layers.arrays())

        def body(x, xs):
            params, key, adapters, lora_key, i, *local = xs
            return layer(stacks.bind(params, i), x, context(*local), cfg, rate, key,
                         lora=(adapters, lora_rate, lora_key))[::2]

        body = _remat(body, cfg.remat)
        xs = (stacks.scanned, keys[:-1], lora.get("layers", {}), lora_keys,
              jnp.arange(cfg.num_layers), *context.flags)
        if cfg.scan_layers:
            x, aux = jax.lax.scan(body, x, xs)
        else:
            outs = []
            for i in range(cfg.num_layers):
                params = stacks.layer(i)
                x, a = body(x, (params, *jax.tree.map(lambda a, i=i: a[i], xs[1:])))
                outs.append(a)
            aux = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        h = rms_norm(x, self.final_norm[...], cfg.norm_eps, cfg.norm_plus_one)
        return (h, moe_aux_summary(cfg, aux)) if with_aux else h

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

        The sequence is never split over the mesh's sequence axis here (decoding attends one
        new token, or a prompt, to the cache on each device as a whole).
        """
        cfg = self.cfg
        lora = lora or {}
        x = self._embed_tokens(tokens, lora)
        segments = jax.lax.dynamic_update_slice(cache["segments"], segment_ids, (0, index))
        context = layer_context(cfg, positions, attention_mask(segment_ids, segments,
                                                              q_offset=index), q_offset=index)
        stacks = _LayerStacks(cfg, self.layers.arrays())

        def body(x, xs):
            params, k_cache, v_cache, adapters, i, *local = xs
            x, (k_cache, v_cache), _ = layer(stacks.bind(params, i), x, context(*local), cfg,
                                             0.0, None, kv_cache=(k_cache, v_cache, index),
                                             lora=(adapters, 0.0, None))
            return x, (k_cache, v_cache)

        if layers is not None:  # per-layer weights and cache: unrolled, nothing sliced
            outs = []
            for i in range(cfg.num_layers):
                adapters = jax.tree.map(lambda a, i=i: a[i], lora.get("layers", {}))
                local = tuple(f[i] for f in context.flags)
                x, kv = body(x, (unstacked_layer(layers, cfg, i), cache["k"][i], cache["v"][i],
                                 adapters, i, *local))
                outs.append(kv)
            k, v = (tuple(parts) for parts in zip(*outs))
        else:
            xs = (stacks.scanned, cache["k"], cache["v"], lora.get("layers", {}),
                  jnp.arange(cfg.num_layers), *context.flags)
            if cfg.scan_layers:
                x, (k, v) = jax.lax.scan(body, x, xs)
            else:
                outs = []
                for i in range(cfg.num_layers):
                    x, kv = body(x, (stacks.layer(i), *jax.tree.map(lambda a, i=i: a[i], xs[1:])))
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


def layer(p, x, att: "AttnInputs", cfg, rate, key, kv_cache=None, lora=None):
    """One transformer layer on per-layer parameters `p` (dict of arrays without "layers").

    att: what it attends with (AttnInputs). With kv_cache=(k_cache, v_cache, index) the new
    keys/values are written into the caches at slot `index` and attention reads the whole
    cache (mask [B, T, S]). lora=(adapters of this layer, dropout rate, key) adds the low-rank
    updates. Returns (x, caches, aux): aux the MoE router's statistics (moe_block), zeros for
    a dense layer.
    """
    dtype = x.dtype
    k_attn, k_mlp = jax.random.split(key) if rate else (None, None)
    scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    sin, cos = att.sin, att.cos
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
            o = jax.nn.dot_product_attention(q, k_bskd, v_bskd, mask=att.mask[:, None],
                                             scale=scale)
        else:
            o = _attend_cache(q, k_heads, v_heads, att.mask, scale, cfg.attn_logit_softcap)
    else:
        k, v = repeat_kv(k, cfg), repeat_kv(v, cfg)
        if partitioning.axis_size("act_len") > 1:  # the sequence is split over devices
            o = context_attention(q, k.astype(dtype), v.astype(dtype), att, cfg, scale)
        elif cfg.attention_impl == "dot_product_attention":
            o = jax.nn.dot_product_attention(q, k.astype(dtype), v.astype(dtype),
                                             mask=att.mask[:, None], scale=scale)
        elif cfg.attention_impl == "chunked":  # no [T, S] mask: built per block
            T = q.shape[1]
            seg = att.segments if att.segments is not None else jnp.ones(q.shape[:2], jnp.int32)
            o = chunked_attention(q, k.astype(dtype), v.astype(dtype), jnp.arange(T),
                                  jnp.arange(T), seg, seg, att.local, chunk=cfg.attention_block,
                                  scale=scale, softcap=cfg.attn_logit_softcap,
                                  window=cfg.sliding_window)
        else:  # blocks only in self-attention over whole sequences (training, scoring)
            o = attention(q, k.astype(dtype), v.astype(dtype), att.mask,
                          block=cfg.attention_block, scale=scale,
                          softcap=cfg.attn_logit_softcap)
    o = _bias(_proj(o, p, "wo", lora, n_in=2), p, "o_bias")
    if cfg.post_norms:
        o = _norm(o, p, "attn_post_norm", cfg)
    x = x + _dropout(o, rate, k_attn)
    x = partitioning.constrain(x, ("act_batch", "act_len", "act_embed"))

    h = _norm(x, p, "mlp_norm", cfg)
    out, aux = mlp_block(p, h, cfg, lora, att.segments)
    if cfg.post_norms:
        out = _norm(out, p, "mlp_post_norm", cfg)
    x = x + _dropout(out, rate, k_mlp)
    return partitioning.constrain(x, ("act_batch", "act_len", "act_embed")), kv_cache, aux


def dense_mlp(p, h, cfg, lora=None):
    """The gated MLP (SwiGLU or GeGLU) of a dense layer: h [B, T, d] -> [B, T, d]."""
    gate = _bias(_proj(h, p, "w_gate", lora), p, "gate_bias")
    up = _bias(_proj(h, p, "w_up", lora), p, "up_bias")
    hidden = partitioning.constrain(_activation(gate, cfg) * up,
                                    ("act_batch", "act_len", "act_mlp"))
    return _bias(_proj(hidden, p, "w_down", lora), p, "down_bias")


def _activation(gate, cfg):
    return (jax.nn.gelu(gate, approximate=True) if cfg.mlp_activation == "gelu_tanh"
            else jax.nn.silu(gate))


def mlp_block(p, h, cfg, lora=None, segments=None):
    """The layer's MLP, dense or MoE by the weights in `p` (or, in a scan over a model with
    both kinds, by the layer's flag: p["_mixed"] from _LayerStacks.bind). Returns (out, aux)."""
    if "_mixed" in p:
        is_moe, index, stacks = p["_mixed"]
        rest = {k: v for k, v in p.items() if k != "_mixed"}

        def pick(names):
            return {**rest, **{n: jax.lax.dynamic_index_in_dim(stacks[n], index, keepdims=False)
                               for n in names if n in stacks}}
        return jax.lax.cond(is_moe,
                            lambda h: moe_block(pick(MOE_MLP), h, cfg, segments),
                            lambda h: (dense_mlp(pick(DENSE_MLP), h, cfg, lora),
                                       _no_moe_aux(h)), h)
    if "router" in p:
        return moe_block(p, h, cfg, segments)
    return dense_mlp(p, h, cfg, lora), _no_moe_aux(h)


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
    once, for `Transformer.decode(layers=...)`). A model with both dense and MoE layers gets
    a dict of each stack's rows instead (parameter name -> list), which decode resolves per
    layer (unstacked_layer): which layer is which kind is in the model config, not here."""
    stacked = params["layers"]
    num_layers = stacked["wq"].shape[0]
    rows = {name: [a[i] for i in range(a.shape[0])] for name, a in stacked.items()}
    if all(a.shape[0] == num_layers for a in stacked.values()):
        return [{name: r[i] for name, r in rows.items()} for i in range(num_layers)]
    return rows


def unstacked_layer(layers, cfg, i: int) -> dict:
    """Layer i's parameters from unstack_layers' result."""
    if not isinstance(layers, dict):
        return layers[i]
    moe, index = moe_layers(cfg), stack_index(cfg)
    mine, other = (MOE_MLP, DENSE_MLP) if moe[i] else (DENSE_MLP, MOE_MLP)
    return {name: rows[index[i] if name in mine else i]
            for name, rows in layers.items() if name not in other}


def stack_index(cfg) -> np.ndarray:
    """[L] int: each layer's row in the stack of its MLP kind (dense or MoE)."""
    moe = moe_layers(cfg)
    return np.where(moe, np.cumsum(moe) - 1, np.cumsum(~moe) - 1)


class _LayerStacks:
    """The layer loop's view of the stacked parameters. With one kind of MLP every stack has L
    rows and is scanned as it is (`scanned`). With both kinds, only the [L] stacks are scanned;
    the MLP stacks stay whole and `bind` gives each layer its row of the right one, chosen in
    the layer by a cond on its flag (mlp_block), so one layer body still compiles."""

    def __init__(self, cfg, arrays: dict):
        self.cfg = cfg
        moe = moe_layers(cfg)
        self.mixed = bool(moe.any() and not moe.all())
        mlp = set(DENSE_MLP + MOE_MLP) if self.mixed else set()
        self.scanned = {k: v for k, v in arrays.items() if k not in mlp}
        self.mlp = {k: v for k, v in arrays.items() if k in mlp}
        self.flags, self.index = jnp.asarray(moe), jnp.asarray(stack_index(cfg))
        self._np_flags, self._np_index = moe, stack_index(cfg)

    def bind(self, params: dict, i) -> dict:
        """A scanned layer's parameters plus what picks its MLP (nothing to add when the MLP
        weights are already there: one kind of MLP, or an unrolled layer)."""
        if not self.mixed or "w_gate" in params or "router" in params:
            return params
        return {**params, "_mixed": (self.flags[i], self.index[i], self.mlp)}

    def layer(self, i: int) -> dict:
        """Layer i's parameters, sliced statically (unrolled layers)."""
        params = {k: v[i] for k, v in self.scanned.items()}
        if self.mixed:
            names = MOE_MLP if self._np_flags[i] else DENSE_MLP
            params.update({k: v[self._np_index[i]] for k, v in self.mlp.items() if k in names})
        return params


def repeat_kv(k, cfg):
    """k [B, T, K, D] -> [B, T, K * r, D]: each key/value head repeated r times when the
    tensor axis is r times larger than K (partitioning.REPLICATE_IF_INDIVISIBLE), so that every
    tensor shard has the one head its query heads use. Query head h reads head h // (H / K)
    before and (h * r) // (H / K) after, the same head's copy."""
    K = k.shape[2]
    tp = partitioning.axis_size("act_kv_heads")
    if tp <= K or tp % K or cfg.num_heads % tp:
        return k
    k = jnp.repeat(k, tp // K, axis=2)
    return partitioning.constrain(k, ("act_batch", "act_len", "act_kv_heads", None))


def context_attention(q, k, v, att: "AttnInputs", cfg, scale=None):
    """Self-attention with the sequence split over the mesh's sequence axis (shard_map).

    q [B, T, H, D], k/v [B, T, K, D], all split along T. Each device all-gathers the keys,
    values and segment ids of the whole sequence and attends its own T / n queries to them:
    query t of shard i has global index i * T / n + t, which the causal mask and the sliding
    window compare with the key indices, and packed documents are told apart by the gathered
    segment ids, so documents crossing shard boundaries are exact. The keys are K heads
    (grouped-query attention keeps the gather small). Every device computes T / n x T scores
    (the causal upper triangle masked), so the work is balanced across the axis. The local
    attention is model.attention_impl's: whole (einsum, dot_product_attention) or chunked.
    """
    B, T, H, D = q.shape
    seq = partitioning.mesh_axes("act_len")
    mesh = jax.sharding.get_abstract_mesh()
    spec = lambda *names, shape: partitioning.logical_to_spec(  # noqa: E731
        names, shape=shape, mesh=mesh)
    q_spec = spec("act_batch", "act_len", "act_heads", None, shape=q.shape)
    kv_spec = spec("act_batch", "act_len", "act_kv_heads", None, shape=k.shape)
    seg_spec = spec("act_batch", "act_len", shape=(B, T))
    n = partitioning.axis_size("act_len")
    if T % n:
        raise ValueError(f"sequence length {T} is not divisible by the sequence axis ({n})")
    segments = att.segments if att.segments is not None else jnp.ones((B, T), jnp.int32)
    window = cfg.get("sliding_window", 0)
    local = jnp.asarray(False if att.local is None else att.local)

    def local_attention(q, k, v, seg, local):
        t = q.shape[1]
        gather = lambda x: jax.lax.all_gather(x, seq, axis=1, tiled=True)  # noqa: E731
        k_all, v_all, seg_all = gather(k), gather(v), gather(seg)
        q_idx = jax.lax.axis_index(seq) * t + jnp.arange(t)
        k_idx = jnp.arange(k_all.shape[1])
        if cfg.attention_impl == "chunked":
            return chunked_attention(q, k_all, v_all, q_idx, k_idx, seg, seg_all, local,
                                     chunk=cfg.attention_block, scale=scale,
                                     softcap=cfg.attn_logit_softcap, window=window)
        mask = _flash_mask(q_idx, k_idx, seg, seg_all, local, window)
        if cfg.attention_impl == "dot_product_attention":
            return jax.nn.dot_product_attention(q, k_all, v_all, mask=mask[:, None], scale=scale)
        return _attend(q, k_all, v_all, mask, scale, cfg.attn_logit_softcap)

    return jax.shard_map(local_attention, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, P()),
                         out_specs=q_spec, check_vma=False)(q, k, v, segments, local)


def chunked_attention(q, k, v, q_idx, k_idx, q_seg, k_seg, local=None, *, chunk: int,
                      scale=None, softcap: float = 0.0, window: int = 0):
    """Attention in tiles of `chunk` queries x `chunk` keys with an online softmax, as
    FlashAttention does (Dao et al. 2022), in plain XLA ops: only [chunk, chunk] scores per head
    exist at a time, tiles wholly above the causal diagonal (or, on a local layer, wholly
    outside the window) are skipped, and the backward pass (a custom VJP) keeps only the output
    and the softmax's log-normalizer, recomputing each tile's scores: memory linear in the
    context, and half the score FLOPs of a full causal matrix.

    q [B, T, H, D], k/v [B, S, K, D]; the mask is built per tile from the positions' indices
    q_idx [T], k_idx [S] (increasing; causal: key index <= query index), segment ids q_seg
    [B, T], k_seg [B, S] (packed documents apart) and, with `window` > 0, when `local` (a
    bool; a layer flag) the sliding window. The same results as _attend for every row that
    sees a key (a row that sees none, padding, averages the values of the tiles not skipped,
    where _attend averages all: nothing reads those rows)."""
    T, S = q.shape[1], k.shape[1]
    if not chunk or S % chunk or T % chunk:
        chunk = math.gcd(math.gcd(T, S), chunk or S)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    local = jnp.asarray(False if local is None else local)
    return _flash(q, k, v, q_idx, k_idx, q_seg, k_seg, local, chunk, float(scale),
                  float(softcap), int(window))


def _flash_mask(q_idx, k_idx, q_seg, k_seg, local, window):
    """[B, T, c] bool for queries at q_idx [T] and keys at k_idx [c]."""
    m = (q_idx[:, None] >= k_idx[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    if window:
        m = m & ((q_idx[:, None] - k_idx[None, :] < window) | ~local)[None]
    return m


def _flash_skip(k_idx, chunk, local, window):
    """skip(query tile's indices, key tile start) -> whether the tile is wholly masked."""
    def skip(qi, start):
        first = jax.lax.dynamic_index_in_dim(k_idx, start, keepdims=False)
        last = jax.lax.dynamic_index_in_dim(k_idx, start + chunk - 1, keepdims=False)
        out = first > qi[-1]  # every key after every query
        if window:
            out = out | (local & (qi[0] - last >= window))  # every key before the window
        return out
    return skip


def _loop(n: int, body, init):
    """body(i, carry) for i in range(n), as a while loop. Not a scan: these loops run inside a
    custom VJP, and a scan there, itself inside the layer scan, gets its intermediates saved
    for a reverse pass that never comes (the [tiles x tiles] scores: JAX 0.10)."""
    return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, body(c[0], c[1])),
                              (jnp.int32(0), init))[1]


def _flash_scores(qg, k, k_idx, k_seg, qi, qs, start, chunk, scale, softcap, local, window):
    """One tile: raw scores [B, K, G, c, c] (scaled, before the softcap), the masked scores,
    the mask, and the tile's keys."""
    kc = jax.lax.dynamic_slice_in_dim(k, start, chunk, axis=1)
    ic = jax.lax.dynamic_slice_in_dim(k_idx, start, chunk)
    sc = jax.lax.dynamic_slice_in_dim(k_seg, start, chunk, axis=1)
    raw = jnp.einsum("btkgd,bskd->bkgts", qg, kc, preferred_element_type=jnp.float32) * scale
    mask = _flash_mask(qi, ic, qs, sc, local, window)[:, None, None]
    return raw, jnp.where(mask, _softcap(raw, softcap), _MASK_VALUE), mask, kc


def _query_tile(q, q_idx, q_seg, i, chunk):
    """Query tile i: q [B, c, K, G, D]... as grouped heads, its indices and segments."""
    start = i * chunk
    return (jax.lax.dynamic_slice_in_dim(q, start, chunk, axis=1),
            jax.lax.dynamic_slice_in_dim(q_idx, start, chunk),
            jax.lax.dynamic_slice_in_dim(q_seg, start, chunk, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11))
def _flash(q, k, v, q_idx, k_idx, q_seg, k_seg, local, chunk, scale, softcap, window):
    return _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, local, chunk, scale, softcap,
                      window)[0]


def _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, local, chunk, scale, softcap, window):
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    qg_all = q.reshape(B, T, K, G, D)
    skip = _flash_skip(k_idx, chunk, local, window)

    def query_tile(i, carry):
        out, lse = carry  # [B, K, G, T, D], [B, K, G, T]
        qg, qi, qs = _query_tile(qg_all, q_idx, q_seg, i, chunk)

        def key_tile(j, carry):
            def attend(carry):
                o, m, l = carry  # [B, K, G, c, D] float32, [B, K, G, c] twice
                _, s, _, _ = _flash_scores(qg, k, k_idx, k_seg, qi, qs, j * chunk, chunk,
                                           scale, softcap, local, window)
                vc = jax.lax.dynamic_slice_in_dim(v, j * chunk, chunk, axis=1)
                m_new = jnp.maximum(m, s.max(axis=-1))
                p = jnp.exp(s - m_new[..., None])
                corr = jnp.exp(m - m_new)
                o = o * corr[..., None] + jnp.einsum(
                    "bkgts,bskd->bkgtd", p.astype(v.dtype), vc, preferred_element_type=jnp.float32)
                return o, m_new, l * corr + p.sum(axis=-1)
            return jax.lax.cond(skip(qi, j * chunk), lambda c: c, attend, carry)

        o, m, l = _loop(S // chunk, key_tile, (
            jnp.zeros((B, K, G, chunk, D), jnp.float32), jnp.full((B, K, G, chunk), -jnp.inf),
            jnp.zeros((B, K, G, chunk), jnp.float32)))
        out = jax.lax.dynamic_update_slice_in_dim(out, (o / l[..., None]).astype(out.dtype),
                                                  i * chunk, axis=3)
        return out, jax.lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i * chunk, axis=3)

    out, lse = _loop(T // chunk, query_tile, (jnp.zeros((B, K, G, T, D), q.dtype),
                                              jnp.zeros((B, K, G, T), jnp.float32)))
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D)
    return out, (q, k, v, q_idx, k_idx, q_seg, k_seg, local, out, lse)


def _flash_bwd(chunk, scale, softcap, window, res, g):
    q, k, v, q_idx, k_idx, q_seg, k_seg, local, out, lse = res
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    f32 = jnp.float32
    qg_all = q.reshape(B, T, K, G, D)
    skip = _flash_skip(k_idx, chunk, local, window)
    do_all = g.astype(f32).reshape(B, T, K, G, D).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    delta_all = jnp.sum(do_all * out.astype(f32).reshape(B, T, K, G, D).transpose(
        0, 2, 3, 1, 4), axis=-1)  # rowsum(dO * O): [B, K, G, T]

    def query_tile(i, carry):
        dq_all, dk, dv = carry
        qg, qi, qs = _query_tile(qg_all, q_idx, q_seg, i, chunk)
        tile = lambda x: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=3)  # noqa: E731
        do, delta, lt = tile(do_all), tile(delta_all), tile(lse)

        def key_tile(j, carry):
            def grads(carry):
                dq, dk, dv = carry
                start = j * chunk
                raw, s, mask, kc = _flash_scores(qg, k, k_idx, k_seg, qi, qs, start, chunk,
                                                 scale, softcap, local, window)
                vc = jax.lax.dynamic_slice_in_dim(v, start, chunk, axis=1).astype(f32)
                p = jnp.exp(s - lt[..., None])
                ds = p * (jnp.einsum("bkgtd,bskd->bkgts", do, vc) - delta[..., None])
                if softcap:  # d(cap * tanh(x / cap)) / dx
                    ds = ds * (1.0 - jnp.tanh(raw / softcap) ** 2)
                ds = jnp.where(mask, ds, 0.0) * scale  # masked scores are constants
                dq = dq + jnp.einsum("bkgts,bskd->btkgd", ds, kc.astype(f32))
                add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                    acc, jax.lax.dynamic_slice_in_dim(acc, start, chunk, axis=1) + x, start,
                    axis=1)
                return (dq, add(dk, jnp.einsum("bkgts,btkgd->bskd", ds, qg.astype(f32))),
                        add(dv, jnp.einsum("bkgts,bkgtd->bskd", p, do)))
            return jax.lax.cond(skip(qi, j * chunk), lambda c: c, grads, carry)

        dq, dk, dv = _loop(S // chunk, key_tile, (jnp.zeros((B, chunk, K, G, D), f32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq_all, dq, i * chunk, axis=1), dk, dv

    zeros = jnp.zeros((B, S, K, D), f32)
    dq, dk, dv = _loop(T // chunk, query_tile, (jnp.zeros((B, T, K, G, D), f32), zeros, zeros))
    return (dq.reshape(B, T, H, D).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None,
            None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Mixture of experts.

_MOE_AUX = ("moe_load_balance", "moe_router_z", "moe_dropped")


def _no_moe_aux(h) -> dict:
    del h
    return {name: jnp.zeros((), jnp.float32) for name in _MOE_AUX}


def moe_aux_summary(cfg, per_layer: dict) -> dict:
    """Per-layer router statistics ([L] each, zeros on dense layers) -> their means over the
    MoE layers, and moe_aux_loss = the weighted sum training adds to the loss ({} when the
    model has no MoE layer)."""
    count = int(moe_layers(cfg).sum())
    if not count:
        return {}
    out = {name: per_layer[name].sum() / count for name in _MOE_AUX}
    if not cfg.get("moe_capacity_factor"):
        del out["moe_dropped"]  # dropless: always 0
    out["moe_aux_loss"] = (cfg.get("moe_aux_loss_weight", 0.0) * out["moe_load_balance"]
                           + cfg.get("router_z_loss_weight", 0.0) * out["moe_router_z"])
    return out


def moe_block(p, h, cfg, segments=None):
    """A MoE layer's MLP: h [B, T, d] -> (out [B, T, d], router statistics).

    The router (float32) gives each token a softmax over the E experts; its top k are chosen
    and, with model.router_norm_topk, renormalized to sum to 1 (Mixtral; Qwen3-MoE's
    norm_topk_prob). The statistics are over the real tokens (segment id > 0), so padding
    counts for nothing: load balance E * sum_e f_e P_e, with f_e the share of the token copies
    sent to expert e and P_e its mean probability (1.0 when perfectly balanced, gradient
    through P only), and the router z-loss, the mean squared logsumexp of the logits.
    """
    E, k = cfg.num_experts, cfg.experts_per_token
    logits = dense(h, p["router"].astype(h.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)  # [B, T, k]
    if cfg.router_norm_topk:
        top_p = top_p / top_p.sum(axis=-1, keepdims=True)
    real = (jnp.ones(h.shape[:2]) if segments is None else (segments > 0)).astype(jnp.float32)
    n = jnp.maximum(real.sum(), 1.0)
    sent = jax.nn.one_hot(top_i, E, dtype=jnp.float32).sum(axis=2)  # [B, T, E]
    f = jnp.einsum("bt,bte->e", real, sent) / (n * k)
    P = jnp.einsum("bt,bte->e", real, probs) / n
    z = jnp.einsum("bt,bt->", real, jax.nn.logsumexp(logits, axis=-1) ** 2) / n
    out, dropped = moe_dispatch(h, top_i, top_p.astype(h.dtype), p, cfg, real)
    if "ws_gate" in p:  # shared experts: every token, no routing
        shared = _activation(dense(h, p["ws_gate"].astype(h.dtype)), cfg) * dense(
            h, p["ws_up"].astype(h.dtype))
        shared = partitioning.constrain(shared, ("act_batch", "act_len", "act_mlp"))
        out = out + dense(shared, p["ws_down"].astype(h.dtype))
    aux = {"moe_load_balance": E * jnp.sum(jax.lax.stop_gradient(f) * P),
           "moe_router_z": z, "moe_dropped": dropped}
    return partitioning.constrain(out, ("act_batch", "act_len", "act_embed")), aux


def moe_dispatch(h, top_i, top_w, p, cfg, real):
    """sum_j top_w[.., j] * expert_{top_i[.., j]}(h) for every token: h [B, T, d], top_i/top_w
    [B, T, k], real [B, T] (1 for real tokens). Returns (out [B, T, d], the share of the real
    token copies dropped for capacity: 0 when dropless).

    On a mesh it runs in shard_map over the tokens' shards (batch and sequence axes): each
    device routes its own tokens; with an expert axis it holds only E / expert experts (see
    _dispatch_dropless and _dispatch_capacity); the experts' hidden units are split over the
    tensor axis, whose partial outputs are summed. Without a mesh it is the same function on
    the whole batch.
    """
    B, T, d = h.shape
    kernel = _dispatch_capacity if cfg.get("moe_capacity_factor") else _dispatch_dropless
    weights = (p["we_gate"].astype(h.dtype), p["we_up"].astype(h.dtype),
               p["we_down"].astype(h.dtype))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        out, dropped, total = kernel(h.reshape(B * T, d), top_i.reshape(B * T, -1),
                                     top_w.reshape(B * T, -1), real.reshape(-1), weights, cfg,
                                     (), ())
        return out.reshape(B, T, d), dropped / jnp.maximum(total, 1.0)
    ep = partitioning.mesh_axes("experts")
    tp = partitioning.mesh_axes("expert_mlp")
    token_axes = partitioning.mesh_axes("act_batch") + partitioning.mesh_axes("act_len")
    if not set(ep) <= set(token_axes):
        raise ValueError(f"the experts' mesh axes {ep} must also split the batch (act_batch), "
                         "so each device routes its own tokens; fix mesh.rules")
    tok = partitioning.logical_to_spec(("act_batch", "act_len", None))
    w_in = P(ep or None, None, tp or None)
    w_out = P(ep or None, tp or None, None)

    def local(h, top_i, top_w, real, wg, wu, wd):
        b, t = h.shape[:2]
        out, dropped, total = kernel(h.reshape(b * t, d), top_i.reshape(b * t, -1),
                                     top_w.reshape(b * t, -1), real.reshape(-1), (wg, wu, wd),
                                     cfg, ep, tp)
        if tp:
            out = jax.lax.psum(out, tp)
        counts = jnp.stack([dropped, total])
        if token_axes:
            counts = jax.lax.psum(counts, token_axes)
        return out.reshape(b, t, d), counts

    out, counts = jax.shard_map(
        local, in_specs=(tok, tok, tok, P(*tok[:2]), w_in, w_in, w_out),
        out_specs=(tok, P()), check_vma=False)(h, top_i, top_w, real, *weights)
    return out, counts[0] / jnp.maximum(counts[1], 1.0)


def _expert_mlp(x, weights, group_sizes, cfg):
    """Rows x [M, d] sorted by expert, group_sizes [E_local] rows per expert (rows past their
    sum give zeros) -> [M, d]: each row through its expert's SwiGLU (grouped matmuls)."""
    wg, wu, wd = weights
    gate = jax.lax.ragged_dot(x, wg, group_sizes)
    up = jax.lax.ragged_dot(x, wu, group_sizes)
    return jax.lax.ragged_dot(_activation(gate, cfg) * up, wd, group_sizes)


def _dispatch_dropless(x, top_i, top_w, real, weights, cfg, ep, tp):
    """Dropless dispatch of one device's tokens x [n, d] (sort-based, grouped matmuls).

    With an expert axis (ep) the n tokens of every device in the expert group are all-gathered
    first ([ep * n, d]); this device computes the copies routed to its own E / ep experts, and
    the sums are reduce-scattered back, so each device ends with its own tokens' outputs.
    Copies of other devices' experts sort last, past the group sizes, and give zeros.
    Returns (out [n, d] partial over the tensor axis, 0 dropped, real copies)."""
    del tp
    k = top_i.shape[1]
    E_local = weights[0].shape[0]
    total = real.sum() * k
    if ep:
        gather = lambda a: jax.lax.all_gather(a, ep, axis=0, tiled=True)  # noqa: E731
        x, top_i, top_w = gather(x), gather(top_i), gather(top_w)
        first = jax.lax.axis_index(ep) * E_local
    else:
        first = 0
    expert = top_i.reshape(-1) - first  # [n * k], token-major
    mine = (expert >= 0) & (expert < E_local)
    expert = jnp.where(mine, expert, E_local)
    order = jnp.argsort(expert, stable=True)
    token = order // k
    group_sizes = jnp.zeros(E_local + 1, jnp.int32).at[expert].add(1)[:E_local]
    y = _expert_mlp(x[token], weights, group_sizes, cfg)
    w = jnp.where(mine, top_w.reshape(-1), 0)[order].astype(jnp.float32)
    out = jnp.zeros((x.shape[0], x.shape[1]), jnp.float32).at[token].add(
        y.astype(jnp.float32) * w[:, None])
    if ep:
        out = jax.lax.psum_scatter(out, ep, scatter_dimension=0, tiled=True)
    return out.astype(x.dtype), jnp.zeros((), jnp.float32), total


def _dispatch_capacity(x, top_i, top_w, real, weights, cfg, ep, tp):
    """Capacity-based dispatch (GShard) of one device's tokens x [n, d].

    Each expert takes at most C = ceil(capacity_factor * n * k / E) of the device's token
    copies, first choices first (all tokens' first choices, then their second...), in token
    order; the rest are dropped (they add nothing; the residual carries the token on). The
    kept copies are written to a buffer [E, C, d]; with an expert axis an all-to-all sends
    each device the slots of its own experts from every device ([ep, E / ep, C, d]) and a
    second one sends the outputs back. Returns (out [n, d], dropped real copies, real copies).
    """
    del tp
    n, d = x.shape
    k = top_i.shape[1]
    E = cfg.num_experts
    C = max(1, math.ceil(cfg.moe_capacity_factor * n * k / E))
    expert = top_i.T.reshape(-1)  # [k * n], choice-major: first choices get the first slots
    onehot = jax.nn.one_hot(expert, E, dtype=jnp.int32)
    slot = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=1)  # rank within its expert
    keep = slot < C
    token = jnp.tile(jnp.arange(n), k)
    weight = top_w.T.reshape(-1)
    real_copies = jnp.tile(real, k)
    dropped = jnp.sum(real_copies * ~keep)
    dest = jnp.where(keep, expert * C + slot, E * C)  # dropped copies go to a spare row
    buffer = jnp.zeros((E * C + 1, d), x.dtype).at[dest].set(x[token])[:E * C]
    buffer = buffer.reshape(E, C, d)
    if ep:  # [E, C, d] -> [E_local, ep * C, d]: my experts' slots from every device
        buffer = jax.lax.all_to_all(buffer, ep, 0, 1, tiled=True)
    wg, wu, wd = weights
    gate = jnp.einsum("ecd,edf->ecf", buffer, wg)
    up = jnp.einsum("ecd,edf->ecf", buffer, wu)
    y = jnp.einsum("ecf,efd->ecd", _activation(gate, cfg) * up, wd)
    if ep:  # back: [E_local, ep * C, d] -> [E, C, d] in this device's own slots
        y = jax.lax.all_to_all(y, ep, 1, 0, tiled=True)
    y = jnp.concatenate([y.reshape(E * C, d), jnp.zeros((1, d), y.dtype)])[dest]
    out = jnp.zeros((n, d), jnp.float32).at[token].add(
        y.astype(jnp.float32) * (weight * keep)[:, None].astype(jnp.float32))
    return out.astype(x.dtype), dropped.astype(jnp.float32), real.sum() * k


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


class AttnInputs(NamedTuple):
    """What one layer attends with (_LayerContext): RoPE tables, the mask [B, T, S], and for
    context parallelism and the MoE router's statistics the segment ids [B, T] (None when
    decoding) and whether the layer is local (a traced bool, or None: no window)."""
    sin: jax.Array
    cos: jax.Array
    mask: jax.Array
    segments: Any = None
    local: Any = None


class _LayerContext:
    """What each layer attends with (AttnInputs), chosen per layer by `flags` ([L] bool,
    local or not; an empty tuple when every layer is alike), which the layer loop scans as data
    beside the weights."""

    def __init__(self, cfg, positions, mask, q_offset, segment_ids=None):
        self.sin, self.cos = rope_for(cfg, positions)
        self.mask = mask
        self.segments = segment_ids
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

    def __call__(self, local=None) -> AttnInputs:
        if local is None:
            return AttnInputs(self.sin, self.cos, self.mask, self.segments)
        mask = self.mask & (self.near | ~local)[None]
        if self.local_rope is None:
            return AttnInputs(self.sin, self.cos, mask, self.segments, local)
        sin, cos = (jnp.where(local, a, b) for a, b in zip(self.local_rope, (self.sin, self.cos)))
        return AttnInputs(sin, cos, mask, self.segments, local)


def layer_context(cfg, positions, mask, q_offset=0, segment_ids=None) -> _LayerContext:
    """The per-layer attention inputs for positions [B, T] and mask [B, T, S] (see
    _LayerContext); q_offset: the key index of the first query (the cache slot, decoding);
    segment_ids [B, T] of self-attention over whole sequences (training, scoring)."""
    return _LayerContext(cfg, positions, mask, q_offset, segment_ids)


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


def apply_hidden(graphdef, params, tokens, lora=None, with_aux=False, **kwargs):
    """Functional call without the output layer: (hidden [B, T, d], head, logits_fn) where
    logits_fn(head, h) = the logits of h (`output_logits`). The chunked loss
    (losses.chunked_loss) takes them apart so that the full [B, T, V] logits never exist.
    with_aux: ((hidden, head, logits_fn), aux), aux as `Transformer.hidden` gives it."""
    m = nnx.merge(graphdef, params)
    h = m.hidden(tokens, lora=lora, with_aux=with_aux, **kwargs)
    h, aux = h if with_aux else (h, None)
    out = (h, m.output_head(lora), functools.partial(
        output_logits, unpadded_vocab_size=m.cfg.unpadded_vocab_size,
        softcap=m.cfg.final_logit_softcap))
    return (out, aux) if with_aux else out


def add_moe_aux(loss, stats: dict, aux: dict):
    """A language-model loss (a sum over the `stats["weight_sum"]` targets) plus the MoE
    router's losses (`hidden(with_aux=True)`), which are means: they enter the sum times the
    weight, so the division by the batch's total weight leaves them as they are, micro-batches
    weighted by their targets. Their values are added to `stats` as sums the same way
    (moe_load_balance_sum, ...), for the step's metrics. A dense model's {} changes nothing."""
    if not aux:
        return loss, stats
    weight = stats["weight_sum"]
    stats = {**stats, **{f"{k}_sum": jax.lax.stop_gradient(v) * weight
                         for k, v in aux.items() if k != "moe_aux_loss"}}
    return loss + aux["moe_aux_loss"] * weight, stats


def count_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
