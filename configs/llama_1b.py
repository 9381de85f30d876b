"""~1.2B-parameter Llama-style model (Llama-3.2-1B shape, 32k vocab), FSDP over the devices.

    python -m t5x_like.plan --config=configs/llama_1b.py --topology=v5p-8
    python -m t5x_like.plan --config=configs/llama_1b.py --topology=8xh100
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.steps = 100_000
    cfg.model.vocab_size = 32_768
    cfg.model.hidden_dim = 2048
    cfg.model.num_layers = 16
    cfg.model.num_heads = 32
    cfg.model.num_kv_heads = 8
    cfg.model.mlp_dim = 8192
    cfg.model.max_len = 2048
    cfg.model.rope_theta = 500_000.0
    cfg.model.tie_embeddings = True
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "dots_no_batch"  # keep weight matmul outputs, recompute the rest
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.warmup_steps = 2000
    # 8 micro-batches of 32 sequences: 4-8 per device on 4-8 devices (`plan` shows it fits).
    cfg.optimizer.grad_accum_steps = 8
    cfg.data.batch_size = 256  # x 2048 tokens = 0.5M tokens per step
    cfg.data.vocab_size = 32_768
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.checkpoint.every_steps = 1000
    cfg.eval.every_steps = 1000
    return cfg
