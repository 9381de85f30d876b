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
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipelines import chat_template, preference_data, synthetic
from t5x_like.modeling import decoding
from t5x_like.modeling import peft
from t5x_like.training import preference_losses
from t5x_like.training import optimizer as optimizer_lib

RewardFn = Callable[[Sequence[list[dict]], Sequence[str]], np.ndarray]


def exact_answer_reward(prompts: Sequence[list[dict]], replies: Sequence[str]) -> np.ndarray:
    """1.0 where the reply's first integer answers the last user question, else 0.0."""
    return np.array([float(synthetic.check_answer(p[-1]["content"], r))
                     for p, r in zip(prompts, replies)], np.float32)


def reward_function(spec: str, mesh=None) -> RewardFn:
    """rl.reward -> a function of (prompt messages, reply texts) -> rewards [N]."""
    if spec == "exact_answer":
        return exact_answer_reward
    from t5x_like.evaluation import reward_model  # model:<workdir>

    return reward_model.RewardModel.load(spec[len("model:"):], mesh=mesh).score


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


def make_update(graphdef, tx, schedule, *, kl_coef: float, adapt=None) -> Callable:
    """update(state, ref_params, batch) -> (state, metrics); batch = reply rows + "advantages"
    [N]. Pure; jitted with shardings by alignment.py. With PEFT (`adapt`, peft.py) the state's
    params are the trainable tree and `ref_params` the frozen base, which is the reference."""
    forward, reference = peft.forward(graphdef, adapt), peft.reference_forward(graphdef)

    def loss_fn(params, ref_params, batch):
        kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
        logits = forward(params, ref_params, batch["inputs"], **kw)
        ref_logits = jax.lax.stop_gradient(reference(ref_params, batch["inputs"], **kw))
        logp, n = preference_losses.sequence_logprobs(logits, batch["targets"], batch["weights"])
        kl = preference_losses.token_kl(logits, ref_logits, batch["weights"])
        tokens = jnp.maximum(jnp.sum(n), 1.0)
        pg = -jnp.sum(batch["advantages"] * logp) / tokens
        kl_mean = jnp.sum(kl) / tokens
        return pg + kl_coef * kl_mean, {"pg_loss": pg, "kl": kl_mean, "tokens": jnp.sum(n)}

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state, ref_params, batch):
        params = state["params"]
        (loss, aux), grads = grad_fn(params, ref_params, batch)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss, "pg_loss": aux["pg_loss"], "kl": aux["kl"],
                   "grad_norm": optax.global_norm(grads), "learning_rate": schedule(state["step"]),
                   "loss_tokens": aux["tokens"],
                   "nonfinite_steps": optimizer_lib.nonfinite_steps(opt_state)}
        return new_state, metrics

    return update


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


def _whole(params):
    return params, None


def make_train_step(decoder, tokenizer, update, reward_fn: RewardFn, rl_cfg, *, seed: int,
                    max_len: int, mesh=None, policy: Callable = _whole) -> Callable:
    """train_step(state, batch) -> (state, metrics) for the trainer's loop: sample, reward,
    advantages, update. `update` is the jitted `make_update(...)` with the reference bound;
    `policy(state params) -> (decoder params, LoRA inputs or None)` (PEFT: base + adapters)."""
    end = tokenizer.marker_ids[chat_template.END]
    G = rl_cfg.group_size

    def train_step(state, batch):
        step = int(jax.device_get(state["step"]))
        prompts = prompts_of(tokenizer, batch)
        grouped = [p for p in prompts for _ in range(G)]
        sampling = [decoding.Sampling(max_new_tokens=rl_cfg.max_new_tokens,
                                      temperature=rl_cfg.temperature, top_p=rl_cfg.top_p,
                                      stop_tokens=(end,), seed=hash((seed, step, i)) % 2**31)
                    for i in range(len(grouped))]
        decoder.params, decoder.lora = policy(state["params"])  # sample with the policy trained
        completions, _, rewards = sample_and_score(decoder, tokenizer, grouped, reward_fn,
                                                   sampling)
        advantages = group_advantages(rewards.reshape(len(prompts), G)).reshape(-1)
        rows = reply_rows(tokenizer, grouped, completions, max_len)
        rows["advantages"] = advantages.astype(np.float32)
        if mesh is not None:
            from t5x_like.modeling import partitioning

            sharding = partitioning.batch_sharding(mesh)
            rows = {k: jax.device_put(v, sharding) for k, v in rows.items()}
        state, metrics = update(state, rows)
        metrics = dict(metrics)
        metrics["reward"] = float(rewards.mean())
        metrics["reward_std_in_group"] = float(rewards.reshape(len(prompts), G).std(1).mean())
        metrics["reply_length"] = float(np.mean([len(c.tokens) for c in completions]))
        if rl_cfg.reward == "exact_answer":
            metrics["accuracy"] = float((rewards >= 1.0).mean())
        return state, metrics

    return train_step


def evaluate(decoder, tokenizer, params, prompts: Sequence[Sequence[int]], reward_fn: RewardFn,
             rl_cfg, policy: Callable = _whole) -> dict[str, float]:
    """Greedy replies to held-out prompts: mean reward, accuracy (exact_answer), length."""
    end = tokenizer.marker_ids[chat_template.END]
    decoder.params, decoder.lora = policy(params)
    greedy = decoding.Sampling(max_new_tokens=rl_cfg.max_new_tokens, stop_tokens=(end,))
    completions, _, rewards = sample_and_score(decoder, tokenizer, prompts, reward_fn,
                                               [greedy] * len(prompts))
    out = {"reward": float(rewards.mean()),
           "reply_length": float(np.mean([len(c.tokens) for c in completions]))}
    if rl_cfg.reward == "exact_answer":
        out["accuracy"] = float((rewards >= 1.0).mean())
    return out
