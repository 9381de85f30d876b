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


def activation_bytes_estimate(cfg, dp: int, tp: int, sp: int = 1) -> float:
    """Saved activations per device for the backward pass (Korthikanti et al. 2022, eq. 2,
    scaled to the compute dtype): t*b*h*(34 + 5*a*s/h) per layer without remat, with t = s /
    sp the positions of each sequence a device holds (the sequence axis) and the attention
    scores of its t queries over all s keys (none kept with model.attention_impl=chunked);
    with full remat only each layer's input is kept, plus one layer recomputed at a time."""
    m = cfg.model
    s, b = m.max_len, cfg.data.batch_size / cfg.optimizer.grad_accum_steps / dp
    t = s / sp
    h, a = m.hidden_dim, m.num_heads
    scale = (2 if m.dtype == "bfloat16" else 4) / 2
    scores = 0 if m.attention_impl == "chunked" else 5 * a * s / h
    full_layer = t * b * h * (34 + scores) * scale / tp
    if m.remat == "full":
        return m.num_layers * 2 * t * b * h * scale + full_layer
    if m.remat in ("dots", "dots_no_batch"):  # matmul outputs kept, elementwise recomputed
        return m.num_layers * full_layer * 0.6
    return m.num_layers * full_layer


def plan(cfg, target: Target, *, compile_step: bool = True) -> dict:
    import jax

    from t5x_like.core import config as config_lib
    from t5x_like.modeling import flops
    from t5x_like.modeling import partitioning
    from t5x_like.training import batches as batches_lib

    config_lib.validate(cfg)
    vocab = cfg.model.vocab_size or config_lib.padded_vocab_size(cfg.data.vocab_size,
                                                                 cfg.model.vocab_multiple)
    cfg = config_lib.resolve(cfg, vocab)
    mesh = partitioning.make_mesh(cfg.mesh)
    batches_lib.check_batch(cfg, mesh)
    out: dict = {"target": dataclasses.asdict(target), "mesh": dict(mesh.shape)}
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        spec = _memory(cfg, mesh, compile_step, out)
        params = spec.abstract["params"]
        if spec.adapt is not None:  # PEFT: a frozen base, and state for the trainable part only
            params = spec.base_abstract  # the model's own tensors, for "largest" below
        tokens = cfg.data.batch_size * cfg.model.max_len
        out["tokens_per_step"] = tokens
        out["flops_per_step"] = flops.train_flops_per_token(cfg.model, cfg.model.max_len) * tokens
        names = dict(zip(*_flat_names(params, spec)))
        largest = sorted(names, key=lambda k: -math.prod(names[k][0].shape))[:6]
        out["largest"] = [
            {"name": k, "shape": tuple(names[k][0].shape), "spec": str(names[k][0].sharding.spec),
             "per_device": tuple(names[k][0].sharding.shard_shape(names[k][0].shape))}
            for k in largest]
        if cfg.model.get("num_experts"):
            out["moe"] = moe_figures(cfg, mesh, params)
    if mesh.shape["sequence"] > 1:
        out["without_sequence"] = _without_sequence_axis(cfg, mesh, compile_step)
    return out


