"""grain input pipelines: records -> tokens -> chunks -> packed sequences -> batches.

    source (random access) -> shard by process -> shuffle (seed, per epoch) -> repeat
      [a Mixture: each source sharded, shuffled and repeated on its own, then grain's
       MapDataset.mix draws from them in proportion to their weights, deterministically]
      -> encode (tokens + per-token loss weights) -> cut into pieces of at most max_len
      -> pack several documents per row (segment ids, positions restart per document)
      -> batch

Every batch is a dict of [batch, max_len] arrays:

    inputs       int32   token ids fed to the model
    targets      int32   the next token (inputs shifted by one within each document)
    weights      float32 loss weight per target (0 on padding; SFT zeroes non-assistant tokens)
    segment_ids  int32   1, 2, ... per packed document, 0 on padding: attention never crosses
    positions    int32   position within its document (RoPE), restarting at 0

The iterator's state (`get_state` / `set_state`) is saved in every checkpoint, so a resumed run
continues with exactly the next batch.
"""

import dataclasses
from typing import Callable

import grain
import numpy as np
from grain import experimental as grain_exp

FEATURES = ("inputs", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Several random-access sources to train on in proportion to `weights` (per record).

    `make_dataset` mixes them with grain for training; read directly (len, [i]) it is their
    concatenation, in order, which is what one evaluation pass over all of them needs.
    """

    names: tuple[str, ...]
    sources: tuple
    weights: tuple[float, ...]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def __getitem__(self, index: int):
        for source in self.sources:
            if index < len(source):
                return source[index]
            index -= len(source)
        raise IndexError(index)


def _mixed(mixture: Mixture, *, seed: int, train: bool, process_index: int,
           process_count: int) -> grain.MapDataset:
    parts = [grain.MapDataset.source(s)[process_index::process_count] for s in mixture.sources]
    if not train:
        return grain.MapDataset.concatenate(parts)
    # Each source reshuffles every epoch with its own seed and repeats forever, so a small
    # source weighted up is revisited without pulling the others along.
    parts = [p.shuffle(seed=seed + 7919 * i).repeat() for i, p in enumerate(parts)]
    return grain.MapDataset.mix(parts, weights=list(mixture.weights))


def text_encoder(tokenizer, text_field: str) -> Callable[[dict], dict]:
    """Pretraining: BOS + text + EOS, every target weighted 1."""
    def encode(record: dict) -> dict:
        text = record[text_field]
        text = text.decode("utf-8") if isinstance(text, bytes) else text
        tokens = np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id],
                            np.int32)
        return {"tokens": tokens, "weights": np.ones(len(tokens), np.float32)}
    return encode


class _ShiftAndCut(grain_exp.FlatMapTransform):
    """tokens[n] -> (inputs, targets, weights) pieces of at most max_len positions each.

    weights[i] is the weight of predicting tokens[i], so target tokens[i+1] gets weights[i+1].
    A long document becomes several independent pieces; nothing is dropped.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.max_fan_out = 1 << 20  # not enforced by grain's iterator flat-map

    def flat_map(self, element):
        tokens, weights = element["tokens"], element["weights"]
        pieces = []
        for start in range(0, max(len(tokens) - 1, 0), self.max_len):
            end = min(start + self.max_len, len(tokens) - 1)
            piece_weights = weights[start + 1:end + 1]
            if piece_weights.any():
                pieces.append({"inputs": tokens[start:end], "targets": tokens[start + 1:end + 1],
                               "weights": piece_weights})
        return pieces


def _pad_one(example: dict, max_len: int) -> dict:
    """Unpacked rows: one document per row, padded to max_len."""
    n = len(example["inputs"])
    out = {k: np.pad(example[k], (0, max_len - n)) for k in ("inputs", "targets", "weights")}
    out["segment_ids"] = (np.arange(max_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(max_len), 0).astype(np.int32)
    return out


def _from_packed(example: dict) -> dict:
    return {"inputs": example["inputs"], "targets": example["targets"],
            "weights": example["weights"] * (example["inputs_segment_ids"] > 0),
            "segment_ids": example["inputs_segment_ids"].astype(np.int32),
            "positions": example["inputs_positions"].astype(np.int32)}


def make_dataset(source, encode: Callable[[dict], dict], *, batch_size: int, max_len: int,
                 seed: int, train: bool, packing: bool = True, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0) -> grain.IterDataset:
    """Batches for one process. Train: shuffled, repeated forever, full batches only.

    Evaluation (train=False): one pass in order, the last batch may be short.
    `source` may be a Mixture: training then draws from its sources by weight.
    """
    if isinstance(source, Mixture):
        ds = _mixed(source, seed=seed, train=train, process_index=process_index,
                    process_count=process_count)
    else:
        ds = grain.MapDataset.source(source)[process_index::process_count]
        if train:
            ds = ds.shuffle(seed=seed).repeat()
    ds = ds.map(encode)
    it = grain_exp.FlatMapIterDataset(ds.to_iter_dataset(), _ShiftAndCut(max_len))
    if packing:
        lengths = {"inputs": max_len, "targets": max_len, "weights": max_len}
        it = grain_exp.FirstFitPackIterDataset(it, length_struct=lengths,
                                               num_packing_bins=max(4 * batch_size, 16), seed=seed,
                                               shuffle_bins=train)
        it = it.map(_from_packed)
    else:
        it = it.map(lambda ex: _pad_one(ex, max_len))
    it = it.batch(batch_size, drop_remainder=train)
    if worker_count:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it
