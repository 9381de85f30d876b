"""Tokenizer quality: compression (bytes per token) on held-out text, side by side.

    # Tokenizers of 2k, 8k and 32k pieces trained on a prepared dataset's train split and
    # measured on its validation split (plus the dataset's own tokenizer):
    python -m data_pipelines.tokenizer_eval --data=prepared:data/shk --vocab_sizes=2048,8192,32768

    # Two existing tokenizers on any text files:
    python -m data_pipelines.tokenizer_eval --tokenizer=a/tokenizer.model \
        --tokenizer=b/tokenizer.model --eval=../shared/data/eval/ntrex128_newstest2019.src.eng.txt

Per tokenizer: pieces, bytes/token (higher = more text per token = shorter sequences for the
same text: the number that sets training and serving cost), characters/token, tokens per
word, the share of tokens that fell back to raw bytes, the share of the vocabulary the text
used, and whether decoding gives the text back exactly. `--show` prints a few lines as each
tokenizer cuts them. `--out` keeps the trained models and writes results.json.
"""

import os
import tempfile
from typing import Iterable

from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import files, markdown
from t5x_like.core.errors import UserError


def evaluate(tok, texts: list[str]) -> dict:
    """Compression and coverage of `tok` on `texts`."""
    ids = tok.encode_batch(texts)
    n_tokens = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    byte_tokens = sum(1 for x in ids for i in x if tok.is_byte(i))
    unk = sum(1 for x in ids for i in x if i == tok.unk_id)
    used = len({i for x in ids for i in x})
    return {"vocab_size": tok.vocab_size, "tokens": n_tokens, "bytes": n_bytes,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4),
            "chars_per_token": round(n_chars / max(n_tokens, 1), 4),
            "tokens_per_word": round(n_tokens / max(n_words, 1), 4),
            "byte_fallback_share": round(byte_tokens / max(n_tokens, 1), 5),
            "unk_share": round(unk / max(n_tokens, 1), 5),
            "vocab_used_share": round(used / tok.vocab_size, 4),
            "round_trip": all(tok.decode(x) == t for x, t in zip(ids, texts))}


def table(results: dict[str, dict]) -> str:
    """Markdown table, one column per tokenizer."""
    names = list(results)
    rows = [("pieces", "vocab_size", "{:,}"), ("bytes / token", "bytes_per_token", "{:.3f}"),
            ("chars / token", "chars_per_token", "{:.3f}"),
            ("tokens / word", "tokens_per_word", "{:.3f}"),
            ("byte fallback", "byte_fallback_share", "{:.3%}"), ("unk", "unk_share", "{:.3%}"),
            ("vocab used", "vocab_used_share", "{:.1%}"), ("round trip", "round_trip", "{}"),
            ("tokens", "tokens", "{:,}")]
    cells = [[label, *(fmt.format(results[n][key]) for n in names)] for label, key, fmt in rows]
    if len(names) >= 2:
        base = results[names[0]]["tokens"]
        cells.append(["tokens vs first", *(f"{results[n]['tokens'] / base:.1%}" for n in names)])
    return "\n".join(markdown.table(["", *names], cells))


def segmentation(tok, text: str) -> str:
    return "|".join(tok.id_to_piece(i) for i in tok.encode(text))


def _texts(spec: str, split: str) -> list[str]:
    """Texts of a prepared folder's split (all sources' text views) or of text files."""
    from data_pipelines import records as records_lib
    from data_pipelines import prepare, sources, tfds_builder

    if spec.startswith("prepared:"):
        prepared = prepare.load(spec[len("prepared:"):])
        out = []
        splits = tfds_builder.data_sources(prepared.dataset_dir)
        for name, d in prepared.datasets.items():
            source = splits[d.tfds_splits[split]]
            out += [records_lib.text_view(records_lib.decode(source[i], d.kind), d.kind)
                    for i in range(len(source))]
        return out
    paths = sources.expand_paths(spec.removeprefix("text:"))
    return [line for path in paths for _, line in sources.text_documents(path, "paragraph", 0)]


