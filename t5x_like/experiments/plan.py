"""Size a job before paying for it: `python -m t5x_like.plan --config=configs/llama_1b.py
--topology=v5p-8 [--config.mesh.tensor=2 ...]`.

Without allocating any weights it prints: parameter count; bytes per device of parameters,
optimizer state, gradients and activations (from the compiled train step's memory analysis,
compiled here on fake CPU devices shaped like the target; an analytic estimate when
--compile=false or compiling fails); FLOPs per step and the step time at a given MFU; and the
shardings of the largest tensors. The mesh, rules and batch come from the config exactly as
training would use them, so an impossible mesh fails here the same way.
"""

import dataclasses
import math
import os
import sys

from absl import flags

# name: (devices JAX sees, memory GiB per device, dense bf16 peak TFLOP/s per device)
TOPOLOGIES = {
    "v4-8": (4, 32, 275.0), "v4-32": (16, 32, 275.0),
    "v5e-8": (8, 16, 197.0), "v5e-16": (16, 16, 197.0),
    "v5p-8": (4, 95, 459.0), "v5p-16": (8, 95, 459.0), "v5p-64": (32, 95, 459.0),
    "v6e-8": (8, 32, 918.0),
    "8xa100": (8, 80, 312.0), "8xh100": (8, 80, 989.0), "8xh200": (8, 141, 989.0),
    "1xh100": (1, 80, 989.0),
}


@dataclasses.dataclass
class Target:
    name: str
    devices: int
    hbm_gib: float
    peak_tflops: float


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _shard_bytes(abstract_tree) -> int:
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def activation_bytes_estimate(cfg, dp: int, tp: int) -> float:
    """Saved activations per device for the backward pass (Korthikanti et al. 2022, eq. 2,
    scaled to the compute dtype): s*b*h*(34 + 5*a*s/h) per layer without remat; with full
    remat only each layer's input is kept, plus one layer recomputed at a time."""
    m = cfg.model
    s, b = m.max_len, cfg.data.batch_size / cfg.optimizer.grad_accum_steps / dp
    h, a = m.hidden_dim, m.num_heads
    scale = (2 if m.dtype == "bfloat16" else 4) / 2
    full_layer = s * b * h * (34 + 5 * a * s / h) * scale / tp
    if m.remat == "full":
        return m.num_layers * 2 * s * b * h * scale + full_layer
    if m.remat in ("dots", "dots_no_batch"):  # matmul outputs kept, elementwise recomputed
        return m.num_layers * full_layer * 0.6
    return m.num_layers * full_layer


def plan(cfg, target: Target, *, compile_step: bool = True) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from data_pipelines import pipeline
    from t5x_like.core import config as config_lib
    from t5x_like.modeling import flops
    from t5x_like.modeling import partitioning
    from t5x_like.training import batches as batches_lib
    from t5x_like.training import state as state_lib
    from t5x_like.training.tasks import lm

    config_lib.validate(cfg)
    vocab = cfg.model.vocab_size or config_lib.padded_vocab_size(cfg.data.vocab_size,
                                                                 cfg.model.vocab_multiple)
    cfg = config_lib.resolve(cfg, vocab)
    mesh = partitioning.make_mesh(cfg.mesh)
    batches_lib.check_batch(cfg, mesh)
    dp, tp = partitioning.data_parallel_size(mesh), mesh.shape["tensor"]
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    out: dict = {"target": dataclasses.asdict(target), "mesh": dict(mesh.shape)}
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        spec = state_lib.state_spec(cfg, mesh)
        params = spec.abstract["params"]
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(spec.base_abstract or params))
        out["parameters"] = n_params
        out["param_bytes"] = _shard_bytes(params)
        out["opt_bytes"] = _shard_bytes(spec.abstract["opt_state"])
        out["grad_bytes"] = out["param_bytes"] * 4 // max(
            1, jnp.dtype(cfg.model.param_dtype).itemsize)  # gradients accumulate in float32
        out["activation_bytes_estimate"] = activation_bytes_estimate(cfg, dp, tp)
        base_args = ()
        if spec.adapt is not None:  # PEFT: a frozen base, and state for the trainable part only
            base_args = (spec.base_abstract,)
            out["peft"] = _peft_saving(cfg, mesh, spec, out)
            params = spec.base_abstract  # the model's own tensors, for "largest" below
        if compile_step:
            try:
                train_step, _ = lm.compile_steps(cfg, spec, mesh)
                B, T = cfg.data.batch_size, cfg.model.max_len
                batch = {k: jax.ShapeDtypeStruct(
                    (B, T), jnp.float32 if k == "weights" else jnp.int32,
                    sharding=partitioning.batch_sharding(mesh)) for k in pipeline.FEATURES}
                memory = train_step.lower(spec.abstract, batch,
                                          *base_args).compile().memory_analysis()
                out["compiled"] = {
                    "argument_bytes": memory.argument_size_in_bytes,
                    "output_bytes": memory.output_size_in_bytes,
                    "alias_bytes": memory.alias_size_in_bytes,
                    "temp_bytes": memory.temp_size_in_bytes}
                out["peak_bytes"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                     - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
            except Exception as e:  # an estimate is still useful when the compile cannot run
                out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        if "peak_bytes" not in out:
            out["peak_bytes"] = (out["param_bytes"] + out["opt_bytes"] + out["grad_bytes"]
                                 + out.get("peft", {}).get("base_bytes", 0)
                                 + out["activation_bytes_estimate"])
        tokens = cfg.data.batch_size * cfg.model.max_len
        out["tokens_per_step"] = tokens
        out["flops_per_step"] = flops.train_flops_per_token(cfg.model, cfg.model.max_len) * tokens
        names = dict(zip(*_flat_names(params, spec)))
        largest = sorted(names, key=lambda k: -math.prod(names[k][0].shape))[:6]
        out["largest"] = [
            {"name": k, "shape": tuple(names[k][0].shape), "spec": str(names[k][0].sharding.spec),
             "per_device": tuple(names[k][0].sharding.shard_shape(names[k][0].shape))}
            for k in largest]
    del np
    return out


def _peft_saving(cfg, mesh, spec, out: dict) -> dict:
    """Per-device bytes of the weights' training state (parameters, AdamW moments, gradients)
    with PEFT against full fine-tuning of the same model, from both state specs."""
    from t5x_like.modeling import peft
    from t5x_like.training import trainer

    full_cfg = cfg.as_configdict() if hasattr(cfg, "as_configdict") else cfg.copy()
    full_cfg.peft.method, full_cfg.peft.trainable, full_cfg.peft.trainable_layers = "none", "", 0
    full = state_lib.state_spec(full_cfg, mesh)
    full_params = _shard_bytes(full.abstract["params"])
    full_bytes = full_params + _shard_bytes(full.abstract["opt_state"]) + full_params * 4 // max(
        1, full.abstract["params"]["embed"].dtype.itemsize)
    base_bytes = _shard_bytes(spec.base_abstract)
    peft_bytes = base_bytes + out["param_bytes"] + out["opt_bytes"] + out["grad_bytes"]
    return {"trainable": peft.count(spec.adapt.abstract), "base_bytes": base_bytes,
            "base_dtype": str(jax_dtype(spec.base_abstract)), "full_ft_bytes": full_bytes,
            "peft_bytes": peft_bytes, "saved_bytes": full_bytes - peft_bytes,
            "summary": peft.summary(spec.adapt)}


