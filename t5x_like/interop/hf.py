"""Hugging Face interop: import Llama-family checkpoints to fine-tune, export trained models.

    python -m t5x_like.hf import --hf_dir=<dir> --out=<model dir> [--tokenizer=<file>]
    python -m t5x_like.hf export --workdir=<run or model dir> --out=<dir> [--step=N]
                                 [--dtype=bfloat16]

Import reads a Hugging Face model folder (config.json, model.safetensors or the shards listed in
model.safetensors.index.json, tokenizer.model or tokenizer.json) and writes a *model directory*:
the layout of a run's workdir with parameters only, which `runs.load` (sample, evaluate, serve)
and `--config.init_from` read like any run:

    <out>/config.json               a complete t5x_like config: the defaults (core/defaults.py)
                                    with the model section taken from the HF config
    <out>/tokenizer.model           the model's tokenizer, made chat-ready (below): SentencePiece,
      or tokenizer.json             or Hugging Face tokenizers (Llama 3, Qwen: tokenizer.json only)
    <out>/tokenizer_config.json ... the release's tokenizer_config.json (chat template, special
                                    tokens), special_tokens_map.json, generation_config.json (stop
                                    ids; written from config.json's ids when the release has
                                    none), chat_template.jinja: those it has
    <out>/checkpoints/0/params      the parameters (Orbax, as t5x_like.checkpoints writes them)

model.max_len is the HF max_position_embeddings capped at 2048 (--max_len to choose). Import
prints the --config.model.* flags that make a fine-tuning recipe build this same model, which
init_from requires.

Supported: LlamaForCausalLM, MistralForCausalLM (its sliding window), Qwen2ForCausalLM,
Qwen3ForCausalLM (query/key norms), Gemma2ForCausalLM and Gemma3ForCausalLM (GeGLU, (1 + w)
norms before and after attention and MLP, scaled embeddings, softcaps, query_pre_attn_scalar,
local/global layers from `layer_types`, Gemma 3's local RoPE base), MixtralForCausalLM and
Qwen3MoeForCausalLM (mixture-of-experts layers: router, per-expert SwiGLU weights, Qwen3-MoE's
dense layers from decoder_sparse_step and mlp_only_layers and its norm_topk_prob), with
grouped-query attention, RoPE theta, "linear" and "llama3" RoPE scaling (Gemma 3: on the
global layers), tied or untied embeddings, RMSNorm epsilon, attention and MLP biases. Each
maps to a model.* switch (model.py). Anything else (another architecture, activation, RoPE type, a layer pattern other
than "all local" or "every n-th global", quantized weights) stops with a sentence naming it.
Import streams: tensors are read one at a time with the `safetensors` library (bfloat16,
float16 or float32), converted to float32 in our layout and written straight into the Orbax
checkpoint (ParamsWriter: one chunk per layer), so the host holds one tensor at a time, plus
the embedding and output head (finished last, when the added pieces' rows are known) and the
pages of the shard being read: peak RSS about 1.5x the largest shard file plus a fixed
overhead (BENCHMARKS.md, "HF import and export").
Nothing is ever downloaded.

The tokenizer. A published Llama-style tokenizer.model has its own special ids (unk 0, bos 1,
eos 2), usually no pad id, and none of the chat markers of data_pipelines/chat_template.py; fine-
tuning needs both. Import appends what is missing to the SentencePiece model: each marker as a
user-defined piece (always one token) and a `<pad>` control piece. It does so by appending
encoded protobuf fields to the serialized model (a parser concatenates a repeated field's
entries wherever they appear), so no generated protobuf module is imported, whose version can
clash with the installed protobuf runtime. A tokenizer.json (when the release has no
tokenizer.model) gets the missing markers as added tokens (not special: decoded as text) after
its own ids, in tokenizer.json and tokenizer_config.json's added_tokens_decoder; everything else
is kept byte for byte. data_pipelines.tokenizer reads the special ids from the model's files, so
imported and t5x_like-trained tokenizers work alike everywhere.

The vocabulary. The new pieces' ids follow the tokenizer's own; their embedding and output rows
start as the mean of the existing rows: a neutral input, and logits that neither favour nor rule
out the new tokens until fine-tuning teaches them. (Where the HF embedding has more rows than
the tokenizer has pieces, no piece maps to those rows, and the new pieces take the first of
them.) Every other HF row is kept exactly; the embedding is padded to model.vocab_multiple as
in every t5x_like model, and model.unpadded_vocab_size masks the padding rows' logits, so they
are never predicted or sampled. Export slices the padding off again: to unpadded_vocab_size, or
to the tokenizer's size for a model trained here.

Export writes config.json and model.safetensors in the layout of the transformers class that
computes the model (`hf_family`: the class it was imported from; LlamaForCausalLM for a model
trained here, Qwen2ForCausalLM for one with query/key/value biases only), plus the
tokenizer (tokenizer_lib.export_files): an imported tokenizer.json with its files as imported
(with the added markers); a SentencePiece tokenizer as tokenizer.model plus the equivalent
tokenizer.json, which transformers reads as it is (same ids, no conversion) under every class
but Qwen2's: transformers builds its own Qwen2 tokenizer for every qwen2 model, so a qwen2-shaped
model with such a tokenizer is exported as LlamaForCausalLM (o_proj bias zeros: the same
function). tokenizer_config.json carries the run's chat template (the project's for models
trained with it) and generation_config.json its stop ids (eos and the end of turn). The safetensors file is written tensor by tensor, as it is converted.
Import followed by export gives back the same tensors (with rows appended for any tokenizer
pieces import added).
"""

import base64
import inspect
import json
import math
import os
import shutil
import struct
import sys
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import sentencepiece as spm
import tqdm
from absl import flags, logging

from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import checkpoints
from t5x_like.core import cli
from t5x_like.core import config as config_lib
from t5x_like.core import defaults, files
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.core import runs
from t5x_like.core.errors import UserError

# ---------------------------------------------------------------------------------------------
# The mapping tables: every t5x_like parameter and the HF tensor it corresponds to.
#
# How each is stored in HF:
#   "vector"  same values, HF flat [n] <-> ours [..] (norm scales, biases)
#   int k     an nn.Linear weight [out, in]; ours is [in..., out...] with k input dimensions
#   "rows"    the input embedding [V, d]; ours has padding rows after V
#   "cols"    lm_head [V, d]; ours is its transpose [d, V] with padding columns after V
# RoPE needs no permutation: HF Llama's rotate_half pairs the two halves of each head, as
# model.apply_rope does.

