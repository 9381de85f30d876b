"""Training throughput side by side: our jitted train step vs Hugging Face transformers + torch.

    python -m benchmarks.train_step                      # shapes S and M, float32 and bfloat16
    python -m benchmarks.train_step --shapes=S --steps=10 --dtypes=float32

The same Llama-shaped model (vocab 8192, SwiGLU, untied embeddings, RMSNorm, RoPE) and batch,
trained one full step at a time (forward, backward, global-norm clipping, AdamW update) by both
in the same process. Steps are interleaved (ours, theirs, ours, ...) so that whatever else the
machine is doing slows both alike; each figure is the median of --steps timed steps after two
warm-up steps. torch runs with as many threads as JAX's CPU client uses (the machine's cores).

Printed per row: tokens/s, achieved model TFLOP/s (PaLM formula, t5x_like/modeling/flops.py), MFU
against the device's peak (on a CPU: against this machine's measured float32/bfloat16 matmul
rate, printed beside), peak host memory of the process, and ours/theirs.
"""

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from t5x_like.training import batches as batches_lib
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import lm
from t5x_like.modeling import flops
from t5x_like.modeling import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The comparison shapes: (hidden, layers, heads, mlp, seq, batch).
SHAPES = {"S": (256, 4, 4, 704, 256, 16), "M": (512, 8, 8, 1408, 512, 8),
          "L": (768, 12, 12, 2048, 512, 8)}
VOCAB = 8192


def config(shape: str, dtype: str, remat: str = "none", loss_chunk: int = 0, vocab: int = VOCAB):
    from configs import base  # here: configs need ml_collections, Ours does not

    d, L, H, F, T, B = SHAPES[shape]
    cfg = base.get_config()
    m = cfg.model
    m.vocab_size, m.hidden_dim, m.num_layers, m.num_heads, m.num_kv_heads = vocab, d, L, H, H
    m.mlp_dim, m.max_len, m.dtype, m.remat, m.loss_chunk = F, T, dtype, remat, loss_chunk
    cfg.data.batch_size = B
    cfg.optimizer.warmup_steps = 10
    return cfg


def matmul_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """This machine's dense matmul rate (TFLOP/s): the CPU's practical peak for MFU."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    t = common.median(common.timed(lambda: f(a, a).block_until_ready(), repeats=repeats))
    return 2 * n ** 3 / t / 1e12


class DoesNotFit(Exception):
    """The compiled step needs more device memory than allowed (Ours' max_bytes)."""

    def __init__(self, device_bytes: int, max_bytes: int):
        super().__init__(f"needs {device_bytes / 2 ** 30:.1f} GiB, {max_bytes / 2 ** 30:.1f} GiB "
                         "allowed")
        self.device_bytes = device_bytes


def synthetic_batch(cfg, mesh) -> dict:
    """A global batch of random tokens (data.batch_size x model.max_len), one document per row,
    made on the host once and placed on the mesh: no data pipeline involved."""
    B, T = cfg.data.batch_size, cfg.model.max_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    local = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    return batches_lib.global_batch(local, mesh)


class Ours:
    """The project's jitted train step on a synthetic batch. It is compiled against the
    abstract state first, so a step that needs more than `max_bytes` of device memory (XLA's
    own estimate) raises DoesNotFit before anything is allocated."""

    def __init__(self, cfg, max_bytes: int = 0):
        self.cfg = cfg
        self.mesh = partitioning.make_mesh(cfg.mesh)
        with jax.set_mesh(self.mesh):
            spec = state_lib.state_spec(cfg, self.mesh)
            self.batch = synthetic_batch(cfg, self.mesh)
            step_fn, _ = lm.compile_steps(cfg, spec, self.mesh)
            start = time.perf_counter()
            self.step_fn = step_fn.lower(spec.abstract, self.batch).compile()
            self.compile_s = time.perf_counter() - start
            # XLA's temporary buffers of one step (activations, logits, gradients before the
            # update): what remat and model.loss_chunk shrink; the state itself is not counted.
            memory = self.step_fn.memory_analysis()
            self.temp_gib = memory.temp_size_in_bytes / 2 ** 30 if memory else float("nan")
            # Inputs + outputs + temporaries, less the donated state the outputs reuse.
            self.device_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                                 - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                                 if memory else 0)
            if max_bytes and self.device_bytes > max_bytes:
                raise DoesNotFit(self.device_bytes, max_bytes)
            self.state = state_lib.init_state(cfg, spec)

    def step(self):
        self.state, metrics = self.step_fn(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])


