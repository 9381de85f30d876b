"""Preparing a data source once: records -> deterministic train/validation split -> TFDS
(ArrayRecord) -> SentencePiece tokenizer trained on the train split.

    python -m data_pipelines.prepare --config=configs/pretrain_tiny.py --out=data/shk \
        --config.data.source=text:../shared/data/pretrain/tinyshakespeare.txt

writes
    data/shk/prepare.json       source, settings, record counts, fingerprint
    data/shk/tokenizer.model    (and tokenizer.vocab)
    data/shk/tfds/records/1.0.0 the TFDS dataset, splits "train" and "validation"

and training reads it with `--config.data.source=prepared:data/shk`. Training on any other
source prepares it the same way into `data.cache_dir` (default <workdir>/data), keyed by a
fingerprint of the source files and settings, so reruns reuse it. A folder is written under a
temporary name and renamed when complete: an interrupted preparation leaves nothing behind.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from typing import Iterator

from data_pipelines import sources, synthetic, tfds_builder
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.errors import UserError

FORMAT_VERSION = 1
TEXT_FIELD = "text"


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A dataset ready to read: where its splits are, which field, which tokenizer."""

    dataset_dir: str  # a TFDS dataset folder
    tokenizer_path: str
    text_field: str
    splits: dict[str, int]  # split name -> records

    def data_source(self, split: str):
        """Random-access source of one split (what grain's MapDataset.source takes)."""
        if split not in self.splits:
            raise UserError(f"split {split!r} does not exist in {self.dataset_dir} (it has "
                            f"{', '.join(self.splits)}); set data.train_split / data.eval_split.")
        return tfds_builder.data_sources(self.dataset_dir)[split]