LAYER_TENSORS: dict[str, tuple[str, Any]] = {  # under "model.layers.{i}."
    "attn_norm": ("input_layernorm.weight", "vector"),
    "wq": ("self_attn.q_proj.weight", 1),
    "wk": ("self_attn.k_proj.weight", 1),
    "wv": ("self_attn.v_proj.weight", 1),
    "wo": ("self_attn.o_proj.weight", 2),
    "q_bias": ("self_attn.q_proj.bias", "vector"),
    "k_bias": ("self_attn.k_proj.bias", "vector"),
    "v_bias": ("self_attn.v_proj.bias", "vector"),
    "o_bias": ("self_attn.o_proj.bias", "vector"),
    "mlp_norm": ("post_attention_layernorm.weight", "vector"),
    "w_gate": ("mlp.gate_proj.weight", 1),
    "w_up": ("mlp.up_proj.weight", 1),
    "w_down": ("mlp.down_proj.weight", 1),
    "gate_bias": ("mlp.gate_proj.bias", "vector"),
    "up_bias": ("mlp.up_proj.bias", "vector"),
    "down_bias": ("mlp.down_proj.bias", "vector"),
    "q_norm": ("self_attn.q_norm.weight", "vector"),
    "k_norm": ("self_attn.k_norm.weight", "vector"),
    "attn_post_norm": ("post_attention_layernorm.weight", "vector"),
    "mlp_post_norm": ("post_feedforward_layernorm.weight", "vector"),
}
# With model.post_norms (Gemma) HF's post_attention_layernorm is the norm after attention, and
# the MLP's pre-norm has its own name.
POST_NORM_NAMES = {"mlp_norm": "pre_feedforward_layernorm.weight"}
TOP_TENSORS: dict[str, tuple[str, Any]] = {
    "embed": ("model.embed_tokens.weight", "rows"),
    "final_norm": ("model.norm.weight", "vector"),
    "lm_head": ("lm_head.weight", "cols"),
}
# Buffers some checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                 "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
                 "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
# A MoE layer's tensors (model.MOE_MLP), per family: the router and, per expert {j}, the
# SwiGLU's three weights (each an nn.Linear weight: one input dimension). The checkpoints hold
# one tensor per expert (transformers 5 fuses them in memory, and writes them back apart).
MOE_TENSORS: dict[str, dict[str, tuple[str, Any]]] = {
    "mixtral": {"router": ("block_sparse_moe.gate.weight", 1),
                "we_gate": ("block_sparse_moe.experts.{j}.w1.weight", 1),
                "we_up": ("block_sparse_moe.experts.{j}.w3.weight", 1),
                "we_down": ("block_sparse_moe.experts.{j}.w2.weight", 1)},
    "qwen3_moe": {"router": ("mlp.gate.weight", 1),
                  "we_gate": ("mlp.experts.{j}.gate_proj.weight", 1),
                  "we_up": ("mlp.experts.{j}.up_proj.weight", 1),
                  "we_down": ("mlp.experts.{j}.down_proj.weight", 1)},
}
_MOE = tuple(MOE_TENSORS)
MODEL_TYPES = {"gemma3_text": "gemma3"}  # model_type where it is not the family's name
_GEMMA = ("gemma2", "gemma3")
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}
DEFAULT_MAX_LEN = 2048  # import's model.max_len cap: the sequence length sample/train use
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jax.numpy.bfloat16}


def hf_name(param: str, layer: int | None = None, post_norms: bool = False,
            family: str = "", expert: int | None = None) -> str:
    """The HF tensor of our parameter `param` (of `layer`; of `expert` in a MoE layer of
    `family`)."""
    if layer is None:
        return TOP_TENSORS[param][0]
    if param in model.MOE_MLP:
        return f"model.layers.{layer}." + MOE_TENSORS[family][param][0].format(j=expert)
    name = POST_NORM_NAMES.get(param) if post_norms else None
    return f"model.layers.{layer}.{name or LAYER_TENSORS[param][0]}"


def _hf_shape(kind, shape: tuple[int, ...], vocab: int) -> tuple[int, ...]:
    """The HF tensor's shape for one of our (per-layer) parameter shapes."""
    if kind == "vector":
        return (math.prod(shape),)
    if kind == "rows":
        return (vocab, shape[1])
    if kind == "cols":
        return (vocab, shape[0])
    return (math.prod(shape[kind:]), math.prod(shape[:kind]))


def to_hf(kind, ours: np.ndarray, vocab: int) -> np.ndarray:
    """One of our (per-layer) parameters in HF layout; embeddings sliced to `vocab` rows."""
    if kind == "vector":
        return ours.reshape(-1)
    if kind == "rows":
        return ours[:vocab]
    if kind == "cols":
        return ours[:, :vocab].T
    return ours.reshape(math.prod(ours.shape[:kind]), -1).T


# ---------------------------------------------------------------------------------------------
# Configs.


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; point --hf_dir at a Hugging Face model folder "
                        "(config.json and *.safetensors).")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore the file.") from None


def model_config_from_hf(hf: dict, path: str, max_len: int = 0) -> dict[str, Any]:
    """The t5x_like model keys for an HF config (vocab keys excepted); UserError if unsupported."""
    def need(key):
        if hf.get(key) is None:
            raise UserError(f"{path} has no '{key}'; is it the config of a causal language model?")
        return hf[key]

    arch = (hf.get("architectures") or [None])[0]
    kind = (ARCHITECTURES.get(arch) if arch
            else MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type")))
    if kind not in ARCHITECTURES.values():
        raise UserError(f"{path}: architecture {arch or hf.get('model_type')!r} is not supported; "
                        f"t5x_like imports {', '.join(ARCHITECTURES)}.")
    if hf.get("quantization_config"):
        raise UserError(f"{path}: 'quantization_config' is not supported (t5x_like imports float "
                        "weights); use the unquantized release of the model.")
    gemma = kind in _GEMMA
    act_key = "hidden_activation" if gemma and hf.get("hidden_activation") else "hidden_act"
    act = hf.get(act_key) or ("gelu_pytorch_tanh" if gemma else "silu")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        raise UserError(f"{path}: {act_key} {act!r} is not supported; t5x_like's MLP for "
                        f"{kind} is " + ("GeGLU (gelu_pytorch_tanh)." if gemma
                                         else "SwiGLU (silu)."))
    heads = need("num_attention_heads")
    hidden = need("hidden_size")
    positions = hf.get("max_position_embeddings") or DEFAULT_MAX_LEN
    max_len = max_len or min(positions, DEFAULT_MAX_LEN)
    out = {
        "hidden_dim": hidden, "num_layers": need("num_hidden_layers"), "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads, "mlp_dim": need("intermediate_size"),
        "max_len": max_len, "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        # Llama, Qwen3 and Gemma have one attention_bias switch for q, k, v and o.
        "attn_qkv_bias": kind == "qwen2" or (kind != "mistral" and bool(hf.get("attention_bias"))),
        "attn_out_bias": kind not in ("qwen2", "mistral") and bool(hf.get("attention_bias")),
        "mlp_bias": kind == "llama" and bool(hf.get("mlp_bias")),
        "qk_norm": kind in ("qwen3", "gemma3", "qwen3_moe"),
    }
    if kind in _MOE:
        out.update(_moe_from_hf(hf, kind, path, out["num_layers"]))
    if gemma:
        out.update(post_norms=True, norm_plus_one=True, mlp_activation="gelu_tanh",
                   embed_scale=True,
                   query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or out["head_dim"]),
                   attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
                   final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0))
    out.update(_window_from_hf(hf, kind, path, out["num_layers"]))
    out.update(_rope_from_hf(hf, path, positions, kind))
    return out