class Theirs:
    def __init__(self, cfg, dtype: str):
        import torch
        import transformers

        d, L, H, F, T, B = (cfg.model.hidden_dim, cfg.model.num_layers, cfg.model.num_heads,
                            cfg.model.mlp_dim, cfg.model.max_len, cfg.data.batch_size)
        torch.manual_seed(0)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.model.vocab_size, hidden_size=d, intermediate_size=F,
            num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=H,
            max_position_embeddings=T,
            rms_norm_eps=cfg.model.norm_eps, rope_theta=cfg.model.rope_theta,
            tie_word_embeddings=False, attn_implementation="sdpa")
        self.torch = torch
        self.model = transformers.LlamaForCausalLM(hf_cfg).train()
        o = cfg.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.clip = o.grad_clip
        self.ids = torch.randint(4, cfg.model.vocab_size, (B, T))
        # bfloat16 compute with float32 parameters: torch's own mixed precision on the CPU.
        self.autocast = dtype == "bfloat16"

    def step(self):
        torch = self.torch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.detach())  # the host reads the loss, as ours does


def interleaved(fns: dict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, timing them in turn so load hits all alike.

    A pause before each timed call lets the previous library's worker threads, which spin for
    a while after their work (OpenMP's, XLA's), go idle instead of slowing the next call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            time.sleep(0.25)
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: common.median(v) for k, v in times.items()}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None):
    from configs import base

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="S,M")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--loss_chunks", default=str(base.get_config().model.loss_chunk),
                        help="model.loss_chunk values, one row each (0 = the whole logits); "
                             "default: configs/base.py's")
    parser.add_argument("--vocab", type=int, default=VOCAB,
                        help="vocabulary size (the issue's CPU shapes use 8192)")
    parser.add_argument("--no_peer", action="store_true", help="ours only (no torch needed)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if not args.no_peer:
        import torch
        torch.set_num_threads(os.cpu_count())

    on_cpu = jax.devices()[0].platform == "cpu"
    peaks = {}
    rows = []
    combos = [(shape, dtype, int(chunk)) for shape in args.shapes.split(",")
              for dtype in args.dtypes.split(",") for chunk in args.loss_chunks.split(",")]
    for shape, dtype, chunk in combos:
        cfg = config(shape, dtype, args.remat, chunk, args.vocab)
        ours = Ours(cfg)
        fns = {"ours": ours.step}
        if not args.no_peer:
            fns["theirs"] = Theirs(cfg, dtype).step
        secs = interleaved(fns, args.steps)
        tokens = cfg.data.batch_size * cfg.model.max_len
        flop = flops.train_flops_per_token(cfg.model, cfg.model.max_len) * tokens
        if on_cpu:
            peaks.setdefault(dtype, matmul_tflops(dtype))
            peak = peaks[dtype]
        else:
            peak = flops.peak_tflops(jax.devices()[0].device_kind) * jax.device_count()
        row = {"shape": shape, "dtype": dtype, "loss_chunk": chunk, "params_M": round(
                   (flops.matmul_params(cfg.model) + cfg.model.vocab_size * cfg.model.hidden_dim)
                   / 1e6, 1),
               "ours_tok_s": tokens / secs["ours"],
               "ours_tflops": flop / secs["ours"] / 1e12,
               "ours_mfu": flop / secs["ours"] / 1e12 / peak,
               "compile_s": ours.compile_s, "ours_temp_gib": ours.temp_gib}
        if "theirs" in secs:
            row["theirs_tok_s"] = tokens / secs["theirs"]
            row["ratio"] = secs["theirs"] / secs["ours"]
        row["peak_tflops"] = peak
        row["peak_rss_gib"] = peak_rss_gib()
        rows.append(row)
        del ours, fns
    common.report("train_step", rows, args.out,
                  {"command": "python -m benchmarks.train_step " + " ".join(argv or sys.argv[1:]),
                   "steps": args.steps,
                   "note": "peak_tflops: measured 2048^3 matmul rate on CPU, table peak on TPU/GPU"})


if __name__ == "__main__":
    main()
