"""Online RL from an SFT run: sample replies, reward them, and move toward the better ones.

    python -m t5x_like.train --config=configs/rl.py --workdir=runs/rl --config.init_from=runs/sft
    python -m t5x_like.train --config=configs/rl.py --workdir=runs/rl_rm --config.init_from=runs/sft \
        --config.rl.reward=model:runs/rm

Each step takes data.batch_size prompts (the user questions of a chat source), samples
rl.group_size replies to each with the KV-cache decoder, scores them (rl.reward: the demo's
exact answer, or a trained reward model) and applies a group-relative policy gradient with a
KL penalty to the frozen reference (t5x_like/training/rl.py). Validation decodes rl.eval_prompts
held-out prompts greedily and reports their mean reward and exact-answer accuracy.

Recipe, and why:
- 8 prompts x 8 replies: with 0/1 rewards a group teaches something only when some replies are
  right and some wrong; 8 replies at temperature 1 give mixed groups for most questions the SFT
  model half knows, and 64 rows keep a CPU step to a few seconds.
- max_new_tokens 6: a demo answer is at most 4 digit/sign tokens plus <|end|>; longer replies
  are wrong anyway and cost decode steps.
- learning rate 3e-4 constant, weight decay 0: as DPO; the advantages are standardized, so the
  gradient scale does not depend on the reward's.
- kl_coef 0.05 on the exact per-token KL: keeps the replies in the SFT model's format
  (number then <|end|>) while the answers change.
- model.max_len 96: prompt (up to 69 tokens with the system prompt) plus reply; dropout 0
  (sampling and the update must see the same policy).
"""

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.task = "rl"
    cfg.init_from = "runs/sft"
    cfg.model_from_init = True
    cfg.steps = 40
    cfg.log_every_steps = 5
    cfg.model.max_len = 96
    cfg.model.dropout = 0.0
    cfg.data.source = "synthetic:arithmetic_chat"
    cfg.data.synthetic_docs = 2000
    cfg.data.batch_size = 8
    cfg.rl.group_size = 8
    cfg.rl.temperature = 1.0
    cfg.rl.max_new_tokens = 6
    cfg.rl.kl_coef = 0.05
    cfg.rl.reward = "exact_answer"
    cfg.rl.eval_prompts = 200
    cfg.optimizer.lr = 3e-4
    cfg.optimizer.schedule = "constant"
    cfg.optimizer.warmup_steps = 5
    cfg.optimizer.weight_decay = 0.0
    cfg.checkpoint.every_steps = 20
    cfg.checkpoint.keep_best_by = "accuracy"
    cfg.checkpoint.best_mode = "max"
    cfg.eval.every_steps = 20
    cfg.eval.steps = 0  # all rl.eval_prompts
    return cfg
