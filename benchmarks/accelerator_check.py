"""One prepared check for the first accelerator: correctness, training MFU, decode speed.

    python -m benchmarks.accelerator_check [--tiny] [--out=DIR] [--budget_s=480] [--profile]
    PYTHONPATH=. python3 -m benchmarks.accelerator_check     # from the source tree (GPU image)

On whatever JAX backend it finds, in one process, within --budget_s (8 minutes by default):

1. correctness: a toy model of configs/llama_1b.py's architecture (GQA, tied embeddings) on the
   backend against a CPU reference computed in the same process (jax.devices("cpu")): logits,
   loss, one train step (loss, gradient norm, loss after the update) and greedy KV-cache decoding,
   in float32 (matmul precision "highest") and bfloat16, each within its tolerance. Greedy tokens
   may part only where the reference's two candidates are closer than the logits tolerance.
2. attention: the attention op alone at the 1B model's shapes, forward + backward: the model's
   einsum blocks, jax.nn.dot_product_attention with XLA, and on a GPU with cuDNN (causal, and
   with the model's mask). The model's attention_impl=dot_product_attention calls it with no
   `implementation`, which JAX (0.10, 0.11) resolves to XLA, not cuDNN: this row says what
   cuDNN would give.
3. decode: the ~1B model (random weights, cast to --decode_dtype) at batch 1 and 64 with the
   project's Decoder, timed as benchmarks/decode.py does, against the memory-bandwidth bound
   (batch x HBM bandwidth / bytes of the weights, each read once per step; with the KV cache too).
4. training: configs/llama_1b.py's model at sequence 2048, bfloat16 compute, on synthetic
   batches placed on the devices once (no data pipeline), with the project's train step
   (lm.compile_steps via benchmarks/train_step.Ours). First attention_impl
   dot_product_attention against einsum at the config's remat, then the other remat policies on
   the faster one, then larger batches on the best while they fit (XLA's own memory estimate
   against the device's memory) and help. Per point: tokens/s, TFLOP/s (flops.py, causal
   attention halved as MaxText counts it; PaLM's full count beside), MFU against the device's
   dense bf16 peak (flops.PEAK_TFLOPS; none on a CPU) and against the bf16 matmul rate measured
   here, device memory. A point is started only if its predicted time fits the budget left.

The JSON goes to <--out>/accelerator_check.json (accelerator_check_tiny.json with --tiny), --out
defaulting to $OUT, else benchmarks/results/; it is rewritten after every section and point, so
a run stopped midway keeps what it measured. --tiny shrinks everything (toy model, sequence 64,
two steps) to rehearse the whole check on a CPU in seconds (tests/test_accelerator_check.py).

Needs jax, flax, optax, orbax-checkpoint, sentencepiece, absl-py, numpy and ml-collections: not
grain or tensorflow-datasets (the GPU image has neither). That image lacks ml-collections too:
launch/accelerator_check.sh puts the pure-Python wheels in benchmarks/wheels/ on PYTHONPATH
(see the script). Exit status 1 when a correctness check failed, else 0.
"""

import argparse
import contextlib
import gc
import json
import math
import os
import runpy
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, decode, train_step
from data_pipelines import chat_template  # (no grain: templates and token ids only)
from t5x_like.core import config as config_lib
from t5x_like.training.tasks import lm
from t5x_like.modeling import decoding
from t5x_like.modeling import flops
from t5x_like.modeling import model
from t5x_like.training import optimizer as optimizer_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = "configs/llama_1b.py"
# Tolerances against the CPU reference, relative to the largest reference logit (or to the loss
# and gradient norm): float32 at matmul precision "highest" differs only in summation order;
# bfloat16 compute against the float32 reference differs ~1.3% on the toy model on a CPU.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}
# Share of device memory a training point may plan to use (XLA's estimate is not exact).
MEMORY_SHARE = 0.9
# What a step is assumed to reach when predicting whether a point fits the budget (a share of
# the measured matmul rate): low, so that the prediction errs towards "too slow".
ASSUMED_UTILIZATION = 0.25


