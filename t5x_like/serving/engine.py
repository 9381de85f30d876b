"""Continuous batching: a fixed set of decode slots that requests join and leave between steps.

    engine = Engine(decoding.Decoder.from_run(run, max_batch=16))
    engine.start()                    # compiles every program now (state "warming", then "ready")
    engine.submit(Request(prompt_ids, [decoding.Sampling(max_new_tokens=64)], post=callback))

As vLLM and JetStream do it: the device holds one KV cache of `slots` rows, and every device
call decodes all live rows a few steps (`Decoder.steps_per_call`). Between calls a waiting
request's prompt is prefilled into a one-row cache (in chunks of `prefill_chunk` tokens, two
chunks between decode calls, so a long prompt does not stall the rows decoding) and inserted
into a free row; a row that ends (stop, length, constraint, or its client left) frees its slot
at once. Every row keeps its own sampling settings, seed, penalties, constraints and stops:
the device programs and the host's token choice are `decoding.Decoder`'s, the same that
`Decoder.generate` runs, so a greedy reply is the one the one-request decoder gives.

How rows of different ages share one cache: all rows write the same cache slot (`index`) at a
step, as in `Decoder.stream`'s left-padded batch. A new prompt is inserted so that it ends just
before `index` (its RoPE positions start at 0 wherever it sits; slots before it are marked
empty), so a row's tokens sit in [index - its length, index). The cache has room for the
longest prompt bucket plus the context, so that placement always fits; when `index` runs
toward the end, every row moves back by the same amount (one roll of the cache, rare). A step
attends only to a window of slots that covers the live rows (the smallest of a few fixed
sizes), not the whole cache.

No compilation after start-up: prompt lengths are padded to a few buckets (powers of two up to
the chunk, then multiples of it), the windows are a few fixed sizes, the batch is always
`slots` rows; `start()` runs every program once (from JAX's persistent compilation cache when
one is set, so a restart is quick).
"""

import collections
import dataclasses
import math
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from t5x_like.modeling import decoding


@dataclasses.dataclass
class Result:
    completions: list[decoding.Completion]  # one per choice
    # With Request(prompt_logprobs=k): each prompt token's log-probability (None for the first)
    # and its k most likely alternatives [(id, logprob)] under the model's distribution.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


class Request:
    """One prompt and its choices (one Sampling each: n rows). `post(kind, payload)` is called
    from the engine's thread: ("step", [Completion so far per choice]) after each device call
    that advanced it (unless steps=False), then ("done", Result) or ("error", message). Set
    `cancelled` (the client left) and its rows leave at the next step."""

    def __init__(self, prompt: list[int], samplings: list[decoding.Sampling], *,
                 prompt_logprobs: int | None = None,
                 post: Callable[[str, Any], None] | None = None, steps: bool = True):
        self.prompt, self.samplings = list(prompt), list(samplings)
        self.prompt_logprobs = prompt_logprobs
        self.steps = steps
        self._post = post
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.rows: list[decoding.Row] = []
        self.prompt_result = None  # (prompt logprobs, their top alternatives), when asked

    def post(self, kind: str, payload: Any) -> None:
        if self._post is not None:
            self._post(kind, payload)


class QueueFull(Exception):
    pass


class Observer:
    """What the engine reports as it runs (the server turns it into /metrics)."""

    def warmed_up(self, seconds: float) -> None: ...  # every program is built

    def first_token(self, seconds: float) -> None: ...  # submit -> first generated token

    def step_time(self, seconds_per_token: float, steps: int) -> None: ...  # per decode step

    def tokens(self, prompt: int, generated: int) -> None: ...

    def finished(self, request: Request, seconds: float) -> None: ...


@dataclasses.dataclass
class _Slot:
    request: Request
    row: decoding.Row
    start: int  # cache slot of the row's first prompt token


