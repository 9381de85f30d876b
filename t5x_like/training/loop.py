"""The training loop and what happens at its intervals: log, evaluate, save, stop early, and
notice preemption. One loop for every task: it sees only

    train_step(state, local batch) -> (state, metrics)    this process's rows of the batch
    evaluate(params) -> {metric: value}                   the task's validation

so checkpoints (with the data position), early stopping, the non-finite checks and the metrics
lines are the same for pretraining, SFT, reward, DPO and RL.
"""

import collections
import os
import signal
import sys
import time
from typing import Callable

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from t5x_like.core import metrics as metrics_lib
from t5x_like.core.errors import UserError
from t5x_like.modeling import flops

# warn_lost: more than this share of the encoded examples dropped or truncated is a warning,
# once at least LOST_WARN_MIN examples were encoded (a rate over a handful means little).
LOST_WARN_FRACTION = 0.05
LOST_WARN_MIN = 100


class Preemption:
    """Notices SIGTERM. One process: a signal handler sets a flag. Several: JAX's preemption
    service agrees on one step at which every process saves (call `reached` every step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.flag = False
        if enabled and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def reached(self, step: int) -> bool:
        if not self.enabled:
            return False
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self.enabled and jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


class Loop:
    """The training loop and what happens at its intervals: log, evaluate, save, stop.

    example_counts: the task's encoder counts ("encoded", "dropped", "truncated", ...) as the
    data is read; counted_metrics(counts) -> the metrics the task logs from them."""

    def __init__(self, cfg, train_step: Callable, evaluate: Callable, ckpt, writer, preemption,
                 example_counts: collections.Counter,
                 counted_metrics: Callable[[collections.Counter], dict] = lambda counts: {}):
        self.example_counts = example_counts
        self.counted_metrics = counted_metrics
        self.warned: set[str] = set()  # warn_lost: the kinds already warned about
        self.cfg, self.train_step, self.evaluate_params = cfg, train_step, evaluate
        self.ckpt, self.writer, self.preemption = ckpt, writer, preemption
        self.tokens_per_step = cfg.data.batch_size * cfg.model.max_len
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.model.max_len)
        self.peak = flops.peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops_per_device)

    def _early_stopping_state(self, start: int):
        """(best, best step, evaluations without improvement), replayed from metrics.jsonl so a
        resumed run keeps counting where it stopped."""
        e = self.cfg.eval
        if not e.early_stop_by or not start:
            return None, 0, 0
        lines = [r for r in metrics_lib.read_metrics(os.path.dirname(self.writer.path))
                 if r.get("split") == "early_stopping" and r["step"] <= start]
        state = np.array([np.nan, 0, 0], np.float64)
        if lines:
            last = lines[-1]
            state[:] = (last[f"best_{e.early_stop_by}"], last["best_step"],
                        last["evals_without_improvement"])
        if jax.process_count() > 1:  # process 0 has the metrics file; all must agree
            state = multihost_utils.broadcast_one_to_all(state)
        best = None if np.isnan(state[0]) else float(state[0])
        return best, int(state[1]), int(state[2])

    def evaluate(self, state, step: int, write: bool = True) -> dict[str, float]:
        result = self.evaluate_params(state["params"])
        if write:
            self.writer.write(step, result, split="validation")
        return result

    def log(self, step: int, metrics, elapsed: float, steps_done: int) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if steps_done:
            tokens_per_sec = self.tokens_per_step * steps_done / elapsed
            metrics["tokens_per_sec"] = tokens_per_sec
            metrics["tflops_per_sec_per_device"] = (
                self.flops_per_token * tokens_per_sec / jax.device_count() / 1e12)
            if self.peak:
                metrics["mfu"] = metrics["tflops_per_sec_per_device"] / self.peak
        metrics.update(self.counted_metrics(self.example_counts))
        self.writer.write(step, metrics)
        self.warn_lost(step)

    def warn_lost(self, step: int) -> None:
        """A WARNING, once per kind, when more than LOST_WARN_FRACTION of the examples encoded
        so far were dropped or truncated for length: the run is not training on its data."""
        counts = self.example_counts
        total = counts["encoded"]
        if total < LOST_WARN_MIN:
            return
        for kind in ("dropped", "truncated"):
            if kind in self.warned or counts[kind] <= LOST_WARN_FRACTION * total:
                continue
            self.warned.add(kind)
            limit = self.cfg.model.max_len
            if self.cfg.task == "rl":
                limit -= self.cfg.rl.max_new_tokens + 1
            logging.warning(
                "Step %d: %s of the %s examples encoded so far (%.0f%%) were %s because they are "
                "longer than the %d tokens they may take (model.max_len%s); raise "
                "--config.model.max_len%s, or use data with shorter examples.", step,
                f"{counts[kind]:,}", f"{total:,}", 100 * counts[kind] / total, kind, limit,
                " - rl.max_new_tokens - 1" if self.cfg.task == "rl" else "",
                " (data.on_long=split keeps long conversations whole, in pieces)"
                if self.cfg.task == "sft" and self.cfg.data.on_long != "split" else "")

    def check_finite(self, step: int, metrics, skipped_before: int) -> int:
        """Stops the run (optimizer.on_nonfinite=stop) when a step's gradients were not finite,
        and always when a step had no tokens to learn from (an empty loss mask is a data
        problem, never a silent zero loss).

        Reads the previous step's values, so the device is never left idle waiting."""
        skipped, tokens = jax.device_get((metrics["nonfinite_steps"], metrics["loss_tokens"]))
        skipped = int(skipped)
        if float(tokens) == 0:  # (NaN weights are the non-finite case below, not this one)
            raise UserError(
                f"step {step}: the batch has no tokens to learn from (every loss weight is 0); "
                "check the data and data.loss_on (SFT learns only assistant turns).")
        if skipped > skipped_before:
            logging.warning("Step %d: non-finite loss or gradients; the update was skipped "
                            "(%d so far).", step, skipped)
            if self.cfg.optimizer.on_nonfinite == "stop":
                raise UserError(
                    f"step {step}: the loss or gradients became NaN/Inf; the update was not "
                    f"applied and training stopped. Lower optimizer.lr, check the data, or set "
                    f"optimizer.on_nonfinite=skip. The last checkpoint is step "
                    f"{self.ckpt.latest_step()}.")
        return skipped

    def early_stop(self, step: int, result: dict) -> bool:
        """True when eval.early_stop_by has not improved for eval.patience evaluations."""
        e = self.cfg.eval
        if not e.early_stop_by:
            return False
        value = result[e.early_stop_by]
        sign = 1.0 if e.early_stop_mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > e.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        self.writer.write(step, {f"best_{e.early_stop_by}": self.best, "best_step": self.best_step,
                                 "evals_without_improvement": self.stale}, split="early_stopping")
        return self.stale >= e.patience

    def run(self, state, train_batches) -> dict[str, float]:
        cfg = self.cfg
        start, steps = int(jax.device_get(state["step"])), cfg.steps
        final: dict[str, float] = {}
        self.best, self.best_step, self.stale = self._early_stopping_state(start)
        if self.stale >= cfg.eval.patience:
            logging.info("This run already stopped early at step %d; evaluating it.", start)
            return {**self.evaluate(state, start, write=False), "early_stopped": True,
                    "step": start}
        bar = tqdm.tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=jax.process_index() != 0 or not sys.stderr.isatty())
        last_time, last_step = time.perf_counter(), start
        previous, skipped = None, 0
        for step in range(start + 1, steps + 1):
            state, metrics = self.train_step(state, next(train_batches))
            bar.update(1)
            if previous is not None:
                skipped = self.check_finite(step - 1, previous, skipped)
            previous = metrics
            if step == start + 1:  # keep compilation out of tokens/s
                jax.block_until_ready(metrics)
                last_time, last_step = time.perf_counter(), step
            if step % cfg.log_every_steps == 0 or step == steps:
                now = time.perf_counter()
                self.log(step, metrics, now - last_time, step - last_step)
                last_time, last_step = now, step
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            evaluated, stop_early = None, False
            if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == steps:
                evaluated = final = self.evaluate(state, step)
                stop_early = self.early_stop(step, evaluated)
                last_time = time.perf_counter()  # keep eval time out of tokens/s
            preempted = self.preemption.reached(step)
            if (step % cfg.checkpoint.every_steps == 0 or step == steps or preempted
                    or stop_early):
                skipped = self.check_finite(step, metrics, skipped)
                self.ckpt.save(step, state, train_batches, metrics=evaluated)
            if preempted:
                self.ckpt.wait()
                logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved; rerun the same "
                                "command to resume.", step)
                bar.close()
                return {**final, "preempted": True, "step": step}
            if stop_early:
                logging.warning("Early stopping at step %d: validation %s has not improved for %d "
                                "evaluations (best %.4g at step %d).", step, cfg.eval.early_stop_by,
                                cfg.eval.patience, self.best, self.best_step)
                bar.close()
                return {**final, "early_stopped": True, "step": step}
        bar.close()
        if start >= steps:
            logging.info("Already trained for %d steps; evaluating the final checkpoint.", steps)
            final = self.evaluate(state, start, write=False)
        return final