def job_config(tiny: bool):
    """configs/llama_1b.py's get_config(), a fresh mutable copy; --tiny: the same architecture
    (4 query heads per key/value head, tied embeddings, RoPE theta, remat) at toy size."""
    cfg = runpy.run_path(os.path.join(ROOT, CONFIG))["get_config"]()
    cfg.optimizer.grad_accum_steps = 1  # one batch per step: the batch is what the sweep sets
    cfg.model.dtype = "bfloat16"
    if tiny:
        m = cfg.model
        m.vocab_size, m.hidden_dim, m.num_layers, m.mlp_dim = 512, 64, 2, 256
        m.num_heads, m.num_kv_heads = 4, 4 * m.num_kv_heads // m.num_heads
        m.max_len, m.attention_block = 64, 16
        m.loss_chunk = 32
    return cfg


def resolved(cfg):
    """The config with its derived values (head_dim), frozen: what the model is built from."""
    return config_lib.resolve(cfg, cfg.model.vocab_size)


def device_info() -> dict:
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"backend": jax.default_backend(), "device_kind": device.device_kind,
            "devices": jax.device_count(), "jax": jax.__version__,
            "peak_tflops": flops.peak_tflops(device.device_kind),
            "hbm_tbps": flops.hbm_tbps(device.device_kind),
            "memory_bytes_limit": stats.get("bytes_limit")}


def memory_limit() -> int:
    """Bytes a training point may use on one device: the device's own limit, or on a CPU half
    of the machine's memory (shared by the fake devices)."""
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2 // jax.device_count()
    return int(limit * MEMORY_SHARE)


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2 ** 30 if stats and "peak_bytes_in_use" in stats else None