def _moe_from_hf(hf: dict, kind: str, path: str, num_layers: int) -> dict[str, Any]:
    """The mixture-of-experts keys of a Mixtral or Qwen3-MoE config (model.py, "Mixture of
    experts"). Router jitter noise, a training-time perturbation, is not kept."""
    experts = hf.get("num_local_experts") or hf.get("num_experts")  # transformers 5 writes
    # Qwen3-MoE's num_experts as num_local_experts too
    top_k = hf.get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 1 or not isinstance(top_k, int) or not (
            1 <= top_k <= experts):
        raise UserError(f"{path}: the experts ({experts}) and experts per token ({top_k}) must "
                        "be positive integers, the latter at most the former; restore the file.")
    if kind == "mixtral":
        return {"num_experts": experts, "experts_per_token": top_k,
                "moe_mlp_dim": hf["intermediate_size"], "moe_every": 1, "dense_layers": "",
                "router_norm_topk": True, "num_shared_experts": 0}
    dense = sorted(int(i) for i in hf.get("mlp_only_layers") or [])
    if any(not 0 <= i < num_layers for i in dense):
        raise UserError(f"{path}: mlp_only_layers {dense} names layers outside "
                        f"0..{num_layers - 1}; restore the file.")
    return {"num_experts": experts, "experts_per_token": top_k,
            "moe_mlp_dim": hf.get("moe_intermediate_size") or hf["intermediate_size"],
            "moe_every": int(hf.get("decoder_sparse_step") or 1),
            "dense_layers": ",".join(map(str, dense)),
            "router_norm_topk": bool(hf.get("norm_topk_prob", False)), "num_shared_experts": 0}


def _window_from_hf(hf: dict, kind: str, path: str, num_layers: int) -> dict[str, Any]:
    """model.sliding_window and model.global_every from HF's per-layer `layer_types` (or the
    family's rule for it where a config predates that key)."""
    window = hf.get("sliding_window")
    types = hf.get("layer_types")
    if not types:
        i = range(num_layers)
        if kind == "gemma2":
            local = [(j + 1) % 2 != 0 for j in i]
        elif kind == "gemma3":
            pattern = hf.get("sliding_window_pattern") or 6
            local = [(j + 1) % pattern != 0 for j in i]
        elif kind in ("qwen2", "qwen3"):
            local = [bool(hf.get("use_sliding_window")) and j >= hf.get("max_window_layers", 0)
                     for j in i]
        elif kind == "qwen3_moe":  # its attention windows every layer or none
            local = [bool(hf.get("use_sliding_window"))] * num_layers
        else:
            local = [kind in ("mistral", "mixtral")] * num_layers
    else:
        if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise UserError(f"{path}: layer_types {types} is not one of 'sliding_attention' or "
                            f"'full_attention' for each of the {num_layers} layers; restore "
                            "the file.")
        local = [t == "sliding_attention" for t in types]
    if not window or not any(local):
        return {"sliding_window": 0, "global_every": 0}
    if all(local):
        return {"sliding_window": int(window), "global_every": 0}
    for n in range(2, num_layers + 1):
        if local == [(j + 1) % n != 0 for j in range(num_layers)]:
            return {"sliding_window": int(window), "global_every": n}
    raise UserError(f"{path}: layer_types {types} is not supported; t5x_like's local layers are "
                    "all layers or all but every n-th (model.global_every).")


