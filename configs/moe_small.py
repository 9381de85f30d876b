"""A small mixture-of-experts model (~170M parameters, ~60M active per token), Qwen3-MoE-shaped,
trained with its experts split over the mesh's expert axis.

    python -m t5x_like.plan --config=configs/moe_small.py --topology=8xh100
    python -m t5x_like.train --config=configs/moe_small.py --workdir=runs/moe \
        --config.data.source=text:<your corpus>
    python -m t5x_like.hf export --workdir=runs/moe --out=hf/moe   # Qwen3MoeForCausalLM

Recipe, and why:
- 8 experts of width 1,408, top 2, renormalized (Mixtral's routing): per token the MLP work of a
  dense 2,816-wide layer, with 4x the MLP parameters. Fine-grained experts (more, narrower,
  top-k larger) train better per FLOP (DeepSeekMoE, 2024) but move more tokens per layer; 8 x
  top-2 is the well-trodden start.
- Layer 0 dense (model.dense_layers = "0", width 2,816): DeepSeek-V2/V3 keep the first layers
  dense, whose router would otherwise see barely-mixed embeddings and balance poorly.
- Query/key norms on: with them the model is exactly what transformers' Qwen3MoeForCausalLM
  computes (it supports dense layers; Mixtral's class does not), so `hf export` works.
- Capacity-based dispatch, factor 1.25 (Switch Transformer, ST-MoE): each expert takes at most
  1.25 x its fair share of a device's token copies; the copies over it skip the expert (the
  residual carries them; metric moe_dropped, a few percent once the router balances). On 8
  devices this is the cheaper dispatch here: each device runs its expert on 1.25 n k rows,
  where dropless dispatch (factor 0) all-gathers the expert group's tokens and runs the
  grouped matmul over all 8 n k of them (the other devices' rows come out zero), 8x the
  expert FLOPs and activations (`plan`: 16.5 GiB per device against 51.6 GiB). Dropless is
  the better choice on 1-2 expert shards, or when the loss must not depend on batching.
- Load-balancing loss weight 0.01 and router z-loss 0.001 (Switch Transformer, ST-MoE): the
  metric moe_load_balance should stay near 1.0 (perfect balance); a rise means experts
  collapsing onto few.
- mesh.expert = -1: each of n devices holds 8 / n experts (n must divide 8). The expert axis
  also splits the batch (64 sequences of 1,024 tokens: 8 per device on 8 devices); the
  attention and dense weights are ZeRO-3 sharded over it. Two all-to-alls per MoE layer move
  the token copies to their experts and back (`plan` shows the bytes per step).
- Sizes and rates of a ~100M dense model (lr 3e-3 with 2,000 warmup steps, batch 64k tokens):
  the active parameters set the compute; the experts add memory, not FLOPs.
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.steps = 50_000
    cfg.model.vocab_size = 32_768
    cfg.model.hidden_dim = 512
    cfg.model.num_layers = 8
    cfg.model.num_heads = 8
    cfg.model.num_kv_heads = 4
    cfg.model.mlp_dim = 2816  # the dense layer 0
    cfg.model.qk_norm = True
    cfg.model.num_experts = 8
    cfg.model.experts_per_token = 2
    cfg.model.moe_mlp_dim = 1408
    cfg.model.dense_layers = "0"
    cfg.model.moe_capacity_factor = 1.25
    cfg.model.max_len = 1024
    cfg.model.dtype = "bfloat16"
    cfg.optimizer.lr = 3e-3
    cfg.optimizer.warmup_steps = 2000
    cfg.data.batch_size = 64  # x 1,024 tokens = 64k tokens per step
    cfg.data.vocab_size = 32_768
    cfg.mesh.data = 1
    cfg.mesh.fsdp = 1
    cfg.mesh.expert = -1
    cfg.checkpoint.every_steps = 1000
    cfg.eval.every_steps = 1000
    return cfg