def copy_tbps(nbytes: int, repeats: int = 5) -> float:
    """Device memory bandwidth measured by a jitted elementwise op (each byte read and written)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)
    t = common.median(common.timed(lambda: f(x).block_until_ready(), repeats=repeats))
    return 2 * nbytes / t / 1e12


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Report:
    """The JSON record, rewritten whole (temporary name, then rename) after every change."""

    def __init__(self, path: str, head: dict):
        self.path, self.data = path, head

    def save(self) -> None:
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=_jsonable)
        os.replace(tmp, self.path)


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _finite(x):
    """JSON has no NaN: None instead."""
    return None if x is None or not math.isfinite(x) else float(x)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ---------------------------------------------------------------------------------------------
# 1. Correctness against the CPU.


def _toy_batch(cfg, rows: int, length: int) -> dict:
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, cfg.model.vocab_size, (rows, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((rows, length), np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}


def _run_on(device, fn, *args):
    """fn(*args) with every input on `device` (so the jitted computation runs there); the
    result comes back as numpy."""
    with jax.default_device(device):
        return jax.device_get(fn(*jax.device_put(args, device)))


def _compare(name: str, ref: float, value: float, tol: float, scale: float) -> dict:
    diff = abs(float(value) - float(ref))
    return {"name": name, "reference": float(ref), "value": float(value), "abs_diff": diff,
            "tolerance": tol * scale, "passed": bool(diff <= tol * scale)}


def _greedy(graphdef, params, model_cfg, tok, prompts, new_tokens, device):
    with jax.default_device(device):
        decoder = decoding.Decoder(graphdef, jax.device_put(params, device), model_cfg, tok,
                                   max_batch=len(prompts),
                                   unstack_layers=device.platform == "cpu")
        # The stop tokens banned: every row makes new_tokens tokens to compare.
        ban = tuple((t, float("-inf")) for t in chat_template.reply_stop_ids(tok))
        done = decoder.generate(prompts, decoding.Sampling(max_new_tokens=new_tokens,
                                                           logit_bias=ban))
    return [c.tokens for c in done]


def correctness(cfg, tok, backend_device, tiny: bool) -> dict:
    cpu = jax.devices("cpu")[0]
    checks = []
    batch = _toy_batch(cfg, rows=4, length=32)
    rng = np.random.default_rng(2)
    prompts = [[tok.bos_id, *rng.integers(10, tok.vocab_size, n).tolist()] for n in (5, 11)]
    new_tokens = 8 if tiny else 16
    for dtype in ("float32", "bfloat16"):
        tol = TOLERANCE[dtype]
        cfg.model.dtype = dtype
        cfg.optimizer.schedule, cfg.optimizer.warmup_steps, cfg.optimizer.lr = "constant", 0, 1e-3
        c = resolved(cfg)
        graphdef, _, _ = model.abstract_model(c.model)
        with jax.default_device(cpu):
            params = jax.device_get(model.init_params(c.model, seed=0))
        loss = lm.make_loss(graphdef, loss_chunk=c.model.loss_chunk)
        tx = optimizer_lib.make(c.optimizer, c.steps)
        step = lm.make_train_step(graphdef, tx, optimizer_lib.learning_rate(c.optimizer,
                                                                                 c.steps),
                                       seed=0, z_loss=0.0, accum_steps=1, dropout=0.0,
                                       loss_chunk=c.model.loss_chunk)

        def logits_and_loss(p, b):
            stats = loss(p, None, b)[1]
            return model.apply(graphdef, p, b["inputs"]), stats["nll_sum"] / stats["weight_sum"]

        def train_once(p, b):
            state, metrics = step({"step": jnp.zeros((), jnp.int32), "params": p,
                                   "opt_state": tx.init(p)}, b)
            return metrics["loss"], metrics["grad_norm"], logits_and_loss(state["params"], b)[1]

        # The reference is always float32; bfloat16 on the backend is compared with it. One
        # program for both (each compile counts on a CPU).
        with jax.default_matmul_precision("highest"):
            both = jax.jit(lambda p, b: (logits_and_loss(p, b), train_once(p, b)))
            (got_logits, got_loss), got_train = _run_on(backend_device, both, params, batch)
            if dtype == "float32":
                (ref_logits, ref_loss), ref_train = _run_on(cpu, both, params, batch)
        scale = float(np.abs(ref_logits).max())
        diff = float(np.abs(got_logits - ref_logits).max())
        checks.append({"name": f"logits_{dtype}", "max_abs_diff": diff, "tolerance": tol * scale,
                       "passed": bool(diff <= tol * scale)})
        checks.append(_compare(f"loss_{dtype}", ref_loss, got_loss, tol, abs(ref_loss)))
        for name, r, g in zip(("train_loss", "grad_norm", "loss_after_update"), ref_train,
                              got_train):
            checks.append(_compare(f"{name}_{dtype}", r, g, tol, abs(float(r))))
        with jax.default_matmul_precision("highest"):
            ref = _greedy(graphdef, params, c.model, tok, prompts, new_tokens, cpu)
            # On a CPU backend (the rehearsal) the reference is the run itself: no second decoder.
            got = (ref if backend_device == cpu else
                   _greedy(graphdef, params, c.model, tok, prompts, new_tokens, backend_device))
        checks.append(_decode_check(dtype, graphdef, params, prompts, ref, got, tol * scale, cpu))
    return {"reference": "cpu", "device": str(backend_device), "checks": checks,
            "passed": all(ch["passed"] for ch in checks)}


def _decode_check(dtype, graphdef, params, prompts, ref, got, tol_abs, cpu) -> dict:
    """Greedy tokens equal, or parting first where the reference's logits of its token and the
    backend's are within the logits tolerance (a near tie that rounding may break either way)."""
    out = {"name": f"greedy_decode_{dtype}", "tokens": sum(map(len, ref)), "match": "exact",
           "first_mismatch": None, "passed": True}
    for prompt, r, g in zip(prompts, ref, got):
        i = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), None)
        if i is None and len(r) == len(g):
            continue
        if i is None:  # one stopped earlier (cannot happen with stops banned): a mismatch
            out.update(match="mismatch", passed=False, first_mismatch=min(len(r), len(g)))
            break
        with jax.default_matmul_precision("highest"):
            logits = _run_on(cpu, jax.jit(lambda p, t: model.apply(graphdef, p, t)), params,
                             np.asarray([prompt + r[:i]], np.int32))[0, -1]
        gap = float(logits[r[i]] - logits[g[i]])
        near = gap <= 2 * tol_abs
        out.update(match="near_tie" if near else "mismatch", first_mismatch=i, logit_gap=gap,
                   passed=bool(near and out["passed"]))
        if not near:
            break
    return out


# ---------------------------------------------------------------------------------------------
# 2. The attention op alone.