def _rope_from_hf(hf: dict, path: str, positions: int, kind: str = "") -> dict[str, Any]:
    """RoPE keys from either the transformers 5 `rope_parameters` or the older `rope_theta` +
    `rope_scaling` form; Gemma 3's local layers have their own (unscaled) base."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    local_theta = 0.0
    if kind == "gemma3":
        local = params.pop("sliding_attention", None) or {}
        full = params.pop("full_attention", None) or {}
        params.update(full)
        if "rope_theta" not in params and not hf.get("rope_theta"):
            params["rope_theta"] = 1_000_000.0  # transformers' Gemma 3 default
        if local.get("rope_type", "default") != "default":
            raise UserError(f"{path}: RoPE scaling {local['rope_type']!r} on the local layers "
                            "is not supported; t5x_like scales only the global layers' RoPE.")
        local_theta = float(local.get("rope_theta") or hf.get("rope_local_base_freq") or 10000.0)
    if any(isinstance(v, dict) for v in params.values()):
        raise UserError(f"{path}: per-layer rope_parameters are not supported; t5x_like uses one "
                        "RoPE for every layer.")
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise UserError(f"{path}: rope_scaling type {rope_type!r} is not supported; t5x_like "
                        f"supports {', '.join(ROPE_TYPES)}.")
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise UserError(f"{path}: partial_rotary_factor {partial} is not supported; t5x_like "
                        "rotates the whole head.")
    out = {"rope_theta": float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0),
           "rope_scaling": ROPE_TYPES[rope_type], "rope_local_theta": local_theta}
    if rope_type != "default":
        out["rope_scaling_factor"] = float(params.get("factor", 1.0))
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise UserError(f"{path}: llama3 RoPE scaling needs '{key}'; restore the file.")
        out.update(rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]),
                   rope_original_max_len=int(params.get("original_max_position_embeddings")
                                             or positions))
    return out


_CLASSES = {kind: arch for arch, kind in ARCHITECTURES.items()}


def hf_family(m) -> str:
    """The transformers family that computes what model config `m` does (export's class):
    Gemma 2 or 3 by their switches, Qwen3 by its query/key norms, Qwen2 by q/k/v biases alone,
    Mistral by a window on every layer, else Llama. UserError for a mix no class computes."""
    gemma = m.norm_plus_one or m.post_norms or m.embed_scale or m.mlp_activation != "silu"
    window_ok = True
    if m.get("num_experts", 0) and not gemma:
        # Mixtral: every layer MoE, renormalized top k, no biases, a window on every layer or
        # none; Qwen3-MoE: query/key norms, any dense layers, its own norm_topk_prob.
        kind = "qwen3_moe" if m.qk_norm else "mixtral"
        ok = (not m.num_shared_experts and not m.mlp_bias and m.attn_qkv_bias == m.attn_out_bias
              and (kind == "qwen3_moe" or (model.moe_layers(m).all() and m.router_norm_topk
                                           and not m.attn_qkv_bias)))
        window_ok = not m.global_every  # both classes: a window on every layer or none
    elif gemma:
        kind = "gemma3" if m.qk_norm else "gemma2"
        ok = (m.norm_plus_one and m.post_norms and m.embed_scale and m.mlp_activation == "gelu_tanh"
              and not m.mlp_bias and m.attn_qkv_bias == m.attn_out_bias
              and (kind == "gemma3" or not m.rope_local_theta))
    elif m.qk_norm:
        kind = "qwen3"
        ok = not m.mlp_bias and m.attn_qkv_bias == m.attn_out_bias
    elif m.attn_qkv_bias and not m.attn_out_bias and not m.mlp_bias:
        kind, ok = "qwen2", True
    elif m.sliding_window and not m.global_every:
        kind = "mistral"
        ok = not (m.attn_qkv_bias or m.attn_out_bias or m.mlp_bias)
    else:
        kind, ok = "llama", True
        window_ok = not m.sliding_window
    gemma_only = (m.query_pre_attn_scalar or m.attn_logit_softcap or m.final_logit_softcap
                  or m.rope_local_theta)
    if m.get("num_experts", 0) and kind not in _MOE:
        ok = False
    if not ok or not window_ok or (gemma_only and kind not in _GEMMA):
        raise UserError(f"model config: no transformers class computes this mix of switches "
                        f"(closest: {_CLASSES[kind]}); export models whose model.* keys match "
                        "one of " + ", ".join(ARCHITECTURES) + ".")
    return kind


def _layer_types(m) -> list[str]:
    return ["sliding_attention" if local else "full_attention" for local in model.local_layers(m)]


def hf_config(m, vocab: int, tok: tokenizer_lib.Tokenizer, dtype: str,
              kind: str | None = None) -> dict[str, Any]:
    """The transformers config.json for a t5x_like model config `m` with `vocab` rows (as
    the class of `kind`, default hf_family(m))."""
    kind = kind or hf_family(m)
    out = {
        "architectures": [_CLASSES[kind]],
        "model_type": "gemma3_text" if kind == "gemma3" else kind,
        "vocab_size": vocab, "hidden_size": m.hidden_dim, "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads, "head_dim": config_lib.head_dim(m),
        "max_position_embeddings": m.max_len, "rms_norm_eps": m.norm_eps,
        # The pre-transformers-5 form: older versions read it, newer ones convert it.
        "rope_theta": m.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings, "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id if tok.pad_id >= 0 else None,
        "torch_dtype": dtype,
        "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
    }
    if m.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": m.rope_scaling_factor}
    elif m.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3", "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len}
    if kind in _GEMMA:
        out["hidden_activation"] = "gelu_pytorch_tanh"
    else:
        out["hidden_act"] = "silu"
    if kind == "gemma3":  # transformers 5's form: RoPE per layer type
        full = {"rope_type": "default", **(out.pop("rope_scaling") or {}),
                "rope_theta": out.pop("rope_theta")}
        out["rope_parameters"] = {
            "full_attention": full,
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": m.rope_local_theta or full["rope_theta"]}}
    if kind in ("qwen2", "qwen3"):
        out.update(use_sliding_window=bool(m.sliding_window),
                   sliding_window=m.sliding_window or None, max_window_layers=m.num_layers,
                   layer_types=_layer_types(m))
    elif kind == "qwen3_moe":
        out.update(use_sliding_window=bool(m.sliding_window),
                   sliding_window=m.sliding_window or None)
    elif kind in ("mistral", "mixtral"):
        out["sliding_window"] = m.sliding_window or None
    if kind == "mixtral":
        out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                   intermediate_size=model.moe_mlp_dim(m), router_jitter_noise=0.0,
                   output_router_logits=False)
    elif kind == "qwen3_moe":
        out.update(num_experts=m.num_experts, num_experts_per_tok=m.experts_per_token,
                   moe_intermediate_size=model.moe_mlp_dim(m), decoder_sparse_step=m.moe_every,
                   mlp_only_layers=list(model.dense_layer_indices(m)),
                   norm_topk_prob=bool(m.router_norm_topk), output_router_logits=False)
    elif kind in _GEMMA:
        qpas = m.query_pre_attn_scalar or config_lib.head_dim(m)
        out.update(sliding_window=m.sliding_window or m.max_len, layer_types=_layer_types(m),
                   query_pre_attn_scalar=int(qpas) if float(qpas).is_integer() else qpas,
                   attn_logit_softcapping=m.attn_logit_softcap or None,
                   final_logit_softcapping=m.final_logit_softcap or None)
    if kind not in ("qwen2", "mistral", "mixtral"):
        out.update(attention_bias=bool(m.attn_qkv_bias or m.attn_out_bias))
    if kind == "llama":
        out.update(mlp_bias=bool(m.mlp_bias), pretraining_tp=1)
    return out


# ---------------------------------------------------------------------------------------------
# The tokenizer: appending what fine-tuning needs to a SentencePiece model.

_CONTROL, _USER_DEFINED = 3, 4  # ModelProto.SentencePiece.Type


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _piece(text: str, kind: int) -> bytes:
    """ModelProto.pieces (1) += SentencePiece{piece (1), score (2) = 0, type (3)}."""
    body = _field(1, text.encode("utf-8")) + _varint(2 << 3 | 5) + struct.pack("<f", 0.0)
    return _field(1, body + _varint(3 << 3) + _varint(kind))


def chat_ready_tokenizer(proto: bytes, path: str) -> tuple[bytes, list[str]]:
    """Appends the missing chat markers and a pad piece to a serialized SentencePiece model.

    Returns the new model and the added pieces, whose ids follow the existing ones in order.
    """
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(proto)
    except RuntimeError as e:
        raise UserError(f"{path} is not a SentencePiece model ({e}); pass the model's "
                        "tokenizer.model with --tokenizer.") from None
    if sp.bos_id() < 0 or sp.eos_id() < 0:
        raise UserError(f"{path} has no bos or eos piece, which t5x_like needs to mark documents; "
                        "use a tokenizer that has both.")
    added = [m for m in chat_template.MARKERS if sp.piece_to_id(m) == sp.unk_id()]
    extra = b"".join(_piece(m, _USER_DEFINED) for m in added)
    if sp.pad_id() < 0:
        pad = next(p for p in ("<pad>", "<|pad|>", "<|t5x_like_pad|>")
                   if sp.piece_to_id(p) == sp.unk_id())  # a name no piece has yet
        pad_id = sp.get_piece_size() + len(added)
        # TrainerSpec (ModelProto field 2): pad_id (43), pad_piece (48); merged into the original.
        extra += _piece(pad, _CONTROL) + _field(2, _varint(43 << 3) + _varint(pad_id)
                                                + _field(48, pad.encode("utf-8")))
        added.append(pad)
    new = proto + extra
    check = spm.SentencePieceProcessor()
    check.load_from_serialized_proto(new)
    assert check.get_piece_size() == sp.get_piece_size() + len(added), "pieces not appended"
    assert check.pad_id() >= 0 and all(check.piece_to_id(m) != check.unk_id()
                                       for m in chat_template.MARKERS)
    return new, added


# ---------------------------------------------------------------------------------------------
# Import.


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no 'weight_map'; restore the file from the model's "
                            "release.")
        files = [os.path.join(hf_dir, f) for f in sorted(set(weight_map.values()))]
    else:
        files = sorted(os.path.join(hf_dir, f) for f in os.listdir(hf_dir)
                       if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{hf_dir} has no *.safetensors weights; save the model with "
                        "safe_serialization=True (pytorch_model.bin is not read).")
    for f in files:
        if not os.path.isfile(f):
            raise UserError(f"{f} is listed in {index} but missing; download every shard.")
    return files


class SafetensorsFile:
    """One .safetensors file read tensor by tensor with plain reads, not a memory map: the
    safetensors library maps the file, and every page a tensor was read from then stays in
    the process's resident memory until the file closes (up to the whole shard)."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "rb")
        try:
            (n,) = struct.unpack("<Q", self.f.read(8))
            self.header = json.loads(self.f.read(n))
            self.header.pop("__metadata__", None)
        except (struct.error, ValueError) as e:
            self.f.close()
            raise UserError(f"{path} is not a safetensors file ({e}); download it again.") from None
        self.data_start = 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.f.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, key: str) -> str:
        return self.header[key]["dtype"]

    def get_tensor(self, key: str) -> np.ndarray:
        entry = self.header[key]
        start, end = entry["data_offsets"]
        dtype = np.dtype(_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        if end - start != math.prod(shape) * dtype.itemsize:
            raise UserError(f"{self.path}: tensor {key!r} has {end - start} bytes for shape "
                            f"{shape}; download the file again.")
        self.f.seek(self.data_start + start)
        value = np.empty(shape, dtype)
        if self.f.readinto(memoryview(value.reshape(-1).view(np.uint8))) != end - start:
            raise UserError(f"{self.path} ends inside tensor {key!r}; download it again.")
        return value


class ParamsWriter:
    """Writes a parameters-only checkpoint `<model_dir>/checkpoints/<step>` one tensor (or one
    layer of a stacked tensor) at a time, so the model never needs to be in memory at once.

    The layout is the one Orbax's StandardSave writes without OCDBT (use_ocdbt=False), which
    Orbax restores like any other: `params/_METADATA` (the tree), and per parameter a zarr v2
    array `params/<a.b>/` whose chunks are single layers ([1, ...] for stacked parameters, the
    whole array otherwise; single experts [1, 1, ...] of a MoE layer's experts), float32,
    uncompressed: each chunk file is the raw C-order bytes.
    """

    def __init__(self, model_dir: str, abstract: dict, step: int = 0):
        self.step_dir = os.path.join(checkpoints.checkpoint_dir(model_dir), str(step))
        self.dir = os.path.join(self.step_dir, "params")
        self.leaves = {}  # "a.b" -> (key path, shape, chunk shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            keys = tuple(k.key for k in path)
            chunk = (1, *leaf.shape[1:]) if keys[0] == "layers" else tuple(leaf.shape)
            if keys[-1] in _EXPERT_PARAMS:  # one expert of one layer
                chunk = (1, 1, *leaf.shape[2:])
            self.leaves[".".join(keys)] = (keys, tuple(leaf.shape), chunk)
        for name, (_, shape, chunk) in self.leaves.items():
            os.makedirs(os.path.join(self.dir, name))
            self._json(os.path.join(name, ".zarray"), {
                "chunks": list(chunk), "compressor": None, "dimension_separator": ".",
                "dtype": "<f4", "fill_value": None, "filters": None, "order": "C",
                "shape": list(shape), "zarr_format": 2})

    def _json(self, name: str, content) -> None:
        with open(os.path.join(self.dir, name), "w", encoding="utf-8") as f:
            json.dump(content, f)

    def write(self, name: str, value: np.ndarray, layer: int | tuple | None = None) -> None:
        """Parameter `name` ("embed", "layers.wq"), or its layer `layer` of a stacked one
        (a (layer, expert) pair: one expert of a MoE layer)."""
        _, shape, chunk = self.leaves[name]
        lead = () if layer is None else layer if isinstance(layer, tuple) else (layer,)
        want = shape[len(lead):]
        assert tuple(value.shape) == want, (name, value.shape, want)
        index = [0] * len(shape)
        index[:len(lead)] = lead
        path = os.path.join(self.dir, name, ".".join(map(str, index)))
        with open(path, "wb") as f:
            f.write(memoryview(np.ascontiguousarray(value, np.float32).reshape(-1).view(np.uint8)))

    def finish(self) -> None:
        """The tree metadata and Orbax's commit markers (after every chunk is written)."""
        tree = {str(keys): {"key_metadata": [{"key": k, "key_type": 2} for k in keys],
                            "value_metadata": {"value_type": "jax.Array",
                                               "skip_deserialize": False,
                                               "write_shape": list(shape)}}
                for keys, shape, _ in self.leaves.values()}
        self._json("_METADATA", {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": False,
                                 "store_array_data_equal_to_fill_value": True,
                                 "custom_metadata": None})
        self._json("_sharding", {
            base64.b64encode(name.encode()).decode(): json.dumps(
                {"sharding_type": "SingleDeviceSharding", "device_str": "cpu:0"})
            for name in self.leaves})
        with open(os.path.join(self.dir, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.dir}")
        now = time.time_ns()
        with open(os.path.join(self.step_dir, "_CHECKPOINT_METADATA"), "w") as f:
            json.dump({"item_handlers": {"params": "orbax.checkpoint._src.handlers."
                                         "standard_checkpoint_handler.StandardCheckpointHandler"},
                       "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
                       "commit_timestamp_nsecs": now, "custom_metadata": {}}, f)
        with open(os.path.join(self.step_dir, "commit_success.txt"), "w") as f:
            f.write(f"Checkpoint commit was successful to {self.step_dir}")
        # Sealed like a trained checkpoint, so damage is named when anything restores it.
        checkpoints.seal(os.path.dirname(self.step_dir), int(os.path.basename(self.step_dir)))


_EXPERT_PARAMS = ("we_gate", "we_up", "we_down")  # [L_moe, E, ...]: one HF tensor per expert


def _targets(abstract: dict, m=None) -> dict[str, tuple[tuple, Any, tuple]]:
    """HF tensor name -> (where in our params: (top name,) or ("layers", name, row[, expert]),
    kind, shape). `m`, the model config, places the MLP weights of a model with MoE layers: HF
    layer i is row i of the attention stacks, and row stack_index[i] of its MLP kind's."""
    out = {}
    for name, (_, kind) in TOP_TENSORS.items():
        if name in abstract:
            out[hf_name(name)] = ((name,), kind, abstract[name].shape)
    post_norms = "attn_post_norm" in abstract["layers"]
    family = hf_family(m) if m is not None and m.get("num_experts", 0) else ""
    for i, row, names in _layer_rows(abstract["layers"], m):
        for name in names:
            shape = abstract["layers"][name].shape[1:]
            if name in _EXPERT_PARAMS:
                for j in range(shape[0]):
                    out[hf_name(name, i, family=family, expert=j)] = (
                        ("layers", name, row, j), MOE_TENSORS[family][name][1], shape[1:])
            elif name in model.MOE_MLP:
                out[hf_name(name, i, family=family)] = (("layers", name, row),
                                                        MOE_TENSORS[family][name][1], shape)
            else:
                out[hf_name(name, i, post_norms)] = (("layers", name, row if name in
                                                      model.DENSE_MLP else i),
                                                     LAYER_TENSORS[name][1], shape)
    return out


def _layer_rows(layers: dict, m=None) -> Iterator[tuple[int, int, list[str]]]:
    """(HF layer i, its row in the MLP stacks, our layer parameters it has) for every layer."""
    L = layers["wq"].shape[0]
    moe = model.moe_layers(m) if m is not None else np.zeros(L, bool)
    rows = model.stack_index(m) if m is not None else np.arange(L)
    for i in range(L):
        other = model.DENSE_MLP if moe[i] else model.MOE_MLP
        yield i, int(rows[i]), [n for n in layers if n not in other]


def read_params(files: list[str], abstract: dict, hf_vocab: int, tied: bool,
                writer: "ParamsWriter | None" = None,
                new_rows: tuple[int, int, int] = (0, 0, 0), m=None) -> dict:
    """Reads every tensor once, converted to float32 in our layout.

    Without `writer`: into preallocated arrays (numpy), returned; embedding rows past
    `hf_vocab` (added pieces and padding) are left zero for the caller. With `writer`: each
    tensor is written to the checkpoint as soon as it is read and dropped (peak memory: one
    tensor, plus the pages of the shard being read); the embedding and output head get their
    added rows (`new_rows` = (first, last, known), see _init_new_rows) first. Returns {}.
    `m`: the model config (needed for a model with MoE layers, see _targets).
    """
    stream = writer is not None
    params = {} if stream else jax.tree.map(lambda a: np.empty(a.shape, np.float32), abstract)
    for name in ("embed", "lm_head"):
        if name in abstract and not stream:
            params[name] = np.zeros(abstract[name].shape, np.float32)  # rows past hf_vocab
    targets = _targets(abstract, m)
    ignored = {hf_name("lm_head")} if tied else set()  # some tied checkpoints still hold it
    seen: set[str] = set()
    bar = tqdm.tqdm(total=len(targets), desc="import", disable=not sys.stderr.isatty())
    for path in files:
        with SafetensorsFile(path) as f:
            for key in f.keys():
                if key in ignored or key.endswith(_IGNORED_SUFFIXES):
                    continue
                if key not in targets:
                    raise UserError(f"{path} holds tensor {key!r}, which a model with this "
                                    "config.json does not have; check that the config belongs "
                                    "to these weights.")
                where, kind, shape = targets[key]
                dtype = f.dtype(key)
                if dtype not in _DTYPES:
                    raise UserError(f"{path}: tensor {key!r} is {dtype}; t5x_like imports "
                                    f"{', '.join(_DTYPES)} weights.")
                value = f.get_tensor(key)
                want = _hf_shape(kind, shape, hf_vocab)
                if tuple(value.shape) != want:
                    raise UserError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}, but "
                                    f"config.json implies {want}; check that they belong together.")
                if stream:  # one tensor, converted, written, dropped
                    dst = (np.zeros if kind in ("rows", "cols") else np.empty)(shape, np.float32)
                    _assign(kind, dst, value)
                    del value
                    _init_rows_of(kind, dst, *new_rows)
                    writer.write(".".join(map(str, where[:2])), dst,
                                 tuple(where[2:]) or None)
                    del dst
                else:
                    dst = (params[where[0]] if len(where) == 1
                           else params["layers"][where[1]][tuple(where[2:])])
                    _assign(kind, dst, value)
                seen.add(key)
                bar.update(1)
    bar.close()
    missing = [k for k in targets if k not in seen]
    if missing:
        raise UserError(f"tensor {missing[0]!r} (and {len(missing) - 1} more) is missing from "
                        f"{', '.join(files)}; are all shards there and does config.json match?")
    if stream:
        writer.finish()
    return params