def _memory(cfg, mesh, compile_step: bool, out: dict):
    """Fills `out` with the per-device bytes of parameters, optimizer state, gradients and
    activations (estimate), and the compiled train step's (peak_bytes); returns the state
    spec. Runs inside the mesh and rules."""
    import jax
    import jax.numpy as jnp

    from data_pipelines import pipeline
    from t5x_like.modeling import partitioning
    from t5x_like.training import state as state_lib
    from t5x_like.training.tasks import lm

    dp, tp = partitioning.data_parallel_size(mesh), mesh.shape["tensor"]
    spec = state_lib.state_spec(cfg, mesh)
    params = spec.abstract["params"]
    out["parameters"] = sum(math.prod(x.shape)
                            for x in jax.tree.leaves(spec.base_abstract or params))
    out["param_bytes"] = _shard_bytes(params)
    out["opt_bytes"] = _shard_bytes(spec.abstract["opt_state"])
    out["grad_bytes"] = out["param_bytes"] * 4 // max(
        1, jnp.dtype(cfg.model.param_dtype).itemsize)  # gradients accumulate in float32
    out["activation_bytes_estimate"] = activation_bytes_estimate(cfg, dp, tp,
                                                                 mesh.shape["sequence"])
    base_args = ()
    if spec.adapt is not None:  # PEFT: a frozen base, and state for the trainable part only
        base_args = (spec.base_abstract,)
        out["peft"] = _peft_saving(cfg, mesh, spec, out)
    if compile_step:
        try:
            train_step, _ = lm.compile_steps(cfg, spec, mesh)
            B, T = cfg.data.batch_size, cfg.model.max_len
            batch = {k: jax.ShapeDtypeStruct(
                (B, T), jnp.float32 if k == "weights" else jnp.int32,
                sharding=partitioning.batch_sharding(mesh)) for k in pipeline.FEATURES}
            memory = train_step.lower(spec.abstract, batch, *base_args).compile().memory_analysis()
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
    return spec


