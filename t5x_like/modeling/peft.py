"""Parameter-efficient fine-tuning: LoRA adapters and partial freezing of a base model.

    --config.init_from=runs/pre --config.peft.method=lora --config.peft.rank=16
    --config.init_from=runs/pre --config.peft.trainable=lm_head,final_norm
        --config.peft.trainable_layers=2           (classic partial fine-tuning, no LoRA)

With PEFT the run keeps two parameter trees:

    base       the init_from model, never trained and never checkpointed (optionally bfloat16);
               exactly the base model, so it doubles as DPO's reference model
    trainable  {"lora": {"layers": {"wq": {"a": [L, d, r], "b": [L, r, H, D]}, ...},
                         "embed": {"a", "b"}, "lm_head": {"a", "b"}},
                "tuned": {"lm_head": [d, V], "layers": {"wq": [N, d, H, D]}, ...}}
               LoRA adapters plus full copies of the base parameters trained in place (the last
               N layers of a stacked layer parameter when peft.trainable_layers = N)

Only `trainable` is differentiated, so gradients and AdamW moments exist for it alone, and the
train state's "params" *is* `trainable`: checkpoints hold it, the step and the optimizer state,
plus `base.json` in the run directory naming the base checkpoint (directory, step and a
fingerprint of its values), which every load checks.

LoRA (Hu et al. 2021): W x + (alpha / r) B A x, computed as two thin matmuls (model.lora_delta)
so the full-size B A never exists in training. A ~ N(0, 1/fan_in) and B = 0, so step 0 computes
exactly the base model. A [in..., r] carries W's input axis names plus "lora_rank", B [r, out...]
"lora_rank" plus W's output names, so the rules table in partitioning.py shards adapters along
with their weights (FSDP over "embed", tensor parallelism over heads / mlp / vocab).
"""

import dataclasses
import fnmatch
import json
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.core import files
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft_targets
from t5x_like.core.errors import UserError

# Leading input dimensions each weight contracts (after the "layers" axis); the embedding's is
# its row index.
_IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1,
            "embed": 1, "lm_head": 1}
REF_FILE = "base.json"