def _assign(kind, dst: np.ndarray, hf: np.ndarray) -> None:
    """Writes an HF tensor into our (contiguous) array in place, converting to float32."""
    if kind == "rows":
        dst[:len(hf)] = hf
    elif kind == "cols":
        dst[:, :len(hf)] = hf.T
    elif kind == "vector":
        dst.reshape(-1)[...] = hf
    else:  # through a 2-D view of dst: no reshaped copy of the transposed tensor
        dst.reshape(math.prod(dst.shape[:kind]), -1)[...] = hf.T


def _init_new_rows(params: dict, first: int, last: int, known: int) -> None:
    """Rows [first, last) (added tokenizer pieces) start as the mean of the rows [0, known)."""
    _init_rows_of("rows", params["embed"], first, last, known)
    if "lm_head" in params:
        _init_rows_of("cols", params["lm_head"], first, last, known)


def _init_rows_of(kind, ours: np.ndarray, first: int, last: int, known: int) -> None:
    """_init_new_rows for one tensor: embedding rows ("rows") or output columns ("cols")."""
    if last <= first or kind not in ("rows", "cols"):
        return
    if kind == "rows":
        ours[first:last] = ours[:known].mean(axis=0)
    else:
        ours[:, first:last] = ours[:, :known].mean(axis=1, keepdims=True)


