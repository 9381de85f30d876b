"""Long-context training of the ~1.2B Llama-style model (configs/llama_1b.py) at 32k tokens,
each sequence split over the devices of the mesh's sequence axis (context parallelism).

    python -m t5x_like.plan --config=configs/llama_1b_long.py --topology=v5p-8
    python -m t5x_like.plan --config=configs/llama_1b_long.py --topology=8xh100
    python -m t5x_like.train --config=configs/llama_1b_long.py --workdir=runs/1b-long \
        --config.init_from=runs/1b --config.data.source=text:<long documents>

Continue a llama_1b run with init_from (the same model: RoPE and sizes unchanged, only
max_len grows) or train from scratch. `plan` prints the per-device memory with the sequence
axis and, for comparison, without it (README, "Choosing axis sizes").

Recipe, and why:
- 32,768 tokens per sequence, 8 sequences per step (256k tokens), one sequence per
  micro-batch (optimizer.grad_accum_steps = 8): the fewest tokens a step can hold at once, so
  that the sequence axis, not the batch, divides the activations.
- mesh.sequence = -1: every device holds 32k / n positions of the one sequence (8k on a
  v5p-8's 4 chips, 4k on 8 GPUs). Without the axis a device holds at least one whole 32k
  sequence: n times the activations (plan shows both). Attention all-gathers the keys and
  values over the axis: with 8 key/value heads of 64 that is 32k x 8 x 64 x 2 bytes x 2 =
  64 MiB per layer in bfloat16, small beside the activations it saves.
- The weights are sharded over the sequence axis too (the rules table's "embed" is ZeRO-3
  over fsdp, sequence and expert): 1.2B parameters' weights, AdamW moments and gradients come
  to ~19 GB replicated, ~19 GB / n sharded.
- attention_impl = chunked in tiles of 1,024 queries x 1,024 keys: an online softmax with a
  FlashAttention-style backward pass, memory linear in the context, never the 32k x 32k scores
  (4 GiB per head per sequence in float32); a tile's scores are 32 heads x 1,024 x 1,024 x 4
  bytes = 128 MiB, and tiles above the causal diagonal are skipped (half the score FLOPs).
- remat = full: only each layer's input is kept (32k x 2048 x 2 bytes / n per layer); at this
  length the recomputation (~1/3 more FLOPs) buys more than larger batches would.
- RoPE base 500,000 (Llama 3's) as in llama_1b: positions up to 32k keep distinct phases
  without rescaling, so init_from works (a changed RoPE would be a different model).
- learning rate 1e-4, warmup 200 steps: continued pretraining on longer sequences; a third
  of llama_1b's peak rate, as long-context extension recipes (Llama 3.1, 2024) lower it.
"""

from configs import llama_1b


def get_config():
    cfg = llama_1b.get_config()
    cfg.steps = 2_000  # ~0.5B tokens: a context-extension stage, not a pretraining run
    cfg.model.max_len = 32_768
    cfg.model.attention_impl = "chunked"
    cfg.model.attention_block = 1024
    cfg.model.remat = "full"
    cfg.model.loss_chunk = 1024
    cfg.optimizer.lr = 1e-4
    cfg.optimizer.warmup_steps = 200
    cfg.optimizer.grad_accum_steps = 8
    cfg.data.batch_size = 8  # x 32,768 tokens = 256k tokens per step
    cfg.mesh.data = 1
    cfg.mesh.fsdp = 1
    cfg.mesh.sequence = -1
    cfg.checkpoint.every_steps = 200
    cfg.eval.every_steps = 200
    return cfg
