"""Online RL with a reward: GRPO-style group-relative policy gradient with a KL penalty.

One step, for B prompts (data.batch_size) and G replies each (rl.group_size):

    1. sample       the KV-cache decoder (decoding.Decoder) writes G replies per prompt with the
                    current policy parameters (temperature rl.temperature, rl.max_new_tokens)
    2. reward       a reward function rates each (prompt messages, reply text): the reply is
                    the decoded text, exactly what a user would read
                      exact_answer      1 if the first integer of the reply answers the demo
                                        question (data_pipelines/synthetic.py), else 0
                      model:<workdir>   the score of a trained reward model (reward_model.py)
    3. advantage    A = (r - mean of its group) / (std of its group + 1e-4) (Shao et al. 2024,
                    DeepSeekMath); a group where every reply scored the same teaches nothing
    4. update       loss = -sum_t A * log pi(y_t) / tokens + kl_coef * sum_t KL_t / tokens over
                    the reply tokens, KL_t = KL(pi || ref) of the next-token distributions, exact
                    over the vocabulary (the reference is the init_from model, frozen)

One update per sample batch, so the policy that sampled is the policy updated and the PPO ratio
is 1 (its clipping would never act): the gradient is REINFORCE with the group mean as baseline.
The reply row is prompt + reply tokens (+ <|end|> when the reply stopped there), loss weight 1
on the reply tokens only.

Every process samples: each decodes the replies to its own prompts (its rows of the global
batch) on its own devices, rates them and computes their advantages (a prompt's group is all on
one process); the update is the one train step of every task (steps.py) over the global rows,
so it takes optimizer.grad_accum_steps, and model.loss_chunk computes the log-probs and the KL
a chunk of positions at a time. Row i of the global batch samples with the seed of row i
whatever the process count, so 1 and N processes train the same way.
"""

import contextlib
import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import chat_template, preference_data, synthetic
from t5x_like.modeling import decoding
from t5x_like.modeling import peft
from t5x_like.training import distributed
from t5x_like.training import preference_losses

RewardFn = Callable[[Sequence[list[dict]], Sequence[str]], np.ndarray]


def exact_answer_reward(prompts: Sequence[list[dict]], replies: Sequence[str]) -> np.ndarray:
    """1.0 where the reply's first integer answers the last user question, else 0.0."""
    return np.array([float(synthetic.check_answer(p[-1]["content"], r))
                     for p, r in zip(prompts, replies)], np.float32)


def reward_function(spec: str, mesh=None) -> RewardFn:
    """rl.reward -> a function of (prompt messages, reply texts) -> rewards [N]. A reward
    model is restored onto `mesh`; with several processes each then scores its own replies on
    its own devices (a copy of the model there)."""
    if spec == "exact_answer":
        return exact_answer_reward
    from t5x_like.core import runs  # model:<workdir>
    from t5x_like.evaluation import reward_model

    run = runs.load(spec[len("model:"):], mesh=mesh)
    if mesh is not None and jax.process_count() > 1:
        local = distributed.local_mesh(mesh)
        run = dataclasses.replace(run, params=distributed.local_copy(run.params, mesh, local),
                                  lora=distributed.local_copy(run.lora, mesh, local), mesh=local)
    return reward_model.RewardModel(run).score