def _check_out(out: str) -> str:
    """`out` as an absolute path, refused before the (long) work if it holds anything: the
    folder is written under a temporary name and renamed into place when complete."""
    path = os.path.abspath(out)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"--out={out} already exists and is not empty; choose a new folder "
                        "or delete it.")
    return path


def import_model(hf_dir: str, out: str, *, tokenizer: str = "", max_len: int = 0) -> str:
    """HF model folder -> t5x_like model directory `out` (see the module docstring)."""
    out = _check_out(out)
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf_dir={hf_dir} is not a folder; give the folder holding the HF "
                        "model's config.json and *.safetensors.")
    config_path = os.path.join(hf_dir, "config.json")
    hf = _read_json(config_path)
    model_keys = model_config_from_hf(hf, config_path, max_len)
    hf_vocab = hf.get("vocab_size")
    if not isinstance(hf_vocab, int) or hf_vocab <= 0:
        raise UserError(f"{config_path} has no positive integer 'vocab_size'; restore the file.")
    weights = _weight_files(hf_dir)

    tok_path = tokenizer or tokenizer_lib.find(hf_dir, required=False)
    if not tok_path or not os.path.isfile(tok_path):
        where = (f"{tok_path} does not exist" if tok_path
                 else f"{hf_dir} has no tokenizer.model or tokenizer.json")
        raise UserError(f"{where}; t5x_like needs the model's tokenizer: pass it with "
                        "--tokenizer=<path>.")
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                  if hf.get(k) is not None}  # for a release without generation_config.json
    if tokenizer_lib.is_json(tok_path):  # Hugging Face tokenizers: markers as added tokens
        tok_json, added, pieces_before = tokenizer_lib.chat_ready_json(tok_path)
        added_tokens = [(m, pieces_before + k, False) for k, m in enumerate(added)]
    else:
        with open(tok_path, "rb") as f:
            proto, added = chat_ready_tokenizer(f.read(), tok_path)
        pieces_before = (spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
                         - len(added))
        added_tokens = [(m, pieces_before + k, m not in chat_template.MARKERS)
                        for k, m in enumerate(added)]
    if pieces_before > hf_vocab:
        raise UserError(f"{tok_path} has {pieces_before} pieces but {config_path} has vocab_size "
                        f"{hf_vocab}; pass the tokenizer that belongs to this model with "
                        "--tokenizer.")
    used = max(hf_vocab, pieces_before + len(added))

    cfg = defaults.get_config()
    cfg.model.update(model_keys)
    cfg.model.vocab_size = config_lib.padded_vocab_size(used, cfg.model.vocab_multiple)
    cfg.model.unpadded_vocab_size = used
    config_lib.validate(cfg)
    cfg = config_lib.resolve(cfg, pieces_before + len(added))
    _, abstract, _ = model.abstract_model(cfg.model, cfg.seed)
    logging.info("Importing %s (%s parameters) from %s", hf.get("architectures"),
                 f"{model.count_params(abstract):,}", hf_dir)

    if added:
        logging.info("Adding tokenizer pieces %s as ids %d..%d", added, pieces_before,
                     pieces_before + len(added) - 1)
    with files.atomic_dir(out) as tmp:
        if tokenizer_lib.is_json(tok_path):
            if tok_json is None:
                shutil.copyfile(tok_path, os.path.join(tmp, tokenizer_lib.HF_FILE))
            else:
                with open(os.path.join(tmp, tokenizer_lib.HF_FILE), "w", encoding="utf-8") as f:
                    f.write(tok_json)
        else:
            with open(os.path.join(tmp, tokenizer_lib.SP_FILE), "wb") as f:
                f.write(proto)
        # tokenizer_config.json (chat template, special tokens), special_tokens_map.json,
        # generation_config.json (stop ids), chat_template.jinja: as the release has them.
        tokenizer_lib.write_files(tmp, tok_path, hf_dir=hf_dir, generation=generation,
                                  added=added_tokens)
        tokenizer_lib.load(tmp)  # what every job checks
        config_lib.save_json(cfg, os.path.join(tmp, "config.json"))
        # Streamed: each tensor goes into the checkpoint as it is read (ParamsWriter).
        read_params(weights, abstract, hf_vocab, cfg.model.tie_embeddings,
                    writer=ParamsWriter(tmp, abstract),
                    new_rows=(pieces_before, pieces_before + len(added), pieces_before),
                    m=cfg.model)
    return os.path.abspath(out)


