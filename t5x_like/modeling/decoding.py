"""Fast decoding: jitted prefill + incremental steps with a KV cache, batched prompts.

    decoder = Decoder.from_run(runs.load("runs/sft"))
    [completion] = decoder.generate([prompt_ids], Sampling(temperature=0.7, top_p=0.9))

Prompts of different lengths share one batch: they are left-padded (padding has segment id 0,
so it is never attended, and RoPE positions start at 0 at each prompt's first token), so every
row writes the same cache slot at each step. Shapes are static: the batch, prompt and cache
lengths are rounded up to powers of two, so a handful of programs serve every request.

Sampling happens on the device, per row (each row has its own temperature, top-k, top-p, seed
and logit-bias vector): the scaled, filtered logits get Gumbel noise and the device returns the
row's best `candidates` tokens in sampled order (for temperature 0, simply the top logits).
The host takes the first candidate that breaks no constraint; rejecting the first and taking
the next is exactly sampling from the distribution with the rejected tokens removed. That is
how banned words and banned token sequences can never appear (checked on the decoded text, so
no tokenization of a banned word gets through), while single tokens can also be banned or
boosted through the logit bias. Stop tokens end a row; stop strings end it and are cut off.
"""

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_like.modeling import model

_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_tokens: tuple[int, ...] = ()  # besides eos, which always stops
    stop_strings: tuple[str, ...] = ()
    banned_words: tuple[str, ...] = ()  # never in the output text (case-insensitive)
    banned_sequences: tuple[tuple[int, ...], ...] = ()  # never in the output tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added logit); -inf bans it


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token or string), "length", or "constraint"