def attention_ops(cfg, batch: int, repeats: int) -> list[dict]:
    """Forward + backward of attention at the model's shapes, per implementation, in bfloat16;
    max |output - einsum's| beside each (all compute the same)."""
    m = resolved(cfg).model
    B, T, H, K, D = batch, m.max_len, m.num_heads, m.num_kv_heads, m.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, T, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (B, T, K, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (B, T, K, D), jnp.bfloat16)
    seg = jnp.ones((B, T), jnp.int32)
    mask = model.attention_mask(seg, seg)
    dpa = jax.nn.dot_product_attention
    impls = {
        "einsum_blocks": lambda q, k, v: model.attention(q, k, v, mask, block=m.attention_block),
        "xla_masked": lambda q, k, v: dpa(q, k, v, mask=mask[:, None], implementation="xla"),
    }
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:
        impls["cudnn_causal"] = lambda q, k, v: dpa(q, k, v, is_causal=True,
                                                   implementation="cudnn")
        impls["cudnn_masked"] = lambda q, k, v: dpa(q, k, v, mask=mask[:, None],
                                                   implementation="cudnn")
    # MaxText's count: 4 B T^2 H D forward for the full matrix, halved for causal, x3 with the
    # backward pass.
    flop = 3 * 4 * B * T * T * H * D / 2
    rows, reference = [], None
    for name, fn in impls.items():
        row = {"impl": name, "batch": B, "seq": T}
        try:
            def loss(q, k, v, fn=fn):
                out = fn(q, k, v)
                return out.astype(jnp.float32).sum(), out

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
            secs = common.median(common.timed(lambda: jax.block_until_ready(grad(q, k, v)),
                                              repeats=repeats))
            out = grad(q, k, v)[1]
            reference = out if reference is None else reference
            row.update(ms=1e3 * secs, tflops=flop / secs / 1e12,
                       max_abs_diff_vs_einsum=float(jnp.abs(out.astype(jnp.float32)
                                                            - reference.astype(jnp.float32)).max()))
        except Exception as e:  # noqa: BLE001 (an unsupported implementation is a result)
            row["error"] = _error(e)
        rows.append(row)
    if not on_gpu:
        rows.append({"impl": "cudnn_*", "skipped": "cuDNN runs on NVIDIA GPUs only"})
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Decode.


def decode_speed(cfg, tok, batches, prompt_len: int, new_tokens: int, repeats: int,
                 dtype: str, hbm_tbps: float | None, budget: Budget) -> list[dict]:
    c = resolved(cfg)
    graphdef, _, _ = model.abstract_model(c.model)
    params = jax.tree.map(lambda x: x.astype(dtype), model.init_params(c.model, seed=0))
    count = model.count_params(params)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    decoder = decoding.Decoder(graphdef, params, c.model, tok, max_batch=max(batches))
    m = c.model
    rows = []
    for batch in batches:
        if budget.left() <= 0:
            rows.append({"batch": batch, "skipped": "time budget spent"})
            continue
        row = {"batch": batch, "params_M": count / 1e6, "weights_dtype": dtype,
               "compute_dtype": m.dtype, "weight_gib": weight_bytes / 2 ** 30}
        try:
            row.update(decode.measure(decoder, tok, batch, prompt_len, new_tokens, repeats))
        except Exception as e:  # noqa: BLE001
            row["error"] = _error(e)
            rows.append(row)
            continue
        # The KV cache read per step at the mean context of the timed steps.
        context = prompt_len + new_tokens / 2
        kv_bytes = 2 * m.num_layers * batch * m.num_kv_heads * m.head_dim * context * \
            jnp.dtype(m.dtype).itemsize
        if hbm_tbps:
            bound = batch * hbm_tbps * 1e12 / weight_bytes
            row.update(bound_tok_s=bound, share_of_bound=row["decode_tok_s"] / bound,
                       bound_with_kv_tok_s=batch * hbm_tbps * 1e12 / (weight_bytes + kv_bytes))
        rows.append(row)
    del decoder, params
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Training.


