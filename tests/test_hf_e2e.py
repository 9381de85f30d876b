"""An open model's tokenizer and chat template end to end (issue 30), checked against
transformers itself on a random Qwen2-style model built here: a byte-level BPE tokenizer.json
(tests/tokenizer_builders.py, Qwen 2.5's pre-tokenizer and special tokens) and a ChatML template.

- in the default run (in-process, seconds): import -> export keeps the tokenizer, the template
  and the stop ids; transformers' AutoTokenizer renders a chat prompt from the export to the ids
  we render; transformers generates from the export the greedy tokens our KV-cache decoder
  generates from the import;
- slow: README's commands as a user types them (`hf import`, `data_pipelines.inspect`,
  `train` with configs/sft_chat.py on a chat JSONL, `serve` answered through the `openai`
  client, `hf export`, `sample`); the fine-tuned model's reply ends at <|im_end|>
  (finish_reason "stop", the marker never in the text), and transformers loads the export and
  generates the same greedy tokens as our decoder.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT, TEST_XLA_FLAGS
from tokenizer_builders import CHATML, byte_level_bpe
from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import runs
from t5x_like.interop import hf
from t5x_like.modeling import decoding

IM_END = "<|im_end|>"
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about 12 + 30, 日本語 🤖"}]
ANSWERED = QUESTION + [{"role": "assistant", "content": "OK."}]


def qwen_release(folder, *, seed: int = 0, layers: int = 2, extra_rows: int = 7) -> str:
    """A Qwen2.5-style release in `folder`: tokenizer.json, tokenizer_config.json (ChatML
    template, eos <|im_end|>), generation_config.json (stop ids <|im_end|>, <|endoftext|>), and a
    random Qwen2ForCausalLM whose embedding has `extra_rows` rows no token uses, as Qwen's have.
    Weights are perturbed well away from their init so greedy choices are not near-ties."""
    byte_level_bpe(folder, "qwen", config=False)
    generation = open(os.path.join(folder, "generation_config.json"), encoding="utf-8").read()
    n = tokenizer_lib.load(str(folder)).vocab_size
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(
        vocab_size=n + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True, attn_implementation="eager")
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    # save_pretrained writes its own generation_config.json: put the release's back.
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        f.write(generation)
    return str(folder)


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation (stopping at generation_config's eos ids, which it
    includes in the output)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, attention_mask=torch.ones(1, len(prompt),
                                                                        dtype=torch.long))
    return out[0, len(prompt):].tolist()


def our_greedy(run, prompts: list[list[int]], max_new_tokens: int) -> list:
    """Our KV-cache decoder's greedy completions, stopping where a chat reply stops."""
    decoder = decoding.Decoder.from_run(run, max_batch=len(prompts), steps_per_call=1,
                                        max_len=max(map(len, prompts)) + max_new_tokens)
    sampling = decoding.Sampling(max_new_tokens=max_new_tokens,
                                 stop_tokens=chat_template.reply_stop_ids(run.tokenizer))
    return decoder.generate(prompts, sampling)


def assert_same_greedy(ours, theirs: list[int], stop_ids) -> None:
    """Our completion (its stop token left out) against transformers' tokens (its eos kept):
    the same tokens, and where ours stopped, theirs went on with one of our stop tokens."""
    assert theirs[:len(ours.tokens)] == ours.tokens, (ours.tokens, theirs)
    if ours.finish_reason == "stop":
        assert len(theirs) > len(ours.tokens) and theirs[len(ours.tokens)] in stop_ids
    else:
        assert ours.finish_reason == "length" and theirs == ours.tokens


