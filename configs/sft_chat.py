"""Chat fine-tuning (SFT) from a pretraining run: the bridge from a text model to a chat model.

    python -m t5x_like.train --config=configs/sft_chat.py --workdir=runs/sft \
        --config.init_from=runs/tiny
    python -m t5x_like.train --config=configs/sft_chat.py --workdir=runs/sft_alpaca \
        --config.init_from=runs/shk --config.data.source=alpaca:../shared/data/sft/alpaca_subset.json \
        --config.model.max_len=1024 --config.data.batch_size=4

The model (sizes, vocabulary, RoPE) and the tokenizer come from init_from (model_from_init),
so one recipe fine-tunes any pretrained run. Loss only on the assistant's turns
(data.loss_on), long conversations truncated at whole messages (data.on_long).

Recipe, and why:
- learning rate 1e-3, a third of pretrain_tiny's 3e-3 peak, with a short warmup: the weights
  are already good; a pretraining-sized step would undo them (the same ratio as nanochat's SFT).
- weight decay 0: a few hundred steps on a small set; decay would only shrink what pretraining
  learned, not regularize the fine-tuning.
- dropout 0.1 and early stopping on validation loss (patience 3 evaluations), keeping the best
  checkpoint: chat sets are small and a tiny model memorizes them within a few epochs.
- steps 400 x 16 conversations: about 3 passes over the 2,000 synthetic dialogues.
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.task = "sft"
    cfg.init_from = "runs/tiny"
    cfg.model_from_init = True
    cfg.steps = 400
    cfg.model.max_len = 128
    cfg.model.dropout = 0.1
    cfg.data.source = "synthetic:arithmetic_chat"
    cfg.data.synthetic_docs = 2000
    cfg.data.batch_size = 16
    cfg.optimizer.lr = 1e-3
    cfg.optimizer.warmup_steps = 20
    cfg.optimizer.weight_decay = 0.0
    cfg.checkpoint.every_steps = 50
    cfg.checkpoint.keep_best_by = "loss"
    cfg.eval.every_steps = 50
    cfg.eval.steps = 0
    cfg.eval.early_stop_by = "loss"
    cfg.eval.patience = 3
    return cfg