def in_validation(text: str, fraction: float) -> bool:
    """Deterministic split by a hash of the record: stable as records are added or reordered."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64 < fraction


def iter_records(source: sources.Source, data_cfg) -> Iterator[str]:
    """Every text record of a file-based source, streamed."""
    paths = sources.expand_paths(source.path)
    if source.kind == "text":
        return sources.read_text(paths, data_cfg.text_unit, data_cfg.min_doc_chars)
    return sources.read_jsonl(paths, source.field)


def split_records(source: sources.Source, data_cfg, split: str) -> Iterator[str]:
    """The records of one split ("train" or "validation")."""
    if source.kind == "synthetic":
        n = data_cfg.synthetic_docs if split == "train" else max(
            1, round(data_cfg.synthetic_docs * data_cfg.validation_fraction))
        return (synthetic.text_document(i, split) for i in range(n))
    want_validation = split != "train"
    return (r for r in iter_records(source, data_cfg)
            if in_validation(r, data_cfg.validation_fraction) == want_validation)


def fingerprint(source: sources.Source, data_cfg) -> str:
    """Hash of everything the prepared data depends on (file sizes and mtimes, not contents)."""
    parts: dict = {"format": FORMAT_VERSION, "source": source.spec,
                   "validation_fraction": data_cfg.validation_fraction,
                   "tokenizer_type": data_cfg.tokenizer_type, "vocab_size": data_cfg.vocab_size,
                   "tokenizer_max_chars": data_cfg.tokenizer_max_chars}
    if source.kind == "synthetic":
        parts["synthetic_docs"] = data_cfg.synthetic_docs
    elif source.kind in ("text", "jsonl"):
        parts["files"] = [(os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns)
                          for p in sources.expand_paths(source.path)]
        if source.kind == "text":
            parts["text"] = (data_cfg.text_unit, data_cfg.min_doc_chars)
    if data_cfg.tokenizer:
        path = os.path.abspath(data_cfg.tokenizer)
        parts["tokenizer"] = (path, os.path.getsize(path), os.stat(path).st_mtime_ns)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _slug(source: sources.Source) -> str:
    base = os.path.basename(source.path.rstrip("/*")) or source.kind
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in base)[:40]
    return f"{source.kind}-{keep}"


def prepare(data_cfg, cache_dir: str) -> Prepared:
    """Prepares `data_cfg.source` (or finds it already prepared) and returns it."""
    source = sources.parse_source(data_cfg.source)
    if source.kind == "prepared":
        return load(source.path)
    if source.kind == "tfds":
        return _prepare_tfds(source, data_cfg, cache_dir)
    out = os.path.join(cache_dir, f"{_slug(source)}-{fingerprint(source, data_cfg)}")
    if not os.path.isfile(os.path.join(out, "prepare.json")):
        write(source, data_cfg, out)
    return load(out)


def write(source: sources.Source, data_cfg, out: str) -> None:
    """Builds the prepared folder `out` from a file-based or synthetic source, atomically."""
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        counts = {"train": 0, "validation": 0}

        def records(split):
            for text in split_records(source, data_cfg, split):
                counts[split] += 1
                yield {TEXT_FIELD: text}

        try:
            dataset_dir = tfds_builder.build(
                os.path.join(tmp, "tfds"), (TEXT_FIELD,),
                {split: functools.partial(records, split) for split in counts},
                description=f"t5x_like prepared {source.spec}")
        except AssertionError as e:  # TFDS refuses to write an empty split
            if "No examples were yielded" not in str(e):
                raise
        if not counts["train"]:
            raise UserError(f"config key 'data.source': {source.spec} produced no records; is "
                            "it empty (or all blank lines)?")
        if not counts["validation"]:
            raise UserError(
                f"config key 'data.source': {source.spec} gave {counts['train']} records and none "
                "for validation; raise data.validation_fraction or lower data.min_doc_chars.")
        tok_path = os.path.join(tmp, "tokenizer.model")
        if data_cfg.tokenizer:
            shutil.copyfile(data_cfg.tokenizer, tok_path)
            tokenizer_lib.Tokenizer(tok_path)  # checks it is one of ours
        else:
            tokenizer_lib.train(split_records(source, data_cfg, "train"), tok_path,
                                vocab_size=data_cfg.vocab_size,
                                model_type=data_cfg.tokenizer_type,
                                max_chars=data_cfg.tokenizer_max_chars)
        meta = {"format": FORMAT_VERSION, "source": source.spec, "text_field": TEXT_FIELD,
                "dataset_dir": os.path.relpath(dataset_dir, tmp), "tokenizer": "tokenizer.model",
                "splits": counts, "fingerprint": fingerprint(source, data_cfg)}
        with open(os.path.join(tmp, "prepare.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        shutil.rmtree(os.path.join(tmp, "tfds", "downloads"), ignore_errors=True)
        if os.path.exists(out):  # a previous or concurrent preparation: replace it
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: str) -> Prepared:
    meta_path = os.path.join(folder, "prepare.json")
    if not os.path.isfile(meta_path):
        raise UserError(f"{folder} is not a prepared dataset (no prepare.json); create it with "
                        "python -m data_pipelines.prepare.")
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    return Prepared(dataset_dir=os.path.join(folder, meta["dataset_dir"]),
                    tokenizer_path=os.path.join(folder, meta["tokenizer"]),
                    text_field=meta["text_field"], splits=meta["splits"])


def _prepare_tfds(source: sources.Source, data_cfg, cache_dir: str) -> Prepared:
    """A TFDS dataset is read in place; only its tokenizer may need training (cached)."""
    import tensorflow_datasets as tfds

    name = source.path + (f"/{source.config}" if source.config else "") + (
        f":{source.version}" if source.version else "")
    try:
        builder = tfds.builder(name, data_dir=data_cfg.tfds_data_dir or None)
    except Exception as e:  # TFDS raises many types for unknown or unbuilt datasets
        raise UserError(f"config key 'data.source': TFDS dataset {name!r} is not available "
                        f"({type(e).__name__}: {str(e).splitlines()[0]}); build it first or set "
                        "data.tfds_data_dir.") from None
    if not builder.is_prepared():
        raise UserError(f"config key 'data.source': TFDS dataset {name!r} is not prepared in "
                        f"{builder.data_dir}; this machine cannot download it, so run "
                        "download_and_prepare where it can and copy the folder here.")
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    if data_cfg.text_field not in builder.info.features:
        raise UserError(f"config key 'data.text_field': {name!r} has no feature "
                        f"{data_cfg.text_field!r} (it has {', '.join(builder.info.features)}).")
    prepared = Prepared(str(builder.data_dir), "", data_cfg.text_field, splits)
    if data_cfg.tokenizer:
        return dataclasses.replace(prepared, tokenizer_path=data_cfg.tokenizer)
    key = hashlib.sha256(json.dumps([name, str(builder.data_dir), data_cfg.text_field,
                                     data_cfg.train_split, data_cfg.vocab_size,
                                     data_cfg.tokenizer_type, data_cfg.tokenizer_max_chars]
                                    ).encode()).hexdigest()[:16]
    tok_path = os.path.join(cache_dir, f"tfds-{source.path}-{key}", "tokenizer.model")
    if not os.path.isfile(tok_path):
        os.makedirs(os.path.dirname(tok_path), exist_ok=True)
        train = prepared.data_source(data_cfg.train_split)
        texts = (_as_text(train[i][data_cfg.text_field]) for i in range(len(train)))
        tokenizer_lib.train(texts, tok_path, vocab_size=data_cfg.vocab_size,
                            model_type=data_cfg.tokenizer_type,
                            max_chars=data_cfg.tokenizer_max_chars)
    return dataclasses.replace(prepared, tokenizer_path=tok_path)


def _as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def main(argv):
    from absl import flags

    del argv
    out = flags.FLAGS.out
    cfg = flags.FLAGS.config
    source = sources.parse_source(cfg.data.source)
    if source.kind in ("tfds", "prepared"):
        raise UserError(f"config key 'data.source': {source.spec} is already prepared; "
                        "train on it directly.")
    write(source, cfg.data, os.path.abspath(out))
    prepared = load(out)
    print(json.dumps({"out": out, "splits": prepared.splits,
                      "tokenizer": prepared.tokenizer_path}, indent=2))


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from t5x_like import cli

    config_flags.DEFINE_config_file("config", None, "Config file with a `data` section.")
    flags.DEFINE_string("out", None, "Folder to write the prepared dataset to.", required=True)
    cli.run(main)