class _Prefill:
    """A request whose prompt is being prefilled, chunk by chunk, into a one-row cache."""

    def __init__(self, request: Request, bucket: int, chunk: int, slots: list[int]):
        P = len(request.prompt)
        self.request, self.bucket, self.slots = request, bucket, slots
        self.T = min(bucket, chunk)
        self.tokens = np.zeros((1, bucket), np.int32)
        self.tokens[0, bucket - P:] = request.prompt
        self.segments = np.zeros((1, bucket), np.int32)
        self.segments[0, bucket - P:] = 1
        self.positions = np.maximum(np.cumsum(self.segments, axis=1) - 1, 0).astype(np.int32)
        self.next_tokens = np.zeros((1, bucket), np.int32)
        self.next_tokens[0, :-1] = self.tokens[0, 1:]
        self.done_to = 0  # slots prefilled so far
        self.cache = None
        self.logits = None
        self.prompt_info: list = []  # per chunk (own [1, T], top ids, top lps) on the host

    @property
    def finished(self) -> bool:
        return self.done_to >= self.bucket


def prompt_buckets(max_len: int, chunk: int, smallest: int = 16) -> list[int]:
    """Padded prompt lengths: powers of two up to the chunk, then multiples of the chunk, up
    to the first that holds max_len tokens."""
    out, b = [], smallest
    while b < min(chunk, max_len):
        out.append(b)
        b *= 2
    if max_len <= chunk:
        return out + [b]
    return out + list(range(chunk, math.ceil(max_len / chunk) * chunk + 1, chunk))