def _bucket(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Decoder:
    def __init__(self, graphdef, params, model_cfg, tokenizer, *, max_batch: int = 16,
                 max_len: int | None = None, candidates: int = 16, mesh=None, lora=None,
                 steps_per_call: int = 8, unstack_layers: bool | None = None):
        self.graphdef, self.cfg, self.tokenizer = graphdef, model_cfg, tokenizer
        # Per-layer copies of the layer weights (model.decode(layers=...)): a scan over the
        # stacked ones makes XLA's CPU backend copy each layer's weights every step, which is
        # most of a small model's time per token. They cost the layers' memory again, so by
        # default only on a CPU, where that copy is what limits decoding.
        if unstack_layers is None:
            unstack_layers = jax.default_backend() == "cpu"
        self.unstack_layers = unstack_layers
        self.params = params
        self.lora = lora  # unmerged LoRA adapters (runs.load(merge=False)), or None
        self.max_batch = max_batch
        self.max_len = max_len or model_cfg.max_len  # cache slots: prompt + new tokens
        self.candidates = candidates
        self.mesh = mesh
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len",))
        # Steps the device runs ahead in one call, feeding back its own first candidate: they
        # stand while the host takes that candidate for every live row (no stop, ban or
        # constraint intervening), so the host syncs once per call instead of once per token.
        self.steps_per_call = max(1, steps_per_call)
        self._steps = jax.jit(self._steps_fn, donate_argnames=("cache",), static_argnames=("n",))

    @property
    def params(self):
        return self._weights[0]

    @params.setter
    def params(self, params):  # RL samples with each step's new parameters
        self._weights = (params, model.unstack_layers(params) if self.unstack_layers else None)

    @classmethod
    def from_run(cls, run, **kwargs) -> "Decoder":
        return cls(run.graphdef, run.params, run.cfg.model, run.tokenizer, mesh=run.mesh,
                   lora=run.lora, **kwargs)

    # -- device functions -------------------------------------------------------------------

    def _choose(self, logits, controls, keys, step):
        """[B, V] logits -> [B, C] candidate ids in sampled order."""
        temperature, top_k, top_p, bias = controls
        logits = logits.astype(jnp.float32) + bias
        greedy = temperature <= 0
        # An all-greedy batch (the common case in evaluation) skips the sorts and the noise.
        return jax.lax.cond(jnp.all(greedy), lambda: jax.lax.top_k(logits, self.candidates)[1],
                            lambda: self._sample(logits, controls, keys, step))

    def _sample(self, logits, controls, keys, step):
        temperature, top_k, top_p, _ = controls
        greedy = temperature <= 0
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)  # per row and step
        scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

        def filtered(scaled):
            # One sort serves both filters: masking the values below the k-th keeps the
            # descending order (they become the smallest), so `ranked` stays sorted.
            ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
            kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, None)[:, None], axis=-1)
            on = top_k[:, None] > 0
            scaled = jnp.where(on & (scaled < kth), _NEG, scaled)
            ranked = jnp.where(on & (ranked < kth), _NEG, ranked)
            # Nucleus: keep the smallest set of top tokens whose probability reaches top_p.
            probs = jax.nn.softmax(ranked, axis=-1)
            keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
            cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1)
            return jnp.where(scaled < cutoff[:, None], _NEG, scaled)

        # The sort costs more than the rest of a step's sampling (a second per step for 16
        # rows of a 32k vocabulary on a CPU): skip it when no row filters.
        scaled = jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1), filtered,
                              lambda scaled: scaled, scaled)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:]))(keys)
        scores = jnp.where(greedy[:, None], logits, scaled + gumbel)
        return jax.lax.top_k(scores, self.candidates)[1]

    def _prefill_fn(self, weights, lora, tokens, positions, segments, controls, keys, *,
                    cache_len):
        params, layers = weights
        net = model.bind(self.graphdef, params)
        cache = model.init_cache(self.cfg, tokens.shape[0], cache_len,
                                 per_layer=layers is not None)
        logits, cache = net.decode(tokens, positions, segments, cache, 0, lora=lora, layers=layers)
        return self._choose(logits[:, -1], controls, keys, 0), cache

    def _step_fn(self, weights, lora, cache, tokens, positions, index, controls, keys, step):
        params, layers = weights
        net = model.bind(self.graphdef, params)
        segments = jnp.ones_like(tokens)
        logits, cache = net.decode(tokens[:, None], positions[:, None], segments[:, None],
                                   cache, index, lora=lora, layers=layers)
        return self._choose(logits[:, 0], controls, keys, step), cache

    def _steps_fn(self, weights, lora, cache, tokens, positions, index, controls, keys, step, *,
                  n):
        """n steps from `tokens` at cache slot `index`, each feeding in its first candidate:
        candidates [n, B, C] for steps step .. step + n - 1."""
        def body(carry, _):
            cache, tokens, positions, index, step = carry
            cands, cache = self._step_fn(weights, lora, cache, tokens, positions, index,
                                         controls, keys, step)
            return (cache, cands[:, 0], positions + 1, index + 1, step + 1), cands

        (cache, *_), cands = jax.lax.scan(body, (cache, tokens, positions, index, step), None,
                                          length=n)
        return cands, cache

    # -- host loop ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: Sampling | Sequence[Sampling] = Sampling()) -> list[Completion]:
        """Completions of every prompt (token ids, already templated)."""
        result: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = prompts[start:start + self.max_batch]
            params = (sampling[start:start + self.max_batch] if not isinstance(sampling, Sampling)
                      else [sampling] * len(chunk))
            *_, done = self.stream(chunk, params)
            result.extend(done)
        return result

    def stream(self, prompts: Sequence[Sequence[int]],
               sampling: Sequence[Sampling]) -> Iterator[list[Completion]]:
        """Yields the completions so far after every step; the last yield is final."""
        if len(prompts) > self.max_batch:
            raise ValueError(f"{len(prompts)} prompts; at most {self.max_batch} per batch")
        n = len(prompts)
        lengths = [len(p) for p in prompts]
        max_new = max(s.max_new_tokens for s in sampling)
        if min(lengths) == 0:
            raise ValueError("a prompt is empty; it needs at least one token (e.g. bos)")
        if max(lengths) + max_new > self.max_len:
            raise ValueError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new}) "
                             f"exceeds the decoder's {self.max_len} positions")
        B = _bucket(n)
        # The padded prompt must leave max_new cache slots: a bucket reaching past
        # max_len - max_new would make the new tokens overwrite the last slot.
        P = max(min(_bucket(max(lengths), 8), self.max_len - max_new), max(lengths))
        S = min(_bucket(P + max_new, 16), _bucket(self.max_len))
        tokens = np.zeros((B, P), np.int32)
        segments = np.zeros((B, P), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, P - len(p):] = p
            segments[i, P - len(p):] = 1
        positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
        rows = [_Row(self.tokenizer, s, len(p)) for s, p in zip(sampling, prompts)]
        controls = self._controls(sampling, B)
        # One key per row from its seed, folded with the step inside the jitted functions (no
        # per-step host dispatches).
        keys = jax.random.wrap_key_data(np.stack(
            [jax.random.key_data(jax.random.key(s.seed)) for s in sampling]
            + [jax.random.key_data(jax.random.key(0))] * (B - n)))

        with _maybe_mesh(self.mesh):
            candidates, cache = self._prefill(self._weights, self.lora, tokens, positions,
                                              segments, controls, keys, cache_len=S)
            ahead = [np.asarray(candidates)]  # [B, C] candidates of this step and the next ones
            for step in range(max_new):
                chosen = np.zeros(B, np.int32)
                cands = ahead.pop(0)
                for i, row in enumerate(rows):
                    chosen[i] = row.take(cands[i]) if not row.done else self.tokenizer.eos_id
                yield [row.completion() for row in rows]
                if all(row.done for row in rows) or step == max_new - 1:
                    break
                # The steps run ahead assumed every row takes its first candidate; a live row
                # that took another ends them (a finished row's input no longer matters).
                if not ahead or any(chosen[i] != cands[i, 0] for i, row in enumerate(rows)
                                    if not row.done):
                    n = min(self.steps_per_call, _bucket(max_new - step - 1))
                    block, cache = self._steps(self._weights, self.lora, cache, chosen,
                                               positions[:, -1] + 1 + step, np.int32(P + step),
                                               controls, keys, np.int32(step + 1), n=n)
                    ahead = list(np.asarray(block))
        for row in rows:
            row.finish("length")
        yield [row.completion() for row in rows]

    def _controls(self, sampling: Sequence[Sampling], B: int):
        V = self.cfg.vocab_size
        pad = B - len(sampling)
        temperature = np.array([s.temperature for s in sampling] + [0.0] * pad, np.float32)
        top_k = np.array([s.top_k for s in sampling] + [0] * pad, np.int32)
        top_p = np.array([s.top_p for s in sampling] + [1.0] * pad, np.float32)
        bias = np.zeros((B, V), np.float32)
        bias[:, self.tokenizer.vocab_size:] = _NEG  # vocab padding rows are not tokens
        for i, s in enumerate(sampling):
            for token, value in s.logit_bias:
                bias[i, token] = max(value, _NEG)
        return tuple(jnp.asarray(x) for x in (temperature, top_k, top_p, bias))


