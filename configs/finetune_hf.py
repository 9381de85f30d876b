"""Chat fine-tuning (SFT with LoRA) of an imported open model (`python -m t5x_like.hf import`).

    python -m t5x_like.hf import --hf_dir=hf/Qwen3-1.7B --out=models/qwen3-1.7b
    python -m t5x_like.train --config=configs/finetune_hf.py --workdir=runs/qwen3-sft \
        --config.init_from=models/qwen3-1.7b --config.data.source=alpaca:<your data.json>
    python -m t5x_like.export --merge --workdir=runs/qwen3-sft --out=models/qwen3-sft
    python -m t5x_like.hf export --workdir=models/qwen3-sft --out=hf/qwen3-sft --dtype=bfloat16

The model (its family's switches, sizes, vocabulary, RoPE, window) and the tokenizer come from
init_from (model_from_init), so the one recipe serves Llama, Mistral, Qwen2/3 and Gemma 2/3.
Sized for a 1-8B model on one accelerator host (8 x 80 GB, or a v5p-8); the defaults of
sft_chat.py's data handling stay (assistant-only loss, whole-message truncation). The data
default is the synthetic chat task, a smoke test: set data.source to real conversations.

Recipe, and why:
- LoRA, rank 16, alpha 32, on every attention and MLP projection plus the embedding and output
  head: the base stays frozen (no optimizer state for 1-8B weights: about 8 bytes per weight
  saved), and import appends the chat markers as new tokens whose rows start as the mean row,
  so the embedding and head must be able to move (adapters on the projections alone cannot).
- learning rate 2e-4 (cosine to a tenth, 30 warmup steps), weight decay 0: the LoRA rate
  used for 7-65B models in the QLoRA paper (Dettmers et al. 2023: 2e-4 up to 13B), about 10x a
  full fine-tuning rate because adapters start at zero and are scaled by alpha / rank. (Not
  tuned here on a real 1-8B model: a sweep over 1e-4..3e-4 is the first thing to try.)
- batch 32 sequences of 2048 tokens (64k tokens per step) in 4 micro-batches of 8: the
  tokens per step of common SFT recipes (Tulu, QLoRA: 16-128 sequences), and 8 x 2048 tokens
  of an 8B model's activations fit 80 GB with full rematerialization; 600 steps ~ 39M tokens,
  two to three passes over a 20-30k conversation set.
- the frozen base in bfloat16 (peft.base_dtype), compute in bfloat16: an 8B base is 16 GB
  instead of 32; adapters and their optimizer stay float32.
- dropout 0 on the model (it was trained without), LoRA dropout 0.05 (QLoRA's for <= 13B);
  early stopping on validation loss, keeping the best checkpoint, as sft_chat.py.
"""

from configs import sft_chat


def get_config():
    cfg = sft_chat.get_config()
    cfg.init_from = "models/imported"  # the `hf import` output; set --config.init_from
    cfg.model_from_init = True
    cfg.steps = 600
    cfg.model.max_len = 2048
    cfg.model.dropout = 0.0
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = "full"
    cfg.data.batch_size = 32
    cfg.optimizer.grad_accum_steps = 4
    cfg.optimizer.lr = 2e-4
    cfg.optimizer.warmup_steps = 30
    cfg.optimizer.weight_decay = 0.0
    cfg.peft.method = "lora"
    cfg.peft.rank = 16
    cfg.peft.alpha = 32.0
    cfg.peft.dropout = 0.05
    cfg.peft.targets = "all,embed,head"
    cfg.peft.base_dtype = "bfloat16"
    cfg.checkpoint.every_steps = 100
    cfg.eval.every_steps = 100
    return cfg