def jax_dtype(tree):
    import jax

    return jax.tree.leaves(tree)[0].dtype


def _flat_names(params, spec):
    import jax

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    keys = ["/".join(str(getattr(p, "key", p)) for p in path) for path, _ in flat]
    return keys, [(leaf,) for _, leaf in flat]


def render(cfg_name: str, p: dict, mfu: float) -> str:
    t = p["target"]
    lines = [f"plan for {cfg_name} on {t['name']}: {t['devices']} devices x {t['hbm_gib']} GiB, "
             f"mesh {p['mesh']}",
             f"  parameters            {p['parameters'] / 1e9:,.3f} B",
             f"  per device: params    {_gib(p['param_bytes'])}",
             f"              optimizer {_gib(p['opt_bytes'])} (AdamW moments, float32)",
             f"              grads     {_gib(p['grad_bytes'])}",
             f"              activations (estimate) {_gib(p['activation_bytes_estimate'])}"]
    if "peft" in p:
        e = p["peft"]
        lines += [f"  {e['summary']}",
                  f"  per device: frozen base {_gib(e['base_bytes'])} ({e['base_dtype']}); the "
                  "params/optimizer/grads above are the trainable part only",
                  f"  weights + optimizer + grads per device: full fine-tuning "
                  f"{_gib(e['full_ft_bytes'])} -> PEFT {_gib(e['peft_bytes'])}: saves "
                  f"{_gib(e['saved_bytes'])} ({e['saved_bytes'] / e['full_ft_bytes']:.0%})"]
    if "compiled" in p:
        c = p["compiled"]
        lines.append(f"  compiled train step, per device: arguments {_gib(c['argument_bytes'])}, "
                     f"temporaries {_gib(c['temp_bytes'])} (XLA buffer assignment, CPU backend)")
    elif "compile_error" in p:
        lines.append(f"  (compile skipped: {p['compile_error']})")
    fits = p["peak_bytes"] <= t["hbm_gib"] * 2**30
    lines.append(f"  peak per device       {_gib(p['peak_bytes'])} of {t['hbm_gib']} GiB -> "
                 f"{'fits' if fits else 'DOES NOT FIT'}")
    step_s = p["flops_per_step"] / (t["devices"] * t["peak_tflops"] * 1e12 * mfu)
    lines.append(f"  FLOPs per step        {p['flops_per_step']:.3e} ({p['tokens_per_step']:,} "
                 f"tokens); at {mfu:.0%} MFU: {step_s:.2f} s/step, "
                 f"{p['tokens_per_step'] / step_s:,.0f} tokens/s")
    lines.append("  largest tensors (global shape -> mesh axes -> per-device shard):")
    for x in p["largest"]:
        lines.append(f"    {x['name']:<22} {str(x['shape']):<24} {x['spec']:<40} {x['per_device']}")
    return "\n".join(lines)


def main(argv):
    del argv
    f = flags.FLAGS
    devices, hbm, peak = TOPOLOGIES.get(f.topology, (f.devices, f.hbm_gib, f.peak_tflops))
    target = Target(f.topology, devices, hbm, peak)
    print(render(os.path.basename(f["config"].config_filename), plan(
        f.config, target, compile_step=f.compile), f.mfu))


def target_devices(argv: list[str]) -> int:
    """Device count to fake, read before JAX starts (flags are parsed later)."""
    values = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if values.get("topology", "custom") in TOPOLOGIES:
        return TOPOLOGIES[values["topology"]][0]
    return int(values.get("devices", 8))