class Sweep:
    """Training points within the budget; each row one (attention_impl, remat, batch)."""

    def __init__(self, cfg, args, budget: Budget, report: Report, matmul_tflops: float,
                 peak: float | None):
        self.cfg, self.args, self.budget, self.report = cfg, args, budget, report
        self.matmul, self.peak = matmul_tflops, peak
        self.rows = report.data["training"]["points"]
        self.limit = memory_limit()
        self.compile_s = 0.0  # the longest compile so far: the next one's prediction
        self.bytes_per_row: dict = {}  # (impl, remat) -> XLA's bytes per batch row, last point

    def config(self, impl: str, remat: str, batch: int):
        cfg = job_config(self.args.tiny)
        cfg.model.max_len = self.args.seq or cfg.model.max_len
        cfg.model.attention_impl, cfg.model.remat = impl, remat
        cfg.data.batch_size = batch
        return resolved(cfg)

    def predicted_s(self, cfg) -> float:
        tokens = cfg.data.batch_size * cfg.model.max_len
        flop = flops.train_flops_per_token(cfg.model, cfg.model.max_len) * tokens
        step = flop / (self.matmul * 1e12 * ASSUMED_UTILIZATION * jax.device_count())
        return self.compile_s + (self.args.steps + 2) * step

    def point(self, impl: str, remat: str, batch: int) -> dict | None:
        """Measures one point; None when it was not run (budget, memory)."""
        cfg = self.config(impl, remat, batch)
        row = {"attention_impl": impl, "remat": remat, "batch": batch, "seq": cfg.model.max_len}
        key = (impl, remat)
        if key in self.bytes_per_row and self.bytes_per_row[key] * batch > self.limit:
            return None  # predicted not to fit: not even compiled
        predicted = self.predicted_s(cfg)
        if predicted > self.budget.left():
            row["skipped"] = f"predicted {predicted:.0f} s, {self.budget.left():.0f} s left"
            self.add(row)
            return None
        ours = None
        try:
            ours = train_step.Ours(cfg, max_bytes=self.limit)
            compile_s = ours.compile_s
            self.compile_s = max(self.compile_s, compile_s)
            self.bytes_per_row[key] = ours.device_bytes / batch
            start = time.perf_counter()
            ours.step()  # the first run of the executable: allocations, autotuning
            first = time.perf_counter() - start
            steps = max(2, min(self.args.steps, int(self.budget.left() / 4 / max(first, 1e-3))))
            secs = common.median(common.timed(ours.step, repeats=steps, warmup=0))
            loss = float(jax.device_get(ours.step_fn(ours.state, ours.batch)[1]["loss"]))
        except train_step.DoesNotFit as e:
            row["skipped"] = f"does not fit: {e}"
            self.bytes_per_row[key] = e.device_bytes / batch
            self.add(row)
            return None
        except Exception as e:  # noqa: BLE001 (out of memory at run time, an XLA error)
            row["error"] = _error(e)
            self.add(row)
            return None
        finally:
            del ours
            gc.collect()
        tokens = batch * cfg.model.max_len
        tflops = flops.train_flops_per_token(cfg.model, cfg.model.max_len, causal=True) * \
            tokens / secs / 1e12 / jax.device_count()
        palm = flops.train_flops_per_token(cfg.model, cfg.model.max_len) * \
            tokens / secs / 1e12 / jax.device_count()
        row.update(tokens_per_s=tokens / secs, step_s=secs, timed_steps=steps,
                   tflops_per_device=tflops, tflops_per_device_palm=palm,
                   mfu=tflops / self.peak if self.peak else None,
                   mfu_vs_measured_matmul=tflops / self.matmul,
                   compile_s=compile_s, xla_device_gib=self.bytes_per_row[key] * batch / 2 ** 30,
                   peak_device_gib_so_far=peak_memory_gib(), loss=_finite(loss))
        self.add(row)
        return row

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print("train", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()},
              flush=True)
        self.report.save()

    def run(self, impls, remats, batch: int, max_batch: int) -> None:
        cfg_remat = self.cfg.model.remat
        best = None

        def better(row):
            nonlocal best
            if row and (best is None or row["tokens_per_s"] > best["tokens_per_s"]):
                best = row

        for impl in impls:  # the attention implementations at the config's remat
            better(self.point(impl, cfg_remat, batch))
        if best is None:
            return
        for remat in remats:  # the other remat policies with the faster attention
            if remat != cfg_remat:
                better(self.point(best["attention_impl"], remat, batch))
        impl, remat, size = best["attention_impl"], best["remat"], 2 * batch
        while size <= max_batch:  # larger batches of the best while they fit and help
            row = self.point(impl, remat, size)
            if row is None or row["tokens_per_s"] < 1.02 * best["tokens_per_s"]:
                better(row)
                break
            better(row)
            size *= 2
        self.report.data["training"]["best"] = best
        self.report.save()


