"""Chat fine-tuning with LoRA: sft_chat.py with adapters instead of updating every weight.

    python -m t5x_like.train --config=configs/sft_lora.py --workdir=runs/sft_lora \
        --config.init_from=runs/tiny
    python -m t5x_like.export --merge --workdir=runs/sft_lora --out=models/sft_lora

Recipe, and why (the rest as in sft_chat.py):
- rank 16, alpha 32 on every projection (attention and MLP) plus the embedding and the output
  head: the chat markers never occurred in pretraining, so their embedding rows and output
  columns must move too, which adapters on the projections alone cannot do.
- learning rate 3e-3, three times full fine-tuning's: adapters start at zero (B = 0) and their
  updates are scaled by alpha / rank, so they take larger steps to move as far (LoRA papers
  use about 10x the full fine-tuning rate).
"""

from configs import sft_chat


def get_config():
    cfg = sft_chat.get_config()
    cfg.peft.method = "lora"
    cfg.peft.rank = 16
    cfg.peft.alpha = 32.0
    cfg.peft.targets = "all,embed,head"
    cfg.optimizer.lr = 3e-3
    return cfg
