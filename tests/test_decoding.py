"""The KV-cache decoder: equal to full recomputation, and its sampling constraints."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.modeling import decoding
from t5x_like.modeling import model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    texts = [synthetic.text_document(i) for i in range(300)]
    tok = tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "t.model"),
                              vocab_size=400)
    cfg = ml_collections.FrozenConfigDict(dict(
        vocab_size=384, vocab_multiple=128, hidden_dim=32, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64, rope_theta=10000.0, norm_eps=1e-5,
        tie_embeddings=False, dropout=0.0, dtype="float32", param_dtype="float32",
        scan_layers=True, remat="none"))
    graphdef, _, _ = model.abstract_model(cfg)
    params = model.init_params(cfg, seed=3)
    return tok, cfg, graphdef, params


def naive_greedy(graphdef, params, prompt, n, stop, vocab):
    """Reference: recompute the whole sequence for every new token."""
    forward = jax.jit(lambda p, t: model.apply(graphdef, p, t))
    ids, out = list(prompt), []
    for _ in range(n):
        # Right-padded to one length (one compile); causal attention ignores what follows.
        window = np.zeros((1, 64), np.int32)
        window[0, :len(ids)] = ids
        token = int(jnp.argmax(forward(params, window)[0, len(ids) - 1, :vocab]))
        if token in stop:
            break
        ids.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("unstack", [True, False])  # per-layer weights and cache, or a scan
def test_cached_greedy_equals_recomputation_for_a_ragged_batch(setup, unstack):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=4, unstack_layers=unstack)
    assert (decoder._weights[1] is not None) == unstack
    prompts = [[tok.bos_id, *tok.encode(t)] for t in
               ["What is 12 + 30? ", "7", "Q: What is 99 - 1? A: 98\n12 plus", "3 - 4 ="]]
    completions = decoder.generate(prompts, decoding.Sampling(max_new_tokens=12))
    for prompt, completion in zip(prompts, completions):
        assert completion.tokens == naive_greedy(graphdef, params, prompt, 12, {tok.eos_id},
                                                 tok.vocab_size)
        assert completion.text == tok.decode(completion.tokens)
        assert completion.finish_reason in ("length", "stop")


def sample_many(setup, n=8, **kw):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=8)
    prompt = [tok.bos_id, *tok.encode("What is 1")]
    sampling = [decoding.Sampling(max_new_tokens=24, temperature=1.5, seed=s, **kw)
                for s in range(n)]
    return tok, decoder.generate([prompt] * n, sampling)


def test_banned_words_never_appear(setup):
    tok, free = sample_many(setup)
    assert any("1" in c.text or "2" in c.text for c in free)  # they would, unconstrained
    _, banned = sample_many(setup, banned_words=("1", "2"))
    for c in banned:
        assert "1" not in c.text and "2" not in c.text
        assert c.finish_reason in ("length", "stop", "constraint")


def test_banned_token_sequences_and_logit_bias(setup):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=2)
    prompt = [tok.bos_id, *tok.encode("What is")]
    forced = tok.encode("7")[0]
    out = decoder.generate([prompt], decoding.Sampling(max_new_tokens=6,
                                                      logit_bias=((forced, 100.0),)))[0]
    assert out.tokens == [forced] * 6
    pair = (forced, forced)
    out = decoder.generate([prompt], decoding.Sampling(
        max_new_tokens=6, logit_bias=((forced, 100.0),), banned_sequences=(pair,)))[0]
    assert all(a != forced or b != forced for a, b in zip(out.tokens, out.tokens[1:]))
    assert out.tokens[0] == forced
    out = decoder.generate([prompt], decoding.Sampling(max_new_tokens=6,
                                                      logit_bias=((forced, -np.inf),)))[0]
    assert forced not in out.tokens


def test_stop_strings_and_stop_tokens(setup):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=2)
    prompt = [tok.bos_id, *tok.encode("What is")]
    free = decoder.generate([prompt], decoding.Sampling(max_new_tokens=20))[0]
    assert len(free.text) > 3
    stop = free.text[2:4]
    cut = decoder.generate([prompt], decoding.Sampling(max_new_tokens=20,
                                                      stop_strings=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]
    third = free.tokens[2]
    ended = decoder.generate([prompt], decoding.Sampling(max_new_tokens=20,
                                                        stop_tokens=(third,)))[0]
    assert ended.finish_reason == "stop" and ended.tokens == free.tokens[:2]


def test_sampling_controls(setup):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=8)
    prompt = [tok.bos_id, *tok.encode("12 +")]
    greedy = decoder.generate([prompt], decoding.Sampling(max_new_tokens=10))[0]
    # top_k=1 and a tiny top_p leave one token: the greedy choice, at any temperature.
    for s in (decoding.Sampling(max_new_tokens=10, temperature=5.0, top_k=1, seed=1),
              decoding.Sampling(max_new_tokens=10, temperature=5.0, top_p=1e-6, seed=2)):
        assert decoder.generate([prompt], s)[0].tokens == greedy.tokens
    hot = [decoding.Sampling(max_new_tokens=10, temperature=1.5, seed=s) for s in (7, 7, 8)]
    a, b, c = decoder.generate([prompt] * 3, hot)
    assert a.tokens == b.tokens and a.tokens != c.tokens  # a seed reproduces a sample
    # Rows of one batch keep their own settings.
    mixed = decoder.generate([prompt] * 2, [decoding.Sampling(max_new_tokens=10),
                                            decoding.Sampling(max_new_tokens=10, temperature=1.5,
                                                              seed=8)])
    assert mixed[0].tokens == greedy.tokens and mixed[1].tokens == c.tokens


def test_steps_run_ahead_change_nothing(setup):
    """Several steps per device call give token for token what one step per call gives: greedy,
    seeded sampling, and rows whose bans and stops make the host overrule the device's guess."""
    tok, cfg, graphdef, params = setup
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ["What is 1", "12 +", "7", "Q:"]]
    forced = tok.encode("7")[0]
    sampling = [decoding.Sampling(max_new_tokens=21),
                decoding.Sampling(max_new_tokens=21, temperature=1.5, seed=4),
                # The device always proposes `forced` first; the host must refuse every second.
                decoding.Sampling(max_new_tokens=21, temperature=1.2, seed=5,
                                  logit_bias=((forced, 100.0),),
                                  banned_sequences=((forced, forced),)),
                decoding.Sampling(max_new_tokens=13, temperature=1.0, seed=6, top_p=0.9,
                                  stop_strings=("=",))]
    outs, calls = {}, {}
    for per_call in (1, 4, 8):
        decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=4,
                                   steps_per_call=per_call)
        steps, calls[per_call] = decoder._steps, []
        decoder._steps = lambda *a, _steps=steps, _calls=calls[per_call], **kw: (
            _calls.append(kw["n"]) or _steps(*a, **kw))
        outs[per_call] = [(c.tokens, c.finish_reason) for c in decoder.generate(prompts, sampling)]
    assert outs[4] == outs[1] and outs[8] == outs[1]
    steered = outs[1][2][0]
    assert steered.count(forced) >= 5 and (forced, forced) not in zip(steered, steered[1:])
    # One step per call: a call per token after the first. Eight: the ban overruled the device's
    # guess (more calls than 8 + 8 + 4 for 20 tokens), and there were still fewer calls.
    assert len(calls[1]) == 20 and 3 < len(calls[8]) < 20, calls


