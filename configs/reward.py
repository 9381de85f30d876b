"""A reward model from an SFT run: the chat model plus a scalar head, trained on pairs.

    python -m t5x_like.train --config=configs/reward.py --workdir=runs/rm --config.init_from=runs/sft
    python -m t5x_like.train --config=configs/reward.py --workdir=runs/rm_hh \
        --config.init_from=runs/sft \
        --config.data.source=preference:../shared/data/preference/hh_rlhf_harmless_base_test_shared.jsonl.gz \
        --config.data.on_bad_record=skip
    python -m t5x_like.score --workdir=runs/rm --prompt="What is 2 + 3?" --reply=5

The model is init_from's (model_from_init) plus `reward_head` (a vector on the last reply
token's hidden state, starting at zero); the Bradley-Terry loss makes score(chosen) exceed
score(rejected). Validation reports pairwise accuracy (share of held-out pairs ranked right,
0.5 = chance), the mean margin and the loss; the best checkpoint by accuracy is kept.

Recipe, and why:
- learning rate 3e-4, between SFT's 1e-3 and DPO's 1e-4: the head starts from zero and must
  move far, the body should keep what SFT taught it.
- dropout 0.1 (as SFT): preference sets are small and a reward model overfits them quickly,
  which shows as training accuracy near 1 with validation accuracy falling.
- model.max_len 128: the demo's pairs fit in 64; hh-rlhf dialogues do not fit even 512, and a
  pair too long keeps its last tokens (the replies being compared).
- validation_fraction 0.2: hh-rlhf's shared file has 1,768 pairs; 5% would be 88 pairs, too
  few to tell 55% from chance.
- near-duplicate removal off for the demo pairs (as in configs/dpo.py).
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.task = "reward"
    cfg.init_from = "runs/sft"
    cfg.model_from_init = True
    cfg.model.reward_head = True
    cfg.steps = 300
    cfg.log_every_steps = 20
    cfg.model.max_len = 128
    cfg.model.dropout = 0.1
    cfg.data.source = "synthetic:arithmetic_pairs"
    cfg.data.synthetic_docs = 2000
    cfg.data.batch_size = 16
    cfg.data.validation_fraction = 0.2
    cfg.data.dedup.near = False
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.warmup_steps = 20
    cfg.optimizer.weight_decay = 0.0
    cfg.checkpoint.every_steps = 50
    cfg.checkpoint.keep_best_by = "accuracy"
    cfg.checkpoint.best_mode = "max"
    cfg.eval.every_steps = 50
    cfg.eval.steps = 0
    return cfg
