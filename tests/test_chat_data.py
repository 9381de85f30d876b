"""Chat records through preparation and SFT encoding: per-turn context, empty replies, and
counting each long conversation once."""

import collections
import json
import random

import ml_collections
import pytest

from data_pipelines import chat_data, chat_template, prepare, records
from data_pipelines import tokenizer as tokenizer_lib

WORDS = ("river stone market winter lantern garden copper signal harbor violet candle meadow "
         "thunder pepper silver orchard canyon marble falcon willow ember saddle velvet").split()


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_records_keep_the_context_and_clean_it():
    chat = records.from_chat({"messages": [
        {"role": "user", "content": "Who won?", "context": "  Match report: the home side.  "},
        {"role": "assistant", "content": "The home side."}]})
    assert chat["messages"][0]["context"] == "  Match report: the home side.  "
    assert records.pieces(chat, "chat")[:2] == ["  Match report: the home side.  ", "Who won?"]
    assert "Match report" in records.text_view(chat, "chat")
    stripped = records.map_contents(chat, "chat", str.strip)
    assert stripped["messages"][0] == {"role": "user", "content": "Who won?",
                                       "context": "Match report: the home side."}
    assert records.decode(records.encode(chat, "chat"), "chat") == chat
    with pytest.raises(records.BadRecord, match="'context' in message 0 is int"):
        records.from_chat({"messages": [{"role": "user", "content": "x", "context": 3}]})


def test_only_a_blank_prompt_turn_empties_a_chat():
    def chat(*contents):
        roles = ["user", "assistant"] * len(contents)
        return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents)]}

    assert not records.has_empty_part(chat("Say nothing.", ""), "chat")
    assert not records.has_empty_part(chat("Hi", "Hello", "Bye", "  "), "chat")
    assert records.has_empty_part(chat("  ", "Hello"), "chat")


def test_preparation_keeps_empty_replies_and_contexts(tmp_path):
    from configs import base

    rows = [{"messages": [{"role": "user", "content": words(i, 8)},
                          {"role": "assistant", "content": words(1000 + i, 12)}]}
            for i in range(30)]
    rows[3]["messages"][1]["content"] = ""
    rows[5]["messages"][0]["context"] = "Retrieved: " + words(77, 10)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base.get_config().data
    cfg.vocab_size = 320
    cfg.report = False  # no plots: seconds saved
    cfg.sources.chat = ml_collections.ConfigDict({"source": f"chat:{path}", "weight": 1.0})
    out = str(tmp_path / "out")
    prepare.write_sources(prepare.named_sources(cfg), cfg, out)
    prepared = prepare.load(out)
    stored = [records.decode(s[i], "chat")["messages"]
              for s in (prepared.data_source(split, kind="chat")
                        for split in ("train", "validation")) for i in range(len(s))]
    assert len(stored) == 30
    assert rows[3]["messages"] in stored and rows[5]["messages"] in stored


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [words(i, 30) for i in range(200)]
    return tokenizer_lib.train(texts, str(tmp_path_factory.mktemp("tok") / "t.model"),
                               vocab_size=300)


def test_an_empty_reply_learns_its_end_marker(tok):
    encode = chat_data.encoder(tok, loss_on="assistant", max_len=64, on_long="truncate")
    example = encode({"messages": json.dumps([{"role": "user", "content": "Say nothing."},
                                              {"role": "assistant", "content": ""}])})
    learned = example["tokens"][example["weights"] > 0].tolist()
    assert learned == [tok.marker_ids[chat_template.END]]


def test_long_conversations_are_counted_once_however_often_encoded(tok):
    def conversation(i, first_user_words):
        return {"messages": json.dumps([
            {"role": "user", "content": words(i, first_user_words)},
            {"role": "assistant", "content": words(i + 1, 4)},
            {"role": "user", "content": words(i + 2, 100)},
            {"role": "assistant", "content": words(i + 3, 4)}]).encode()}

    data = [conversation(i, 3) for i in range(10)]  # the second exchange does not fit
    data += [conversation(100 + i, 100) for i in range(2)]  # not even the first fits
    counts = collections.Counter()
    encode = chat_data.encoder(tok, loss_on="assistant", max_len=80, on_long="truncate",
                               counts=counts)
    for _ in range(3):  # epochs, probes, prefetch: the same records again
        for record in data:
            encode(record)
    assert counts == {"truncated": 10, "dropped": 2}


# The project's markers laid out differently (a newline after each role, one after each turn),
# as a model's own template: rendered by jinja, masked by prefix rendering.
NEWLINE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_sft_trains_and_serves_with_a_chosen_template(tiny_cfg, tmp_path):
    from t5x_like.core import runs
    from t5x_like.training import trainer

    template_file = tmp_path / "newline.jinja"
    template_file.write_text(NEWLINE_TEMPLATE)
    cfg = tiny_cfg
    cfg.task = "sft"
    cfg.data.source = "synthetic:arithmetic_chat"
    cfg.data.chat_template = str(template_file)
    cfg.steps = 1
    cfg.data.synthetic_docs = 100
    cfg.eval.steps = 1
    cfg.model.max_len = 48
    cfg.data.vocab_size = 400
    trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["data"]["chat_template"] == str(template_file)
    assert json.load(open(tmp_path / "run" / chat_template.RUN_FILE))["chat_template"] == \
        NEWLINE_TEMPLATE
    template_file.unlink()  # the run keeps its own copy
    run = runs.load(str(tmp_path / "run"))
    tok = run.tokenizer
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}]
    assert chat_template.render(messages, tok) == "<s><|user|>\nWhat is 2 + 3?<|end|>\n" \
        "<|assistant|>\n5<|end|>\n"
    ids, weights = chat_template.encode(tok, messages)
    assert ids[weights > 0].tolist() == [*tok.encode("5"), tok.marker_ids[chat_template.END]]
    assert chat_template.prompt(tok, messages[:1])[-2:] == [
        tok.marker_ids[chat_template.ASSISTANT], *tok.encode("\n")]
    assert chat_template.reply_stop_ids(tok)[0] == tok.marker_ids[chat_template.END]


def test_preference_prompts_keep_their_context():
    pair = records.from_preference({"prompt": [{"role": "user", "content": "Who won?",
                                                "context": "The home side won."}],
                                    "chosen": " Home. ", "rejected": "Away."})
    assert pair["prompt"][0]["context"] == "The home side won."
    assert records.pieces(pair, "preference")[0] == "The home side won."
    cleaned = records.map_contents(pair, "preference", str.strip)
    assert cleaned["prompt"][0]["context"] == "The home side won." and cleaned["chosen"] == "Home."
