"""A trained reward model (task=reward) as a function: (prompt messages, reply) -> score.

    rm = RewardModel.load("runs/rm")
    rm.score([[{"role": "user", "content": "What is 2 + 3?"}]], ["5"])   # -> array([1.7])

Each pair is rendered by the one chat template exactly as in training (the reply as the last
assistant turn; too long: the oldest tokens go) and scored at its reply's last token. Scores are
comparable between replies to the same prompt (Bradley-Terry fixes differences, not levels).
Used by `python -m t5x_like.score`, by RL (rl.reward=model:<workdir>) and by best-of-N
(rerank.py).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import preference_data
from t5x_like.modeling import model
from t5x_like.core import runs
from t5x_like.core.errors import UserError


class RewardModel:
    def __init__(self, run: runs.Run, *, batch_size: int = 32, max_len: int | None = None):
        if not run.cfg.model.get("reward_head"):
            raise UserError(f"the run at step {run.step} is not a reward model (its model has no "
                            "reward_head); train one with --config=configs/reward.py.")
        self.run, self.tokenizer = run, run.tokenizer
        self.batch_size = batch_size
        self.max_len = max_len or run.cfg.model.max_len
        graphdef = run.graphdef

        def score_fn(params, inputs, positions, segment_ids, weights):
            from t5x_like.training import preference

            return model.bind(graphdef, params).score(
                inputs, preference.last_index(weights), positions=positions,
                segment_ids=segment_ids)

        self._score = jax.jit(score_fn)

    @classmethod
    def load(cls, workdir: str, *, mesh=None, step: int | None = None, **kwargs) -> "RewardModel":
        return cls(runs.load(workdir, step=step, mesh=mesh), **kwargs)

    def score(self, prompts: Sequence[list[dict]], replies: Sequence[str]) -> np.ndarray:
        """Scores [N] of each reply to its prompt (a list of messages ending with a user turn)."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        rows = []
        for prompt, reply in zip(prompts, replies):
            tokens, weights, _ = preference_data.encode_reply(self.tokenizer, prompt, reply,
                                                              self.max_len)
            rows.append(preference_data.row(tokens, weights, self.max_len))
        out = []
        with jax.set_mesh(self.run.mesh):
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                pad = self.batch_size - len(chunk)  # one compiled shape for every chunk
                batch = {k: np.stack([r[k] for r in chunk] + [np.zeros_like(chunk[0][k])] * pad)
                         for k in chunk[0]}
                scores = self._score(self.run.params, jnp.asarray(batch["inputs"]),
                                     batch["positions"], batch["segment_ids"], batch["weights"])
                out.append(np.asarray(jax.device_get(scores))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)