def test_import_export_keeps_tokenizer_template_and_greedy_tokens(tmp_path):
    src = qwen_release(tmp_path / "hf")
    imported = hf.import_model(src, str(tmp_path / "imported"))
    exported = hf.export_model(imported, str(tmp_path / "exported"))
    run = runs.load(imported)
    tok = run.tokenizer
    assert tok.backend == "hf" and isinstance(chat_template.of(tok), chat_template.JinjaTemplate)

    # The export ships the release's tokenizer and template; transformers reads them as Qwen's.
    original = transformers.AutoTokenizer.from_pretrained(src)
    auto = transformers.AutoTokenizer.from_pretrained(exported)
    assert type(auto).__name__ == "Qwen2Tokenizer" and auto.chat_template == CHATML
    for messages, gen in ((QUESTION, True), (ANSWERED, False)):
        want = original.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert auto.apply_chat_template(messages, add_generation_prompt=gen,
                                        tokenize=False) == want
        assert chat_template.render(messages, tok, add_generation_prompt=gen) == want
        assert auto(want, add_special_tokens=False)["input_ids"] == original(
            want, add_special_tokens=False)["input_ids"]
    prompt = chat_template.prompt(tok, QUESTION)
    assert prompt == auto(chat_template.render(QUESTION, tok, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"]
    # Assistant-only loss: the reply and its <|im_end|> (learned, so the model stops).
    ids, weights = chat_template.encode(tok, ANSWERED)
    assert auto.decode([int(i) for i, w in zip(ids, weights) if w]) == "OK." + IM_END

    # Stopping: transformers stops where the release says (generation_config.json), and so do
    # we (plus the markers import added, which would start a turn of our own template).
    im_end = auto.convert_tokens_to_ids(IM_END)
    gen_config = json.loads(open(os.path.join(exported, "generation_config.json")).read())
    assert gen_config["eos_token_id"][0] == im_end == tok.eos_id == chat_template.end_id(tok)
    assert set(gen_config["eos_token_id"]) <= set(chat_template.reply_stop_ids(tok))

    # Greedy decoding: transformers on the export, our decoder on the import.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported, attn_implementation="eager").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    prompts = [prompt, tok.encode("The quick brown fox")]
    for p, ours in zip(prompts, our_greedy(run, prompts, 12)):
        assert_same_greedy(ours, hf_greedy(model, p, 12), chat_template.reply_stop_ids(tok))


# ---------------------------------------------------------------------------------------------
# README's commands, as a user types them.


def _env() -> dict:
    """Subprocess jobs: one CPU device, the tests' fast compiles, this session's cache."""
    import jax
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=TEST_XLA_FLAGS,
                JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _cli(*args) -> str:
    result = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def chats(path, n: int = 48) -> str:
    """A chat JSONL whose assistant always answers "OK." (a few steps teach it, and to end the
    turn), some conversations with a system prompt or two turns."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [{"role": "user", "content": f"Tell me about {i} and {i * 7 % 13}."},
                        {"role": "assistant", "content": "OK."}]
            if i % 3 == 1:
                messages.insert(0, {"role": "system", "content": "You are terse."})
            if i % 4 == 2:
                messages += [{"role": "user", "content": "And more?"},
                             {"role": "assistant", "content": "OK."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask(run_dir, db) -> tuple[object, str]:
    """`python -m t5x_like.serve` on the run; the `openai` client asks QUESTION greedily, once
    whole and once streamed. Returns the reply and the streamed text."""
    import httpx
    import openai

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "t5x_like.serve", f"--workdir={run_dir}", f"--port={port}",
         f"--db={db}", "--max_batch=2", "--max_tokens_limit=16"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 400
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=16,
                                               temperature=0)
        stream = client.chat.completions.create(model="run", messages=QUESTION, max_tokens=16,
                                                temperature=0, stream=True)
        chunks = [c for c in stream if c.choices]
        assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    return reply, streamed


@pytest.mark.slow
def test_import_sft_serve_export_with_the_models_own_template(tmp_path):
    timings = {}

    def step(name, start):
        timings[name] = round(time.monotonic() - start, 1)
        return time.monotonic()

    t = time.monotonic()
    src = qwen_release(tmp_path / "hf")
    data = chats(tmp_path / "chats.jsonl")
    model_dir, run_dir, out = tmp_path / "models" / "qwen", tmp_path / "runs" / "qsft", \
        tmp_path / "hf_out" / "qsft"
    t = step("build", t)
    _cli("t5x_like.hf", "import", f"--hf_dir={src}", f"--out={model_dir}")
    t = step("import", t)

    # The masks, shown in the model's own template: the reply and its <|im_end|> learned.
    shown = _cli("data_pipelines.inspect", "--config=configs/sft_chat.py",
                 f"--config.init_from={model_dir}", f"--config.data.source=chat:{data}",
                 f"--config.data.cache_dir={tmp_path / 'cache'}", "--n=1")
    assert "chat template: model" in shown
    assert "<|im_start|>assistant\n[[OK.<|im_end|>]]" in shown, shown
    t = step("inspect", t)

    _cli("t5x_like.train", "--config=configs/sft_chat.py", f"--workdir={run_dir}",
         f"--config.init_from={model_dir}", f"--config.data.source=chat:{data}",
         "--config.steps=30", "--config.model.max_len=128", "--config.model.dropout=0",
         "--config.data.batch_size=8", "--config.optimizer.lr=1e-2",
         "--config.optimizer.warmup_steps=2", "--config.checkpoint.every_steps=30",
         "--config.eval.every_steps=30", "--config.log_every_steps=10")
    t = step("train", t)
    # The run trained with the release's template, kept in the run.
    assert json.load(open(run_dir / "chat_template.json"))["chat_template"] == CHATML

    # Served: the reply ends at <|im_end|>, which the text never shows.
    reply, streamed = serve_and_ask(run_dir, tmp_path / "feedback.sqlite")
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == "OK.", reply
    assert streamed == "OK." and IM_END not in streamed
    assert reply.usage.completion_tokens < 16
    t = step("serve", t)

    printed = _cli("t5x_like.hf", "export", f"--workdir={run_dir}", f"--out={out}")
    assert "exported" in printed
    t = step("export", t)

    # transformers loads the export as Qwen2 with the release's tokenizer and template, and its
    # greedy tokens are our decoder's.
    auto = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager").eval()
    assert type(model).__name__ == "Qwen2ForCausalLM" and auto.chat_template == CHATML
    run = runs.load(str(run_dir))
    tok = run.tokenizer
    prompt = chat_template.prompt(tok, QUESTION)
    assert auto.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        chat_template.render(QUESTION, tok, add_generation_prompt=True)
    prompts = [prompt, tok.encode("The quick brown fox")]
    theirs = [hf_greedy(model, p, 12) for p in prompts]
    for p, ours, hf_tokens in zip(prompts, our_greedy(run, prompts, 12), theirs):
        assert_same_greedy(ours, hf_tokens, chat_template.reply_stop_ids(tok))
    assert theirs[0][-1] == auto.convert_tokens_to_ids(IM_END)
    assert auto.decode(theirs[0], skip_special_tokens=True) == "OK."
    t = step("transformers", t)

    # `sample` continues plain text as transformers does (no bos for a Qwen tokenizer).
    sampled = _cli("t5x_like.sample", f"--workdir={run_dir}", "--prompt=The quick brown fox",
                   "--max_new_tokens=12")
    want = auto.decode(theirs[1], skip_special_tokens=True)
    assert sampled.rstrip("\n") == "The quick brown fox" + want
    step("sample", t)
    print("timings (s):", timings)