def _without_sequence_axis(cfg, mesh, compile_step: bool) -> dict:
    """The same run on the same devices without the sequence axis: its devices folded into
    fsdp, and optimizer.grad_accum_steps divided by its size so that each device still gets
    the same tokens per micro-batch, now as whole sequences (a device can hold no less than
    one). Returns the sizes (as plan's), or {"error": why} when the batch does not allow it."""
    import jax

    from t5x_like.core.errors import UserError
    from t5x_like.modeling import partitioning
    from t5x_like.training import batches as batches_lib

    n = mesh.shape["sequence"]
    flat = cfg.as_configdict() if hasattr(cfg, "as_configdict") else cfg.copy()
    flat.mesh.update({**dict(mesh.shape), "sequence": 1, "fsdp": mesh.shape["fsdp"] * n})
    flat.optimizer.grad_accum_steps = max(1, cfg.optimizer.grad_accum_steps // n)
    flat_mesh = partitioning.make_mesh(flat.mesh)
    out: dict = {"mesh": dict(flat_mesh.shape),
                 "grad_accum_steps": flat.optimizer.grad_accum_steps}
    try:
        batches_lib.check_batch(flat, flat_mesh)
    except UserError as e:
        return {**out, "error": str(e)}
    with jax.set_mesh(flat_mesh), partitioning.axis_rules(
            partitioning.rules_with_overrides(flat.mesh.rules)):
        _memory(flat, flat_mesh, compile_step, out)
    return out


def moe_figures(cfg, mesh, params) -> dict:
    """Expert parameters (all, per device, per token) and the bytes the expert dispatch moves
    per device and step, forward and backward, for the mesh's expert axis (ep devices).

    Each device routes n = (micro-batch rows / data-parallel size) x (max_len / sequence)
    tokens per micro-batch and MoE layer. Dropless dispatch (ours) all-gathers the expert
    group's tokens and reduce-scatters their outputs: (ep - 1) n d values each way, and as
    much again in the backward pass. Capacity-based dispatch (model.moe_capacity_factor c)
    all-to-alls two buffers of c n k d values ((ep - 1) / ep of them leave the device), forward
    and backward. An ideal ragged all-to-all would move (ep - 1) / ep x n k d each way: shown
    for comparison (dropless all-gather costs ep / k times that)."""
    import numpy as np

    from t5x_like.modeling import flops
    from t5x_like.modeling import model

    m = cfg.model
    ep = mesh.shape["expert"]
    layers = params["layers"]
    expert_leaves = [layers[k] for k in ("we_gate", "we_up", "we_down")]
    dp = mesh.shape["data"] * mesh.shape["fsdp"] * ep
    rows = cfg.data.batch_size / cfg.optimizer.grad_accum_steps / dp
    n = rows * m.max_len / mesh.shape["sequence"]
    d, k = m.hidden_dim, m.experts_per_token
    act = 2 if m.dtype == "bfloat16" else 4
    n_moe = int(model.moe_layers(m).sum())
    per_step = n_moe * cfg.optimizer.grad_accum_steps * 2  # forward and backward
    dropless = 2 * (ep - 1) * n * d * act * per_step
    capacity = 2 * (ep - 1) / ep * (m.moe_capacity_factor or 1.0) * n * k * d * act * per_step
    ideal = 2 * (ep - 1) / ep * n * k * d * act * per_step
    return {"experts": m.num_experts, "top_k": k, "moe_layers": n_moe, "expert_axis": ep,
            "expert_params": int(sum(np.prod(x.shape) for x in expert_leaves)),
            "expert_bytes_per_device": _shard_bytes(expert_leaves),
            "active_params_per_token": flops.matmul_params(m), "tokens_per_device": n,
            "dispatch": "capacity" if m.moe_capacity_factor else "dropless",
            "dispatch_bytes_per_step": capacity if m.moe_capacity_factor else dropless,
            "dropless_bytes_per_step": dropless, "capacity_bytes_per_step": capacity,
            "ideal_all_to_all_bytes_per_step": ideal}


def _peft_saving(cfg, mesh, spec, out: dict) -> dict:
    """Per-device bytes of the weights' training state (parameters, AdamW moments, gradients)
    with PEFT against full fine-tuning of the same model, from both state specs."""
    from t5x_like.modeling import peft
    from t5x_like.training import state as state_lib

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
    lines.append(_peak_line(p, t))
    if "without_sequence" in p:
        w = p["without_sequence"]
        lines.append(f"  without the sequence axis (mesh {w['mesh']}, grad_accum_steps "
                     f"{w['grad_accum_steps']}: each device holds whole sequences):")
        if "error" in w:
            lines.append(f"    not possible: {w['error']}")
        else:
            lines.append(f"    activations (estimate) {_gib(w['activation_bytes_estimate'])}")
            lines.append("  " + _peak_line(w, t))
    if "moe" in p:
        e = p["moe"]
        lines += [
            f"  experts: {e['experts']} per MoE layer x {e['moe_layers']} layers, top "
            f"{e['top_k']}: {e['expert_params'] / 1e9:,.3f} B expert parameters, "
            f"{_gib(e['expert_bytes_per_device'])} per device (expert axis {e['expert_axis']}); "
            f"{e['active_params_per_token'] / 1e9:,.3f} B active per token",
            f"  expert dispatch per device and step ({e['dispatch']}, "
            f"{e['tokens_per_device']:,.0f} tokens per micro-batch and layer): "
            f"{_gib(e['dispatch_bytes_per_step'])} forward+backward (dropless all-gather "
            f"{_gib(e['dropless_bytes_per_step'])}, capacity all-to-all "
            f"{_gib(e['capacity_bytes_per_step'])}, ideal ragged all-to-all "
            f"{_gib(e['ideal_all_to_all_bytes_per_step'])})"]
    step_s = p["flops_per_step"] / (t["devices"] * t["peak_tflops"] * 1e12 * mfu)
    lines.append(f"  FLOPs per step        {p['flops_per_step']:.3e} ({p['tokens_per_step']:,} "
                 f"tokens); at {mfu:.0%} MFU: {step_s:.2f} s/step, "
                 f"{p['tokens_per_step'] / step_s:,.0f} tokens/s")
    lines.append("  largest tensors (global shape -> mesh axes -> per-device shard):")
    for x in p["largest"]:
        lines.append(f"    {x['name']:<22} {str(x['shape']):<24} {x['spec']:<40} {x['per_device']}")
    return "\n".join(lines)


def _peak_line(p: dict, t: dict) -> str:
    fits = p["peak_bytes"] <= t["hbm_gib"] * 2**30
    return (f"  peak per device       {_gib(p['peak_bytes'])} of {t['hbm_gib']} GiB -> "
            f"{'fits' if fits else 'DOES NOT FIT'}")


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
