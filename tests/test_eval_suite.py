"""The suite runner on an untrained model: likelihood sums (bits per byte by hand), prompts
that must be shortened, batched generation in the original order, and suite validation."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import chat_template, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.modeling import decoding
from t5x_like.evaluation import eval_suite
from t5x_like.evaluation import eval_tasks
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.core import runs
from t5x_like.core.errors import UserError

TEXT = "Grüße aus Köln: 12 + 30 = 42.\nWhat is 7 - 9? -2 日本"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    texts = [synthetic.text_document(i) for i in range(300)]
    texts += [m["content"] for i in range(300) for m in synthetic.dialogue(i)]
    tok = tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "t.model"),
                              vocab_size=400)
    model_cfg = dict(vocab_size=512, vocab_multiple=128, hidden_dim=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64,
                     rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, dropout=0.0,
                     dtype="float32", param_dtype="float32", scan_layers=True, remat="none",
                     loss_chunk=16)  # the chunked loss, checked against numpy below
    cfg = ml_collections.FrozenConfigDict({"model": model_cfg})
    graphdef, _, _ = model.abstract_model(cfg.model)
    params = model.init_params(cfg.model, seed=1)
    mesh = partitioning.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1}),
                                  jax.devices()[:1])
    return runs.Run(cfg, tok, graphdef, params, 0, mesh)


def direct_stats(run, tokens, weights):
    """Reference: the model on the whole sequence, log-softmax in numpy."""
    logits = np.asarray(model.apply(run.graphdef, run.params, jnp.asarray([tokens[:-1]])))[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = np.asarray(tokens[1:])
    nll = -logp[np.arange(len(targets)), targets]
    w = np.asarray(weights[1:], np.float64)
    nbytes = run.tokenizer.token_bytes()[targets]
    return {"loss": (w * nll).sum() / w.sum(),
            "accuracy": (w * (logits.argmax(-1) == targets)).sum() / w.sum(),
            "bits_per_byte": (w * nll * (nbytes > 0)).sum() / (math.log(2) * (w * nbytes).sum()),
            "bytes": (w * nbytes).sum()}


def test_bits_per_byte_by_hand_with_a_uniform_model(run):
    """lm_head = 0 makes every logit 0: each target costs ln(V) nats, V the padded vocab.
    TEXT is 57 UTF-8 bytes: Grüße (7) + " aus " (5) + Köln (5) + ": 12 + 30 = 42." (15) + newline
    (1) + "What is 7 - 9? -2 " (18) + 日本 (6).
    So bits/byte = (tokens that stand for text) * log2(V) / (UTF-8 bytes of the text)."""
    flat = dict(run.params, lm_head=jnp.zeros_like(run.params["lm_head"]))
    uniform = runs.Run(run.cfg, run.tokenizer, run.graphdef, flat, 0, run.mesh)
    got = eval_suite.likelihood(uniform, [{"text": TEXT}], batch_size=1)
    n_tokens = len(run.tokenizer.encode(TEXT))
    vocab = run.cfg.model.vocab_size
    assert len(TEXT.encode("utf-8")) == 57 and n_tokens + 2 < 64  # one piece, no cut
    assert got["bits_per_byte"] == pytest.approx(n_tokens * math.log2(vocab) / 57, rel=1e-6)
    assert got["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert got["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert got["tokens"] == n_tokens + 1  # every token after bos, eos included


def test_likelihood_equals_a_direct_computation(run):
    tok = run.tokenizer
    tokens = [tok.bos_id, *tok.encode(TEXT), tok.eos_id]
    want = direct_stats(run, tokens, [1.0] * len(tokens))
    assert want["bytes"] == len(TEXT.encode("utf-8"))  # bytes do not depend on the tokenizer
    got = eval_suite.likelihood(run, [{"text": TEXT}], batch_size=2)
    for key in ("loss", "accuracy", "bits_per_byte"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_chat_likelihood_counts_assistant_tokens_only(run):
    conversation = synthetic.dialogue(3, "validation")
    tokens, weights = chat_template.encode(run.tokenizer, conversation)
    want = direct_stats(run, tokens.tolist(), weights.tolist())
    got = eval_suite.likelihood(run, [{"messages": conversation}], batch_size=1)
    assert got["tokens"] == weights[1:].sum() < len(tokens) / 2
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)
    with pytest.raises(UserError, match="has no scored tokens"):
        eval_suite.likelihood(run, [{"messages": conversation[:1] if conversation[0]["role"] == "user"
                                     else conversation[:2]}], batch_size=1, source="x")


def test_long_prompts_are_shortened_to_fit(run):
    tok = run.tokenizer
    long = eval_tasks.Example("x", [{"role": "user", "content": "Summarize: " + "12 + 30 = 42. " * 40}],
                              "12 + 30 = 42. " * 40 + "Q:", ["42"])
    ids, cut = eval_suite.prompt_ids(tok, long, template="chat", system="Be brief.", budget=40)
    assert cut and len(ids) <= 40 and ids[-1] == tok.marker_ids[chat_template.ASSISTANT]
    messages = chat_template.parse(tok, ids[:-1])
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"].startswith("Summarize: 12 + 30")  # the start is kept
    ids, cut = eval_suite.prompt_ids(tok, long, template="plain", system="", budget=20)
    assert cut and len(ids) == 20 and ids[0] == tok.bos_id and tok.decode(ids[1:]).endswith("Q:")
    short = eval_tasks.Example("y", [{"role": "user", "content": "Hi"}], "Hi", ["x"])
    assert eval_suite.prompt_ids(tok, short, template="chat", system="", budget=40) == (
        chat_template.prompt(tok, short.messages), False)
    with pytest.raises(UserError, match="does not fit in the model's context"):
        eval_suite.prompt_ids(tok, long, template="chat", system="Be brief. " * 20, budget=40)


def test_batched_generation_keeps_the_order_whatever_the_batches(run):
    examples = eval_tasks.generation_set("synthetic:arithmetic", data_dir="", n=7).examples
    examples[2].messages[-1]["content"] += " Think about it carefully, please."  # other lengths
    sampling = decoding.Sampling(max_new_tokens=6)
    # One batch of 7 against batches of 4 + 3 that are sorted by prompt length first. The
    # 48-token prompt pads the whole batch to the end of the 64-position context: the decoder
    # must still leave room for the new tokens (it once overwrote its last cache slot).
    whole, truncated = eval_suite.generate(run, examples, sampling, batch_size=7)
    split, _ = eval_suite.generate(run, examples, sampling, batch_size=4)
    assert not any(truncated) and len(whole) == 7
    assert [c.tokens for c in split] == [c.tokens for c in whole]
    for c in whole:
        assert c.text == run.tokenizer.decode(c.tokens).strip()
        # A chat reply never runs into another turn's marker.
        assert not set(c.tokens) & set(run.tokenizer.marker_ids.values())
    # The order is the examples' own: each reply equals the example generated alone.
    [alone], _ = eval_suite.generate(run, examples[2:3], sampling, batch_size=1)
    assert alone.tokens == whole[2].tokens


def test_likelihood_window_sets_where_dialogues_are_cut(run):
    # Scored in windows of the run's max_len (64) by default, a dialogue is one sequence; in
    # windows of 24 it is cut, and the turns after a cut lose their context.
    conversation = next(d for d in (synthetic.dialogue(i, "validation") for i in range(200))
                        if len(chat_template.encode(run.tokenizer, d)[0]) > 48)
    tokens, weights = chat_template.encode(run.tokenizer, conversation)
    want = direct_stats(run, tokens.tolist(), weights.tolist())
    whole = eval_suite.likelihood(run, [{"messages": conversation}], batch_size=1)
    cut = eval_suite.likelihood(run, [{"messages": conversation}], batch_size=1, max_len=24)
    assert whole["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert cut["tokens"] == whole["tokens"] == weights[1:].sum()  # every token still scored
    assert cut["loss"] != pytest.approx(want["loss"], rel=1e-3)


def suite_with(**task):
    from configs.eval import common

    cfg = common.suite()
    cfg.tasks.t = common.task("generate", "synthetic:arithmetic")
    cfg.tasks.t.update(task)
    return cfg


@pytest.mark.parametrize("change, message", [
    (dict(kind="score"), "config key 'tasks.t.kind': is 'score'"),
    (dict(metrics="bleu,blue"), "config key 'tasks.t.metrics': unknown metric 'blue'"),
    (dict(top_p=0.0), "config key 'tasks.t.top_p'"),
    (dict(template="raw"), "config key 'tasks.t.template'"),
    (dict(kind="likelihood", metrics="bleu"), "likelihood tasks always give"),
    (dict(kind="likelihood", max_len=-1), "config key 'tasks.t.max_len'"),
])
def test_suite_validation_names_the_key(change, message):
    with pytest.raises(UserError, match=message):
        eval_suite.validate(suite_with(**change))


def test_suite_validation_unknown_and_missing_keys():
    cfg = suite_with()
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _null():
        cfg.tasks.t.max_new_token = 3
    with pytest.raises(UserError, match="'tasks.t.max_new_token' is unknown. Did you mean "
                                        "'max_new_tokens'"):
        eval_suite.validate(cfg)
    cfg = suite_with()
    cfg.only = "t,u"
    with pytest.raises(UserError, match="config key 'only': no task 'u'"):
        eval_suite.validate(cfg)
    cfg.only = "t"
    assert eval_suite.validate(cfg) == ["t"]


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