def active(peft_cfg) -> bool:
    """True when the run fine-tunes part of a frozen base (LoRA or peft.trainable)."""
    return peft_cfg is not None and (peft_cfg.method == "lora" or bool(peft_cfg.trainable)
                                     or peft_cfg.trainable_layers > 0)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def _get(tree, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


@dataclasses.dataclass(eq=False)
class Peft:
    """What a PEFT run trains; shapes and logical names of both trees (no arrays)."""

    targets: tuple[str, ...]  # parameters with LoRA adapters
    tuned: dict[str, int]  # parameter path -> first trained index along "layers" (0 = all)
    rank: int
    alpha: float
    dropout: float
    abstract: dict  # trainable tree of ShapeDtypeStruct
    names: dict  # its logical axis names
    base_abstract: dict  # the base tree, in the base dtype
    base_names: dict

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def build(cfg, abstract_params: dict, names: dict) -> Peft | None:
    """The PEFT layout for `cfg` over the model's abstract parameters; None without PEFT."""
    p = cfg.get("peft")
    if not active(p):
        return None
    targets = peft_targets.lora_targets(p, cfg.model)
    base_dtype = jnp.dtype(p.base_dtype or cfg.model.param_dtype)
    paths = [_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]]
    tuned: dict[str, int] = {}
    L, n = cfg.model.num_layers, p.trainable_layers
    if not 0 <= n <= L:
        raise UserError(f"config key 'peft.trainable_layers': {n} is not between 0 and "
                        f"model.num_layers ({L}).")
    if n:  # the rows of the last n layers in each stack (MoE models: each MLP kind's own)
        first = _first_rows(cfg.model, L - n)
        tuned.update({q: first.get(q.split("/")[1], L - n) for q in paths
                      if q.startswith("layers/")})
    for pattern in filter(None, (e.strip() for e in p.trainable.split(","))):
        hits = [q for q in paths if fnmatch.fnmatchcase(q, pattern)]
        if not hits:
            raise UserError(f"config key 'peft.trainable': {pattern!r} matches no parameter; "
                            f"they are {', '.join(paths)}.")
        tuned.update({q: 0 for q in hits})  # a whole parameter wins over its last layers
    if "reward_head" in paths:  # task=reward: the new head (zeros in the base) always learns
        tuned["reward_head"] = 0

    moe = model.moe_layers(cfg.model)
    mlp_targets = [t for t in targets if t in model.DENSE_MLP]
    if moe.any() and mlp_targets:
        raise UserError(f"config key 'peft.targets': {', '.join(mlp_targets)} on a model with "
                        "mixture-of-experts layers, whose MLPs are experts LoRA does not adapt; "
                        "target the attention (peft.targets=attention).")

    f32 = jnp.float32
    abstract: dict = {}
    trainable_names: dict = {}
    for path, start in sorted(tuned.items()):
        leaf = _get(abstract_params, path)
        _set(abstract, "tuned/" + path,
             jax.ShapeDtypeStruct((leaf.shape[0] - start, *leaf.shape[1:]), f32))
        _set(trainable_names, "tuned/" + path, _get(names, path))
    for name in targets:
        path = name if name in ("embed", "lm_head") else "layers/" + name
        leaf, axes = _get(abstract_params, path), _get(names, path)
        stacked = path.startswith("layers/")
        cut = int(stacked) + _IN_DIMS[name]  # [layers?, in..., | out...]
        lead = ((leaf.shape[0],), ("layers",)) if stacked else ((), ())
        _set(abstract, f"lora/{path}/a", jax.ShapeDtypeStruct((*leaf.shape[:cut], p.rank), f32))
        _set(abstract, f"lora/{path}/b",
             jax.ShapeDtypeStruct((*lead[0], p.rank, *leaf.shape[cut:]), f32))
        _set(trainable_names, f"lora/{path}/a", (*axes[:cut], "lora_rank"))
        _set(trainable_names, f"lora/{path}/b", (*lead[1], "lora_rank", *axes[cut:]))
    base_abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, base_dtype),
                                 abstract_params)
    return Peft(targets, tuned, p.rank, p.alpha, p.dropout, abstract, trainable_names,
                base_abstract, names)


def _first_rows(model_cfg, first_layer: int) -> dict[str, int]:
    """The first row of layer `first_layer` or later in each MLP stack of a model with MoE
    layers (dense and MoE MLP weights are stacked over their own layers, model.stack_sizes)."""
    moe = model.moe_layers(model_cfg)
    rows = {}
    for names, kind in ((model.DENSE_MLP, ~moe), (model.MOE_MLP, moe)):
        rows.update({name: int(kind[:first_layer].sum()) for name in names})
    return rows


# ---------------------------------------------------------------------------------------------
# Computing with the two trees.


def combine(adapt: Peft, params: dict, base: dict) -> tuple[dict, dict]:
    """(trainable, base) -> (full model parameters, LoRA inputs for model.apply).

    Tuned parameters replace (or, for the last layers, extend) the base's; LoRA's B is scaled
    by alpha / rank here, so the model only adds (x A) B.
    """
    full = jax.tree.map(lambda x: x, base)  # a new dict tree over the same arrays
    for path, start in adapt.tuned.items():
        t = _get(params["tuned"], path)
        if start:
            t = jnp.concatenate([_get(base, path)[:start].astype(t.dtype), t])
        _set(full, path, t)
    lora = jax.tree.map(lambda x: x, params.get("lora", {}))
    for ad in _adapters(lora):
        ad["b"] = ad["b"] * adapt.scale
    return full, lora


def _adapters(lora: dict):
    """The {"a", "b"} dicts of a LoRA tree."""
    for key, node in lora.items():
        if key == "layers":
            yield from node.values()
        else:
            yield node