def group_advantages(rewards, eps: float = 1e-4):
    """rewards [B, G] -> advantages [B, G]: standardized within each prompt's group."""
    rewards = np.asarray(rewards, np.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return (rewards - mean) / (std + eps)


def reply_rows(tokenizer, prompts: Sequence[Sequence[int]],
               completions: Sequence[decoding.Completion], max_len: int) -> dict:
    """Prompt + reply token rows [N, max_len] (pipeline.FEATURES), loss weight on the reply."""
    end = tokenizer.marker_ids[chat_template.END]
    rows = []
    for prompt, c in zip(prompts, completions):
        reply = list(c.tokens) + ([end] if c.finish_reason == "stop" else [])
        tokens = np.asarray([*prompt, *reply][:max_len + 1], np.int32)
        weights = np.zeros(len(tokens), np.float32)
        weights[len(prompt):] = 1.0
        rows.append(preference_data.row(tokens, weights, max_len))
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_loss(graphdef, *, kl_coef: float, adapt=None, loss_chunk: int = 0) -> Callable:
    """loss_fn(params, batch, rng, ref_params) -> (objective summed over reply tokens, sums)
    for the one train step (steps.py, count "tokens"); batch = reply rows + "advantages" [N].
    With PEFT (`adapt`, peft.py) params are the trainable tree and `ref_params` the frozen
    base, which is the reference. loss_chunk > 0: a chunk of positions at a time."""
    hidden = bool(loss_chunk)
    forward = peft.forward(graphdef, adapt, hidden=hidden)
    reference = peft.reference_forward(graphdef, hidden=hidden)

    def loss_fn(params, batch, rng, ref_params):
        del rng  # no dropout while learning from samples of the same policy
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        seq = preference_losses.sequence_stats(
            forward(params, ref_params, batch["inputs"], **kw),
            reference(ref_params, batch["inputs"], **kw), batch["targets"], batch["weights"],
            chunk=loss_chunk, kl_grad=True)
        pg_sum = -jnp.sum(batch["advantages"] * seq["logp"])
        kl_sum = jnp.sum(seq["kl"])
        return pg_sum + kl_coef * kl_sum, {"pg_sum": pg_sum, "kl_sum": kl_sum,
                                           "tokens": jnp.sum(seq["tokens"])}
    return loss_fn


def train_metrics(kl_coef: float) -> Callable:
    """sums -> per reply token: loss, its policy-gradient part and the KL to the reference."""
    def metrics(sums):
        tokens = jnp.maximum(sums["tokens"], 1.0)
        pg, kl = sums["pg_sum"] / tokens, sums["kl_sum"] / tokens
        return {"loss": pg + kl_coef * kl, "pg_loss": pg, "kl": kl}
    return metrics


def prompts_of(tokenizer, batch) -> list[list[int]]:
    """The prompt ids of a batch from preference_data.prompt_dataset (host arrays)."""
    ids, lengths = np.asarray(jax.device_get(batch["prompt"])), np.asarray(
        jax.device_get(batch["prompt_len"]))
    return [ids[i, :int(n)].tolist() for i, n in enumerate(lengths)]


def sample_and_score(decoder, tokenizer, prompts: Sequence[Sequence[int]], reward_fn: RewardFn,
                     sampling: Sequence[decoding.Sampling]):
    """Decodes one reply per (prompt, sampling) and rates its text.

    Returns (completions, prompt messages, reward per reply)."""
    completions = decoder.generate(list(prompts), list(sampling))
    messages = [chat_template.parse(tokenizer, p[:-1]) for p in prompts]  # drop <|assistant|>
    return completions, messages, reward_fn(messages, [c.text for c in completions])


def whole(params):
    """The policy's decoder inputs without PEFT: its parameters as they are, no adapters."""
    return params, None


def sample_with(decoder, weights, tokenizer, prompts, reward_fn: RewardFn, sampling):
    """sample_and_score with the policy's (params, LoRA or None) `weights`, all of it on the
    decoder's own mesh (with several processes, this process's devices only)."""
    with jax.set_mesh(decoder.mesh) if decoder.mesh is not None else contextlib.nullcontext():
        decoder.params, decoder.lora = weights
        return sample_and_score(decoder, tokenizer, prompts, reward_fn, sampling)


def make_train_step(decoder, tokenizer, update, reward_fn: RewardFn, rl_cfg, *, seed: int,
                    max_len: int, policy: Callable = whole) -> Callable:
    """train_step(state, local batch) -> (state, metrics) for the training loop: sample, reward,
    advantages, update, on every process for its own prompts. `update(state, local rows)` is
    the jitted train step with the reference bound (it makes the global rows);
    `policy(state params) -> (decoder params, LoRA inputs or None)` on this process's devices
    (PEFT: base + adapters)."""
    end = tokenizer.marker_ids[chat_template.END]
    G = rl_cfg.group_size

    def train_step(state, batch):
        step = int(jax.device_get(state["step"]))
        prompts = prompts_of(tokenizer, batch)
        grouped = [p for p in prompts for _ in range(G)]
        first = jax.process_index() * len(grouped)  # this process's first row of the batch
        sampling = [decoding.Sampling(max_new_tokens=rl_cfg.max_new_tokens,
                                      temperature=rl_cfg.temperature, top_p=rl_cfg.top_p,
                                      stop_tokens=(end,),
                                      seed=hash((seed, step, first + i)) % 2**31)
                    for i in range(len(grouped))]
        completions, _, rewards = sample_with(decoder, policy(state["params"]), tokenizer,
                                              grouped, reward_fn, sampling)
        advantages = group_advantages(rewards.reshape(len(prompts), G)).reshape(-1)
        rows = reply_rows(tokenizer, grouped, completions, max_len)
        rows["advantages"] = advantages.astype(np.float32)
        state, metrics = update(state, rows)
        # The batch's replies, from every process.
        rewards = distributed.gather_rows(rewards.astype(np.float32))
        lengths = distributed.gather_rows(np.array([len(c.tokens) for c in completions],
                                                   np.float32))
        metrics = dict(metrics)
        metrics["reward"] = float(rewards.mean())
        metrics["reward_std_in_group"] = float(rewards.reshape(-1, G).std(1).mean())
        metrics["reply_length"] = float(lengths.mean())
        if rl_cfg.reward == "exact_answer":
            metrics["accuracy"] = float((rewards >= 1.0).mean())
        return state, metrics

    return train_step


def evaluate(decoder, tokenizer, params, prompts: Sequence[Sequence[int]], reward_fn: RewardFn,
             rl_cfg, policy: Callable = whole) -> dict[str, float]:
    """Greedy replies to held-out prompts (this process's share of them; the means are over
    every process's): mean reward, accuracy (exact_answer), reply length."""
    end = tokenizer.marker_ids[chat_template.END]
    greedy = decoding.Sampling(max_new_tokens=rl_cfg.max_new_tokens, stop_tokens=(end,))
    completions, _, rewards = sample_with(decoder, policy(params), tokenizer, prompts,
                                          reward_fn, [greedy] * len(prompts))
    rewards = distributed.gather_rows(np.asarray(rewards, np.float32).reshape(-1))
    lengths = distributed.gather_rows(np.array([len(c.tokens) for c in completions], np.float32))
    out = {"reward": float(rewards.mean()), "reply_length": float(lengths.mean())}
    if rl_cfg.reward == "exact_answer":
        out["accuracy"] = float((rewards >= 1.0).mean())
    return out
