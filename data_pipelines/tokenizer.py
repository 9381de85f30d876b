"""Tokenizers: one interface, two backends, and the files that travel with them.

- SentencePiece (`tokenizer.model`, `SentencePieceTokenizer`): what `train` makes, the default
  for models born here. Trained as BPE (or unigram) with byte fallback (any UTF-8 text
  round-trips), digits split one per token, whitespace kept exactly as written (no
  normalization, no dummy prefix: decode(encode(s)) == s), and the chat markers reserved as
  single pieces. Ids: 0 pad, 1 unk, 2 bos, 3 eos, then the markers. A published SentencePiece
  model (Llama 2, Gemma: unk 0, bos 1, eos 2, a dummy-prefix space) opens too once
  `python -m t5x_like.hf import` has appended the markers and a pad piece it lacks.
- Hugging Face `tokenizers` (`tokenizer.json`, `HFTokenizer`): byte-level BPE with the Llama 3
  or Qwen pre-tokenizers, SentencePiece-style BPE/unigram converted by transformers, with their
  added and special tokens; encodes exactly as transformers' `AutoTokenizer` does
  (`encode(text)` == `tok(text, add_special_tokens=False).input_ids`).

A tokenizer is its main file plus the Hugging Face files beside it (SIDECARS:
tokenizer_config.json, special_tokens_map.json, generation_config.json, chat_template.jinja).
Special ids come from those files, never from assumptions: bos/eos/pad/unk from
tokenizer_config.json, then special_tokens_map.json, then (SentencePiece) the model's own
control pieces, then generation_config.json; `stop_ids` are eos, every eos_token_id of
generation_config.json (instruct models list their end of turn there: <|im_end|>, <|eot_id|>,
<end_of_turn>) and the <|end|> marker. A model without a pad token has pad_id -1.

    load(path)               a .model, a tokenizer.json, or a folder holding one (a run, a model
                             directory, prepared data, a Hugging Face model folder)
    find(folder)             that main file; install(path, folder) copies main file and sidecars
    same(a, b)               whether two tokenizers are the same files
    to_tokenizer_json(tok)   a SentencePiece model as an equivalent tokenizer.json (export)
    StreamDecoder            ids one at a time -> only complete text (streaming)

`Tokenizer(path)` is `load(path)` (older call sites); both backends have: path, files, backend,
vocab_size, pad_id, unk_id, bos_id, eos_id, marker_ids, stop_ids, special_ids, encode,
encode_batch, decode (special tokens left out, as SentencePiece does with control pieces),
token_bytes, id_to_bytes, id_to_piece, piece_to_id (None when absent), is_byte.
"""

import functools
import io
import json
import os
import re
import shutil
import struct
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from data_pipelines import chat_template
from t5x_like.core.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_MAX_SENTENCE_BYTES = 16384

SP_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
SIDECARS = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
            "chat_template.jinja")
_SPECIAL_KEYS = ("bos", "eos", "pad", "unk")


