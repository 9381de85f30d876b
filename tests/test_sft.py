"""SFT: the long-conversation policy, packing, empty masks, and starting from a pretrained run."""

import collections
import json

import jax
import numpy as np
import pytest

from data_pipelines import chat_data, pipeline, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import config as config_lib
from t5x_like.modeling import model
from t5x_like.core import runs
from t5x_like.training import trainer
from t5x_like.training.tasks import lm
from t5x_like.core import metrics as metrics_lib
from t5x_like.core.errors import UserError


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [synthetic.text_document(i) for i in range(300)]
    return tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "t.model"),
                               vocab_size=400)


def record(messages):
    return {"messages": json.dumps(messages).encode()}


LONG = [{"role": "system", "content": "You are a careful calculator."}]
for i in range(6):
    LONG += [{"role": "user", "content": f"What is {i} + {i * 7}?"},
             {"role": "assistant", "content": f"{i + i * 7}"}]


def test_long_conversations_follow_the_policy(tok):
    full = chat_data.encoder(tok, loss_on="assistant", max_len=1000, on_long="split")(
        record(LONG))["tokens"]
    max_len = len(full) // 2  # too long by half
    counts = collections.Counter()
    cut = chat_data.encoder(tok, loss_on="assistant", max_len=max_len, on_long="truncate",
                            counts=counts)(record(LONG))
    assert len(cut["tokens"]) <= max_len + 1
    # A prefix of whole messages: the tokens start the full conversation's and end at an <|end|>.
    assert cut["tokens"].tolist() == full[:len(cut["tokens"])].tolist()
    assert cut["tokens"][-1] == tok.marker_ids["<|end|>"] and cut["weights"].any()
    assert counts == {"truncated": 1}
    dropped = chat_data.encoder(tok, loss_on="assistant", max_len=max_len, on_long="drop",
                                counts=counts)(record(LONG))
    assert len(dropped["tokens"]) == 0 and counts["dropped"] == 1
    split = chat_data.encoder(tok, loss_on="assistant", max_len=max_len, on_long="split")(
        record(LONG))
    assert split["tokens"].tolist() == full.tolist()  # the pipeline cuts it into pieces
    # Nothing fits (even the first exchange is too long): dropped and counted.
    tiny = chat_data.encoder(tok, loss_on="assistant", max_len=8, on_long="truncate",
                             counts=counts)(record(LONG))
    assert len(tiny["tokens"]) == 0 and counts["dropped"] == 2


def test_bad_chat_record_names_the_problem(tok):
    encode = chat_data.encoder(tok, loss_on="assistant", max_len=64, on_long="truncate")
    with pytest.raises(UserError, match="not a valid conversation .*role"):
        encode(record([{"role": "robot", "content": "hi"}]))


def test_packed_and_unpacked_batches_give_the_same_loss(tok, tiny_cfg):
    cfg = config_lib.resolve(tiny_cfg, tok.vocab_size)
    graphdef, _, _ = model.abstract_model(cfg.model)
    params = model.init_params(cfg.model, 0)
    source = [record(synthetic.dialogue(i)) for i in range(24)]
    encode = chat_data.encoder(tok, loss_on="assistant", max_len=32, on_long="split")
    step = jax.jit(lm.make_eval_step(graphdef))
    token_bytes = tok.token_bytes()

    def loss(packing):
        totals = collections.Counter()
        for batch in pipeline.make_dataset(source, encode, batch_size=4, max_len=32, seed=0,
                                           train=False, packing=packing):
            for k, v in jax.device_get(step(params, batch, token_bytes)).items():
                totals[k] += float(v)
        return totals

    packed, unpacked = loss(True), loss(False)
    assert packed["weight_sum"] == unpacked["weight_sum"] > 0
    np.testing.assert_allclose(packed["nll_sum"], unpacked["nll_sum"], rtol=1e-5)


def test_conversations_without_assistant_turns_are_refused(tiny_cfg, tmp_path):
    path = tmp_path / "chats.jsonl"
    words = ["apple", "river", "stone", "cloud", "lamp", "violin", "cedar", "harbor", "maple",
             "comet", "saddle", "pepper"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": " ".join(
        words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}"}]}) + "\n"
        for i in range(200)))
    tiny_cfg.task = "sft"
    tiny_cfg.data.source = f"chat:{path}"
    with pytest.raises(UserError, match="has a token to learn from"):
        trainer.train_and_evaluate(tiny_cfg, str(tmp_path / "run"))


def test_sft_starts_from_the_pretrained_parameters(tiny_cfg, tmp_path):
    trainer.train_and_evaluate(tiny_cfg.copy_and_resolve_references(), str(tmp_path / "pre"))
    pre = runs.load(str(tmp_path / "pre"))

    sft = tiny_cfg.copy_and_resolve_references()
    sft.task = "sft"
    sft.data.source = "synthetic:arithmetic_chat"
    sft.init_from = str(tmp_path / "pre")
    sft.model_from_init = True
    sft.model.hidden_dim = 999  # a recipe's size is replaced by the pretrained model's
    sft.steps = 1
    sft.optimizer.lr = 1e-30
    sft.log_every_steps = 1
    trainer.train_and_evaluate(sft, str(tmp_path / "sft"))
    after = runs.load(str(tmp_path / "sft"))
    assert after.cfg.model.hidden_dim == pre.cfg.model.hidden_dim == 32
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), after.params,
                 pre.params)
    train = [r for r in metrics_lib.read_metrics(str(tmp_path / "sft")) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1]
    # 32 tokens cannot hold most demo dialogues: the policy's work is counted, not hidden.
    assert train[0]["sft_truncated"] + train[0]["sft_dropped"] > 0

