"""Checking, resolving and saving job configs (ml_collections ConfigDicts).

Configs are plain Python files under configs/; this module only validates them (each error names
the key and what to do), fills derived values, and reads/writes `<workdir>/config.json`.
"""

import json
import os
from typing import Any

import ml_collections

from t5x_like.core import defaults, files
from t5x_like.core.errors import UserError
from t5x_like.modeling import peft_targets  # no JAX: config stays light

TASKS = ("pretrain", "sft", "reward", "dpo", "rl")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
SCHEDULES = ("cosine", "linear", "constant")
TEXT_UNITS = ("line", "paragraph", "file")
TOKENIZER_TYPES = ("bpe", "unigram")
ROPE_SCALINGS = ("none", "linear", "llama3")
ATTENTION_IMPLS = ("einsum", "dot_product_attention", "chunked")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")
EVAL_METRICS = ("loss", "perplexity", "bits_per_byte", "accuracy")
# Model keys that may differ between a checkpoint and the run loading it: they change how the
# same parameters are computed with, not what the parameters are (reward_head: a reward model
# starts from a chat model's parameters and adds a fresh head, see training/tasks/pairs.py).
FREE_MODEL_KEYS = ("max_len", "dropout", "dtype", "param_dtype", "scan_layers", "remat",
                   "vocab_multiple", "unpadded_vocab_size", "reward_head", "attention_impl",
                   "attention_block", "loss_chunk", "moe_capacity_factor",
                   "moe_aux_loss_weight", "router_z_loss_weight")


# Keys a resumed run (its workdir has a checkpoint) may change from the config.json it was
# started with: how long it runs, how it logs, evaluates and saves, where and how it computes.
# Any other change (the model, the data and its order, the optimizer, the seed...) alters what
# the checkpoints continue, so it needs train's --allow_config_change=<key>. A section name
# covers all its keys.
RESUME_FREE_KEYS = (
    "steps", "log_every_steps", "peak_tflops_per_device", "model_from_init", "model.dtype",
    "model.scan_layers", "model.remat", "model.attention_impl", "model.attention_block",
    "model.loss_chunk", "optimizer.grad_accum_steps", "optimizer.on_nonfinite",
    "data.cache_dir", "data.tfds_data_dir", "data.worker_count", "data.num_workers",
    "data.runner", "data.beam_options", "data.report",
    "data.tokenizer",  # a path: the workdir's tokenizer.model is compared by content instead
    "mesh", "distributed", "checkpoint", "eval")