def _sentences(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    """Documents cut at line breaks into pieces SentencePiece accepts, up to max_chars total."""
    total = 0
    for text in texts:
        piece: list[str] = []
        size = 0
        for line in text.split("\n"):
            if size + len(line) > _MAX_SENTENCE_BYTES // 4 and piece:
                yield "\n".join(piece)
                piece, size = [], 0
            piece.append(line[: _MAX_SENTENCE_BYTES // 4])
            size += len(piece[-1]) + 1
        yield "\n".join(piece)
        total += len(text)
        if total >= max_chars:
            return


def train(texts: Iterable[str], model_path: str, *, vocab_size: int, model_type: str = "bpe",
          max_chars: int = 50_000_000, character_coverage: float = 0.9995,
          special_tokens: Sequence[str] = ()) -> "SentencePieceTokenizer":
    """Trains on `texts` and writes `<model_path>` (and `.vocab`) atomically.

    character_coverage: share of characters the vocabulary must cover (rarer ones go through
    byte fallback); special_tokens: extra single-piece symbols after the chat markers.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_sentences(texts, max_chars)), model_writer=model,
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            hard_vocab_limit=False,  # small corpora get fewer pieces instead of an error
            character_coverage=character_coverage, split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, max_sentence_length=_MAX_SENTENCE_BYTES,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=[*chat_template.MARKERS,
                                  *(t for t in special_tokens if t not in chat_template.MARKERS)],
            num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as e:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:
            raise UserError(f"config key 'data.vocab_size': {vocab_size} is too small for this "
                            f"text, which needs at least {needed.group(1)} pieces (256 bytes, "
                            "special tokens and every character seen); raise it.") from None
        raise UserError(f"SentencePiece could not train on this data ({e}); is the training "
                        "split empty or very small?") from None
    tmp = f"{model_path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, model_path)
    tok = SentencePieceTokenizer(model_path)
    vocab_tmp = f"{model_path}.vocab.tmp{os.getpid()}"
    with open(vocab_tmp, "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i)}\n")
    os.replace(vocab_tmp, os.path.splitext(model_path)[0] + ".vocab")
    return tok


# ---------------------------------------------------------------------------------------------
# Where a tokenizer is, and copying it.

def find(folder: str, *, required: bool = True) -> str | None:
    """The main tokenizer file in a run, model, prepared-data or Hugging Face folder:
    tokenizer.model (preferred where a release ships both, as import does), else
    tokenizer.json."""
    for name in (SP_FILE, HF_FILE):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    if required:
        raise UserError(f"{folder} has no tokenizer.model or tokenizer.json; was it written by "
                        "t5x_like (train, hf import) or is it a Hugging Face model folder?")
    return None


def resolve(path: str) -> str:
    """`path` itself, or the main tokenizer file of the folder `path`."""
    return find(path) if os.path.isdir(path) else path


def files(path: str) -> list[str]:
    """The files that make up the tokenizer at `path`: the main file, then its sidecars."""
    path = resolve(path)
    folder = os.path.dirname(path)
    return [path, *(p for p in (os.path.join(folder, n) for n in SIDECARS) if os.path.isfile(p))]


def install(path: str, folder: str) -> str:
    """Copies the tokenizer at `path` (main file and sidecars) into `folder`, each file under a
    temporary name renamed into place; returns the new main file's path."""
    main = resolve(path)
    name = HF_FILE if is_json(main) else SP_FILE
    out = os.path.join(folder, name)
    for src in files(main):
        dst = out if src == main else os.path.join(folder, os.path.basename(src))
        if os.path.abspath(src) == os.path.abspath(dst):
            continue
        shutil.copyfile(src, dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    return out


def remove(path: str) -> None:
    """Deletes the tokenizer files at `path` (one this project installed)."""
    for p in files(path):
        os.remove(p)


def same(a: str, b: str) -> bool:
    """Whether two tokenizers are the same files (names after the main file, and contents)."""
    fa, fb = files(a), files(b)

    def names(fs):
        return [os.path.basename(p) for p in fs[1:]]

    if is_json(fa[0]) != is_json(fb[0]) or names(fa) != names(fb):
        return False
    import filecmp

    return all(filecmp.cmp(x, y, shallow=False) for x, y in zip(fa, fb))


def is_json(path: str) -> bool:
    """Whether `path` is a tokenizer.json (else a SentencePiece model)."""
    if path.endswith(".json"):
        return True
    if path.endswith(".model"):
        return False
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] == b"{"


def load(path: str) -> "Tokenizer":
    """The tokenizer at `path`: a SentencePiece .model, a tokenizer.json, or a folder."""
    if not os.path.exists(path):
        raise UserError(f"tokenizer {path} does not exist.")
    main = resolve(path)
    cls = HFTokenizer if is_json(main) else SentencePieceTokenizer
    return cls(main)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); restore it from the model's "
                        "release.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; restore it from the model's release.")
    return data


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# ---------------------------------------------------------------------------------------------
# The interface.

class Tokenizer:
    """The interface both backends implement; `Tokenizer(path)` opens either (`load`)."""

    backend = ""
    path = ""
    vocab_size = 0
    pad_id = unk_id = bos_id = eos_id = -1

    def __new__(cls, path: str | None = None):
        if cls is Tokenizer:  # the generic name picks the backend from the file
            if path is None or not os.path.exists(path):
                raise UserError(f"tokenizer {path} does not exist.")
            cls = HFTokenizer if is_json(resolve(path)) else SentencePieceTokenizer
            return super().__new__(cls)
        return super().__new__(cls)

    def __init__(self, path: str):
        path = resolve(path) if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise UserError(f"tokenizer {path} does not exist.")
        self.path = path
        self.files = files(path)
        self.sidecar = {os.path.basename(p): p for p in self.files[1:]}

    # -- special ids from the model's files ------------------------------------------------------

    def _config(self, name: str) -> dict:
        path = self.sidecar.get(name)
        return _read_json(path) if path else {}

    def _special_ids(self, own: dict[str, int]) -> None:
        """pad/unk/bos/eos ids: tokenizer_config.json, special_tokens_map.json, the model's own
        (`own`), generation_config.json, in that order; stop ids."""
        tconf, smap = self._config("tokenizer_config.json"), self._config("special_tokens_map.json")
        gen = self._config("generation_config.json")
        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            found = None
            for source in (tconf, smap):
                text = _token_string(source.get(f"{key}_token"))
                if text is not None:
                    found = self.piece_to_id(text)
                    if found is None:
                        where = "tokenizer_config.json" if source is tconf else "special_tokens_map.json"
                        raise UserError(f"{self.sidecar[where]}: {key}_token {text!r} is not a "
                                        f"token of {self.path}; the files belong to different "
                                        "models.")
                    break
            if found is None and own.get(key, -1) >= 0:
                found = own[key]
            if found is None and _ids(gen.get(f"{key}_token_id")):
                found = _ids(gen.get(f"{key}_token_id"))[0]
            setattr(self, f"{key}_id", -1 if found is None else found)
            if found is not None and self.id_to_piece(found) is not None:
                self.special_tokens[f"{key}_token"] = self.id_to_piece(found)
        stops = [self.eos_id, *_ids(gen.get("eos_token_id"))]
        if chat_template.END in self.marker_ids:
            stops.append(self.marker_ids[chat_template.END])
        self.stop_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in stops if 0 <= i < self.vocab_size))
        self.add_bos = bool(tconf.get("add_bos_token", self._adds_bos()))

    def _adds_bos(self) -> bool:
        return False

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template (chat_template.jinja, else tokenizer_config.json's
        chat_template; of a list of named ones, "default"), or None."""
        if "chat_template.jinja" in self.sidecar:
            with open(self.sidecar["chat_template.jinja"], encoding="utf-8") as f:
                return f.read()
        source = self._config("tokenizer_config.json").get("chat_template")
        if isinstance(source, list):
            source = {t.get("name"): t.get("template") for t in source
                      if isinstance(t, dict)}.get("default")
        return source if isinstance(source, str) else None

    def _markers(self) -> dict[str, int]:
        return {m: i for m in chat_template.MARKERS if (i := self.piece_to_id(m)) is not None}

    # -- what every backend provides ---------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str | None:
        raise NotImplementedError

    def piece_to_id(self, piece: str) -> int | None:
        raise NotImplementedError

    def is_byte(self, i: int) -> bool:
        """A byte-fallback piece (<0xAB>): a byte of a character the vocabulary lacks."""
        return False

    def id_to_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes token `i` stands for on its own (b"" for special tokens; a
        byte-level or byte-fallback token may be part of a character; a SentencePiece word
        piece keeps its space, which decode drops at the very start)."""
        raise NotImplementedError

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for; 0 for special tokens (pad/bos/eos/unk, control and
        special added tokens) and the chat markers.

        Bits per byte sums the loss over tokens with bytes > 0 and divides by their bytes, so it
        does not depend on the tokenizer and compares models with different vocabularies.
        """
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# SentencePiece.

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _wire(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a serialized protobuf message."""
    pos, n = 0, len(data)

    def varint():
        nonlocal pos
        out = shift = 0
        while True:
            b = data[pos]
            pos += 1
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    while pos < n:
        key = varint()
        field, kind = key >> 3, key & 7
        if kind == 0:
            value = varint()
        elif kind == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif kind == 2:
            size = varint()
            value, pos = data[pos:pos + size], pos + size
        elif kind == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"protobuf wire type {kind} is not supported")
        yield field, kind, value