def profile_point(cfg, out_dir: str, top: int = 15) -> dict:
    """One step of `cfg` under jax.profiler: the op kinds taking the most time (the trace file
    is copied to out_dir when small enough to come back from a device machine)."""
    from benchmarks import profile_step

    ours = train_step.Ours(cfg)
    ours.step()
    trace_dir = tempfile.mkdtemp(prefix="accelerator_check_trace_")
    try:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            ours.step()
        kinds = profile_step.op_times(trace_dir)
        traces = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs
                  if f.endswith(".trace.json.gz")]
        copied = None
        if traces and os.path.getsize(traces[0]) < 15 * 2 ** 20:
            copied = os.path.join(out_dir, "accelerator_check_trace.json.gz")
            shutil.copyfile(traces[0], copied)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
        del ours
        gc.collect()
    total = sum(kinds.values()) or 1.0
    return {"attention_impl": cfg.model.attention_impl, "remat": cfg.model.remat,
            "batch": cfg.data.batch_size, "trace": copied,
            "top_ops": [{"op": k, "ms": ms, "share": ms / total}
                        for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:top]]}


# ---------------------------------------------------------------------------------------------


def out_dir(flag: str) -> str:
    return flag or os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="toy model, sequence 64, 2 steps: the whole check on a CPU in seconds")
    p.add_argument("--out", default="", help="folder of the JSON (default: $OUT, else "
                   "benchmarks/results/)")
    p.add_argument("--budget_s", type=float, default=480.0,
                   help="time for the whole check; no training point starts that is predicted "
                   "to end after it")
    p.add_argument("--seq", type=int, default=0, help="training sequence length (default: the "
                   "config's max_len, 2048; 64 with --tiny)")
    p.add_argument("--batch", type=int, default=0, help="first global batch of the sweep "
                   "(default 8 per device on an accelerator, 1 on a CPU, 2 with --tiny)")
    p.add_argument("--max_batch", type=int, default=0, help="largest global batch tried "
                   "(default 16x the first; with --tiny the first)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per point (default 5, "
                   "2 with --tiny; fewer when the budget is short)")
    p.add_argument("--impls", default="dot_product_attention,einsum")
    p.add_argument("--remats", default="", help="remat policies tried (default: the config's, "
                   "full, none (at the first batch none may not fit: it is then skipped); "
                   "only the config's with --tiny)")
    p.add_argument("--decode_batches", default="", help="default 1,64 (1,4 with --tiny)")
    p.add_argument("--decode_dtype", default="bfloat16",
                   help="dtype the weights are cast to for decoding (float32: as stored)")
    p.add_argument("--profile", action="store_true",
                   help="profile one step of the best training point (top ops in the JSON)")
    p.add_argument("--skip", default="", help="sections not to run: any of correctness, "
                   "attention, decode, training")
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error("--budget_s must be positive")
    accelerator = jax.default_backend() != "cpu"
    args.seq = args.seq or (64 if args.tiny else 0)
    args.batch = args.batch or jax.device_count() * (2 if args.tiny else 8 if accelerator else 1)
    args.max_batch = args.max_batch or (1 if args.tiny else 16) * args.batch
    args.steps = args.steps or (2 if args.tiny else 5)
    args.decode_batches = [int(b) for b in (args.decode_batches
                                            or ("1,4" if args.tiny else "1,64")).split(",")]
    return args


