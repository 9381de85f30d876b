"""One tokenizer interface, two backends (data_pipelines/tokenizer.py), checked against
transformers' AutoTokenizer on tokenizers built here: byte-level BPE in the Llama 3 and Qwen
styles (tokenizer.json), SentencePiece the t5x_like and the Llama 2 way, and SentencePiece
exported as tokenizer.json. Also: special ids from the model's own files, streaming decode,
bits-per-byte tables, and preparing data with a tokenizer.json."""

import json
import os
import unicodedata

import pytest
import transformers

from data_pipelines import chat_template, prepare
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core.errors import UserError
from t5x_like.interop import hf
from tokenizer_builders import CORPUS, TRAIN, byte_level_bpe, sentencepiece_bpe

ARCHITECTURES = ("llama", "mistral", "qwen3", "gemma2", "gemma3_text")  # qwen2: see test_hf


def auto_ids(auto, text, special=False):
    return auto(text, add_special_tokens=special)["input_ids"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tok")
    return {style: byte_level_bpe(root / style, style) for style in ("llama3", "qwen")}


@pytest.fixture(scope="module")
def sp_tokenizers(tmp_path_factory):
    """t5x_like's own, and a Llama 2-style one made chat-ready as `hf import` does."""
    root = tmp_path_factory.mktemp("sp_tok")
    ours = tokenizer_lib.train(TRAIN, str(root / "tokenizer.model"), vocab_size=400)
    with open(sentencepiece_bpe(root / "raw.model"), "rb") as f:
        proto, _ = hf.chat_ready_tokenizer(f.read(), "raw.model")
    (root / "llama2").mkdir()
    (root / "llama2" / "tokenizer.model").write_bytes(proto)
    return {"t5x_like": ours, "llama2": tokenizer_lib.load(str(root / "llama2"))}


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_tokenizer_json_encodes_as_autotokenizer(hf_dirs, style):
    ours = tokenizer_lib.load(hf_dirs[style])
    auto = transformers.AutoTokenizer.from_pretrained(hf_dirs[style])
    assert type(auto).__name__ == ("Qwen2Tokenizer" if style == "qwen" else "TokenizersBackend")
    assert ours.backend == "hf" and ours.byte_level
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == auto_ids(auto, text), text
        assert auto_ids(auto, text, special=True) == ([ours.bos_id] if ours.add_bos else []) + ids
        assert ours.decode(ids) == auto.decode(ids, skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False)
    assert ours.encode_batch(CORPUS) == [ours.encode(t) for t in CORPUS]
    # Special tokens typed in text are special tokens, as in transformers.
    end = "<|im_end|>" if style == "qwen" else "<|eot_id|>"
    assert ours.encode(f"a{end}b").count(ours.piece_to_id(end)) == 1


def test_special_ids_come_from_the_model_files(hf_dirs, tmp_path):
    llama3, qwen = (tokenizer_lib.load(hf_dirs[s]) for s in ("llama3", "qwen"))
    piece = llama3.piece_to_id
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (
        piece("<|begin_of_text|>"), piece("<|eot_id|>"), -1)  # Llama 3 has no pad token
    assert llama3.stop_ids == (piece("<|eot_id|>"), piece("<|end_of_text|>"))
    assert llama3.add_bos and not qwen.add_bos
    # Qwen names no bos token; its generation_config.json's bos_token_id is <|endoftext|>.
    piece = qwen.piece_to_id
    assert (qwen.bos_id, qwen.eos_id, qwen.pad_id) == (
        piece("<|endoftext|>"), piece("<|im_end|>"), piece("<|endoftext|>"))
    assert qwen.stop_ids == (piece("<|im_end|>"), piece("<|endoftext|>"))
    assert qwen.chat_template.startswith("{% for message in messages %}")
    assert qwen.special_tokens["eos_token"] == "<|im_end|>"
    # A tokenizer.json alone says nothing about bos/eos: refused, naming what to add.
    (tmp_path / "tokenizer.json").write_bytes(open(llama3.path, "rb").read())
    with pytest.raises(UserError, match="no bos token is named by tokenizer_config.json"):
        tokenizer_lib.load(str(tmp_path))
    # Files that disagree (a token the tokenizer lacks) are refused too.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(UserError, match="bos_token '<s>' is not a token"):
        tokenizer_lib.load(str(tmp_path / "tokenizer.json"))


def test_load_find_and_install(hf_dirs, sp_tokenizers, tmp_path):
    sp = sp_tokenizers["t5x_like"]
    for path in (sp.path, os.path.dirname(sp.path)):
        assert isinstance(tokenizer_lib.Tokenizer(path), tokenizer_lib.SentencePieceTokenizer)
    for path in (hf_dirs["qwen"], os.path.join(hf_dirs["qwen"], "tokenizer.json")):
        assert isinstance(tokenizer_lib.Tokenizer(path), tokenizer_lib.HFTokenizer)
    copied = tokenizer_lib.install(hf_dirs["qwen"], str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["generation_config.json", "tokenizer.json",
                                            "tokenizer_config.json"]
    assert tokenizer_lib.same(copied, hf_dirs["qwen"])
    assert not tokenizer_lib.same(copied, hf_dirs["llama3"])
    assert not tokenizer_lib.same(copied, sp.path)
    with pytest.raises(UserError, match="has no tokenizer.model or tokenizer.json"):
        tokenizer_lib.find(str(tmp_path / "nothing"))


@pytest.mark.parametrize("kind", ["t5x_like", "llama2"])
def test_sentencepiece_as_tokenizer_json_encodes_the_same(sp_tokenizers, kind, tmp_path):
    """to_tokenizer_json gives the SentencePiece ids exactly, read by the tokenizers library
    and by AutoTokenizer under every architecture whose loader keeps the declared class."""
    from tokenizers import Tokenizer

    tok = sp_tokenizers[kind]
    converted = Tokenizer.from_str(tokenizer_lib.to_tokenizer_json(tok))
    for text in CORPUS:
        ids = tok.encode(text)
        assert converted.encode(text, add_special_tokens=False).ids == ids, text
        assert converted.decode(ids) == tok.decode(ids)
    for arch in ARCHITECTURES:
        out = tmp_path / arch
        out.mkdir()
        tokenizer_lib.export_files(tok, str(out), max_len=64)
        (out / "config.json").write_text(json.dumps({"model_type": arch}))
        auto = transformers.AutoTokenizer.from_pretrained(str(out))
        for text in CORPUS:
            assert auto_ids(auto, text, special=True) == [tok.bos_id, *tok.encode(text)], \
                (arch, text)
    # The one difference left, as for Llama 2 itself: transformers reads a control token's
    # text typed inside text as that token; SentencePiece spells it in pieces.
    assert auto_ids(auto, "a</s>b") != tok.encode("a</s>b")


def test_autotokenizer_converts_a_tokenizer_model_in_this_environment(sp_tokenizers,
                                                                      tmp_path):
    """Without tokenizer.json transformers converts tokenizer.model through sentencepiece's
    generated protobuf module, which failed beside apache-beam's protobuf<7 ("tiktoken is
    required") until pyproject pinned sentencepiece<0.2.3."""
    tok = sp_tokenizers["t5x_like"]
    tokenizer_lib.export_files(tok, str(tmp_path), max_len=64)
    os.remove(tmp_path / "tokenizer.json")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert [auto_ids(auto, t, special=True) for t in CORPUS] == [
        [tok.bos_id, *tok.encode(t)] for t in CORPUS]


def test_unigram_sentencepiece_converts_too(tmp_path):
    from tokenizers import Tokenizer

    tok = tokenizer_lib.train(TRAIN, str(tmp_path / "u.model"), vocab_size=400,
                              model_type="unigram")
    converted = Tokenizer.from_str(tokenizer_lib.to_tokenizer_json(tok))
    assert all(converted.encode(t, add_special_tokens=False).ids == tok.encode(t)
               for t in CORPUS)


def _streamed(tok, ids, context=()):
    stream = tokenizer_lib.StreamDecoder(tok, context)
    pieces = [stream.add(i) for i in ids]
    return pieces, pieces + [stream.flush()]


def test_streaming_decode_never_breaks_a_character(hf_dirs, sp_tokenizers):
    texts = [t for t in CORPUS if t] + ["日本語🤖" * 5, "👩‍👩‍👧🇫🇷 naïve"]
    tokenizers = {**sp_tokenizers, **{s: tokenizer_lib.load(d) for s, d in hf_dirs.items()}}
    split_chars = 0
    for name, tok in tokenizers.items():
        for text in texts:
            ids = tok.encode(text)
            pieces, everything = _streamed(tok, ids)
            assert not any("\ufffd" in p for p in everything), (name, text, pieces)
            assert "".join(everything) == tok.decode(ids), (name, text)
            split_chars += pieces.count("")
        # After a prompt: the first reply token keeps its leading space (dummy-prefix models).
        prompt, reply = tok.encode("Question: what?"), tok.encode(" Answer: 日本 🤖")
        _, everything = _streamed(tok, reply, context=prompt)
        assert "".join(everything) == tok.decode(prompt + reply)[len(tok.decode(prompt)):]
    assert split_chars > 20  # the byte-level and byte-fallback pieces did split characters
    # Output that is not valid UTF-8 comes out at the end, not lost.
    tok = tokenizers["llama3"]
    lone = [tok.piece_to_id("æ")]  # byte 0xE6 alone: the first of a three-byte character
    assert _streamed(tok, lone)[0] == [""] and _streamed(tok, lone)[1][-1] == "\ufffd"


def test_token_bytes_count_the_text(hf_dirs, sp_tokenizers):
    for name, tok in {**sp_tokenizers,
                      **{s: tokenizer_lib.load(d) for s, d in hf_dirs.items()}}.items():
        table = tok.token_bytes()
        assert table.shape == (tok.vocab_size,)
        for text in CORPUS:
            if not any(m in text for m in (*chat_template.MARKERS, "<|im_", "<|eot", "<|begin")):
                # Qwen normalizes to NFC first: the bytes of what it encodes; Llama 2 adds its
                # dummy-prefix space.
                want = unicodedata.normalize("NFC", text) if name == "qwen" else text
                want = " " + want if name == "llama2" and text else want
                assert sum(table[i] for i in tok.encode(text)) == len(want.encode()), (name, text)
        zero = {tok.bos_id, tok.eos_id, *tok.marker_ids.values(), *tok.special_ids}
        assert all(table[i] == 0 for i in zero if i >= 0)
        # id_to_bytes (the logprobs' bytes): a token's bytes, which join into the text's.
        for text in ("naïve 日本語 🤖\t\n  x", "12 + 30"):
            ids = tok.encode(text)
            want = " " + text if name == "llama2" else text
            assert b"".join(tok.id_to_bytes(i) for i in ids) == want.encode(), (name, text)
            assert [len(tok.id_to_bytes(i)) for i in ids] == [table[i] for i in ids]


def test_prepare_text_with_a_tokenizer_json(tiny_cfg, hf_dirs, tmp_path):
    """data.tokenizer = a tokenizer.json (or its folder): prepared, packed and read back with
    its own ids, the config files travelling with it."""
    from data_pipelines import pipeline

    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox, 日本語 🤖 {i * 7}."
                                for i in range(120)))
    data = tiny_cfg.data
    data.source = f"text:{docs}"
    data.tokenizer = os.path.join(hf_dirs["qwen"], "tokenizer.json")
    got = prepare.prepare(data, str(tmp_path / "cache"))
    tok = tokenizer_lib.load(got.tokenizer_path)
    assert tok.backend == "hf" and os.path.basename(got.tokenizer_path) == "tokenizer.json"
    assert tokenizer_lib.same(got.tokenizer_path, hf_dirs["qwen"])
    encode = pipeline.text_encoder(tok, got.text_field)
    record = got.data_source("train")[0]
    tokens = encode(record)["tokens"].tolist()
    auto = transformers.AutoTokenizer.from_pretrained(hf_dirs["qwen"])
    assert tokens == [tok.bos_id, *auto_ids(auto, record["text"].decode()), tok.eos_id]
    # A folder works as well, and the same tokenizer prepares the same data (cache reused).
    data.tokenizer = hf_dirs["qwen"]
    again = prepare.prepare(data, str(tmp_path / "cache2"))
    assert again.splits == got.splits