def sp_proto(proto: bytes) -> dict:
    """The parts of a serialized SentencePiece ModelProto a conversion needs, read straight from
    the wire format (no generated protobuf module: its version can clash with the installed
    protobuf runtime). Messages that appear twice merge, as a protobuf parser does."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, object] = {}
    normalizer: dict[int, object] = {}
    for field, _, value in _wire(proto):
        if field == 1:
            piece, score, kind = "", 0.0, _NORMAL
            for f, _, v in _wire(value):
                if f == 1:
                    piece = v.decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
        elif field == 2:
            trainer.update((f, v) for f, _, v in _wire(value))
        elif field == 3:
            normalizer.update((f, v) for f, _, v in _wire(value))
    return {
        "pieces": pieces,
        "model_type": {1: "unigram", 2: "bpe", 3: "word", 4: "char"}[trainer.get(3, 1)],
        "byte_fallback": bool(trainer.get(35, False)),
        "precompiled_charsmap": bytes(normalizer.get(2, b"")),
        "add_dummy_prefix": bool(normalizer.get(3, True)),
        "remove_extra_whitespaces": bool(normalizer.get(4, True)),
        "escape_whitespaces": bool(normalizer.get(5, True)),
    }


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus the ids and byte lengths the trainer needs."""

    backend = "sentencepiece"

    def __init__(self, path: str):
        super().__init__(path)
        path = self.path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is not a SentencePiece model ({e}).") from None
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.vocab_size)
                                     if sp.is_control(i) or sp.is_unknown(i))
        self.marker_ids = self._markers()
        self._special_ids({"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(),
                           "eos": sp.eos_id()})
        missing = [name for name, i in (("pad", self.pad_id), ("bos", self.bos_id),
                                        ("eos", self.eos_id)) if i < 0]
        missing += [m for m in chat_template.MARKERS if m not in self.marker_ids]
        if missing:
            raise UserError(f"{path} was not trained by t5x_like (it lacks {', '.join(missing)}); "
                            "train one with data.tokenizer='' or bring a published model in with "
                            "python -m t5x_like.hf import.")

    def _adds_bos(self) -> bool:
        return True  # every SentencePiece model here is used with bos first, as Llama's are

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.vocab_size else None

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return None if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i) else i

    def is_byte(self, i: int) -> bool:
        return self.sp.is_byte(int(i))

    def id_to_bytes(self, i: int) -> bytes:
        i = int(i)
        if i in self.special_ids or not 0 <= i < self.vocab_size:
            return b""
        if self.sp.is_byte(i):  # "<0xE2>"
            return bytes([int(self.sp.id_to_piece(i)[3:-1], 16)])
        return self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

    def proto(self) -> dict:
        return sp_proto(self.sp.serialized_model_proto())

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        markers = set(self.marker_ids.values())
        for i in range(self.vocab_size):
            if i in self.special_ids or i in markers:
                continue
            if self.sp.is_byte(i):
                out[i] = 1
            else:
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers (tokenizer.json).