def forward(graphdef, adapt: Peft | None, hidden: bool = False) -> Callable:
    """fn(params, base, tokens, **kwargs) -> logits of the model being trained; with `hidden`,
    (hidden states, head, logits_fn) instead (model.apply_hidden), for the chunked loss.

    Without PEFT `params` is the whole model and `base` is ignored; with PEFT `params` is the
    trainable tree and `base` the frozen base. The reference model of preference tuning is
    `model.apply(graphdef, base, tokens, ...)`: the base without adapters.
    """
    call = model.apply_hidden if hidden else model.apply
    if adapt is None:
        return lambda params, base, tokens, **kw: call(graphdef, params, tokens, **kw)

    def apply(params, base, tokens, **kwargs):
        full, lora = combine(adapt, params, base)
        return call(graphdef, full, tokens, lora=lora, lora_dropout=adapt.dropout, **kwargs)
    return apply


def reference_forward(graphdef, hidden: bool = False) -> Callable:
    """fn(base, tokens, **kwargs) -> logits of the base without adapters or tuned parameters:
    preference tuning's reference model, from the arrays PEFT already holds (no second copy).
    With `hidden`, (hidden states, head, logits_fn) as in `forward`."""
    if hidden:
        return lambda base, tokens, **kwargs: model.apply_hidden(graphdef, base, tokens, **kwargs)
    return lambda base, tokens, **kwargs: model.apply(graphdef, base, tokens, **kwargs)


def merge(full: dict, lora: dict) -> dict:
    """Folds LoRA into the weights: W + A @ B (b already scaled; see `combine`), in float32."""
    merged = jax.tree.map(lambda x: x, full)
    for path, ad in _lora_paths(lora):
        w = _get(full, path).astype(jnp.float32)
        a, b = ad["a"].astype(jnp.float32), ad["b"].astype(jnp.float32)
        if path.startswith("layers/"):
            update = jax.vmap(lambda a, b: jnp.tensordot(a, b, 1))(a, b)
        else:
            update = jnp.tensordot(a, b, 1)
        _set(merged, path, w + update)
    return merged


def _lora_paths(lora: dict):
    for key, node in lora.items():
        if key == "layers":
            yield from ((f"layers/{n}", ad) for n, ad in node.items())
        else:
            yield key, node


def init_trainable(adapt: Peft, base: dict, seed: int, shardings: dict) -> dict:
    """Fresh trainable tree on its shardings: A ~ N(0, 1/fan_in) (N(0, 1) rows for the
    embedding, like its table), B = 0, tuned parameters copied from the base in float32."""
    def make(base):
        out: dict = {}
        for path, start in adapt.tuned.items():
            _set(out, "tuned/" + path, _get(base, path)[start:].astype(jnp.float32))
        key = jax.random.key(seed + 1)
        for i, (path, ad) in enumerate(_lora_paths(adapt.abstract.get("lora", {}))):
            a, b = ad["a"], ad["b"]
            name = path.rsplit("/", 1)[-1]
            fan_in = 1 if name == "embed" else math.prod(a.shape[-1 - _IN_DIMS[name]:-1])
            _set(out, f"lora/{path}/a",
                 jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype) * fan_in ** -0.5)
            _set(out, f"lora/{path}/b", jnp.zeros(b.shape, b.dtype))
        return out
    return jax.jit(make, out_shardings=shardings)(base)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# The base: where it is, loading it, and checking it is the one the adapters were trained on.


@jax.jit
def _fingerprint(params):
    """Per parameter: mean / rms, rms, and a fixed pseudo-random projection / rms, in float32.

    Independent of the mesh (up to reduction-order rounding) and of the storage format, and any
    real change of the weights (more training, another seed, a cast to bfloat16) moves them."""
    def one(x):
        x = x.astype(jnp.float32)
        # Integer phases keep cos() exact to float32 on every backend.
        phase = sum((jax.lax.broadcasted_iota(jnp.int32, x.shape, d) * c) % 4096
                    for d, c in zip(range(x.ndim), (613, 1499, 2857, 3931, 241)))
        rms = jnp.sqrt(jnp.mean(x * x)) + 1e-12
        proj = jnp.sum(x * jnp.cos(phase.astype(jnp.float32) * (2 * math.pi / 4096)))
        proj = proj / math.sqrt(x.size)
        return jnp.stack([jnp.mean(x) / rms, rms, proj / rms])
    return jnp.stack(jax.tree.leaves(jax.tree.map(one, params)))


