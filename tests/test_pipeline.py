"""grain pipeline: packing, loss weights, long documents, process sharding, resumable state."""

import numpy as np
import pytest

from data_pipelines import pipeline


class FakeTokenizer:
    """Token ids = characters' code points + 10 (so 0..9 stay free for pad/bos/eos)."""

    pad_id, bos_id, eos_id = 0, 2, 3

    def encode(self, text):
        return [ord(c) + 10 for c in text]


def docs_source(texts):
    return [{"text": t.encode()} for t in texts]


def batches(texts, **kw):
    args = dict(batch_size=2, max_len=16, seed=0, train=False, packing=True)
    args.update(kw)
    ds = pipeline.make_dataset(docs_source(texts), pipeline.text_encoder(FakeTokenizer(), "text"),
                               **args)
    return list(ds)


def rows(batch_list):
    for b in batch_list:
        for i in range(len(b["inputs"])):
            yield {k: v[i] for k, v in b.items()}


def documents_of(row):
    """Splits a packed row back into its documents' (inputs, targets, positions)."""
    out = []
    for seg in sorted(set(row["segment_ids"].tolist()) - {0}):
        mask = row["segment_ids"] == seg
        out.append((row["inputs"][mask], row["targets"][mask], row["positions"][mask],
                    row["weights"][mask]))
    return out


def test_packing_keeps_documents_apart():
    texts = ["abc", "hello", "xy", "packing", "z"]
    all_docs = []
    for row in rows(batches(texts)):
        assert set(row.keys()) == set(pipeline.FEATURES)
        assert np.all(row["weights"][row["segment_ids"] == 0] == 0)  # padding never counts
        for inputs, targets, positions, weights in documents_of(row):
            # Positions restart at 0 and targets are the next token within the same document.
            assert positions.tolist() == list(range(len(inputs)))
            assert inputs[1:].tolist() == targets[:-1].tolist()
            assert np.all(weights == 1)
            all_docs.append((inputs.tolist(), targets.tolist()))
    expected = []
    for t in texts:
        tokens = [2] + [ord(c) + 10 for c in t] + [3]
        expected.append((tokens[:-1], tokens[1:]))
    assert sorted(all_docs) == sorted(expected)


def test_long_documents_are_cut_not_dropped():
    text = "abcdefghijklmnopqrstuvwxyz" * 3  # 78 chars + bos/eos = 80 tokens -> 79 targets
    got_targets = []
    for row in rows(batches([text], max_len=16, packing=False)):
        mask = row["segment_ids"] > 0
        assert mask.sum() <= 16
        got_targets.extend(row["targets"][mask].tolist())
    assert got_targets == [ord(c) + 10 for c in text] + [3]


def test_unpacked_rows_hold_one_document():
    for row in rows(batches(["abc", "defgh"], packing=False)):
        assert set(row["segment_ids"].tolist()) <= {0, 1}
        n = int(row["segment_ids"].sum())
        assert row["positions"][:n].tolist() == list(range(n))


def test_processes_read_disjoint_shards():
    texts = [f"doc{i}" for i in range(20)]
    seen = []
    for index in range(2):
        docs = set()
        for row in rows(batches(texts, process_index=index, process_count=2, batch_size=1)):
            for inputs, *_ in documents_of(row):
                docs.add("".join(chr(t - 10) for t in inputs[1:]))
        seen.append(docs)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(texts)


def test_train_iterator_state_resumes_exactly():
    texts = [f"document number {i}" * (1 + i % 3) for i in range(40)]
    ds = pipeline.make_dataset(docs_source(texts), pipeline.text_encoder(FakeTokenizer(), "text"),
                               batch_size=4, max_len=32, seed=3, train=True)
    it = iter(ds)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(7)]  # crosses an epoch boundary (40 docs, 4 per row+)
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in pipeline.FEATURES:
            np.testing.assert_array_equal(got[key], want[key])


def test_shuffle_depends_on_seed():
    texts = [f"doc {i}" for i in range(64)]
    def first(seed):
        ds = pipeline.make_dataset(docs_source(texts),
                                   pipeline.text_encoder(FakeTokenizer(), "text"), batch_size=2,
                                   max_len=16, seed=seed, train=True, packing=False)
        return next(iter(ds))["inputs"]
    assert np.array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))
