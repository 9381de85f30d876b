"""Model FLOPs per token, device peak FLOP/s and memory bandwidth, for throughput and MFU.

MFU = (model FLOPs per token x tokens per second) / (peak FLOP/s per device x devices), with
model FLOPs as in the PaLM paper (appendix B): 6 x (matmul parameters) for the forward and
backward passes, plus 12 x layers x heads x head_dim x seq_len for attention. Rematerialized
recomputation is not counted (it is hardware FLOPs, not model FLOPs). With causal=True the
attention term is halved, as MaxText counts causal attention since mid-2025 (only the lower
triangle of the score matrix is needed).
"""

# Dense bfloat16 peak TFLOP/s per JAX device, matched against `device.device_kind`, most
# specific first. TPU v2/v3 expose each core as a device; later TPUs one device per chip.
PEAK_TFLOPS = (
    ("TPU v2", 22.5), ("TPU v3", 61.5), ("TPU v4", 275.0), ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v5", 459.0), ("TPU v6 lite", 918.0),
    ("TPU v6e", 918.0), ("TPU7x", 2307.0),
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0), ("V100", 125.0),
)


# Memory (HBM) bandwidth in TB/s per JAX device, by the vendors' datasheets: the bound of
# memory-bound work such as decoding one token (all weights read once per step).
HBM_TBPS = (
    ("TPU v4", 1.2), ("TPU v5 lite", 0.819), ("TPU v5e", 0.819), ("TPU v5p", 2.765),
    ("TPU v5", 2.765), ("TPU v6 lite", 1.64), ("TPU v6e", 1.64), ("TPU7x", 7.37),
    ("H200", 4.8), ("H100 PCIe", 2.0), ("H100", 3.35), ("B200", 8.0),
    ("A100-SXM4-80GB", 2.039), ("A100", 1.555), ("L40S", 0.864), ("L4", 0.3), ("A10G", 0.6),
    ("V100", 0.9),
)


def _lookup(table, device_kind: str) -> float | None:
    for key, value in table:
        if key.lower() in device_kind.lower():
            return value
    return None


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Peak TFLOP/s of one device; None when unknown (CPUs: set peak_tflops_per_device)."""
    if override > 0:
        return override
    return _lookup(PEAK_TFLOPS, device_kind)


def hbm_tbps(device_kind: str) -> float | None:
    """Memory bandwidth of one device in TB/s; None when unknown (CPUs)."""
    return _lookup(HBM_TBPS, device_kind)


def matmul_params(model_cfg) -> int:
    """Parameters that take part in matmuls per token (the output projection included). A MoE
    layer counts what one token uses: the router, its k experts and the shared ones (the
    active parameters), not all E experts."""
    from t5x_like.modeling import model  # local: keeps this module's import light

    d, L, F, V = model_cfg.hidden_dim, model_cfg.num_layers, model_cfg.mlp_dim, model_cfg.vocab_size
    H, K = model_cfg.num_heads, model_cfg.num_kv_heads
    D = model_cfg.head_dim or d // H
    attention = d * H * D + 2 * d * K * D + H * D * d
    n_moe = int(model.moe_layers(model_cfg).sum())
    moe = 0
    if n_moe:
        moe = (d * model_cfg.num_experts + 3 * d * model_cfg.experts_per_token
               * model.moe_mlp_dim(model_cfg) + 3 * d * model.shared_mlp_dim(model_cfg))
    return L * attention + (L - n_moe) * 3 * d * F + n_moe * moe + d * V


def train_flops_per_token(model_cfg, seq_len: int, causal: bool = False) -> float:
    d, H = model_cfg.hidden_dim, model_cfg.num_heads
    D = model_cfg.head_dim or d // H
    attention = 12.0 * model_cfg.num_layers * H * D * seq_len
    return 6.0 * matmul_params(model_cfg) + (attention / 2 if causal else attention)