def fingerprint(params) -> list[list[float]]:
    return np.asarray(jax.device_get(_fingerprint(params)), np.float64).round(7).tolist()


def same_fingerprint(a, b, tol: float = 1e-4) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    scale = np.ones_like(a)
    scale[:, 1] = np.abs(a[:, 1])  # the rms compares relatively; the others are rms-normalized
    return bool(np.all(np.abs(a - b) <= tol * np.maximum(scale, 1e-12)))


def read_ref(workdir: str) -> dict | None:
    """The run's base reference (base.json), or None for a run that is not PEFT."""
    path = os.path.join(workdir, REF_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_ref(workdir: str, ref: dict) -> None:
    if jax.process_index() == 0:
        files.atomic_write_json(os.path.join(workdir, REF_FILE), ref)


def _has_checkpoints(workdir: str) -> bool:
    directory = checkpoints.checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def check_run(cfg, workdir: str, init_dir: str | None) -> None:
    """Before any work: PEFT needs a base (init_from), and a workdir's checkpoints are either
    whole models or adapters, never one then the other."""
    if active(cfg.get("peft")) and not init_dir:
        raise UserError("config key 'init_from': PEFT (peft.method=lora or peft.trainable) "
                        "fine-tunes a base model; set init_from to its run or model directory.")
    if init_dir and read_ref(init_dir) is not None:
        raise UserError(f"config key 'init_from': {init_dir} holds adapters, not a whole model; "
                        f"fold them into their base first: python -m t5x_like.export --merge "
                        f"--workdir={init_dir} --out=<model dir>.")
    has_ref = os.path.isfile(os.path.join(workdir, REF_FILE))
    has_ckpt = _has_checkpoints(workdir)
    if active(cfg.get("peft")) and has_ckpt and not has_ref:
        raise UserError(f"{workdir} holds checkpoints of a run without peft; its parameters "
                        "are not adapters. Use a new --workdir for a PEFT run.")
    if not active(cfg.get("peft")) and has_ref:
        raise UserError(f"{workdir} is a PEFT run (it has {REF_FILE}); keep its peft settings "
                        "to resume it, or use a new --workdir.")


def load_base(adapt: Peft, base_dir: str, step: int | None, shardings: dict,
              expect: dict | None = None) -> tuple[dict, dict]:
    """Restores the base onto `shardings` in the base dtype -> (base, reference to record).

    With `expect` (the run's base.json) the base must have the recorded fingerprint.
    """
    if read_ref(base_dir) is not None:
        raise UserError(f"{base_dir} holds adapters, not a whole model; fold them into their "
                        f"base first: python -m t5x_like.export --merge --workdir={base_dir} "
                        "--out=<model dir>.")
    saved = config_lib.load_json(os.path.join(base_dir, "config.json"))
    full_dtype = jnp.dtype(saved.model.get("param_dtype", "float32"))
    target = checkpoints.abstract_with_shardings(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, full_dtype), adapt.base_abstract),
        shardings)
    # A reward model from a chat model: the base has no head; it starts at zero (a tuned part).
    new_head = "reward_head" in target and not saved.model.get("reward_head")
    head = target.pop("reward_head") if new_head else None
    base, step = checkpoints.restore_params(base_dir, target, step)
    if new_head:
        base["reward_head"] = jax.jit(lambda: jnp.zeros(head.shape, head.dtype),
                                      out_shardings=head.sharding)()
    ref = {"path": os.path.abspath(base_dir), "step": step, "fingerprint": fingerprint(base)}
    if expect is not None and not same_fingerprint(ref["fingerprint"], expect["fingerprint"]):
        raise UserError(f"the base model {base_dir} step {step} is not the base these adapters "
                        f"were trained on ({expect['path']} step {expect['step']}): its weights "
                        f"differ. Point init_from (or --base) at that checkpoint.")
    cast = jax.jit(lambda t: jax.tree.map(lambda x, a: x.astype(a.dtype), t, adapt.base_abstract),
                   out_shardings=shardings, donate_argnums=0)
    return cast(base), ref


