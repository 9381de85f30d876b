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
Presence and frequency penalties (OpenAI's definitions) subtract from the logits of tokens the
reply already holds, counted on the device. With `Sampling(logprobs=k)` every token comes with
its log-probability under the distribution it was drawn from (after bias, penalties,
temperature and the top-k / top-p cut; at temperature 0 the distribution at temperature 1) and
the k most likely tokens of that distribution.

The device programs here serve two hosts: `Decoder.stream` (one batch from prefill to its last
row: sample, chat, evaluation, RL) and the server's continuous-batching engine
(t5x_like/serving/engine.py), which keeps a fixed set of rows ("slots") decoding and inserts a
new prompt's prefilled cache into a free one between steps (`prefill_chunk`, `insert`,
`window_steps`, `shift`).
"""

import dataclasses
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.modeling import model

_NEG = -1e9
TOP_LOGPROBS = 20  # most alternatives a generated token can report (OpenAI's limit)
PROMPT_TOP_LOGPROBS = 5  # most alternatives a prompt token can report (the completions API's)


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
    presence_penalty: float = 0.0  # minus this from the logit of every token the reply holds
    frequency_penalty: float = 0.0  # minus this times the number of times the reply holds it
    logprobs: int = -1  # -1: off; k >= 0: each token's log-probability and the k most likely


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token or string), "length", or "constraint"
    logprobs: list[float] | None = None  # per token, with Sampling(logprobs >= 0)
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: (id, logprob)s


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
        self._steps = jax.jit(self._steps_fn, donate_argnames=("cache", "counts"),
                              static_argnames=("n",))
        self._prefill_chunk = jax.jit(self._prefill_chunk_fn, donate_argnames=("row_cache",),
                                      static_argnames=("cache_len",))
        self._choose_first = jax.jit(self._choose_fn)
        self._insert = jax.jit(self._insert_fn, donate_argnames=("cache",))
        self._shift = jax.jit(self._shift_fn, donate_argnames=("cache",))
        self._window_steps = jax.jit(self._window_steps_fn, donate_argnames=("cache", "counts"),
                                     static_argnames=("n", "window"))
        self._new_cache = jax.jit(self._new_cache_fn, static_argnames=("batch", "length"))

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

    def _choose(self, logits, controls, seeds, step, counts):
        """[B, V] logits -> ([B, C] candidate ids in sampled order, log-probability info).

        counts [B, V]: how often each token is in each row's reply so far (the penalties').
        The info is (the candidates' log-probabilities [B, C], the TOP_LOGPROBS most likely ids
        and their log-probabilities [B, K]) under the distribution sampled, zeros unless some
        row asked for log-probabilities."""
        temperature, top_k, top_p, bias, presence, frequency, want = controls
        logits = logits.astype(jnp.float32) + bias
        # OpenAI's definitions: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty.
        logits = jax.lax.cond(
            jnp.any(presence != 0) | jnp.any(frequency != 0),
            lambda: logits - presence[:, None] * (counts > 0) - frequency[:, None] * counts,
            lambda: logits)
        greedy = temperature <= 0
        # An all-greedy batch (the common case in evaluation) skips the sorts and the noise.
        cands, used = jax.lax.cond(
            jnp.all(greedy), lambda: (jax.lax.top_k(logits, self.candidates)[1], logits),
            lambda: self._sample(logits, controls, seeds, step))
        return cands, jax.lax.cond(jnp.any(want), _logprob_info, _no_logprob_info, used, cands)

    def _sample(self, logits, controls, seeds, step):
        """Candidates in sampled order and the logits sampled from (scaled and filtered)."""
        temperature, top_k, top_p, *_ = controls
        greedy = temperature <= 0
        # A key per row from its seed (as jax.random.key(seed)), folded with the step: one
        # for the batch or each row's own ([B]).
        step = jnp.broadcast_to(step, greedy.shape)
        keys = jax.vmap(lambda seed, t: jax.random.fold_in(jax.random.key(seed), t))(seeds, step)
        scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]

        def filtered(scaled):
            # One sort serves both filters: masking the values below the k-th keeps the
            # descending order (they become the smallest), so `ranked` stays sorted.
            ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
            kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, None)[:, None], axis=-1)
            on = top_k[:, None] > 0
            scaled = jnp.where(on & (scaled < kth), _NEG, scaled)
            ranked = jnp.where(on & (ranked < kth), _NEG, ranked)
            # Nucleus: keep the smallest set of top tokens whose probability reaches top_p. A row
            # with top_p 1 keeps all: its rounded cumulative sum can reach 1 early (one token
            # holding all the mass), which would cut the rest.
            probs = jax.nn.softmax(ranked, axis=-1)
            keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
            cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1)
            return jnp.where(scaled < cutoff[:, None], _NEG, scaled)

        # The sort costs more than the rest of a step's sampling (a second per step for 16
        # rows of a 32k vocabulary on a CPU): skip it when no row filters.
        scaled = jax.lax.cond(jnp.any(top_k > 0) | jnp.any(top_p < 1), filtered,
                              lambda scaled: scaled, scaled)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scaled.shape[-1:]))(keys)
        scores = jnp.where(greedy[:, None], logits, scaled + gumbel)
        return (jax.lax.top_k(scores, self.candidates)[1],
                jnp.where(greedy[:, None], logits, scaled))

    def _prefill_fn(self, weights, lora, tokens, positions, segments, controls, seeds, *,
                    cache_len):
        params, layers = weights
        net = model.bind(self.graphdef, params)
        cache = model.init_cache(self.cfg, tokens.shape[0], cache_len,
                                 per_layer=layers is not None)
        logits, cache = net.decode(tokens, positions, segments, cache, 0, lora=lora, layers=layers)
        counts = jnp.zeros(logits[:, -1].shape, jnp.float32)
        cands, info = self._choose(logits[:, -1], controls, seeds, 0, counts)
        return cands, info, cache, counts

    def _step_fn(self, weights, lora, cache, counts, tokens, positions, index, controls, seeds,
                 step):
        params, layers = weights
        net = model.bind(self.graphdef, params)
        segments = jnp.ones_like(tokens)
        logits, cache = net.decode(tokens[:, None], positions[:, None], segments[:, None],
                                   cache, index, lora=lora, layers=layers)
        cands, info = self._choose(logits[:, 0], controls, seeds, step, counts)
        return cands, info, cache

    def _steps_fn(self, weights, lora, cache, counts, tokens, positions, index, controls, seeds,
                  step, *, n):
        """n steps from `tokens` at cache slot `index`, each feeding in its first candidate:
        candidates [n, B, C] (and their info, [n, B, ...]) for steps step .. step + n - 1.
        `tokens` are the replies' latest tokens: they join `counts` as they are fed in."""
        rows = jnp.arange(tokens.shape[0])

        def body(carry, _):
            cache, counts, tokens, positions, index, step = carry
            counts = counts.at[rows, tokens].add(1.0)
            cands, info, cache = self._step_fn(weights, lora, cache, counts, tokens, positions,
                                               index, controls, seeds, step)
            return (cache, counts, cands[:, 0], positions + 1, index + 1, step + 1), (cands, info)

        (cache, counts, *_), (cands, info) = jax.lax.scan(
            body, (cache, counts, tokens, positions, index, step), None, length=n)
        return cands, info, cache, counts

    # -- the engine's programs (t5x_like/serving/engine.py) -----------------------------------

    def _prefill_chunk_fn(self, weights, lora, row_cache, tokens, positions, segments, index,
                          next_tokens, want, *, cache_len):
        """One chunk [1, T] of a left-padded prompt into a one-row cache of cache_len slots
        (made here when row_cache is None: the first chunk), at slot `index`.

        Returns the last position's logits [1, V], the prompt log-probabilities (of each
        position's next token `next_tokens` [1, T] and the PROMPT_TOP_LOGPROBS most likely,
        under the model's own distribution; zeros unless `want`) and the row cache."""
        params, layers = weights
        net = model.bind(self.graphdef, params)
        if row_cache is None:
            row_cache = model.init_cache(self.cfg, 1, cache_len, per_layer=layers is not None)
        logits, row_cache = net.decode(tokens, positions, segments, row_cache, index, lora=lora,
                                       layers=layers)

        def info():
            lp = jax.nn.log_softmax(self._vocab_only(logits), axis=-1)
            own = jnp.take_along_axis(lp, next_tokens[..., None], axis=-1)[..., 0]
            top_lp, top_ids = jax.lax.top_k(lp, PROMPT_TOP_LOGPROBS)
            return own, top_ids, top_lp

        def none():
            T = tokens.shape[1]
            return (jnp.zeros((1, T), jnp.float32), jnp.zeros((1, T, PROMPT_TOP_LOGPROBS),
                                                              jnp.int32),
                    jnp.zeros((1, T, PROMPT_TOP_LOGPROBS), jnp.float32))

        return logits[:, -1], jax.lax.cond(want, info, none), row_cache

    def _vocab_only(self, logits):
        """Logits with the vocabulary's padding rows (no token) masked, as sampling sees them."""
        V = logits.shape[-1]
        return jnp.where(jnp.arange(V) < self.tokenizer.vocab_size, logits.astype(jnp.float32),
                         _NEG)

    def _choose_fn(self, logits, controls, seeds):
        """The first token of new rows from their prompt's last logits [R, V] (step 0, nothing
        to penalize yet)."""
        return self._choose(logits, controls, seeds, 0, jnp.zeros_like(logits))

    def _insert_fn(self, cache, row_cache, row, slot):
        """A one-row cache (all its slots) into row `row` of `cache` at slots [slot, slot +
        its length); the row's other slots are marked empty (segment 0)."""
        K = self.cfg.num_kv_heads

        def put(big, small, axis):
            start = [0] * big.ndim
            start[0 if big.ndim == 3 else 1] = row * K if big.ndim == 3 else row
            start[axis] = slot
            return jax.lax.dynamic_update_slice(big, small.astype(big.dtype), start)

        segments = jax.lax.dynamic_update_slice(
            jnp.zeros_like(cache["segments"][:1]), row_cache["segments"], (0, slot))
        return {"k": jax.tree.map(lambda b, s: put(b, s, b.ndim - 2), cache["k"], row_cache["k"]),
                "v": jax.tree.map(lambda b, s: put(b, s, b.ndim - 1), cache["v"], row_cache["v"]),
                "segments": jax.lax.dynamic_update_slice(cache["segments"], segments, (row, 0))}

    def _shift_fn(self, cache, shift):
        """Every row's slots moved by `shift` (negative: toward 0), wrapping around."""
        return _map_slots(cache, lambda a, axis: jnp.roll(a, shift, axis=axis))

    def _window_steps_fn(self, weights, lora, cache, counts, tokens, positions, index, start,
                         controls, seeds, step, *, n, window):
        """_steps_fn over the cache's slots [start, start + window) only: the attention reads
        what the live rows hold instead of the whole cache."""
        part = _map_slots(cache, lambda a, axis: jax.lax.dynamic_slice_in_dim(
            a, start, window, axis=axis))
        cands, info, part, counts = self._steps_fn(weights, lora, part, counts, tokens,
                                                   positions, index - start, controls, seeds,
                                                   step, n=n)
        cache = jax.tree.map(
            lambda a, p, axis: jax.lax.dynamic_update_slice_in_dim(a, p, start, axis=axis),
            cache, part, _slot_axes(cache))
        return cands, info, cache, counts

    def _new_cache_fn(self, *, batch, length):
        cache = model.init_cache(self.cfg, batch, length, per_layer=self._weights[1] is not None)
        return cache, jnp.zeros((batch, self.cfg.vocab_size), jnp.float32)

    def new_cache(self, batch: int, length: int):
        """An empty cache and penalty counts, placed as the programs return them (so passing
        them in compiles nothing new)."""
        with maybe_mesh(self.mesh):
            return self._new_cache(batch=batch, length=length)

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
        rows = [Row(self.tokenizer, s, len(p)) for s, p in zip(sampling, prompts)]
        controls = Controls(B, self.cfg.vocab_size, self.tokenizer.vocab_size)
        for i, s in enumerate(sampling):
            controls.set(i, s)
        controls = controls.device()
        # One key per row from its seed, folded with the step inside the jitted functions (no
        # per-step host dispatches).
        seeds = np.array([s.seed for s in sampling] + [0] * (B - n), np.int32)
        penalized = any(s.presence_penalty or s.frequency_penalty for s in sampling)

        with maybe_mesh(self.mesh):
            candidates, info, cache, counts = self._prefill(
                self._weights, self.lora, tokens, positions, segments, controls, seeds,
                cache_len=S)
            ahead = steps_on_host(candidates, info, rows, steps=False)
            for step in range(max_new):
                chosen = np.zeros(B, np.int32)
                cands, info = ahead.pop(0)
                for i, row in enumerate(rows):
                    chosen[i] = row.take(cands[i], row_info(info, i)) if not row.done \
                        else self.tokenizer.eos_id
                yield [row.completion() for row in rows]
                if all(row.done for row in rows) or step == max_new - 1:
                    break
                # The steps run ahead assumed every row takes its first candidate; a live row
                # that took another ends them (a finished row's input no longer matters).
                if not ahead or any(chosen[i] != cands[i, 0] for i, row in enumerate(rows)
                                    if not row.done):
                    if ahead and penalized:  # the device counted the run-ahead's tokens
                        counts = penalty_counts(rows, B, self.cfg.vocab_size)
                    n = min(self.steps_per_call, _bucket(max_new - step - 1))
                    block, info, cache, counts = self._steps(
                        self._weights, self.lora, cache, counts, chosen,
                        positions[:, -1] + 1 + step, np.int32(P + step), controls, seeds,
                        np.int32(step + 1), n=n)
                    ahead = steps_on_host(block, info, rows)
        for row in rows:
            row.finish("length")
        yield [row.completion() for row in rows]