@functools.lru_cache(maxsize=1)
def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the character that stands for each byte -> the byte."""
    visible = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
    chars, n = {}, 0
    for b in range(256):
        if b in visible:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def _components(node) -> Iterator[dict]:
    """A tokenizer.json component and, for a Sequence, its parts."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("normalizers", "pretokenizers", "decoders", "processors"):
        for part in node.get(key) or []:
            yield from _components(part)


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json, encoding as transformers does (no bos/eos added)."""

    backend = "hf"

    def __init__(self, path: str):
        import tokenizers

        super().__init__(path)
        path = self.path
        try:
            self.tk = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception
            raise UserError(f"{path} is not a tokenizer.json the `tokenizers` library reads "
                            f"({str(e).splitlines()[0]}).") from None
        self.tk.no_truncation()  # a release's own settings would cut or pad every encoding
        self.tk.no_padding()
        spec = _read_json(path)
        model = spec.get("model") or {}
        self.model_type = model.get("type") or ""
        self._byte_fallback = bool(model.get("byte_fallback"))
        self.byte_level = any(c.get("type") == "ByteLevel"
                              for c in _components(spec.get("decoder")))
        self._post_bos = any(c.get("type") == "TemplateProcessing" for c in _components(
            spec.get("post_processor")))
        vocab = self.tk.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.added = {int(i): t for i, t in self.tk.get_added_tokens_decoder().items()}
        self.special_ids = frozenset(i for i, t in self.added.items() if t.special)
        self.marker_ids = self._markers()
        unk = model.get("unk_token")
        self._special_ids({"unk": self.piece_to_id(unk) if isinstance(unk, str) else -1})
        if self.bos_id < 0 or self.eos_id < 0:
            raise UserError(f"{path}: no {'bos' if self.bos_id < 0 else 'eos'} token is named "
                            "by tokenizer_config.json, special_tokens_map.json or "
                            "generation_config.json beside it; put the model's own files there "
                            "(python -m t5x_like.hf import copies them).")

    def _adds_bos(self) -> bool:
        return self._post_bos

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str | None:
        return self.tk.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self.tk.token_to_id(piece)

    def is_byte(self, i: int) -> bool:
        piece = self.tk.id_to_token(int(i))
        return bool(self._byte_fallback and piece and re.fullmatch(r"<0x[0-9A-F]{2}>", piece))

    def id_to_bytes(self, i: int) -> bytes:
        i = int(i)
        piece = self.tk.id_to_token(i)
        if piece is None or i in self.special_ids or i == self.unk_id:
            return b""
        if i in self.added:  # added text (not special): matched and kept as written
            return self.added[i].content.encode("utf-8")
        if self.byte_level:  # each character stands for one byte
            chars = _byte_level_chars()
            return bytes(chars[c] for c in piece)
        if self._byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece-style pieces

    def token_bytes(self) -> np.ndarray:
        out = np.zeros(self.vocab_size, np.int32)
        markers = set(self.marker_ids.values())
        for i in range(self.vocab_size):
            if i not in markers:
                out[i] = len(self.id_to_bytes(i))
        return out


# ---------------------------------------------------------------------------------------------
# SentencePiece -> tokenizer.json.

def to_tokenizer_json(tok: SentencePieceTokenizer) -> str:
    """The SentencePiece model as a tokenizer.json that encodes and decodes to the same ids
    (what export ships, so transformers needs no conversion and every architecture's loader
    reads the same tokenizer).

    SentencePiece's BPE merges the adjacent pair whose merged piece scores highest: a BPE whose
    merges are every (left, right) split of every normal piece, ranked by that piece's score,
    does the same. Its normalizer runs once over the whole text (dummy prefix, spaces as
    U+2581), and user-defined pieces (the chat markers) are matched on the normalized text, so
    they are added tokens with normalized=true; control pieces (pad, bos, eos) are special
    added tokens, which SentencePiece never matches in text (transformers does).
    """
    from tokenizers import AddedToken, Regex, Tokenizer as HFTok, decoders, models
    from tokenizers import normalizers, processors

    spec = tok.proto()
    pieces = spec["pieces"]
    if len(pieces) != tok.vocab_size:
        raise UserError(f"{tok.path}: could not read its pieces ({len(pieces)} of "
                        f"{tok.vocab_size}); export it with the tokenizer.model only.")
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    unk = tok.id_to_piece(tok.unk_id) if tok.unk_id >= 0 else None
    if spec["model_type"] == "bpe":
        normal = {p: (s, i) for i, (p, s, kind) in enumerate(pieces) if kind == _NORMAL}
        ranked = sorted((-score, i, p[:k], p[k:]) for p, (score, i) in normal.items()
                        for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal)
        model = models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked],
                           unk_token=unk, fuse_unk=True, byte_fallback=spec["byte_fallback"],
                           dropout=None)
    elif spec["model_type"] == "unigram":
        model = models.Unigram([(p, s) for p, s, _ in pieces], tok.unk_id,
                               spec["byte_fallback"])
    else:
        raise UserError(f"{tok.path} is a SentencePiece {spec['model_type']} model; export "
                        "converts only bpe and unigram models.")
    out = HFTok(model)
    steps = []
    if spec["precompiled_charsmap"]:
        steps.append(normalizers.Precompiled(spec["precompiled_charsmap"]))
    if spec["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if spec["add_dummy_prefix"]:
        # Once, before the whole text; not before a text that is exactly a user-defined piece:
        # that is how the pieces themselves are normalized, for matching in normalized text.
        whole = "|".join(re.escape(p) for p, _, kind in pieces if kind == _USER_DEFINED)
        steps.append(normalizers.Replace(Regex(rf"\A(?!(?:{whole})\z)" if whole else r"\A"),
                                         " "))
    if spec["escape_whitespaces"]:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if steps:
        out.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace("\u2581", " ")]
    if spec["byte_fallback"]:
        parts.append(decoders.ByteFallback())
    parts.append(decoders.Fuse())
    if spec["add_dummy_prefix"]:
        parts.append(decoders.Strip(" ", 1, 0))
    out.decoder = decoders.Sequence(parts)
    added = []
    for i, (p, _, kind) in enumerate(pieces):
        if kind == _USER_DEFINED:
            added.append(AddedToken(p, special=False, normalized=True))
        elif kind in (_CONTROL, _UNKNOWN):
            added.append(AddedToken(p, special=True, normalized=False))
    out.add_tokens(added)
    ids = {t.content: i for i, t in out.get_added_tokens_decoder().items()}
    assert all(ids[t.content] == vocab[t.content] for t in added), "added tokens moved"
    if tok.bos_id >= 0:
        bos = tok.id_to_piece(tok.bos_id)
        out.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.bos_id)])
    return out.to_str(pretty=True)


# ---------------------------------------------------------------------------------------------
# Streaming.

class StreamDecoder:
    """Generated ids one at a time in, text out only once it is complete.

        stream = StreamDecoder(tok, context=prompt_ids)
        for i in generated:          # stop on tok.stop_ids (or the template's) before adding
            send(stream.add(i))      # "" while a character is still incomplete
        send(stream.flush())

    A byte-level or byte-fallback piece may end in the middle of a character: its text is held
    until the bytes that complete it arrive, so no U+FFFD is emitted for valid UTF-8 output.
    Each call decodes a short window (the tokens since the last emitted text, plus the ones
    before it), which keeps the leading-space rules of SentencePiece decoders right; `context`
    (the prompt's last ids) gives the first generated token its left neighbour.
    The pieces joined equal decode(generated ids) (after the context).
    """

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids = [int(i) for i in list(context)[-4:]]
        self.prefix = 0  # window start: decoded again only for its effect on what follows
        self.read = len(self.ids)  # text of ids before this was emitted

    def add(self, token: int) -> str:
        self.ids.append(int(token))
        return self._new_text(final=False)

    def flush(self) -> str:
        """Whatever is left (an invalid byte sequence at the very end, as U+FFFD)."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        before = self.tok.decode(self.ids[self.prefix:self.read])
        now = self.tok.decode(self.ids[self.prefix:])
        if not final and now.endswith("\ufffd"):
            return ""  # a character still incomplete
        if now.startswith(before):
            k = len(before)
        else:  # held bytes of the context completed: emit from where the two differ
            k = next((j for j, (a, b) in enumerate(zip(before, now)) if a != b),
                     min(len(before), len(now)))
        if len(now) <= k:
            return ""  # nothing visible yet (a special token): keep the window
        self.prefix, self.read = self.read, len(self.ids)
        return now[k:]


# ---------------------------------------------------------------------------------------------
# Hugging Face files in and out (t5x_like.hf import/export).

def chat_ready_json(path: str) -> tuple[str | None, list[str], int]:
    """tokenizer.json at `path` with the chat markers it lacks appended as added tokens: ids
    after its own, each one token wherever it appears, decoded as text. Returns the new JSON
    (None when nothing is added: the file is kept byte for byte), the added markers, and the
    number of ids before them."""
    import tokenizers

    spec = _read_json(path)
    try:
        tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises a bare Exception
        raise UserError(f"{path} is not a tokenizer.json the `tokenizers` library reads "
                        f"({str(e).splitlines()[0]}).") from None
    vocab = tk.get_vocab(with_added_tokens=True)
    before = max(vocab.values()) + 1 if vocab else 0
    added = [m for m in chat_template.MARKERS if m not in vocab]
    if not added:
        return None, [], before
    spec.setdefault("added_tokens", [])
    spec["added_tokens"] += [{"id": before + k, "content": m, "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False,
                              "special": False} for k, m in enumerate(added)]
    text = json.dumps(spec, ensure_ascii=False, indent=2)
    check = tokenizers.Tokenizer.from_str(text)
    assert [check.token_to_id(m) for m in added] == list(range(before, before + len(added)))
    return text, added, before


def write_files(folder: str, tokenizer_path: str, *, hf_dir: str = "",
                generation: dict | None = None, added: Sequence[tuple[str, int, bool]] = ()):
    """Copies the sidecars of the tokenizer at `tokenizer_path` (else of `hf_dir`) into
    `folder`; tokenizer_config.json's added_tokens_decoder gains the `added` (content, id,
    special) tokens; without a generation_config.json one is written from `generation`
    (config.json's bos/eos/pad_token_id), so the model's stop ids travel with it."""
    for name in SIDECARS:
        src = next((p for p in (os.path.join(os.path.dirname(tokenizer_path), name),
                                os.path.join(hf_dir, name) if hf_dir else "")
                    if p and os.path.isfile(p)), None)
        dst = os.path.join(folder, name)
        if name == "tokenizer_config.json" and src and added:
            config = _read_json(src)
            if isinstance(config.get("added_tokens_decoder"), dict):
                config["added_tokens_decoder"].update({
                    str(i): {"content": t, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False, "special": special}
                    for t, i, special in added})
            _write_json(dst, config)
        elif src:
            shutil.copyfile(src, dst)
        elif name == "generation_config.json" and generation:
            _write_json(dst, dict(generation))


def _write_json(path: str, content: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


# Qwen2Tokenizer (transformers), which transformers builds for every qwen2 model whatever
# tokenizer_config.json declares: these parts, with the vocabulary and merges of tokenizer.json.
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}"""
                r"""\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def qwen2_compatible(tok: Tokenizer) -> bool:
    """Whether transformers' Qwen2Tokenizer, rebuilt from this tokenizer's vocabulary and
    merges, encodes as it does: a byte-level BPE with Qwen's NFC normalizer and split."""
    if tok.backend != "hf":
        return False
    spec = _read_json(tok.path)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers") or []
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
            and (spec.get("normalizer") or {}).get("type") == "NFC" and len(parts) == 2
            and parts[0].get("type") == "Split"
            and (parts[0].get("pattern") or {}).get("Regex") == _QWEN2_SPLIT
            and str(parts[0].get("behavior")).lower() == "isolated" and not parts[0].get("invert")
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("add_prefix_space")
            and not parts[1].get("use_regex", True) and tok.byte_level)