class Engine:
    def __init__(self, decoder: decoding.Decoder, *, slots: int | None = None,
                 prefill_chunk: int = 256, max_queue: int = 256, cache_len: int | None = None,
                 smallest_window: int = 64, window_growth: int = 4,
                 observer: Observer | None = None):
        self.decoder = decoder
        self.tok = decoder.tokenizer
        self.B = slots or decoder.max_batch
        self.n = decoder.steps_per_call
        self.max_len = decoder.max_len
        self.V = decoder.cfg.vocab_size
        self.chunk = 1 << max(3, (prefill_chunk - 1).bit_length())  # a power of two
        self.buckets = prompt_buckets(self.max_len, self.chunk)
        # Room for the longest padded prompt before `index` and the longest reply after it:
        # any request fits beside any others (see _placement).
        self.S = cache_len or self.buckets[-1] + self.max_len + self.n
        # Attention windows: each size is a decode program (the costliest to compile, ~10 s
        # for the tiny model on a loaded 2-core CPU), so they grow 4x; a step reads at most
        # 4x the slots its rows hold.
        widest = min(self.max_len + self.n, self.S)
        windows, w = [], smallest_window
        while w < widest:
            windows.append(w)
            w *= window_growth
        self.windows = windows + [widest]
        self.max_queue = max_queue
        self.observer = observer or Observer()
        self.state = "warming"  # -> "ready", or "failed" (start-up failed: see the log)
        # steps: decode steps taken; row_steps: tokens they gave (live rows per step summed)
        self.stats = collections.Counter(requests=0, rows=0, steps=0, row_steps=0,
                                         device_calls=0, prefill_chunks=0, shifts=0,
                                         cancelled=0, generated_tokens=0, prompt_tokens=0)
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._slots: list[_Slot | None] = [None] * self.B
        self._reserved: set[int] = set()
        self._prefill: _Prefill | None = None
        self._index = 0
        self._cache = None
        self._counts = None
        self._counts_exact = True
        self._controls = decoding.Controls(self.B, self.V, self.tok.vocab_size)
        self._tokens = np.zeros(self.B, np.int32)
        self._positions = np.zeros(self.B, np.int32)
        self._steps = np.zeros(self.B, np.int32)
        self._seeds = np.zeros(self.B, np.int32)
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)

    # -- the outside ---------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    def submit(self, request: Request) -> None:
        P = len(request.prompt)
        longest = max(s.max_new_tokens for s in request.samplings)
        if P == 0:
            raise ValueError("the prompt is empty; it needs at least one token")
        if P + longest > self.max_len:
            raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({longest}) exceeds the "
                             f"engine's {self.max_len} positions")
        if any(not -2 ** 31 <= s.seed < 2 ** 31 for s in request.samplings):
            raise ValueError("a seed is outside the 32-bit range")
        if len(request.samplings) > self.B:
            raise ValueError(f"{len(request.samplings)} choices; the engine has {self.B} slots")
        with self._cv:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(len(self._queue))
            self._queue.append(request)
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._queue) + (self._prefill is not None)

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self._slots) + len(self._reserved)

    # -- the worker ----------------------------------------------------------------------------

    def _run(self) -> None:
        self._started_at = time.monotonic()
        try:
            self.warm_up()
        except Exception:  # noqa: BLE001 - the server reports "failed"; details in the log
            logging.exception("the decode engine failed to start")
            self.state = "failed"
            self._fail_all("the model server failed to start; see its log.")
            return
        self.observer.warmed_up(time.monotonic() - self._started_at)
        self.state = "ready"
        while True:
            with self._cv:
                while not (self._closing or self._queue or self._prefill or self._live()):
                    self._cv.wait()
                if self._closing:
                    break
            try:
                self.step()
            except Exception:  # noqa: BLE001 - logged; every request in flight gets an error
                logging.exception("the decode engine failed; failing the requests in flight")
                self._fail_all("generation failed on the server; see its log.")
                self._reset()
        self._fail_all("the server is shutting down.")

    def step(self) -> None:
        """One turn of the worker: prefill what may join, then one decode call of the live
        rows (tests drive an engine without its thread this way)."""
        with decoding.maybe_mesh(self.decoder.mesh):
            self._admit()
            if self._live():
                self._decode()

    def _fail_all(self, message: str) -> None:
        requests = {id(s.request): s.request for s in self._slots if s is not None}
        if self._prefill is not None:
            requests[id(self._prefill.request)] = self._prefill.request
        with self._cv:
            requests.update((id(r), r) for r in self._queue)
            self._queue.clear()
        for r in requests.values():
            r.post("error", message)
        self._slots = [None] * self.B
        self._reserved.clear()
        self._prefill = None

    def _reset(self) -> None:
        self._cache, self._counts = self.decoder.new_cache(self.B, self.S)
        self._index = 0

    def _live(self) -> list[int]:
        return [b for b, s in enumerate(self._slots) if s is not None]

    # -- start-up ------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Runs every program the engine will need once (compiling it, or loading it from the
        persistent compilation cache), so no request waits for a compile."""
        with decoding.maybe_mesh(self.decoder.mesh):
            self._warm_up()

    def _warm_up(self) -> None:
        d = self.decoder
        t0 = time.monotonic()
        self._reset()
        for bucket in self.buckets:
            T = min(bucket, self.chunk)
            cache = None
            for start in range(0, bucket, T):
                z = np.zeros((1, T), np.int32)
                logits, info, cache = d._prefill_chunk(
                    d._weights, d.lora, cache, z, z, z, np.int32(start), z, np.bool_(True),
                    cache_len=bucket)
            self._cache = d._insert(self._cache, cache, np.int32(0), np.int32(self.S - bucket))
        cands, info = d._choose_first(logits, self._controls.arrays(slice(0, 1)),
                                      self._seeds[:1])
        self._cache = d._shift(self._cache, np.int32(0))
        for window in self.windows:
            cands, info, self._cache, self._counts = d._window_steps(
                d._weights, d.lora, self._cache, self._counts, self._tokens, self._positions,
                np.int32(0), np.int32(0), self._controls.device(), self._seeds, self._steps,
                n=self.n, window=window)
        np.asarray(cands)
        self._reset()
        logging.info("engine ready in %.1f s: %d slots, cache %d, prompt buckets %s, windows %s",
                     time.monotonic() - t0, self.B, self.S, self.buckets, self.windows)

    # -- admission: prefill and insert ---------------------------------------------------------

    def _admit(self) -> None:
        """Prefills waiting requests: everything that fits when no row is decoding, else about
        two chunks' worth between two decode calls."""
        # Two chunks: a chunk of the tiny model costs about a fifth of a decode call (8 steps
        # of 16 rows) on a CPU, and a 400-token prompt then joins in one turn.
        budget = math.inf if not self._live() else 2 * self.chunk
        while budget > 0:
            if self._prefill is None and not self._begin():
                return
            p = self._prefill
            if p.request.cancelled:
                self._drop_prefill()
                continue
            if not p.finished:
                self._prefill_chunk(p)
                budget -= p.T
                continue
            if not self._place(p):
                return  # waits for rows to finish (only with a cache_len below the default)

    def _begin(self) -> bool:
        """Starts prefilling the request at the head of the queue, if its choices have slots."""
        with self._cv:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
                self.stats["cancelled"] += 1
            if not self._queue:
                return False
            request = self._queue[0]
            free = [b for b in range(self.B)
                    if self._slots[b] is None and b not in self._reserved]
            generates = max(s.max_new_tokens for s in request.samplings) > 0
            need = len(request.samplings) if generates else 0
            if need > len(free):  # first come, first served: later ones wait behind it
                return False
            self._queue.popleft()
        bucket = next(b for b in self.buckets if b >= len(request.prompt))
        self._prefill = _Prefill(request, bucket, self.chunk, free[:need])
        self._reserved.update(free[:need])
        return True

    def _drop_prefill(self) -> None:
        self._reserved.difference_update(self._prefill.slots)
        self._prefill = None
        self.stats["cancelled"] += 1

    def _prefill_chunk(self, p: _Prefill) -> None:
        d = self.decoder
        a, b = p.done_to, p.done_to + p.T
        p.logits, info, p.cache = d._prefill_chunk(
            d._weights, d.lora, p.cache, p.tokens[:, a:b], p.positions[:, a:b],
            p.segments[:, a:b], np.int32(a), p.next_tokens[:, a:b],
            np.bool_(p.request.prompt_logprobs is not None), cache_len=p.bucket)
        if p.request.prompt_logprobs is not None:
            p.prompt_info.append(tuple(np.asarray(x)[0] for x in info))
        p.done_to = b
        self.stats["prefill_chunks"] += 1

    def _placement(self, extra_span: int = 0, extra_need: int = 0) -> tuple[int, int]:
        """The lowest and highest `index` at which every live row (and a new one spanning
        extra_span slots before it and writing extra_need after) fits in the cache."""
        live = [self._slots[b] for b in self._live()]
        lo = max([self._index - s.start for s in live] + [extra_span])
        need = max([s.row.s.max_new_tokens - len(s.row.tokens) for s in live] + [extra_need])
        return lo, self.S - self.n - need

    def _move_to(self, index: int) -> None:
        shift = index - self._index
        if shift and self._live():
            self._cache = self.decoder._shift(self._cache, np.int32(shift))
            self.stats["shifts"] += 1
            for b in self._live():
                self._slots[b].start += shift
        self._index = index

    def _place(self, p: _Prefill) -> bool:
        """Inserts a prefilled prompt into its slots and takes each choice's first token."""
        request, d = p.request, self.decoder
        P = len(request.prompt)
        result_prompt = self._prompt_logprobs(p)
        if not p.slots:  # max_tokens 0: the prompt's log-probabilities are all it asked for
            self._prefill = None
            request.rows = [decoding.Row(self.tok, s, P) for s in request.samplings]
            for row in request.rows:
                row.finish("length")
            self._finish(request, result_prompt)
            return True
        longest = max(s.max_new_tokens for s in request.samplings)
        lo, hi = self._placement(p.bucket, longest)
        if lo > hi:
            return False
        if not lo <= self._index <= hi:
            self._move_to(lo)
        slot = self._index - p.bucket
        request.rows = []
        now = time.monotonic()
        for b, sampling in zip(p.slots, request.samplings):
            self._cache = d._insert(self._cache, p.cache, np.int32(b), np.int32(slot))
            self._controls.set(b, sampling)
            self._seeds[b] = sampling.seed
            cands, info = d._choose_first(p.logits, self._controls.arrays(slice(b, b + 1)),
                                          self._seeds[b:b + 1])
            row = decoding.Row(self.tok, sampling, P)
            [(cands, info)] = decoding.steps_on_host(cands, info, [row], steps=False)
            token = row.take(cands[0], decoding.row_info(info, 0))
            request.rows.append(row)
            self._slots[b] = _Slot(request, row, self._index - P)
            self._tokens[b], self._positions[b], self._steps[b] = token, P, 1
            if row.done:  # a stop or max_tokens 1: the first token was the last
                self._release(b)
        self._reserved.difference_update(p.slots)
        self._prefill = None
        self._counts_exact = False
        request.first_token_at = now
        request.prompt_result = result_prompt
        self.observer.first_token(time.monotonic() - request.submitted)
        self.stats.update(requests=1, rows=len(p.slots), prompt_tokens=P)
        self._after_step({id(request): request})
        return True

    def _prompt_logprobs(self, p: _Prefill):
        k = p.request.prompt_logprobs
        if k is None:
            return None
        P = len(p.request.prompt)
        own = np.concatenate([x[0] for x in p.prompt_info])[p.bucket - P:]
        ids = np.concatenate([x[1] for x in p.prompt_info])[p.bucket - P:]
        lps = np.concatenate([x[2] for x in p.prompt_info])[p.bucket - P:]
        # Position i predicts token i + 1: the first token has no log-probability.
        logprobs = [None] + [float(x) for x in own[:-1]]
        top = [None] + [[(int(i), float(v)) for i, v in zip(ids[j, :k], lps[j, :k])]
                        for j in range(P - 1)]
        return logprobs, top

    # -- decoding ------------------------------------------------------------------------------

    def _decode(self) -> None:
        """One device call: every live row `n` steps ahead; the host takes each step's tokens
        until a row takes another token than the device fed on (then the rest is redone)."""
        d = self.decoder
        for b in self._live():  # clients that left free their rows before the call
            if self._slots[b].request.cancelled:
                self._release(b)
        live = self._live()
        if not live:
            return
        lo, hi = self._placement()
        if self._index > hi:
            self._move_to(lo)
        span = max(self._index - self._slots[b].start for b in live) + self.n
        window = next(w for w in self.windows if w >= span)
        start = min(max(self._index + self.n - window, 0), self.S - window)
        rows = [s.row if s is not None else None for s in self._slots]
        penalized = any(s.row.s.presence_penalty or s.row.s.frequency_penalty
                        for s in self._slots if s is not None)
        if penalized and not self._counts_exact:  # placed as the program placed the last ones
            self._counts = jax.device_put(decoding.penalty_counts(rows, self.B, self.V),
                                          self._counts.sharding)
        t0 = time.monotonic()
        cands, info, self._cache, self._counts = d._window_steps(
            d._weights, d.lora, self._cache, self._counts, self._tokens, self._positions,
            np.int32(self._index), np.int32(start), self._controls.device(), self._seeds,
            self._steps, n=self.n, window=window)
        ahead = decoding.steps_on_host(cands, info, rows)
        elapsed = time.monotonic() - t0
        touched: dict[int, Request] = {}
        used = 0
        for cands, info in ahead:
            used += 1
            overruled = False
            self.stats["row_steps"] += len(self._live())
            for b in self._live():
                slot = self._slots[b]
                token = slot.row.take(cands[b], decoding.row_info(info, b))
                touched[id(slot.request)] = slot.request
                if slot.row.done:
                    self._release(b)
                    continue
                overruled |= token != cands[b, 0]
                self._tokens[b] = token
                self._positions[b] += 1
                self._steps[b] += 1
            if overruled or not self._live():
                break
        self._index += used
        self._counts_exact = used == len(ahead)
        self.stats.update(steps=used, device_calls=1)
        self.observer.step_time(elapsed / len(ahead), used)
        self._after_step(touched)

    def _release(self, b: int) -> None:
        self._slots[b] = None
        self._controls.set(b, decoding.Sampling())
        self._tokens[b] = self._positions[b] = self._steps[b] = 0

    def _after_step(self, touched: dict[int, "Request"]) -> None:
        for request in touched.values():
            if request.cancelled:
                continue
            if all(row.done for row in request.rows):
                self._finish(request, request.prompt_result)
            elif request.steps:
                request.post("step", [row.completion() for row in request.rows])

    def _finish(self, request: Request, prompt) -> None:
        completions = [row.completion() for row in request.rows]
        self.stats["generated_tokens"] += sum(len(c.tokens) for c in completions)
        self.observer.tokens(len(request.prompt), sum(len(c.tokens) for c in completions))
        self.observer.finished(request, time.monotonic() - request.submitted)
        request.post("done", Result(completions, *(prompt or (None, None))))
