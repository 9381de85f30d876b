"""SentencePiece: training on a split, and the `Tokenizer` every other module uses.

Trained as BPE (or unigram) with byte fallback (any UTF-8 text round-trips, even characters
never seen in training), digits split one per token (arithmetic stays learnable), whitespace
kept exactly as written (no normalization, no dummy prefix: decode(encode(s)) == s), and the
chat markers reserved as single pieces. Ids: 0 pad, 1 unk, 2 bos, 3 eos, then the markers.

`Tokenizer` reads the special ids from the model itself, so it also opens a published model's
tokenizer brought in by `python -m t5x_like.hf import` (Llama-style: unk 0, bos 1, eos 2, a
dummy-prefix space): that import appends the chat markers (user-defined pieces) and a `<pad>`
control piece such a model lacks, with new embedding rows. Any model must have pad, bos and
eos ids and every chat marker as a single piece; others are refused.
"""

import io
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from data_pipelines import chat_template
from t5x_like.core.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
_MAX_SENTENCE_BYTES = 16384


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
          special_tokens: Sequence[str] = ()) -> "Tokenizer":
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
    tok = Tokenizer(model_path)
    vocab_tmp = f"{model_path}.vocab.tmp{os.getpid()}"
    with open(vocab_tmp, "w", encoding="utf-8") as f:
        for i in range(tok.vocab_size):
            f.write(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i)}\n")
    os.replace(vocab_tmp, os.path.splitext(model_path)[0] + ".vocab")
    return tok


class Tokenizer:
    """A SentencePiece model plus the ids and byte lengths the trainer needs."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise UserError(f"tokenizer {path} does not exist.")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{path} is not a SentencePiece model ({e}).") from None
        self.vocab_size = self.sp.get_piece_size()
        sp = self.sp
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
        self.marker_ids = {m: sp.piece_to_id(m) for m in chat_template.MARKERS}
        missing = [name for name, i in (("pad", self.pad_id), ("bos", self.bos_id),
                                        ("eos", self.eos_id)) if i < 0]
        missing += [m for m, i in self.marker_ids.items() if i == self.unk_id]
        if missing:
            raise UserError(f"{path} was not trained by t5x_like (it lacks {', '.join(missing)}); "
                            "train one with data.tokenizer='' or bring a published model in with "
                            "python -m t5x_like.hf import.")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for; 0 for pad/bos/eos/unk and the chat markers.

        Bits per byte sums the loss over tokens with bytes > 0 and divides by their bytes, so it
        does not depend on the tokenizer and compares models with different vocabularies.
        """
        out = np.zeros(self.vocab_size, np.int32)
        markers = set(self.marker_ids.values())
        for i in range(self.vocab_size):
            if self.sp.is_control(i) or self.sp.is_unknown(i) or i in markers:
                continue
            if self.sp.is_byte(i):
                out[i] = 1
            else:
                out[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out