# Keys whose change (allowed by name) makes the checkpoint's data position meaningless: the
# resumed run starts its data order afresh (a new pass over the data, in the new batches).
DATA_ORDER_KEYS = ("seed", "model.max_len", "data")
# Compared whole: a source added or removed is one change of data.sources.
_LEAF_SECTIONS = ("data.sources",)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}': {message}")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first bad key; checks only what needs no data or devices."""
    from data_pipelines import sources  # local: keeps `import t5x_like.core.config` light

    _require(cfg.task in TASKS, "task", f"is {cfg.task!r}; choose one of {', '.join(TASKS)}.")
    _require(cfg.steps > 0, "steps", f"is {cfg.steps}; it must be a positive number of steps.")
    _require(cfg.log_every_steps > 0, "log_every_steps", "must be positive.")
    _require(cfg.peak_tflops_per_device >= 0, "peak_tflops_per_device", "must be >= 0.")

    m = cfg.model
    for key in ("hidden_dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim", "max_len",
                "vocab_multiple"):
        _require(m[key] > 0, f"model.{key}", f"is {m[key]}; it must be positive.")
    _require(m.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0 = from the tokenizer).")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"{m.num_kv_heads} must divide model.num_heads ({m.num_heads}).")
    _require(m.head_dim > 0 or m.hidden_dim % m.num_heads == 0, "model.head_dim",
             f"is 0 (derived), but model.hidden_dim ({m.hidden_dim}) is not divisible by "
             f"model.num_heads ({m.num_heads}); set model.head_dim explicitly.")
    _require(head_dim(m) % 2 == 0, "model.head_dim", f"{head_dim(m)} must be even for RoPE.")
    _require(m.dtype in DTYPES, "model.dtype", f"is {m.dtype!r}; choose {' or '.join(DTYPES)}.")
    _require(m.param_dtype in DTYPES, "model.param_dtype",
             f"is {m.param_dtype!r}; choose {' or '.join(DTYPES)}.")
    _require(m.remat in REMAT_POLICIES, "model.remat",
             f"is {m.remat!r}; choose one of {', '.join(REMAT_POLICIES)}.")
    _require(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
             f"is {m.attention_impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}.")
    _require(m.attention_block >= 0, "model.attention_block", "must be >= 0 (0 = one block).")
    _require(m.loss_chunk >= 0, "model.loss_chunk", "must be >= 0 (0 = the whole sequence).")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"is {m.dropout}; it must be in [0, 1).")
    _require(m.rope_theta > 0, "model.rope_theta", "must be positive.")
    _require(m.rope_scaling in ROPE_SCALINGS, "model.rope_scaling",
             f"is {m.rope_scaling!r}; choose one of {', '.join(ROPE_SCALINGS)}.")
    _require(m.rope_scaling_factor > 0, "model.rope_scaling_factor", "must be positive.")
    _require(m.mlp_activation in MLP_ACTIVATIONS, "model.mlp_activation",
             f"is {m.mlp_activation!r}; choose {' or '.join(MLP_ACTIVATIONS)}.")
    for key in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                "sliding_window", "global_every", "rope_local_theta"):
        _require(m[key] >= 0, f"model.{key}", f"is {m[key]}; it must be >= 0 (0 = off).")
    _require(not (m.attn_logit_softcap and m.attention_impl == "dot_product_attention"),
             "model.attention_impl", "dot_product_attention cannot softcap attention scores "
             "(model.attn_logit_softcap); use einsum.")
    if m.rope_scaling == "llama3":
        _require(0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
                 "model.rope_high_freq_factor", f"is {m.rope_high_freq_factor}; it must be greater "
                 f"than model.rope_low_freq_factor ({m.rope_low_freq_factor}), which must be > 0.")
        _require(m.rope_original_max_len > 0, "model.rope_original_max_len", "must be positive.")
    _require(m.unpadded_vocab_size >= 0 and (
        m.vocab_size == 0 or m.unpadded_vocab_size <= m.vocab_size), "model.unpadded_vocab_size",
        f"is {m.unpadded_vocab_size}; it must be between 0 (no padding rows masked) and "
        f"model.vocab_size ({m.vocab_size}).")
    _validate_moe(m)

    o = cfg.optimizer
    _require(o.lr > 0, "optimizer.lr", f"is {o.lr}; it must be positive.")
    _require(o.schedule in SCHEDULES, "optimizer.schedule",
             f"is {o.schedule!r}; choose one of {', '.join(SCHEDULES)}.")
    _require(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0.")
    _require(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio", "must be in [0, 1].")
    _require(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0.")
    _require(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 = off).")
    _require(o.z_loss >= 0, "optimizer.z_loss", "must be >= 0.")
    _require(o.grad_accum_steps >= 1, "optimizer.grad_accum_steps", "must be >= 1.")
    _require(o.on_nonfinite in ("skip", "stop"), "optimizer.on_nonfinite",
             f"is {o.on_nonfinite!r}; choose skip or stop.")

    d = cfg.data
    sources.parse_source(d.source)  # raises UserError naming data.source
    _require(d.batch_size > 0, "data.batch_size", "must be positive.")
    _require(d.batch_size % o.grad_accum_steps == 0, "optimizer.grad_accum_steps",
             f"{o.grad_accum_steps} must divide data.batch_size ({d.batch_size}).")
    _require(0.0 < d.validation_fraction < 1.0, "data.validation_fraction",
             f"is {d.validation_fraction}; it must be strictly between 0 and 1.")
    _require(d.text_unit in TEXT_UNITS, "data.text_unit",
             f"is {d.text_unit!r}; choose one of {', '.join(TEXT_UNITS)}.")
    _require(d.min_doc_chars >= 0, "data.min_doc_chars", "must be >= 0.")
    _require(d.synthetic_docs > 0, "data.synthetic_docs", "must be positive.")
    _require(d.tokenizer_type in TOKENIZER_TYPES, "data.tokenizer_type",
             f"is {d.tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}.")
    _require(d.vocab_size >= 300, "data.vocab_size",
             f"is {d.vocab_size}; it must be at least 300 (256 byte pieces plus markers).")
    _require(d.worker_count >= 0, "data.worker_count", "must be >= 0.")
    _require(not d.tokenizer or os.path.exists(d.tokenizer), "data.tokenizer",
             f"{d.tokenizer!r} does not exist; give a SentencePiece .model, a tokenizer.json, a "
             "folder holding one, or leave it empty.")
    _validate_data_prep(d)

    _require(d.loss_on in ("assistant", "last_assistant", "all"), "data.loss_on",
             f"is {d.loss_on!r}; choose assistant, last_assistant or all.")
    _require(d.on_long in ("truncate", "drop", "split"), "data.on_long",
             f"is {d.on_long!r}; choose truncate, drop or split.")
    _require(d.num_shards >= 0, "data.num_shards", "must be >= 0 (0 = one per process).")
    _require(d.num_shards == 0 or d.batch_size % d.num_shards == 0, "data.num_shards",
             f"{d.num_shards} must divide data.batch_size ({d.batch_size}).")
    from t5x_like.modeling import partitioning  # local: partitioning imports jax

    partitioning.rules_with_overrides(cfg.mesh.rules)  # raises UserError naming a bad entry
    sizes = [cfg.mesh.get(name, 1) for name in partitioning.MESH_AXES]
    for name, size in zip(partitioning.MESH_AXES, sizes):
        _require(size == -1 or size >= 1, f"mesh.{name}", f"is {size}; use -1 or a positive size.")
    _require(sizes.count(-1) <= 1, "mesh", "at most one axis may be -1 (the remaining devices).")
    sequence = cfg.mesh.get("sequence", 1)
    _require(sequence == -1 or m.max_len % sequence == 0, "mesh.sequence",
             f"{sequence} must divide model.max_len ({m.max_len}): each device holds an equal "
             "part of every sequence.")
    dist = cfg.distributed
    if dist.coordinator_address:
        _require(":" in dist.coordinator_address, "distributed.coordinator_address",
                 f"is {dist.coordinator_address!r}; use host:port of process 0.")
        _require(dist.num_processes >= 1, "distributed.num_processes",
                 "must be set (>= 1) with distributed.coordinator_address.")
        _require(0 <= dist.process_id < dist.num_processes, "distributed.process_id",
                 f"is {dist.process_id}; it must be in [0, distributed.num_processes).")

    _validate_peft(cfg)

    c = cfg.checkpoint
    _require(c.every_steps > 0, "checkpoint.every_steps", "must be positive.")
    _require(c.max_to_keep >= 1, "checkpoint.max_to_keep", "must be >= 1.")
    _require(c.keep_best >= 1, "checkpoint.keep_best", "must be >= 1.")
    _require(c.best_mode in ("min", "max"), "checkpoint.best_mode",
             f"is {c.best_mode!r}; choose min or max.")
    _require(not c.keep_best_by or c.keep_best_by in EVAL_METRICS, "checkpoint.keep_best_by",
             f"is {c.keep_best_by!r}; choose one of {', '.join(EVAL_METRICS)} (or '' for off).")
    _require(cfg.eval.every_steps >= 0, "eval.every_steps", "must be >= 0 (0 = at the end only).")
    _require(cfg.eval.steps >= 0, "eval.steps", "must be >= 0 (0 = the whole split).")
    _require(cfg.eval.batch_size >= 0, "eval.batch_size", "must be >= 0.")
    e = cfg.eval
    _require(not e.early_stop_by or e.early_stop_by in EVAL_METRICS, "eval.early_stop_by",
             f"is {e.early_stop_by!r}; choose one of {', '.join(EVAL_METRICS)} (or '' for off).")
    _require(e.early_stop_mode in ("min", "max"), "eval.early_stop_mode",
             f"is {e.early_stop_mode!r}; choose min or max.")
    _require(e.patience >= 1, "eval.patience", "must be >= 1.")
    _require(e.min_delta >= 0, "eval.min_delta", "must be >= 0.")
    _validate_alignment(cfg)
    _require(not cfg.model_from_init or cfg.init_from, "model_from_init",
             "needs init_from (the run or model directory to take the model config from).")


def _validate_moe(m) -> None:
    """The mixture-of-experts keys (model.py, "Mixture of experts")."""
    _require(m.num_experts >= 0, "model.num_experts", "must be >= 0 (0 = a dense model).")
    if not m.num_experts:
        return
    _require(1 <= m.experts_per_token <= m.num_experts, "model.experts_per_token",
             f"is {m.experts_per_token}; it must be between 1 and model.num_experts "
             f"({m.num_experts}).")
    for key in ("moe_mlp_dim", "num_shared_experts", "moe_capacity_factor",
                "moe_aux_loss_weight", "router_z_loss_weight"):
        _require(m[key] >= 0, f"model.{key}", f"is {m[key]}; it must be >= 0.")
    _require(m.moe_every >= 1, "model.moe_every", f"is {m.moe_every}; it must be >= 1.")
    parts = [p.strip() for p in m.dense_layers.split(",") if p.strip()]
    _require(all(p.isdigit() and int(p) < m.num_layers for p in parts), "model.dense_layers",
             f"is {m.dense_layers!r}; give comma-separated layer indices below model.num_layers "
             f"({m.num_layers}), e.g. '0,1'.")


def _validate_peft(cfg) -> None:
    """The peft section (t5x_like/modeling/peft.py); patterns are matched against the model
    later."""
    p = cfg.peft
    _require(p.method in ("none", "lora"), "peft.method", f"is {p.method!r}; choose none or lora.")
    _require(p.rank >= 1, "peft.rank", f"is {p.rank}; it must be >= 1.")
    _require(p.alpha > 0, "peft.alpha", f"is {p.alpha}; it must be positive.")
    _require(0.0 <= p.dropout < 1.0, "peft.dropout", f"is {p.dropout}; it must be in [0, 1).")
    _require(p.base_dtype in ("",) + DTYPES, "peft.base_dtype",
             f"is {p.base_dtype!r}; choose float32, bfloat16 or '' (= model.param_dtype).")
    _require(0 <= p.trainable_layers <= cfg.model.num_layers, "peft.trainable_layers",
             f"is {p.trainable_layers}; it must be between 0 and model.num_layers "
             f"({cfg.model.num_layers}).")
    peft_targets.lora_targets(p, cfg.model)  # raises UserError naming a target matching nothing


def _validate_alignment(cfg) -> None:
    """The keys of task=reward / dpo / rl (t5x_like/training/tasks/pairs.py, rl.py)."""
    reward = cfg.task == "reward"
    _require(bool(cfg.model.reward_head) == reward, "model.reward_head",
             "task=reward needs the scalar reward head: set it to True (configs/reward.py does)."
             if reward else f"is True but task={cfg.task}; only a reward model has the head.")
    _require(cfg.task not in ("reward", "dpo", "rl") or cfg.init_from, "init_from",
             f"task={cfg.task} starts from a trained chat model: set it to an SFT run.")
    p = cfg.dpo
    _require(p.beta > 0, "dpo.beta", f"is {p.beta}; it must be positive.")
    _require(p.loss in ("sigmoid", "ipo"), "dpo.loss", f"is {p.loss!r}; choose sigmoid or ipo.")
    _require(0.0 <= p.label_smoothing < 0.5, "dpo.label_smoothing",
             f"is {p.label_smoothing}; it must be in [0, 0.5).")
    _require(p.rpo_alpha >= 0, "dpo.rpo_alpha", f"is {p.rpo_alpha}; it must be >= 0 (0 = off).")
    r = cfg.rl
    _require(r.group_size >= 2, "rl.group_size",
             f"is {r.group_size}; group-relative advantages need at least 2 replies per prompt.")
    _require(r.temperature > 0, "rl.temperature", "must be positive (sampling, not greedy).")
    _require(r.max_new_tokens >= 1, "rl.max_new_tokens", "must be >= 1.")
    _require(r.kl_coef >= 0, "rl.kl_coef", "must be >= 0.")
    _require(r.eval_prompts >= 1, "rl.eval_prompts", "must be >= 1.")
    _require(r.reward == "exact_answer" or r.reward.startswith("model:"), "rl.reward",
             f"is {r.reward!r}; use exact_answer or model:<reward model workdir>.")
    if cfg.task == "rl" and r.reward.startswith("model:"):
        path = r.reward[len("model:"):]
        _require(os.path.isfile(os.path.join(path, "config.json")), "rl.reward",
                 f"{path} is not a run directory (no config.json); train a reward model first.")


def check_same_model(saved_model, model, where: str) -> None:
    """Raises UserError naming the first parameter-defining model key that differs."""
    saved, now = to_dict(saved_model), to_dict(model)
    for key in sorted(set(saved) | set(now)):
        if key not in FREE_MODEL_KEYS and saved.get(key) != now.get(key):
            raise UserError(f"model.{key}: {saved.get(key)} in {where}, {now.get(key)} in config; "
                            "make the model config match (or start a new --workdir).")


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """{"model.num_layers": 4, ...}; values as config.json holds them (lists, not tuples)."""
    tree = json.loads(json.dumps(to_dict(cfg))) if not prefix else cfg
    out = {}
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, dict) and path not in _LEAF_SECTIONS:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _covers(keys, key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in keys)


def check_resume(saved, cfg, allow_changes=()) -> list[str]:
    """Raises UserError when `cfg` (before resolve) changes what a resumed run continues: first
    the parameter-defining model keys, then any key outside RESUME_FREE_KEYS and
    `allow_changes` whose value differs from the run's `saved` config.json. Returns the keys
    changed by permission (`allow_changes`)."""
    model = to_dict(cfg.model)
    # What resolve() derives: compared after the data is prepared, when it is known.
    model["head_dim"] = head_dim(cfg.model)
    for key in ("vocab_size", "unpadded_vocab_size"):
        if not model.get(key):
            model[key] = saved.model.get(key)
    check_same_model(saved.model, model, "this workdir's checkpoints")
    old, new = flatten(saved), flatten(cfg)
    new.update({f"model.{k}": v for k, v in flatten(model).items()})
    changed = [k for k in sorted(new) if k in old and old[k] != new[k]
               and not _covers(RESUME_FREE_KEYS, k)]
    allowed = [k for k in changed if _covers(allow_changes, k)]
    changed = [k for k in changed if k not in allowed]
    if changed:
        key = changed[0]
        also = f" (also changed: {', '.join(changed[1:])})" if changed[1:] else ""
        raise UserError(
            f"config key '{key}' is {new[key]!r} but this workdir's checkpoints were trained with "
            f"{old[key]!r} (its config.json){also}; use a new --workdir, or pass "
            f"--allow_config_change={','.join(changed)} to resume with the change.")
    return allowed


def changes_data_order(keys) -> bool:
    return any(_covers(DATA_ORDER_KEYS, k) for k in keys)


def _validate_data_prep(d) -> None:
    """The data-preparation keys (sources, mixture, cleaning, dedup): data_pipelines/prepare.py."""
    import re

    from data_pipelines import sources

    for name in d.sources:
        entry = d.sources[name]
        _require(re.fullmatch(r"[a-z][a-z0-9_]*", name) is not None, f"data.sources.{name}",
                 "source names must be lower-case letters, digits and underscores.")
        _require(hasattr(entry, "keys") and set(entry.keys()) == {"source", "weight"},
                 f"data.sources.{name}", "must hold exactly 'source' (a spec) and 'weight'.")
        _require(isinstance(entry.weight, (int, float)) and entry.weight >= 0,
                 f"data.sources.{name}.weight", f"is {entry.weight!r}; it must be a number >= 0.")
        try:
            sources.parse_source(entry.source)
        except UserError as e:
            raise UserError(str(e).replace("'data.source'", f"'data.sources.{name}.source'"))
    _require(not d.sources or any(d.sources[n].weight > 0 for n in d.sources), "data.sources",
             "every weight is 0; give at least one source a positive weight.")
    for part in filter(None, (p.strip() for p in d.mixture.split(","))):
        name, sep, value = part.partition("=")
        number = re.fullmatch(r"\s*\d+(\.\d*)?([eE][-+]?\d+)?\s*", value)
        _require(bool(sep) and number is not None, "data.mixture",
                 f"{part!r} is not name=weight, e.g. 'shakespeare=0.7,alpaca=0.3'.")
    _require(d.on_bad_record in ("error", "skip"), "data.on_bad_record",
             f"is {d.on_bad_record!r}; choose error or skip.")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0 (0 = in-process).")
    _require(d.runner in ("local", "beam"), "data.runner", f"is {d.runner!r}; choose local or beam.")
    _require(0.0 < d.character_coverage <= 1.0, "data.character_coverage",
             f"is {d.character_coverage}; it must be in (0, 1].")
    c = d.clean
    _require(c.unicode in ("", "NFC", "NFKC"), "data.clean.unicode",
             f"is {c.unicode!r}; choose NFC, NFKC or '' (off).")
    for key in ("min_chars", "max_chars", "min_tokens", "max_tokens"):
        _require(c[key] >= 0, f"data.clean.{key}", f"is {c[key]}; it must be >= 0 (0 = no limit).")
    _require(not c.max_chars or c.max_chars >= c.min_chars, "data.clean.max_chars",
             f"{c.max_chars} is below data.clean.min_chars ({c.min_chars}).")
    _require(not c.max_tokens or c.max_tokens >= c.min_tokens, "data.clean.max_tokens",
             f"{c.max_tokens} is below data.clean.min_tokens ({c.min_tokens}).")
    for key in ("max_dup_line_fraction", "max_dup_ngram_fraction"):
        _require(0.0 < c[key] <= 1.0, f"data.clean.{key}", f"is {c[key]}; it must be in (0, 1].")
    _require(c.dup_ngram >= 1, "data.clean.dup_ngram", "must be >= 1.")
    if c.stopwords:
        from stop_words import AVAILABLE_LANGUAGES, LANGUAGE_MAPPING

        _require(c.stopwords in AVAILABLE_LANGUAGES or c.stopwords in LANGUAGE_MAPPING,
                 "data.clean.stopwords", f"{c.stopwords!r} is not a language the stop-words "
                 "package knows (e.g. en, de, fr).")
    x = d.dedup
    _require(0.0 < x.threshold <= 1.0, "data.dedup.threshold",
             f"is {x.threshold}; it must be in (0, 1].")
    _require(16 <= x.num_perm <= 1024, "data.dedup.num_perm",
             f"is {x.num_perm}; use 16 to 1024 permutations.")
    _require(x.ngram >= 1, "data.dedup.ngram", "must be >= 1.")


def head_dim(model_cfg) -> int:
    return model_cfg.head_dim or model_cfg.hidden_dim // model_cfg.num_heads


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    return -(-tokenizer_vocab // multiple) * multiple


def resolve(cfg: ml_collections.ConfigDict, tokenizer_vocab: int) -> ml_collections.FrozenConfigDict:
    """Fills derived values (vocab size, head dim) and freezes the config against mutation."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    want = padded_vocab_size(tokenizer_vocab, cfg.model.vocab_multiple)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = want
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise UserError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
            f"tokenizer's {tokenizer_vocab} pieces; set it to 0 to derive it.")
    if 0 < cfg.model.get("unpadded_vocab_size", 0) < tokenizer_vocab:
        raise UserError(
            f"config key 'model.unpadded_vocab_size': {cfg.model.unpadded_vocab_size} masks ids "
            f"of the tokenizer's {tokenizer_vocab} pieces; set it to 0 or at least "
            f"{tokenizer_vocab}.")
    if cfg.model.get("unpadded_vocab_size", 0) == 0 and cfg.model.vocab_size > tokenizer_vocab:
        # Rows past the tokenizer are never targets; mask them so nothing ever predicts them.
        cfg.model.unpadded_vocab_size = tokenizer_vocab
    cfg.model.head_dim = head_dim(cfg.model)
    if cfg.eval.batch_size == 0:
        cfg.eval.batch_size = cfg.data.batch_size
    return ml_collections.FrozenConfigDict(cfg)


def to_dict(cfg) -> dict[str, Any]:
    if isinstance(cfg, dict):
        return dict(cfg)
    if isinstance(cfg, ml_collections.FrozenConfigDict):
        cfg = cfg.as_configdict()
    return cfg.to_dict()


def save_json(cfg, path: str) -> None:
    files.atomic_write_json(path, to_dict(cfg), sort_keys=True)


def load_json(path: str) -> ml_collections.FrozenConfigDict:
    """Reads a run's config.json back (sample, evaluate, serve and init_from use it)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; is this the workdir of a t5x_like run?")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore it or start a new workdir.")
    for section, later in defaults.LATER_KEYS.items():  # an older run had none of these
        if isinstance(data.get(section), dict):
            data[section] = {**later, **data[section]}
    return ml_collections.FrozenConfigDict(data)
