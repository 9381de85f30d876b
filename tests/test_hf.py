"""Hugging Face interop, checked against transformers itself (CPU torch, the hf-test extra).

Small random transformers models of several shapes are saved, imported and compared logit for
logit; a trained t5x_like run is exported and loaded by transformers; import -> export returns
the same tensors; unsupported inputs fail naming what is wrong.
"""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from safetensors import safe_open

from conftest import ROOT
from tokenizer_builders import CORPUS, byte_level_bpe
from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import config as config_lib
from t5x_like.training import checkpoints
from t5x_like.interop import hf
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.core import runs
from t5x_like.training import batches as batches_lib
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import lm
from t5x_like.core.errors import UserError

TEXT = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 30? It is 42.",
        "Pack my box with five dozen liquor jugs!", "Sphinx of black quartz, judge my vow."]
TOL = 1e-4  # max abs logit difference, float32
_apply = jax.jit(model.apply, static_argnums=0)


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """A SentencePiece model with Llama's conventions: unk 0, bos 1, eos 2, no pad, no markers,
    a dummy-prefix space, whitespace kept, digits split, byte fallback."""
    path = tmp_path_factory.mktemp("llama_tok") / "tokenizer.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 20), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, hard_vocab_limit=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        minloglevel=2)
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def t5x_tokenizer(tmp_path_factory):
    """One trained the t5x_like way: it already has the chat markers and a pad id."""
    path = tmp_path_factory.mktemp("t5x_tok") / "tokenizer.model"
    return tokenizer_lib.train(TEXT * 20, str(path), vocab_size=400).path


@pytest.fixture
def sentencepiece_protobuf(monkeypatch):
    """transformers reads tokenizer.model through sentencepiece's generated protobuf module,
    which refuses to import under a protobuf runtime older than the one it was generated for
    (apache-beam, beside this stack, pins protobuf<7); transformers ships an equivalent module
    that works with any runtime, put in its place then."""
    try:
        from sentencepiece import sentencepiece_model_pb2  # noqa: F401
    except Exception:
        from transformers.utils import sentencepiece_model_pb2_new

        monkeypatch.setitem(sys.modules, "sentencepiece.sentencepiece_model_pb2",
                            sentencepiece_model_pb2_new)
        monkeypatch.setattr(spm, "sentencepiece_model_pb2", sentencepiece_model_pb2_new,
                            raising=False)


def pieces(path):
    return spm.SentencePieceProcessor(model_file=path).get_piece_size()