# How a run trains (not which model it is): left to the fine-tuning recipe.
_RUN_CHOICES = ("max_len", "dropout", "dtype", "param_dtype", "scan_layers", "remat",
                "vocab_multiple")


def model_flags(model_dir: str) -> list[str]:
    """The `--config.model.*` overrides that make any recipe build this model directory's model
    (every key that defines the parameters or how they compute), for fine-tuning it with
    --config.init_from, which requires the run's model to be the same."""
    saved = config_lib.load_json(os.path.join(model_dir, "config.json")).model
    derived = {"head_dim": saved.hidden_dim // saved.num_heads}
    return [f"--config.model.{key}={saved[key]}" for key in sorted(saved)
            if key not in _RUN_CHOICES and saved[key] != derived.get(key)]


# ---------------------------------------------------------------------------------------------
# Export.

_EXPORT_ROWS = 16384  # vocabulary rows per block written (16384 x 4096 float32: 256 MiB)
_ST_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", jax.numpy.bfloat16)}


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...], Callable]],
                      dtype: str) -> None:
    """Writes (name, shape, make_value) tensors to a .safetensors file, each value made only
    when it is written, whole or (a generator) in blocks of leading rows (the format: an 8-byte
    little-endian header length, a JSON header of dtypes, shapes and byte offsets, then the raw
    data)."""
    code, np_dtype = _ST_DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": code, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as the library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, make in tqdm.tqdm(tensors, desc="export",
                                           disable=not sys.stderr.isatty()):
            made = make()
            parts = made if inspect.isgenerator(made) else [made]  # blocks of leading rows
            rows = 0
            for part in parts:
                value = np.ascontiguousarray(part, dtype=np_dtype)
                assert value.shape[1:] == tuple(shape)[1:], (name, value.shape, shape)
                rows += value.shape[0] if value.ndim else 1
                f.write(memoryview(value.reshape(-1).view(np.uint8)))
            assert rows == (shape[0] if shape else 1), (name, rows, shape)


class CheckpointReader:
    """Reads a checkpoint's parameters one tensor, or one layer of a stacked tensor, at a time
    (tensorstore on the arrays Orbax wrote, OCDBT or not), so export never holds the model."""

    def __init__(self, workdir: str, step: int | None = None):
        directory = checkpoints.checkpoint_dir(workdir)
        if not os.path.isdir(directory):
            raise UserError(f"{workdir} has no checkpoints/ folder; train first or check the "
                            "path.")
        manager = ocp.CheckpointManager(directory)
        try:
            steps = manager.all_steps()
            self.step = manager.latest_step() if step is None else step
        finally:
            manager.close()
        if self.step is None or self.step not in steps:
            raise UserError(f"{directory} has no finished checkpoint" + (
                f" for step {step} (it has {steps})." if step is not None else " yet."))
        checkpoints.verify(directory, self.step, items=("params",))
        self.dir = os.path.join(directory, str(self.step), "params")
        meta = _read_json(os.path.join(self.dir, "_METADATA"))
        self.ocdbt, self.zarr3 = meta.get("use_ocdbt", True), meta.get("use_zarr3", False)
        self._open: dict[str, Any] = {}

    def read(self, name: str, layer=None) -> np.ndarray:
        """Parameter `name` ("embed", "layers.wq"), or its part `layer` (an index: one layer
        of a stacked parameter, or a block of rows)."""
        import tensorstore as ts

        if name not in self._open:
            driver = "zarr3" if self.zarr3 else "zarr"
            kvstore = ({"driver": "ocdbt", "base": f"file://{self.dir}", "path": name}
                       if self.ocdbt else {"driver": "file", "path": os.path.join(self.dir, name)})
            self._open[name] = ts.open({"driver": driver, "kvstore": kvstore},
                                       open=True, read=True).result()
        array = self._open[name]
        return np.asarray((array if layer is None else array[layer]).read().result())


def _hf_tensors(read: Callable, m, vocab: int,
                kind: str | None = None) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
    """(HF name, shape, producer) for every tensor of the export, in HF's usual order;
    read(name, layer=None) gives one of our parameters (CheckpointReader.read); `kind`: the
    class exported (default hf_family(m))."""
    def top(name, kind):
        if kind not in ("rows", "cols"):
            return lambda: to_hf(kind, np.asarray(read(name), np.float32), vocab)

        def blocks():  # the vocabulary tensors, largest of all, a block of HF rows at a time
            for start in range(0, vocab, _EXPORT_ROWS):
                rows = slice(start, min(vocab, start + _EXPORT_ROWS))
                part = np.asarray(read(name, rows if kind == "rows" else (slice(None), rows)),
                                  np.float32)
                yield part if kind == "rows" else part.T
        return blocks

    def layer(name, i, kind):
        return lambda: to_hf(kind, np.asarray(read(f"layers.{name}", i), np.float32), vocab)

    family = kind or hf_family(m)
    not_llama = family != "llama"  # only Llama's class has biases it may lack
    yield hf_name("embed"), (vocab, m.hidden_dim), top("embed", "rows")
    layers = model.abstract_model(m)[1]["layers"]
    for i, row, names in _layer_rows(layers, m):
        for name, (_, kind) in LAYER_TENSORS.items():
            if name in names:
                shape = _hf_shape(kind, layers[name].shape[1:], vocab)
                yield hf_name(name, i, m.post_norms), shape, layer(
                    name, row if name in model.DENSE_MLP else i, kind)
            elif name in model.DENSE_MLP:
                continue  # a MoE layer's MLP: below
            elif name.endswith("bias") and _hf_needs_bias(name, m, not_llama):
                # LlamaForCausalLM has one attention_bias switch for q, k, v and o: a bias
                # this model lacks is exported as zeros, which computes the same function.
                size = (m.hidden_dim if name == "o_bias"
                        else config_lib.head_dim(m) * (m.num_heads if name == "q_bias"
                                                       else m.num_kv_heads))
                yield hf_name(name, i), (size,), lambda size=size: np.zeros(size, np.float32)
        for name in (n for n in model.MOE_MLP if n in names):  # (router, experts)
            hf_kind = MOE_TENSORS[family][name][1]
            shape = layers[name].shape[1:]
            if name not in _EXPERT_PARAMS:
                yield (hf_name(name, i, family=family), _hf_shape(hf_kind, shape, vocab),
                       layer(name, row, hf_kind))
                continue
            for j in range(shape[0]):
                yield (hf_name(name, i, family=family, expert=j),
                       _hf_shape(hf_kind, shape[1:], vocab), layer(name, (row, j), hf_kind))
    yield hf_name("final_norm"), (m.hidden_dim,), top("final_norm", "vector")
    if not m.tie_embeddings:
        yield hf_name("lm_head"), (vocab, m.hidden_dim), top("lm_head", "cols")