def _logprob_info(used, cands):
    lp = jax.nn.log_softmax(used, axis=-1)
    top_lp, top_ids = jax.lax.top_k(lp, min(TOP_LOGPROBS, used.shape[-1]))
    return jnp.take_along_axis(lp, cands, axis=-1), top_ids, top_lp


def _no_logprob_info(used, cands):
    B, K = used.shape[0], min(TOP_LOGPROBS, used.shape[-1])
    return (jnp.zeros(cands.shape, jnp.float32), jnp.zeros((B, K), jnp.int32),
            jnp.zeros((B, K), jnp.float32))


def _slot_axes(cache):
    """The slot axis of each cache array (init_cache's layouts: keys [.., S, D], values
    [.., D, S], segments [B, S])."""
    return {"k": jax.tree.map(lambda a: a.ndim - 2, cache["k"]),
            "v": jax.tree.map(lambda a: a.ndim - 1, cache["v"]), "segments": 1}


def _map_slots(cache, fn):
    return jax.tree.map(fn, cache, _slot_axes(cache))


def steps_on_host(cands, info, rows, steps: bool = True) -> list:
    """A device call's [n, B, C] candidates (and their info, fetched only when a row reports
    log-probabilities) as one (candidates [B, C], info) per step; steps=False: one step's."""
    cands = np.asarray(cands)
    info = tuple(np.asarray(x) for x in info) if any(
        r.s.logprobs >= 0 for r in rows if r is not None) else None
    if not steps:
        cands, info = cands[None], info and tuple(x[None] for x in info)
    return [(cands[j], info and tuple(x[j] for x in info)) for j in range(cands.shape[0])]