def test_prompt_too_long_is_refused(setup):
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=1, max_len=32)
    with pytest.raises(ValueError, match="exceeds the decoder's 32 positions"):
        decoder.generate([[tok.bos_id] * 30], decoding.Sampling(max_new_tokens=8))


def test_a_prompt_near_the_cache_limit_still_equals_recomputation(setup):
    """40 prompt tokens pad to 64 = max_len: the padding must leave room for the new tokens."""
    tok, cfg, graphdef, params = setup
    decoder = decoding.Decoder(graphdef, params, cfg, tok, max_batch=1)
    prompt = [tok.bos_id, *tok.encode("What is 12 + 30? " * 6)][:40]
    assert len(prompt) == 40
    completion = decoder.generate([prompt], decoding.Sampling(max_new_tokens=20))[0]
    assert completion.tokens == naive_greedy(graphdef, params, prompt, 20, {tok.eos_id},
                                             tok.vocab_size)


def test_decoding_on_a_sharded_mesh_equals_one_device(tmp_path):
    """Parameters and cache sharded over data x fsdp x tensor (8 fake devices): the same greedy
    tokens as on one device, for a batch that fills the mesh and for a lone prompt."""
    import ml_collections

    import chat_model
    from data_pipelines import chat_template
    from t5x_like.modeling import partitioning
    from t5x_like.core import runs

    path = chat_model.make(str(tmp_path / "model"), max_len=64)
    mesh = partitioning.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2}))
    one, sharded = runs.load(path), runs.load(path, mesh=mesh)
    assert max(len(x.sharding.device_set) for x in jax.tree.leaves(sharded.params)) == 8
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.params))
    tok = one.tokenizer
    prompts = [[tok.bos_id, *tok.encode(t)] for t in ["What is 12 + 30? ", "7", "3 - 4 ="]]
    # A random model may stop at once: ban the stop tokens so every row makes 8 tokens.
    ban = tuple((t, float("-inf")) for t in chat_template.reply_stop_ids(tok))
    sampling = decoding.Sampling(max_new_tokens=8, logit_bias=ban)
    for batch in (prompts, prompts[:1]):
        want = decoding.Decoder.from_run(one, max_batch=4).generate(batch, sampling)
        got = decoding.Decoder.from_run(sharded, max_batch=4).generate(batch, sampling)
        assert [len(c.tokens) for c in want] == [8] * len(batch)
        assert [c.tokens for c in got] == [c.tokens for c in want]
