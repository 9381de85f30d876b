"""Peak host memory (RSS) and time of `t5x_like.hf import` and `export` on a ~1B model.

    python -m benchmarks.hf_import_export --workdir=/tmp/hf_bench [--layers=16 --hidden=2048]

Writes a random-init Llama-3.2-1B-shaped checkpoint (bfloat16 safetensors in shards of
--shard_gb, a small SentencePiece tokenizer), then runs import and export (bfloat16) each in a
fresh process and reads that process's peak RSS (getrusage of the child). Nothing is
downloaded. --code=<checkout> runs another checkout's t5x_like (for a before/after figure).
"""

import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import sentencepiece as spm
from absl import app, flags
from safetensors.numpy import save_file

from benchmarks import common

flags.DEFINE_string("workdir", "/tmp/hf_bench", "Scratch folder (HF model, import, export).")
flags.DEFINE_integer("layers", 16, "num_hidden_layers")
flags.DEFINE_integer("hidden", 2048, "hidden_size")
flags.DEFINE_integer("mlp", 8192, "intermediate_size")
flags.DEFINE_integer("heads", 32, "num_attention_heads")
flags.DEFINE_integer("kv_heads", 8, "num_key_value_heads")
flags.DEFINE_integer("vocab", 128256, "vocab_size")
flags.DEFINE_float("shard_gb", 1.0, "Largest safetensors shard, GB.")
flags.DEFINE_string("code", "", "The t5x_like checkout to run (default: this one).")
flags.DEFINE_string("result", "hf_import_export", "Name of the JSON under benchmarks/results.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_hf_model(folder: str) -> dict:
    """Random bfloat16 weights in Llama's names and layout, shard by shard (never all in
    memory), config.json, model.safetensors.index.json and a tokenizer.model."""
    d, f, L, H, K, V = (FLAGS.hidden, FLAGS.mlp, FLAGS.layers, FLAGS.heads, FLAGS.kv_heads,
                        FLAGS.vocab)
    D = d // H
    shapes = {"model.embed_tokens.weight": (V, d)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (H * D, d),
                       p + "self_attn.k_proj.weight": (K * D, d),
                       p + "self_attn.v_proj.weight": (K * D, d),
                       p + "self_attn.o_proj.weight": (d, H * D),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (V, d)})
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    limit, shard, size, weight_map, n = FLAGS.shard_gb * 1e9, {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shard and size + nbytes > limit:
            flush()
        shard[name] = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        size += nbytes
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f_:
        json.dump({"metadata": {}, "weight_map": weight_map}, f_)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
              "hidden_size": d, "intermediate_size": f, "num_hidden_layers": L,
              "num_attention_heads": H, "num_key_value_heads": K, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(folder, "config.json"), "w") as f_:
        json.dump(config, f_)
    buf = io.BytesIO()
    text = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 30? It is 42."]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 50), model_writer=buf,
                                   vocab_size=400, model_type="bpe", byte_fallback=True,
                                   hard_vocab_limit=False, minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f_:
        f_.write(buf.getvalue())
    files = [os.path.join(folder, x) for x in os.listdir(folder) if x.endswith(".safetensors")]
    return {"params": sum(math.prod(s) for s in shapes.values()),
            "hf_gb": sum(os.path.getsize(x) for x in files) / 1e9,
            "largest_shard_gb": max(os.path.getsize(x) for x in files) / 1e9,
            "shards": len(files)}


def measured(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of `python -m t5x_like.hf <args>` in a fresh process."""
    start = time.perf_counter()
    # A child of a child: getrusage(RUSAGE_CHILDREN) then holds this run's peak alone.
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "t5x_like.hf",
                          *args], cwd=FLAGS.code or ROOT, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    seconds = time.perf_counter() - start
    return seconds, int(out.stdout.strip().splitlines()[-1]) * 1024 / 1e9


def main(_):
    work = FLAGS.workdir
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    info = write_hf_model(os.path.join(work, "hf"))
    print(f"wrote {info} in {time.perf_counter() - start:.0f} s")
    rows = []
    imp = measured(["import", f"--hf_dir={work}/hf", f"--out={work}/imported"])
    rows.append({"job": "import", "seconds": imp[0], "peak_rss_gb": imp[1]})
    exp = measured(["export", f"--workdir={work}/imported", f"--out={work}/exported",
                    "--dtype=bfloat16"])
    rows.append({"job": "export bf16", "seconds": exp[0], "peak_rss_gb": exp[1]})
    for r in rows:
        r["rss_over_largest_shard"] = r["peak_rss_gb"] / info["largest_shard_gb"]
    common.report(FLAGS.result, rows, os.path.join(ROOT, "benchmarks", "results"),
                  extra={"model": info, "code": FLAGS.code or ROOT})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