def row_info(info, i):
    return info and tuple(x[i] for x in info)


def penalty_counts(rows, B: int, V: int) -> np.ndarray:
    """[B, V] counts of each row's reply tokens but its latest (which the next device step
    counts as it feeds it in): what the device holds after a step it did not run ahead of."""
    counts = np.zeros((B, V), np.float32)
    for i, row in enumerate(rows):
        if row is not None and not row.done and row.tokens:
            np.add.at(counts[i], row.tokens[:-1], 1.0)
    return counts


class Controls:
    """Each row's sampling settings as the device reads them: temperature, top-k, top-p, logit
    bias [B, V], presence and frequency penalties, and whether it reports log-probabilities."""

    def __init__(self, B: int, V: int, vocab_size: int):
        self.temperature = np.zeros(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.top_p = np.ones(B, np.float32)
        self.bias = np.zeros((B, V), np.float32)
        self.bias[:, vocab_size:] = _NEG  # vocab padding rows are not tokens
        self.presence = np.zeros(B, np.float32)
        self.frequency = np.zeros(B, np.float32)
        self.want = np.zeros(B, bool)
        self.vocab_size = vocab_size
        self._device = None

    def set(self, i: int, s: Sampling) -> None:
        self.temperature[i], self.top_k[i], self.top_p[i] = s.temperature, s.top_k, s.top_p
        self.presence[i], self.frequency[i] = s.presence_penalty, s.frequency_penalty
        self.want[i] = s.logprobs >= 0
        self.bias[i, :self.vocab_size] = 0
        for token, value in s.logit_bias:
            self.bias[i, token] = max(value, _NEG)
        self._device = None

    def arrays(self, rows=slice(None)) -> tuple:
        return (self.temperature[rows], self.top_k[rows], self.top_p[rows], self.bias[rows],
                self.presence[rows], self.frequency[rows], self.want[rows])

    def device(self) -> tuple:
        """On the device; copied again only after a change."""
        if self._device is None:
            self._device = tuple(jnp.asarray(x) for x in self.arrays())
        return self._device


class Row:
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
        # Text only once its characters are complete; joined, the pieces are decode(tokens).
        self._stream = tokenizer_lib.StreamDecoder(tokenizer)
        self._cut = False  # a stop string cut the text: what the stream holds is past it
        self.logprobs: list[float] | None = [] if sampling.logprobs >= 0 else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = (
            [] if sampling.logprobs >= 0 else None)

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

    def take(self, candidates, info=None) -> int:
        """The first allowed candidate (ids in sampled order); info: the device's
        log-probabilities of the candidates and its top tokens (`_choose`), or None."""
        for k, token in enumerate(int(c) for c in candidates):
            if self._allowed(token):
                break
        else:  # every candidate breaks a constraint: end here rather than emit one
            self.finish("constraint")
            return self.tok.eos_id
        if token in self.stops:
            self.finish("stop")
            return token
        self.tokens.append(token)
        if self.logprobs is not None:
            cand_lp, top_ids, top_lp = info
            self.logprobs.append(float(cand_lp[k]))
            self.top_logprobs.append([(int(i), float(v)) for i, v in
                                      zip(top_ids[:self.s.logprobs], top_lp[:self.s.logprobs])])
        self.text += self._stream.add(token)
        for stop in self.s.stop_strings:
            if stop and stop in self.text:
                self.text = self.text[:self.text.index(stop)]
                self._cut = True
                self.finish("stop")
                break
        if len(self.tokens) >= self.s.max_new_tokens and not self.done:
            self.finish("length")
        return token

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason = True, reason
            if not self._cut:  # an invalid byte sequence at the very end, as U+FFFD
                self.text += self._stream.flush()

    def completion(self) -> Completion:
        return Completion(list(self.tokens), self.text, self.reason if self.done else "",
                          None if self.logprobs is None else list(self.logprobs),
                          None if self.top_logprobs is None else list(self.top_logprobs))


class maybe_mesh:
    def __init__(self, mesh):
        self.ctx = jax.set_mesh(mesh) if mesh is not None else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else None