def _hf_needs_bias(name: str, m, not_llama: bool) -> bool:
    if not_llama or name in ("gate_bias", "up_bias", "down_bias"):
        return False
    return bool(m.attn_qkv_bias or m.attn_out_bias)


def _shipped_template(workdir: str, cfg, tok) -> tuple[str | None, tuple[int, ...]]:
    """The chat template the export ships (None: the tokenizer files' own) and the extra ids
    generation stops on: the run's template (its record in the workdir, else the project
    template when the run chose it or the files have none), ending turns with <|end|>."""
    record = os.path.join(workdir, getattr(chat_template, "RUN_FILE", "chat_template.json"))
    if os.path.isfile(record):
        source = _read_json(record).get("chat_template")
        if isinstance(source, str) and source:
            return source, ()
    choice = cfg.data.get("chat_template", "") if "data" in cfg else ""
    if choice == "project" or (choice in ("", "auto") and tok.chat_template is None):
        end = tok.marker_ids.get(chat_template.END)
        return getattr(chat_template, "PROJECT_JINJA", None), (() if end is None else (end,))
    return None, ()


def export_model(workdir: str, out: str, *, step: int | None = None,
                 dtype: str = "float32") -> str:
    """t5x_like run or model directory -> HF folder `out` (see the module docstring)."""
    if dtype not in _ST_DTYPES:
        raise UserError(f"--dtype={dtype} is not supported; choose {' or '.join(_ST_DTYPES)}.")
    out = _check_out(out)
    if peft.read_ref(workdir) is not None:  # adapters and their base: merged in host memory
        host = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
        run = runs.load(workdir, step=step,
                        mesh=partitioning.make_mesh(host, jax.devices("cpu")[:1]))
        cfg, tok, at_step = run.cfg, run.tokenizer, run.step
        flat = {".".join(k.key for k in path): leaf
                for path, leaf in jax.tree_util.tree_leaves_with_path(run.params)}
        read = lambda name, part=None: np.asarray(  # noqa: E731
            flat[name] if part is None else flat[name][part])
    else:  # streamed: one tensor (one layer) at a time from the checkpoint
        cfg = config_lib.load_json(os.path.join(workdir, "config.json"))
        tok = tokenizer_lib.load(tokenizer_lib.find(workdir))
        reader = CheckpointReader(workdir, step)
        read, at_step = reader.read, reader.step
    m = cfg.model
    vocab = m.unpadded_vocab_size or tok.vocab_size
    if vocab < tok.vocab_size or vocab > m.vocab_size:
        raise UserError(f"{workdir}/config.json: model.unpadded_vocab_size {vocab} does not fit "
                        f"the tokenizer's {tok.vocab_size} pieces and model.vocab_size "
                        f"{m.vocab_size}; restore the config the model was trained with.")
    kind = hf_family(m)
    if kind == "qwen2" and not m.sliding_window and not tokenizer_lib.qwen2_compatible(tok):
        # transformers builds Qwen2's own byte-level tokenizer for every qwen2 model, whatever
        # the files declare: this tokenizer would load with other ids. Llama's class computes
        # the same function (its o_proj bias exported as zeros) and reads tokenizer.json as is.
        logging.warning("Exporting as LlamaForCausalLM (the same function): transformers "
                        "would replace this tokenizer by Qwen2's under Qwen2ForCausalLM.")
        kind = "llama"
    tensors = list(_hf_tensors(read, m, vocab, kind))
    logging.info("Exporting %s step %d (%d tensors, vocab %d) to %s", workdir, at_step,
                 len(tensors), vocab, out)
    template, stop_ids = _shipped_template(workdir, cfg, tok)
    with files.atomic_dir(out) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, dtype)
        files.atomic_write_json(os.path.join(tmp, "config.json"),
                                hf_config(m, vocab, tok, dtype, kind))
        # The tokenizer as imported (tokenizer.json or tokenizer.model, with any pieces the
        # import added), its config with the chat template, generation_config.json.
        tokenizer_lib.export_files(tok, tmp, max_len=m.max_len, template=template,
                                   stop_ids=stop_ids)
    return os.path.abspath(out)


# ---------------------------------------------------------------------------------------------
# Entry point.

# Flags are defined per command, and only when this module's commands run (cli.run_command):
# tests import it beside other entry points whose flags share these names (--workdir, --out).


def main_import(argv):
    del argv
    f = flags.FLAGS
    path = import_model(f.hf_dir, f.out, tokenizer=f.tokenizer, max_len=f.max_len)
    print(f"imported {f.hf_dir} -> {path}\nfine-tune it with: python -m t5x_like.train "
          f"--config=<recipe> --workdir=<run> --config.init_from={path} "
          + " ".join(model_flags(path)))


def main_export(argv):
    del argv
    f = flags.FLAGS
    path = export_model(f.workdir, f.out, step=f.step, dtype=f.dtype)
    print(f"exported {f.workdir} -> {path}")


def _import_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "HF model folder (config.json, *.safetensors, "
                        "tokenizer.model or tokenizer.json).")
    flags.DEFINE_string("out", None, "The model directory to write (must not exist or be "
                        "empty).")
    flags.DEFINE_string("tokenizer", "", "The tokenizer to use: a SentencePiece .model or a "
                        "tokenizer.json (default: <hf_dir>/tokenizer.model, else "
                        "<hf_dir>/tokenizer.json).")
    flags.DEFINE_integer("max_len", 0, "model.max_len (default: the model's "
                         f"max_position_embeddings, at most {DEFAULT_MAX_LEN}).")


def _export_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run or model directory.")
    flags.DEFINE_string("out", None, "The HF folder to write (must not exist or be empty).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("dtype", "float32", "float32 or bfloat16 weights.")


COMMANDS = {
    "import": cli.Command(main_import, _import_flags, required=("hf_dir", "out"),
                          usage="--hf_dir=DIR --out=DIR [--tokenizer=FILE] [--max_len=N]"),
    "export": cli.Command(main_export, _export_flags, required=("workdir", "out"),
                          usage="--workdir=DIR --out=DIR [--step=N] [--dtype=bfloat16]"),
}