def main(argv=None) -> dict:
    """Runs the check; returns the report (also written as JSON)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "--tiny" in argv and "optimization_level" not in flags_now:
        # A rehearsal compiles many toy programs and runs each a few times: XLA's cheapest
        # optimization level halves the compile time (as in tests/conftest.py). Read when the
        # backend starts, which parse() does next; an already started one keeps its flags.
        os.environ["XLA_FLAGS"] = f"{flags_now} --xla_backend_optimization_level=0".strip()
    args = parse(argv)
    budget = Budget(args.budget_s)
    folder = out_dir(args.out)
    os.makedirs(folder, exist_ok=True)
    name = "accelerator_check_tiny" if args.tiny else "accelerator_check"
    info = device_info()
    cmd = "python -m benchmarks.accelerator_check " + " ".join(argv)
    report = Report(os.path.join(folder, f"{name}.json"),
                    {"benchmark": name, "command": cmd.strip(), "machine": common.machine(),
                     "device": info, "budget_s": args.budget_s, "tiny": args.tiny,
                     "load_avg_1min": [os.getloadavg()[0]]})
    report.save()
    print("device", info, flush=True)
    skip = set(filter(None, args.skip.split(",")))
    cfg = job_config(args.tiny)
    accelerator = info["backend"] != "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        tok = decode.small_tokenizer(tmp)

    # What this device reaches outside the model: the ceilings the model is compared with.
    n = 8192 if accelerator else 512 if args.tiny else 2048
    report.data["device"]["matmul_tflops_bf16"] = train_step.matmul_tflops("bfloat16", n)
    report.data["device"]["copy_tbps"] = copy_tbps(2 ** 31 if accelerator else 2 ** 24)
    report.save()

    if "correctness" not in skip:
        tiny = job_config(tiny=True)
        with _section(report, "correctness"):
            report.data["correctness"] = correctness(tiny, tok, jax.devices()[0], args.tiny)
        print("correctness", "passed" if report.data["correctness"].get("passed") else "FAILED",
              flush=True)
    if "attention" not in skip:
        att_cfg = job_config(args.tiny)
        att_cfg.model.max_len = args.seq or att_cfg.model.max_len
        with _section(report, "attention"):
            report.data["attention"] = attention_ops(att_cfg, args.batch, repeats=args.steps)
    if "decode" not in skip:
        with _section(report, "decode"):
            report.data["decode"] = {
                "prompt_len": 8 if args.tiny else 128, "new_tokens": 8 if args.tiny else 128,
                "rows": decode_speed(cfg, tok, args.decode_batches, 8 if args.tiny else 128,
                                     8 if args.tiny else 128, 1 if args.tiny else 2,
                                     args.decode_dtype, info["hbm_tbps"], budget)}
    if "training" not in skip:
        impls = args.impls.split(",")
        remats = (args.remats.split(",") if args.remats
                  else [cfg.model.remat] + ([] if args.tiny else ["full", "none"]))
        report.data["training"] = {"config": CONFIG, "dtype": "bfloat16", "points": [],
                                   "flops": "causal attention halved (MaxText since mid-2025);"
                                            " *_palm: PaLM's full count"
                                            " (t5x_like/modeling/flops.py)"}
        sweep = Sweep(cfg, args, budget, report, report.data["device"]["matmul_tflops_bf16"],
                      info["peak_tflops"])
        with _section(report, "training"):
            sweep.run(impls, remats, args.batch, args.max_batch)
        best = report.data["training"].get("best")
        if args.profile and best and budget.left() > sweep.compile_s + 30:
            with _section(report, "profile"):
                report.data["profile"] = profile_point(
                    sweep.config(best["attention_impl"], best["remat"], best["batch"]), folder)
    report.data["elapsed_s"] = args.budget_s - budget.left()
    report.data["load_avg_1min"].append(os.getloadavg()[0])  # a shared machine: how busy
    report.data["passed"] = report.data.get("correctness", {}).get("passed")
    report.save()
    print(f"wrote {report.path} ({report.data['elapsed_s']:.0f} s)", flush=True)
    return report.data


@contextlib.contextmanager
def _section(report: Report, name: str):
    """Runs one section; an exception is recorded in the JSON and the next section runs."""
    start = time.perf_counter()
    try:
        yield
    except Exception as e:  # noqa: BLE001
        report.data.setdefault("errors", {})[name] = _error(e)
        print(f"{name}: {_error(e)}", file=sys.stderr, flush=True)
    report.data.setdefault("section_s", {})[name] = time.perf_counter() - start
    report.save()


if __name__ == "__main__":
    try:
        result = main()
    except OSError as e:  # an unwritable --out folder, a full disk
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if result.get("passed") is not False else 1)
