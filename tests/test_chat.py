"""Terminal chat: the conversation kept through the chat template, commands, context fitting."""

import os
import subprocess
import sys

import jax
import pytest

import chat_model
from conftest import ROOT
from data_pipelines import chat_template
from t5x_like import chat
from t5x_like.modeling import decoding
from t5x_like.core import runs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = chat_model.make(str(tmp_path_factory.mktemp("model")))
    run = runs.load(path)
    return path, run, decoding.Decoder.from_run(run, max_batch=1)


def test_a_chat_keeps_the_conversation_and_obeys_commands(setup):
    _, run, decoder = setup
    tok = run.tokenizer
    session = chat.Session(decoder, tok, decoding.Sampling(max_new_tokens=8))
    out = []
    chat.run(session, ["/system Be brief.", "What is 2 + 3?", "/help", "/bogus", "And 4?",
                       "/reset", "Hi", "/quit", "never read"], out.append)
    text = "".join(out)
    assert "(system prompt: 'Be brief.')" in text and "(conversation reset)" in text
    assert "unknown command /bogus" in text and "/system <text>" in text

    # Each reply is the greedy continuation of the whole conversation so far, templated.
    stops = chat_template.reply_stop_ids(tok)
    greedy = decoding.Sampling(max_new_tokens=8, stop_tokens=stops)
    conversation = [{"role": "system", "content": "Be brief."}]
    replies = []
    for question in ("What is 2 + 3?", "And 4?"):
        conversation.append({"role": "user", "content": question})
        [c] = decoder.generate([chat_template.prompt(tok, conversation)], greedy)
        conversation.append({"role": "assistant", "content": c.text})
        replies.append(c.text)
    for r in replies:
        assert f"assistant> {r}\n" in text
    assert session.system == "Be brief."
    assert [m["content"] for m in session.messages[::2]] == ["Hi"]  # /reset forgot the rest
    assert "never read" not in text


def test_the_oldest_exchanges_are_dropped_to_fit_the_context(setup):
    _, run, decoder = setup
    session = chat.Session(decoder, run.tokenizer, decoding.Sampling(max_new_tokens=100),
                           system="Be brief.")
    for i in range(4):
        session.messages += [{"role": "user", "content": f"What is {i} + {i}?"},
                             {"role": "assistant", "content": f"{2 * i}"}]
    session.messages.append({"role": "user", "content": "What is 9 + 9?"})
    notes = []
    prompt = chat._fit(session, notes.append)
    assert len(prompt) <= decoder.max_len - 100
    assert session.messages[-1]["content"] == "What is 9 + 9?" and len(session.messages) < 9
    assert notes and all("dropped the oldest exchange" in n for n in notes)
    assert prompt == chat_template.prompt(run.tokenizer, session.conversation())

    session.messages = [{"role": "user", "content": "9 " * 200}]
    assert chat._fit(session, notes.append) is None and session.messages == []
    assert "shorten it" in notes[-1]


def test_chat_command(setup):
    path, _, _ = setup
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.chat", f"--workdir={path}", "--max_new_tokens=8",
         "--temperature=0", "--system=Be brief."],
        input="What is 2 + 3?\n/reset\n", cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chatting with" in result.stdout and "assistant> " in result.stdout
    assert "(conversation reset)" in result.stdout