def save_hf_model(folder, cls, tokenizer, *, seed=0, dtype=torch.float32, shard=None, **kw):
    """A random transformers model (all weights, norms and biases perturbed), saved to folder."""
    torch.manual_seed(seed)
    config = cls(**kw)
    causal = {transformers.LlamaConfig: transformers.LlamaForCausalLM,
              transformers.MistralConfig: transformers.MistralForCausalLM,
              transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
              transformers.Qwen3Config: transformers.Qwen3ForCausalLM,
              transformers.Gemma2Config: transformers.Gemma2ForCausalLM,
              transformers.Gemma3TextConfig: transformers.Gemma3ForCausalLM,
              transformers.MixtralConfig: transformers.MixtralForCausalLM,
              transformers.Qwen3MoeConfig: transformers.Qwen3MoeForCausalLM}[cls]
    hf_model = causal(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    hf_model.to(dtype).save_pretrained(folder, **kwargs)
    if tokenizer:  # else the caller puts the tokenizer files there
        shutil.copyfile(tokenizer, os.path.join(folder, "tokenizer.model"))
    return hf_model.float()  # bf16 -> f32 is exact: the same weights the import reads


def hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(run, tokens):
    return np.asarray(_apply(run.graphdef, run.params, jnp.asarray(tokens, jnp.int32)))


def small(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
    return {**base, **kw}


CASES = {
    "llama_gqa2_untied": (transformers.LlamaConfig, small(), {}),
    "llama_mqa_tied_llama3_rope": (
        transformers.LlamaConfig,
        small(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
        {"rope_scaling": "llama3"}),
    "llama_mha_biases_linear_rope_head_dim": (
        transformers.LlamaConfig,
        small(num_key_value_heads=4, head_dim=16, attention_bias=True, mlp_bias=True,
              rms_norm_eps=1e-5, rope_theta=1000.0,
              rope_scaling={"rope_type": "linear", "factor": 2.0}),
        {"attn_qkv_bias": True, "attn_out_bias": True, "mlp_bias": True, "head_dim": 16}),
    "mistral_gqa4_extra_vocab_rows": (
        transformers.MistralConfig,
        small(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6,
              sliding_window=None, head_dim=8),
        {"rope_theta": 1e6}),
    "qwen2_qkv_bias_tied": (
        transformers.Qwen2Config, small(tie_word_embeddings=True),
        {"attn_qkv_bias": True, "attn_out_bias": False, "tie_embeddings": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers_and_exports_back(case, tmp_path, llama_tokenizer):
    cls, kw, expect = CASES[case]
    n = pieces(llama_tokenizer)
    vocab = n + 7 if case.startswith("mistral") else n  # rows the tokenizer never produces
    hf_model = save_hf_model(tmp_path / "hf", cls, llama_tokenizer, vocab_size=vocab, **kw)
    out = hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported"))

    # The import is sealed like a trained checkpoint: a scribbled params file is named.
    assert os.path.isfile(os.path.join(out, "checkpoints", "0", checkpoints.MANIFEST))
    run = runs.load(out)
    m = run.cfg.model
    for key, value in expect.items():
        assert m[key] == value, key
    added = len(chat_template.MARKERS) + 1  # the markers and a pad piece
    assert run.tokenizer.vocab_size == n + added
    assert m.unpadded_vocab_size == max(vocab, n + added) and m.vocab_size % 128 == 0

    # Inputs among the tokenizer's pieces: HF rows past them are unused, and the added pieces
    # take the first of those (with new values).
    tokens = np.random.default_rng(0).integers(0, n, (2, 40))
    want = hf_logits(hf_model, tokens)
    got = our_logits(run, tokens)
    assert np.abs(got[..., :n] - want[..., :n]).max() < TOL
    if vocab > n + added:  # HF rows no piece maps to are kept as they were
        assert np.abs(got[..., n + added:vocab] - want[..., n + added:vocab]).max() < TOL
    assert (got[..., m.unpadded_vocab_size:] < -1e8).all()  # padding: never sampled
    assert (got[..., :m.unpadded_vocab_size] > -1e3).all()

    exported = hf.export_model(out, str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    assert back.config.vocab_size == m.unpadded_vocab_size
    assert np.abs(hf_logits(back, tokens) - got[..., :m.unpadded_vocab_size]).max() < TOL


def test_sharded_bfloat16_checkpoint(tmp_path, llama_tokenizer):
    n = pieces(llama_tokenizer)
    hf_model = save_hf_model(tmp_path / "hf", transformers.LlamaConfig, llama_tokenizer,
                             dtype=torch.bfloat16, shard="30KB", vocab_size=n, **small())
    assert os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]) > 2
    run = runs.load(hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported")))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.params))
    tokens = np.random.default_rng(1).integers(0, n, (2, 16))
    diff = np.abs(our_logits(run, tokens)[..., :n] - hf_logits(hf_model, tokens)[..., :n])
    assert diff.max() < TOL
    # Exported back in bfloat16, every tensor is bit-identical to the original shards.
    exported = hf.export_model(str(tmp_path / "imported"), str(tmp_path / "exported"),
                               dtype="bfloat16")
    original, again = read_tensors(tmp_path / "hf"), read_tensors(exported)
    for name, value in original.items():
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            value_again = again[name][:n]
        else:
            value_again = again[name]
        assert value_again.dtype == value.dtype and np.array_equal(value_again, value), name


def test_imported_model_restores_onto_a_sharded_mesh(tmp_path, llama_tokenizer):
    # The biases carry logical axis names like every parameter: fsdp and tensor shard them.
    n = pieces(llama_tokenizer)
    save_hf_model(tmp_path / "hf", transformers.LlamaConfig, llama_tokenizer, vocab_size=n,
                  **small(attention_bias=True, mlp_bias=True))
    out = hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported"))
    mesh_cfg = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
    mesh = partitioning.make_mesh(mesh_cfg, jax.devices()[:8])
    sharded, single = runs.load(out, mesh=mesh), runs.load(out)
    spec = sharded.params["layers"]["q_bias"].sharding.spec
    assert tuple(spec)[:2] == (None, "tensor")  # (layers, heads, head_dim)
    tokens = np.random.default_rng(2).integers(0, n, (2, 16))
    with jax.set_mesh(mesh):
        got = our_logits(sharded, tokens)
    np.testing.assert_allclose(got, our_logits(single, tokens), atol=1e-5)


def read_tensors(folder):
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_round_trip_gives_identical_tensors(tmp_path, t5x_tokenizer, llama_tokenizer):
    # A tokenizer that already has the markers and a pad id: nothing is added, every tensor
    # and the vocabulary come back exactly. Qwen2's q/k/v biases with a SentencePiece
    # tokenizer come back as LlamaForCausalLM (zero o_proj biases: the same function), since
    # transformers would load any qwen2 model's tokenizer as Qwen2's byte-level one.
    n = pieces(t5x_tokenizer)
    save_hf_model(tmp_path / "hf", transformers.Qwen2Config, t5x_tokenizer, vocab_size=n,
                  **small())
    hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported"))
    hf.export_model(str(tmp_path / "imported"), str(tmp_path / "exported"))
    original, again = read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "exported")
    zero_biases = {f"model.layers.{i}.self_attn.o_proj.bias" for i in range(2)}
    assert set(again) - set(original) == zero_biases and set(original) <= set(again)
    assert not any(again[name].any() for name in zero_biases)
    for name in original:
        assert again[name].dtype == original[name].dtype
        assert np.array_equal(again[name], original[name]), name
    assert ((tmp_path / "exported" / "tokenizer.model").read_bytes()
            == (tmp_path / "hf" / "tokenizer.model").read_bytes())
    a = json.loads((tmp_path / "hf" / "config.json").read_text())
    b = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert (a["architectures"], b["architectures"]) == (["Qwen2ForCausalLM"], ["LlamaForCausalLM"])
    assert b["attention_bias"] and not b["mlp_bias"]
    tok = tokenizer_lib.load(t5x_tokenizer)  # and its tokenizer loads to our ids
    assert _auto_ids(tmp_path / "exported", CORPUS) == (
        "TokenizersBackend", [[tok.bos_id, *tok.encode(t)] for t in CORPUS])
    for key in ("vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert a[key] == b[key], key

    # A Llama-style tokenizer gains the markers and a pad piece: their rows are appended (as
    # the mean of the others), every original value is unchanged.
    n = pieces(llama_tokenizer)
    save_hf_model(tmp_path / "hf2", transformers.LlamaConfig, llama_tokenizer, vocab_size=n,
                  **small())
    hf.import_model(str(tmp_path / "hf2"), str(tmp_path / "imported2"))
    hf.export_model(str(tmp_path / "imported2"), str(tmp_path / "exported2"))
    original, again = read_tensors(tmp_path / "hf2"), read_tensors(tmp_path / "exported2")
    assert sorted(original) == sorted(again)
    added = len(chat_template.MARKERS) + 1
    for name, value in original.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert again[name].shape == (n + added, value.shape[1])
            assert np.array_equal(again[name][:n], value), name
            np.testing.assert_allclose(again[name][n:], np.broadcast_to(
                value.mean(axis=0), (added, value.shape[1])), rtol=1e-5, atol=1e-7)
        else:
            assert np.array_equal(again[name], value), name


def test_imported_tokenizer_is_chat_ready(tmp_path, llama_tokenizer, sentencepiece_protobuf):
    n = pieces(llama_tokenizer)
    save_hf_model(tmp_path / "hf", transformers.LlamaConfig, llama_tokenizer, vocab_size=n,
                  **small())
    out = hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported"))
    tok = tokenizer_lib.Tokenizer(os.path.join(out, "tokenizer.model"))
    original = spm.SentencePieceProcessor(model_file=llama_tokenizer)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)  # the model's own ids
    assert tok.pad_id == n + len(chat_template.MARKERS)
    assert sorted(tok.marker_ids.values()) == list(range(n, n + len(chat_template.MARKERS)))
    for text in TEXT + ["naïve café 日本 🤖"]:
        assert tok.encode(text) == original.encode(text)  # ordinary text: unchanged
        assert tok.decode(tok.encode(text)) == text
    for marker, i in tok.marker_ids.items():  # one token, wherever it appears
        ids = tok.encode(f"x{marker}y")
        assert ids.count(i) == 1 and all(t < n or t == i for t in ids)
    # Special tokens stand for no bytes of text (bits per byte stays comparable).
    table = tok.token_bytes()
    assert all(table[i] == 0 for i in [tok.pad_id, tok.bos_id, tok.eos_id,
                                       *tok.marker_ids.values()])
    assert json.loads((tmp_path / "imported" / "config.json").read_text())["model"][
        "unpadded_vocab_size"] == tok.vocab_size

    # Exported (with the equivalent tokenizer.json), transformers reads it with the same ids for
    # any text: leading spaces, markers, whitespace runs, CJK, emoji.
    hf_tok = transformers.AutoTokenizer.from_pretrained(
        hf.export_model(out, str(tmp_path / "exported")))
    for text in CORPUS:
        assert hf_tok(text)["input_ids"] == [tok.bos_id, *tok.encode(text)], text
    assert hf_tok.pad_token_id == tok.pad_id


def _auto_ids(folder, texts):
    auto = transformers.AutoTokenizer.from_pretrained(str(folder))
    return type(auto).__name__, [auto(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("style", ["llama3", "qwen"])
def test_tokenizer_json_model_imports_and_exports_as_it_came(style, tmp_path):
    """A release with tokenizer.json only (Llama 3, Qwen 2.5 style): imported with its own
    tokenizer, special ids, stop ids and chat template, the chat markers added as tokens with new
    rows; exported with the same files, loaded by transformers to the same ids we encode."""
    cls = transformers.LlamaConfig if style == "llama3" else transformers.Qwen2Config
    src = tmp_path / "hf"
    byte_level_bpe(src, style, config=False)
    n = tokenizer_lib.load(str(src)).vocab_size
    vocab = n + 7 if style == "qwen" else n  # Qwen's embedding has rows no token uses
    generation = (src / "generation_config.json").read_text()
    hf_model = save_hf_model(src, cls, None, vocab_size=vocab,
                             **small(tie_word_embeddings=style == "qwen"))
    (src / "generation_config.json").write_text(generation)  # the release's, not the default
    out = hf.import_model(str(src), str(tmp_path / "imported"))
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "generation_config.json",
                                       "tokenizer.json", "tokenizer_config.json"]
    run = runs.load(out)
    tok, original = run.tokenizer, tokenizer_lib.load(str(src))
    markers = len(chat_template.MARKERS)
    assert tok.backend == "hf" and tok.vocab_size == n + markers
    assert sorted(tok.marker_ids.values()) == list(range(n, n + markers))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (
        original.bos_id, original.eos_id, original.pad_id, (*original.stop_ids, n + 4))
    assert tok.chat_template == original.chat_template
    assert run.cfg.model.unpadded_vocab_size == max(vocab, n + markers)
    # Text without our markers encodes as the release's own tokenizer does.
    plain = [t for t in CORPUS if not any(m in t for m in chat_template.MARKERS)]
    assert _auto_ids(src, plain)[1] == [
        ([tok.bos_id] if tok.add_bos else []) + tok.encode(t) for t in plain]
    tokens = np.asarray([tok.encode("The quick brown fox 12 + 30, 日本語 🤖")[:24]])
    assert np.abs(our_logits(run, tokens)[..., :n] - hf_logits(hf_model, tokens)[..., :n]
                  ).max() < TOL

    exported = hf.export_model(out, str(tmp_path / "exported"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "exported" / name).read_bytes() == (tmp_path / "imported" /
                                                                name).read_bytes(), name
    cls_name, ids = _auto_ids(exported, CORPUS)
    assert cls_name == ("Qwen2Tokenizer" if style == "qwen" else "TokenizersBackend")
    assert ids == [([tok.bos_id] if tok.add_bos else []) + tok.encode(t) for t in CORPUS]
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == [cls.__name__.replace("Config", "ForCausalLM")]
    back = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    assert back.config.vocab_size == max(vocab, n + markers)
    got = our_logits(run, tokens)[..., :back.config.vocab_size]
    assert np.abs(hf_logits(back, tokens) - got).max() < TOL


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A t5x_like run directory after a few steps of trainer's own sharded train step."""
    from configs import base

    workdir = tmp_path_factory.mktemp("run")
    tok = tokenizer_lib.train(TEXT * 20, str(workdir / "tokenizer.model"), vocab_size=400)
    cfg = base.get_config()
    cfg.model.update(dict(hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=32))
    cfg.data.batch_size = 4
    cfg.optimizer.update(dict(lr=1e-2, warmup_steps=1))
    cfg = config_lib.resolve(cfg, tok.vocab_size)
    config_lib.save_json(cfg, str(workdir / "config.json"))
    T = cfg.model.max_len  # one document per row, padded
    rows = np.full((len(TEXT), T + 1), tok.pad_id, np.int32)
    for i, text in enumerate(TEXT):
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id][:T + 1]
        rows[i, :len(ids)] = ids
    real = rows != tok.pad_id
    batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
             "weights": real[:, 1:].astype(np.float32),
             "segment_ids": real[:, :-1].astype(np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (len(TEXT), 1))}
    mesh = partitioning.make_mesh(cfg.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), partitioning.axis_rules(partitioning.RULES):
        spec = state_lib.state_spec(cfg, mesh)
        state = state_lib.init_state(cfg, spec)
        train_step, _ = lm.compile_steps(cfg, spec, mesh)
        losses = []
        for _ in range(4):
            state, metrics = train_step(state, batches_lib.global_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0]
        ckpt = checkpoints.Checkpointer(checkpoints.checkpoint_dir(str(workdir)),
                                        async_save=False)
        ckpt.save(4, state)
        ckpt.close()
    return str(workdir)


def test_export_of_a_trained_run_loads_in_transformers(trained_run, tmp_path,
                                                       sentencepiece_protobuf):
    run = runs.load(trained_run)
    tok = run.tokenizer
    assert run.cfg.model.vocab_size > tok.vocab_size  # padded: export slices it back
    out = hf.export_model(trained_run, str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert back.config.vocab_size == tok.vocab_size
    assert (back.config.bos_token_id, back.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    ids = [tok.bos_id, *tok.encode("What is 12 + 30? 42")]
    tokens = np.asarray([ids, ids[::-1]])
    ours = our_logits(run, tokens)[..., :tok.vocab_size]
    assert np.abs(hf_logits(back.eval(), tokens) - ours).max() < TOL

    # transformers' tokenizer gives the same ids from the exported tokenizer files.
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in CORPUS:
        assert hf_tok(text)["input_ids"] == [tok.bos_id, *tok.encode(text)], text
        assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=False).endswith(text)
    assert hf_tok.pad_token_id == tok.pad_id

    # bfloat16 export: the same weights, rounded.
    out16 = hf.export_model(trained_run, str(tmp_path / "exported16"), dtype="bfloat16")
    a, b = read_tensors(out), read_tensors(out16)
    for name in a:
        assert b[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(b[name], a[name].astype(jnp.bfloat16))


def test_old_run_configs_read_with_the_original_model(tmp_path):
    saved = {"model": {"hidden_dim": 32, "vocab_size": 128}, "seed": 0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    cfg = config_lib.load_json(str(tmp_path / "config.json"))
    assert cfg.model.unpadded_vocab_size == 0 and cfg.model.rope_scaling == "none"
    assert not (cfg.model.attn_qkv_bias or cfg.model.attn_out_bias or cfg.model.mlp_bias)
    from t5x_like.core import defaults
    model_defaults = defaults.get_config().model
    assert ({k: model_defaults[k] for k in defaults.LATER_MODEL_KEYS}
            == defaults.LATER_MODEL_KEYS)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture
def hf_dir(tmp_path, llama_tokenizer):
    save_hf_model(tmp_path / "hf", transformers.LlamaConfig, llama_tokenizer,
                  vocab_size=pieces(llama_tokenizer), **small())
    return tmp_path / "hf"


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GemmaForCausalLM"], model_type="gemma"),
     "architecture 'GemmaForCausalLM' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_scaling type 'yarn' is not supported"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling type 'dynamic' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=True,
          sliding_window=8, layer_types=["full_attention", "sliding_attention"]),
     "layer_types .* is not supported"),
    (dict(quantization_config={"quant_method": "gptq"}), "'quantization_config' is not supported"),
    (dict(intermediate_size=96), "has shape"),
    (dict(num_hidden_layers=3), "is missing from"),
    (dict(num_hidden_layers=1), "which a model with this config.json does not have"),
    (dict(vocab_size=100), "pieces but"),
])
def test_unsupported_or_inconsistent_input_fails_naming_it(hf_dir, tmp_path, change, message):
    _edit_config(hf_dir, **change)
    with pytest.raises(UserError, match=message):
        hf.import_model(str(hf_dir), str(tmp_path / "out"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # nothing half-written


def test_missing_files_fail_naming_them(hf_dir, tmp_path):
    os.remove(hf_dir / "tokenizer.model")
    with pytest.raises(UserError, match="has no tokenizer.model or tokenizer.json.*--tokenizer"):
        hf.import_model(str(hf_dir), str(tmp_path / "out"))
    os.remove(hf_dir / "model.safetensors")
    with pytest.raises(UserError, match="has no \\*.safetensors"):
        hf.import_model(str(hf_dir), str(tmp_path / "out"))
    with pytest.raises(UserError, match="config.json does not exist"):
        hf.import_model(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(UserError, match="already exists"):
        hf.export_model(str(tmp_path), str(tmp_path / "taken"))


def test_command_line(hf_dir, tmp_path):
    out = tmp_path / "imported"
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.hf", "import", f"--hf_dir={hf_dir}", f"--out={out}",
         "--max_len=48"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model"]["max_len"] == 48
    # The release's generation_config.json (its stop ids) travels with the tokenizer.
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "generation_config.json",
                                       "tokenizer.model"]
    assert os.listdir(out / "checkpoints") == ["0"]
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.hf", "export", f"--workdir={out}",
         f"--out={tmp_path / 'exported'}", "--dtype=float16"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --dtype=float16")


def _cli(*args):
    result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_fine_tune_an_imported_model_end_to_end(hf_dir, tmp_path, sentencepiece_protobuf):
    """README's workflow: import -> fine-tune with init_from -> sample -> export -> transformers."""
    model_dir, run_dir = tmp_path / "imported", tmp_path / "run"
    printed = _cli("t5x_like.hf", "import", f"--hf_dir={hf_dir}", f"--out={model_dir}")
    model_args = [a for a in printed.split() if a.startswith("--config.model.")]
    _cli("t5x_like.train", "--config=configs/pretrain_tiny.py", f"--workdir={run_dir}",
         f"--config.init_from={model_dir}", *model_args, "--config.steps=4",
         "--config.model.max_len=32", "--config.model.dropout=0", "--config.data.batch_size=8",
         "--config.data.synthetic_docs=200", "--config.checkpoint.every_steps=4",
         "--config.eval.steps=1")
    assert _cli("t5x_like.sample", f"--workdir={run_dir}", "--prompt=What is",
                "--max_new_tokens=4").startswith("What is")
    exported = _cli("t5x_like.hf", "export", f"--workdir={run_dir}",
                    f"--out={tmp_path / 'exported'}")
    assert "exported" in exported
    run = runs.load(str(run_dir))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "exported"), attn_implementation="eager").eval()
    tokens = np.asarray([[run.tokenizer.bos_id, *run.tokenizer.encode("What is 1 + 2?")]])
    vocab = run.cfg.model.unpadded_vocab_size
    assert np.abs(hf_logits(back, tokens) - our_logits(run, tokens)[..., :vocab]).max() < TOL


# ---------------------------------------------------------------------------------------------
# The open families: each built once per module (random transformers model -> import), then
# checked for parity beyond the window, KV-cache decoding, export to the same class and back,
# and a sharded train step.

WINDOW = 8  # every family's local layers see 8 keys; the tests run 40 tokens and more
FAMILIES = {
    # A window on every layer, shorter than the sequence.
    "mistral_window": (transformers.MistralConfig, small(sliding_window=WINDOW),
                       {"sliding_window": WINDOW, "global_every": 0}),
    # Query/key norms, tied embeddings, head_dim apart from hidden / heads.
    "qwen3_tied": (transformers.Qwen3Config, small(tie_word_embeddings=True, head_dim=16),
                   {"qk_norm": True, "sliding_window": 0, "tie_embeddings": True}),
    # Local/global alternation, both softcaps (small, so tanh bends), a query scale.
    "gemma2": (transformers.Gemma2Config,
               small(head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=12,
                     attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                     rms_norm_eps=1e-6),
               {"post_norms": True, "norm_plus_one": True, "mlp_activation": "gelu_tanh",
                "embed_scale": True, "sliding_window": WINDOW, "global_every": 2,
                "attn_logit_softcap": 2.0, "final_logit_softcap": 3.0,
                "query_pre_attn_scalar": 12.0}),
    # Every third layer global, its own RoPE base on the local ones and linear scaling on the
    # global ones, untied, query/key norms.
    "gemma3_untied": (transformers.Gemma3TextConfig,
                      small(num_hidden_layers=4, head_dim=8, sliding_window=WINDOW,
                            query_pre_attn_scalar=8, tie_word_embeddings=False,
                            layer_types=["sliding_attention", "sliding_attention",
                                         "full_attention", "sliding_attention"],
                            rope_parameters={
                                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                   "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": 1e4}}),
                      {"qk_norm": True, "post_norms": True, "global_every": 3,
                       "rope_local_theta": 1e4, "rope_theta": 1e6, "rope_scaling": "linear",
                       "tie_embeddings": False}),
    # Mixture of experts: every layer MoE, 4 experts, top 2 renormalized, a window.
    "mixtral": (transformers.MixtralConfig,
                small(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
                {"num_experts": 4, "experts_per_token": 2, "moe_mlp_dim": 64,
                 "router_norm_topk": True, "sliding_window": WINDOW, "dense_layers": ""}),
    # Layer 0 dense (mlp_only_layers), 1 and 2 MoE with narrower experts, top 2 not
    # renormalized, query/key norms.
    "qwen3_moe": (transformers.Qwen3MoeConfig,
                  small(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=16, mlp_only_layers=[0], norm_topk_prob=False,
                        head_dim=16),
                  {"num_experts": 4, "moe_mlp_dim": 16, "mlp_dim": 64, "dense_layers": "0",
                   "router_norm_topk": False, "qk_norm": True}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, t5x_tokenizer):
    """(name, transformers model, imported model directory, its run) for one family."""
    cls, kw, expect = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    # A tokenizer with the markers and a pad id already: import adds nothing, so the
    # vocabulary (and every tensor) comes back from an export unchanged.
    hf_model = save_hf_model(folder / "hf", cls, t5x_tokenizer,
                             vocab_size=pieces(t5x_tokenizer), **kw)
    out = hf.import_model(str(folder / "hf"), str(folder / "imported"))
    run = runs.load(out)
    for key, value in expect.items():
        assert run.cfg.model[key] == value, key
    return request.param, hf_model, out, run


def test_family_logits_match_transformers_beyond_the_window(family):
    name, hf_model, _, run = family
    tokens = np.random.default_rng(3).integers(0, pieces(run.tokenizer.path), (2, 40))
    want, got = hf_logits(hf_model, tokens), our_logits(run, tokens)
    vocab = run.cfg.model.unpadded_vocab_size
    diff = np.abs(got[..., :vocab] - want[..., :vocab])
    print(f"{name}: max abs logit difference {diff.max():.2e}")
    assert diff.max() < TOL
    if run.cfg.model.sliding_window:  # the window matters: full attention gives other logits
        m = ml_collections.ConfigDict(config_lib.to_dict(run.cfg.model))
        m.sliding_window = 0
        full = _apply(model.abstract_model(m)[0], run.params, jnp.asarray(tokens, jnp.int32))
        assert np.abs(np.asarray(full) - got)[:, WINDOW + 1:].max() > 1e-2


def test_family_kv_cache_decoding_equals_a_full_forward(family):
    from t5x_like.modeling import decoding

    name, _, _, run = family
    tok, n = run.tokenizer, 20  # prompt + 20 tokens: several windows
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ["What is 12 + 30?", "Pack my"]]
    forward = jax.jit(lambda p, t: model.apply(run.graphdef, p, t))
    # Per-layer weights and cache (the CPU default) for all; the scan over stacked layers too
    # for Gemma 3 (its local/global flags are scanned data there).
    for unstack in (True, False) if name == "gemma3_untied" else (True,):
        decoder = decoding.Decoder(run.graphdef, run.params, run.cfg.model, tok, max_batch=2,
                                   unstack_layers=unstack)
        got = decoder.generate(prompts, decoding.Sampling(max_new_tokens=n))
        for prompt, completion in zip(prompts, got):
            ids = list(prompt)
            for _ in range(n):  # recompute the whole sequence for every token
                row = np.zeros((1, 64), np.int32)
                row[0, :len(ids)] = ids
                token = int(jnp.argmax(forward(run.params, row)[0, len(ids) - 1,
                                                                 :tok.vocab_size]))
                if token == tok.eos_id:
                    break
                ids.append(token)
            assert completion.tokens == ids[len(prompt):], unstack


def test_family_exports_to_its_class_and_back_bit_identically(family, tmp_path):
    name, hf_model, out, run = family
    exported = hf.export_model(out, str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    assert type(back).__name__ == type(hf_model).__name__
    for key in ("sliding_window", "layer_types", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping", "rope_parameters"):
        assert getattr(back.config, key, None) == getattr(hf_model.config, key, None), key
    tokens = np.random.default_rng(4).integers(0, pieces(run.tokenizer.path), (2, 40))
    vocab = run.cfg.model.unpadded_vocab_size
    assert np.abs(hf_logits(back, tokens) - our_logits(run, tokens)[..., :vocab]).max() < TOL
    original, again = read_tensors(os.path.dirname(out) + "/hf"), read_tensors(exported)
    assert sorted(original) == sorted(again)
    for key, value in original.items():
        assert np.array_equal(again[key], value), key
    # ... and imported again: the same parameters, bit for bit, and the same model config.
    run2 = runs.load(hf.import_model(exported, str(tmp_path / "again")))
    assert config_lib.to_dict(run2.cfg.model) == config_lib.to_dict(run.cfg.model)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 run2.params, run.params)


# Gemma 3 has every new parameter (query/key and post norms) and local/global layers; the other
# families' compiles (about a minute each on 2 cores) run with -m slow.
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name == "gemma3_untied" else pytest.mark.slow)
    for name in FAMILIES])
def test_family_train_step_on_a_mesh_gives_the_loss_of_one_device(name, tiny_cfg):
    from test_sharding import run_steps

    cls, kw, _ = FAMILIES[name]
    cfg = tiny_cfg
    cfg.model.update(hf.model_config_from_hf(cls(**kw).to_dict(), "config.json"))
    cfg.model.max_len = 24  # past the window, in 3 attention blocks
    cfg.model.attention_block = 8
    cfg.model.loss_chunk = 8
    cfg.data.batch_size = 4
    one = config_lib.resolve(cfg.copy_and_resolve_references(), 300)
    cfg.mesh.update(dict(data=2, fsdp=2, tensor=2))
    eight = config_lib.resolve(cfg, 300)
    one_losses, one_params, _ = run_steps(one, jax.devices()[:1], n=2)
    losses, params, _ = run_steps(eight, jax.devices(), n=2)
    np.testing.assert_allclose(losses, one_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 params, one_params)


# Published shapes (Gemma 2 2B, Gemma 3 1B, Qwen3 0.6B, Qwen3-30B-A3B), built by transformers
# on the meta device (no memory): plan's parameter count includes every extra norm of the
# family, and every expert.
PLAN_SHAPES = {
    "gemma2_2b": (transformers.Gemma2Config, dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256)),
    "gemma3_1b": (transformers.Gemma3TextConfig, dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512)),
    "qwen3_0.6b": (transformers.Qwen3Config, dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)),
    "qwen3_30b_a3b": (transformers.Qwen3MoeConfig, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True)),
}