def run_base(adapt: Peft, workdir: str, init_dir: str, init_step: int | None,
             shardings: dict) -> dict:
    """The frozen base of a training run: init_from's checkpoint, recorded in base.json when the
    run starts and checked against that record whenever it resumes."""
    ref = read_ref(workdir)
    if ref is None or not _has_checkpoints(workdir):
        base, ref = load_base(adapt, init_dir, init_step, shardings)
        write_ref(workdir, ref)
        return base
    step = ref["step"] if init_step is None else init_step  # the base run may have moved on
    return load_base(adapt, init_dir, step, shardings, expect=ref)[0]


def with_base(train_step, eval_step, base: dict):
    """The jitted steps with the base bound: train_step(state, batch), eval_step(params, batch,
    token_bytes), as without PEFT. The base is never donated, so these arrays stay valid."""
    return (lambda state, batch: train_step(state, batch, base),
            lambda params, batch, token_bytes: eval_step(params, batch, token_bytes, base))


def load_trainable(cfg, workdir: str, step: int | None, mesh=None) -> dict:
    """The trainable tree of a PEFT run's checkpoint (adapters and tuned parameters)."""
    if mesh is None:
        import ml_collections

        one = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
        mesh = partitioning.make_mesh(one, jax.devices()[:1])
    _, abstract, names = model.abstract_model(cfg.model, cfg.seed)
    adapt = build(cfg, abstract, names)
    with jax.set_mesh(mesh):
        shardings = partitioning.tree_shardings(mesh, adapt.abstract, adapt.names)
        target = checkpoints.abstract_with_shardings(adapt.abstract, shardings)
        return checkpoints.restore_params(workdir, target, step)[0]


def load_adapted(cfg, workdir: str, abstract_params: dict, names: dict, mesh, *,
                 step: int | None = None, base_dir: str | None = None,
                 merge_adapters: bool = True) -> tuple[dict, dict | None, int]:
    """A PEFT run's model -> (parameters, LoRA inputs or None, step).

    The base comes from the run's base.json (or `base_dir`) and must match its fingerprint.
    merge_adapters folds LoRA into the weights (any caller can use the result as a plain
    model); otherwise the base (with tuned parameters) and the LoRA inputs come apart, for
    serving one base with adapters on the side.
    """
    ref = read_ref(workdir)
    adapt = build(cfg, abstract_params, names)
    if adapt is None or ref is None:
        raise UserError(f"{workdir} is not a PEFT run (no {REF_FILE} or peft settings).")
    base_shardings = partitioning.tree_shardings(mesh, adapt.base_abstract, adapt.base_names)
    base, _ = load_base(adapt, base_dir or ref["path"], ref["step"], base_shardings, expect=ref)
    shardings = partitioning.tree_shardings(mesh, adapt.abstract, adapt.names)
    target = checkpoints.abstract_with_shardings(adapt.abstract, shardings)
    trainable, step = checkpoints.restore_params(workdir, target, step)
    full, lora = jax.jit(lambda p, b: combine(adapt, p, b))(trainable, base)
    if merge_adapters:
        return jax.jit(merge)(full, lora), None, step
    return full, (lora or None), step


def summary(adapt: Peft) -> str:
    n_train, n_base = count(adapt.abstract), count(adapt.base_abstract)
    return (f"PEFT: {n_train:,} trainable parameters ({100 * n_train / n_base:.3g}% of the "
            f"{n_base:,} of the base); LoRA on {', '.join(adapt.targets) or 'nothing'}, "
            f"tuned in full: {', '.join(adapt.tuned) or 'nothing'}")