def test_foreign_sentencepiece_still_refused(tmp_path):
    path = sentencepiece_bpe(tmp_path / "raw.model")
    with pytest.raises(UserError, match="was not trained by t5x_like"):
        tokenizer_lib.load(path)


def test_a_run_trains_serves_and_exports_with_a_tokenizer_json(tiny_cfg, hf_dirs, tmp_path):
    """data.tokenizer = a Qwen-style tokenizer folder: the run keeps its files (special ids,
    stop ids, chat template), reopens with it, and exports it for transformers unchanged."""
    from t5x_like.core import runs
    from t5x_like.training import trainer

    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox, 日本語 🤖 {i * 7}."
                                for i in range(120)))
    tiny_cfg.data.source = f"text:{docs}"
    tiny_cfg.data.tokenizer = hf_dirs["qwen"]
    tiny_cfg.steps = 2
    workdir = tmp_path / "run"
    trainer.train_and_evaluate(tiny_cfg, str(workdir))
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(
        os.listdir(workdir))
    assert tokenizer_lib.same(str(workdir), hf_dirs["qwen"])
    tok = runs.load(str(workdir)).tokenizer
    original = tokenizer_lib.load(hf_dirs["qwen"])
    assert (tok.backend, tok.vocab_size, tok.stop_ids) == ("hf", original.vocab_size,
                                                           original.stop_ids)
    out = hf.export_model(str(workdir), str(tmp_path / "exported"))
    assert (tmp_path / "exported" / "tokenizer.json").read_bytes() == open(
        original.path, "rb").read()
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert [auto_ids(auto, t) for t in CORPUS] == [tok.encode(t) for t in CORPUS]