@pytest.mark.parametrize("shape", PLAN_SHAPES)
def test_plan_counts_each_familys_parameters(shape):
    from configs import base
    from t5x_like.experiments import plan

    cls, kw = PLAN_SHAPES[shape]
    config = cls(**kw)
    with torch.device("meta"):
        want = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(
            config).parameters())
    cfg = base.get_config()
    cfg.model.update(hf.model_config_from_hf(config.to_dict(), "config.json", max_len=512))
    cfg.model.vocab_size = config.vocab_size  # a multiple of 128: no padding rows
    cfg.data.batch_size = 8
    out = plan.plan(cfg, plan.Target("test", 8, 80.0, 989.0), compile_step=False)
    assert out["parameters"] == want


@pytest.mark.slow
def test_finetune_hf_recipe_on_an_imported_model(tmp_path, t5x_tokenizer):
    """configs/finetune_hf.py (LoRA SFT) on a small imported Qwen3, then merged and exported
    back to its class."""
    save_hf_model(tmp_path / "hf", transformers.Qwen3Config, t5x_tokenizer,
                  vocab_size=pieces(t5x_tokenizer), **small())
    model_dir = hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported"))
    run_dir = tmp_path / "run"
    _cli("t5x_like.train", "--config=configs/finetune_hf.py", f"--workdir={run_dir}",
         f"--config.init_from={model_dir}", "--config.steps=3", "--config.model.max_len=32",
         "--config.data.batch_size=16", "--config.optimizer.grad_accum_steps=2",
         "--config.data.synthetic_docs=100", "--config.checkpoint.every_steps=3",
         "--config.eval.every_steps=3", "--config.eval.steps=1", "--config.model.dtype=float32")
    _cli("t5x_like.export", "--merge", f"--workdir={run_dir}", f"--out={tmp_path / 'merged'}")
    exported = hf.export_model(str(tmp_path / "merged"), str(tmp_path / "exported"))
    back = transformers.AutoModelForCausalLM.from_pretrained(exported)
    assert type(back).__name__ == "Qwen3ForCausalLM"


def test_bfloat16_gemma_checkpoint_imports_and_exports_bit_identically(tmp_path, t5x_tokenizer):
    # Per-tensor dtype conversion both ways: bfloat16 shards in, float32 parameters, bfloat16
    # out equal to the original bits.
    cls, kw, _ = FAMILIES["gemma2"]
    n = pieces(t5x_tokenizer)
    hf_model = save_hf_model(tmp_path / "hf", cls, t5x_tokenizer, dtype=torch.bfloat16,
                             shard="20KB", vocab_size=n, **kw)
    run = runs.load(hf.import_model(str(tmp_path / "hf"), str(tmp_path / "imported")))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(run.params))
    tokens = np.random.default_rng(5).integers(0, n, (2, 24))
    diff = np.abs(our_logits(run, tokens)[..., :n] - hf_logits(hf_model, tokens)[..., :n])
    assert diff.max() < TOL
    exported = hf.export_model(str(tmp_path / "imported"), str(tmp_path / "exported"),
                               dtype="bfloat16")
    original, again = read_tensors(tmp_path / "hf"), read_tensors(exported)
    assert sorted(original) == sorted(again)
    for name, value in original.items():
        assert again[name].dtype == value.dtype and np.array_equal(again[name], value), name
