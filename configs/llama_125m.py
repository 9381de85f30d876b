"""~125M-parameter Llama-style model (GPT-2-small scale), for a GPU node or a small TPU slice.

    python -m t5x_like.plan --config=configs/llama_125m.py --topology=8xh100
    bash launch/tpu_pod.sh --tpu=my-v5p-8 --zone=us-east5-a --accelerator=v5p-8 -- \
        --config=configs/llama_125m.py --workdir=gs://my-bucket/runs/125m --config.data.source=...
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.steps = 20_000
    cfg.model.vocab_size = 32_768
    cfg.model.hidden_dim = 768
    cfg.model.num_layers = 12
    cfg.model.num_heads = 12
    cfg.model.num_kv_heads = 12
    cfg.model.mlp_dim = 2048
    cfg.model.max_len = 2048
    cfg.model.dtype = "bfloat16"
    cfg.model.tie_embeddings = True
    cfg.optimizer.lr = 6e-4
    cfg.optimizer.warmup_steps = 1000
    cfg.optimizer.weight_decay = 0.1
    cfg.data.batch_size = 256  # x 2048 tokens = 0.5M tokens per step
    cfg.data.vocab_size = 32_768
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.checkpoint.every_steps = 1000
    cfg.eval.every_steps = 1000
    return cfg