def train_tokenizers(texts: Iterable[str], vocab_sizes: list[int], folder: str,
                     model_type: str = "bpe") -> dict:
    texts = list(texts)
    out = {}
    for size in vocab_sizes:
        path = os.path.join(folder, f"{model_type}_{size}.model")
        out[f"{model_type} {size:,}"] = tokenizer_lib.train(texts, path, vocab_size=size,
                                                            model_type=model_type)
    return out


def main(argv):
    from absl import flags

    del argv
    f = flags.FLAGS
    if not (f.data or f.eval):
        raise UserError("give held-out text: --data=prepared:<dir> (its validation split) or "
                        "--eval=<text file or glob>.")
    eval_texts = _texts(f.data, "validation") if f.data and not f.eval else _texts(f.eval, "")
    if not eval_texts:
        raise UserError("the held-out text is empty; check --data / --eval.")
    tokenizers = {}
    for path in f.tokenizer or []:
        tokenizers[os.path.basename(os.path.dirname(os.path.abspath(path))) + "/"
                   + os.path.basename(path)] = tokenizer_lib.Tokenizer(path)
    if f.data and f.data.startswith("prepared:") and not f.tokenizer:
        from data_pipelines import prepare

        tokenizers["prepared"] = tokenizer_lib.Tokenizer(
            prepare.load(f.data[len("prepared:"):]).tokenizer_path)
    folder = f.out or tempfile.mkdtemp(prefix="tokenizer_eval-")
    os.makedirs(folder, exist_ok=True)
    if f.vocab_sizes:
        train_spec = f.train or f.data
        if not train_spec:
            raise UserError("--vocab_sizes needs training text: --data=prepared:<dir> or "
                            "--train=<text file or glob>.")
        train_texts = _texts(train_spec, "train")
        tokenizers.update(train_tokenizers(train_texts, [int(v) for v in f.vocab_sizes],
                                           folder, f.model_type))
    if not tokenizers:
        raise UserError("nothing to evaluate: give --tokenizer=<model> or --vocab_sizes=...")
    results = {name: evaluate(tok, eval_texts) for name, tok in tokenizers.items()}
    n_bytes = sum(len(t.encode("utf-8")) for t in eval_texts)
    print(f"Held-out text: {len(eval_texts):,} documents, {n_bytes:,} bytes "
          f"({f.data + ' validation' if f.data and not f.eval else f.eval}).\n")
    print(table(results))
    for text in eval_texts[:f.show]:
        lines = [x for x in text.split("\n") if x.strip()] or [""]
        line = max(lines[:8], key=len)[:120]  # a line of text, not a speaker's name
        print(f"\n{line!r}")
        for name, tok in tokenizers.items():
            print(f"  {name:>14}: {segmentation(tok, line)}")
    if f.out:
        files.atomic_write_json(os.path.join(f.out, "results.json"), results)


if __name__ == "__main__":
    from absl import flags

    from t5x_like.core import cli

    flags.DEFINE_string("data", "", "prepared:<dir>: train on its train split, evaluate on its "
                        "validation split.")
    flags.DEFINE_string("eval", "", "Held-out text files (path or glob), instead of --data.")
    flags.DEFINE_string("train", "", "Text files (path or glob) to train --vocab_sizes on.")
    flags.DEFINE_multi_string("tokenizer", [], "SentencePiece models to compare (repeatable).")
    flags.DEFINE_list("vocab_sizes", [], "Train BPE tokenizers of these sizes, e.g. 2048,8192.")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "For --vocab_sizes.")
    flags.DEFINE_integer("show", 2, "Held-out lines to print as each tokenizer cuts them.")
    flags.DEFINE_string("out", "", "Keep the trained models and results.json here.")
    cli.run(main)