class _Row:
    """One prompt's generation: constraint checks, stops and the text so far."""

    def __init__(self, tokenizer, sampling: Sampling, prompt_len: int):
        self.tok, self.s = tokenizer, sampling
        self.tokens: list[int] = []
        self.done = False
        self.reason = ""
        self.stops = {tokenizer.eos_id, *sampling.stop_tokens}
        self.words = [w.lower() for w in sampling.banned_words if w]
        self.tail = max([len(w) for w in self.words] + [len(x) for x in sampling.stop_strings]
                        + [1]) + 8
        self.text = ""

    def _allowed(self, token: int) -> bool:
        for seq in self.s.banned_sequences:
            if seq and tuple(self.tokens[len(self.tokens) - len(seq) + 1:] + [token]) == tuple(seq):
                return False
        if self.words and token not in self.stops:
            before = self.tok.decode(self.tokens[-self.tail:]).lower()
            after = self.tok.decode(self.tokens[-self.tail:] + [token]).lower()
            if any(w in after and after.count(w) > before.count(w) for w in self.words):
                return False
        return True

    def take(self, candidates) -> int:
        for token in (int(c) for c in candidates):
            if self._allowed(token):
                break
        else:  # every candidate breaks a constraint: end here rather than emit one
            self.finish("constraint")
            return self.tok.eos_id
        if token in self.stops:
            self.finish("stop")
            return token
        self.tokens.append(token)
        self.text = self.tok.decode(self.tokens)
        for stop in self.s.stop_strings:
            if stop and stop in self.text:
                self.text = self.text[:self.text.index(stop)]
                self.finish("stop")
                break
        if len(self.tokens) >= self.s.max_new_tokens and not self.done:
            self.finish("length")
        return token

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason

    def completion(self) -> Completion:
        text = self.text
        if not self.done and text.endswith("\ufffd"):  # an unfinished multi-byte character
            text = text.rstrip("\ufffd")
        return Completion(list(self.tokens), text, self.reason if self.done else "")


class _maybe_mesh:
    def __init__(self, mesh):
        self.ctx = jax.set_mesh(mesh) if mesh is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else None
