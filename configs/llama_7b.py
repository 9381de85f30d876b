"""~6.7B-parameter Llama-2-7B-shaped model: FSDP plus tensor parallelism, full remat.

    python -m t5x_like.plan --config=configs/llama_7b.py --topology=v5p-64
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.steps = 250_000
    cfg.model.vocab_size = 32_000
    cfg.model.vocab_multiple = 128
    cfg.model.hidden_dim = 4096
    cfg.model.num_layers = 32
    cfg.model.num_heads = 32
    cfg.model.num_kv_heads = 32
    cfg.model.mlp_dim = 11008
    cfg.model.max_len = 4096
    cfg.model.norm_eps = 1e-5
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "full"
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.warmup_steps = 2000
    cfg.data.batch_size = 256  # x 4096 tokens = 1M tokens per step
    cfg.data.vocab_size = 32_000
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.mesh.tensor = 1
    cfg.checkpoint.every_steps = 1000
    cfg.eval.every_steps = 1000
    return cfg