def export_files(tok: Tokenizer, folder: str, *, max_len: int, template: str | None = None,
                 stop_ids: Sequence[int] = ()) -> list[str]:
    """Writes the tokenizer files a Hugging Face release has into `folder`; returns their
    names. A tokenizer.json tokenizer: its files as imported (tokenizer.json with any markers
    the import added), byte for byte unless `template` (a Jinja chat template other than the
    files' own) or `stop_ids` (ids generation must also stop on) change tokenizer_config.json /
    generation_config.json. A SentencePiece tokenizer: tokenizer.model, the equivalent
    tokenizer.json (to_tokenizer_json: transformers loads it as it is, for every architecture,
    with no conversion), and config files naming its special tokens."""
    written = []

    def put(name, content):
        if isinstance(content, dict):
            _write_json(os.path.join(folder, name), content)
        else:
            with open(os.path.join(folder, name) + ".tmp", "w", encoding="utf-8") as f:
                f.write(content)
            os.replace(os.path.join(folder, name) + ".tmp", os.path.join(folder, name))
        written.append(name)

    side = {os.path.basename(p): p for p in tok.files[1:]}
    if tok.backend == "hf":
        shutil.copyfile(tok.path, os.path.join(folder, HF_FILE))
        written.append(HF_FILE)
        config = _read_json(side["tokenizer_config.json"]) if "tokenizer_config.json" in side \
            else None
    else:
        shutil.copyfile(tok.path, os.path.join(folder, SP_FILE))
        written.append(SP_FILE)
        put(HF_FILE, to_tokenizer_json(tok))
        piece = tok.id_to_piece
        specials = {f"{k}_token": piece(getattr(tok, f"{k}_id")) for k in _SPECIAL_KEYS
                    if getattr(tok, f"{k}_id") >= 0}
        kept = _read_json(side["tokenizer_config.json"]) if "tokenizer_config.json" in side \
            else {}
        # Its chat template and other settings as imported; the class that reads
        # tokenizer.json as it is (a named class rebuilds its own pipeline from the pieces).
        config = {**{k: v for k, v in kept.items() if k not in (
                     "added_tokens_decoder", "tokenizer_class", "auto_map", "tokenizer_file",
                     "vocab_file", "sp_model_kwargs", "additional_special_tokens",
                     "extra_special_tokens", "add_prefix_space")},
                  "tokenizer_class": "TokenizersBackend", **specials,
                  "additional_special_tokens": list(tok.marker_ids),
                  "add_bos_token": True, "add_eos_token": False, "model_max_length": max_len,
                  "clean_up_tokenization_spaces": False, "legacy": False}
        put("special_tokens_map.json", {**specials,
                                        "additional_special_tokens": list(tok.marker_ids)})
    if config is not None and template is not None and config.get("chat_template") != template:
        config["chat_template"] = template
    if config is not None:
        if "tokenizer_config.json" in side and tok.backend == "hf" and config == _read_json(
                side["tokenizer_config.json"]):
            shutil.copyfile(side["tokenizer_config.json"],
                            os.path.join(folder, "tokenizer_config.json"))
            written.append("tokenizer_config.json")
        else:
            put("tokenizer_config.json", config)
    for name in ("special_tokens_map.json",):
        if tok.backend == "hf" and name in side:
            shutil.copyfile(side[name], os.path.join(folder, name))
            written.append(name)
    if "chat_template.jinja" in side and (template is None or template == tok.chat_template):
        shutil.copyfile(side["chat_template.jinja"], os.path.join(folder, "chat_template.jinja"))
        written.append("chat_template.jinja")
    gen = _read_json(side["generation_config.json"]) if "generation_config.json" in side else {
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        **({"pad_token_id": tok.pad_id} if tok.pad_id >= 0 else {})}
    eos = _ids(gen.get("eos_token_id")) or [tok.eos_id]
    more = [i for i in stop_ids if i not in eos]
    if more or "generation_config.json" not in side:
        gen = {**gen, "eos_token_id": (eos + more) if len(eos + more) > 1 else eos[0]}
        put("generation_config.json", gen)
    else:
        shutil.copyfile(side["generation_config.json"],
                        os.path.join(folder, "generation_config.json"))
        written.append("generation_config.json")
    return written
