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
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers

import chat_model
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


def serve_and_ask(run_dir, db) -> tuple[object, str]:
    """`python -m t5x_like.serve` on the run; the `openai` client asks QUESTION greedily, once
    whole and once streamed. Returns the reply and the streamed text."""
    import openai

    port = chat_model.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "t5x_like.serve", f"--workdir={run_dir}", f"--port={port}",
         f"--db={db}", "--max_batch=2", "--max_tokens_limit=16"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        chat_model.wait_until_ready(proc, url, 400)
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


def test_lora_on_a_tied_embedding_adapts_the_head_through_it():
    # configs/finetune_hf.py targets "all,embed,head" for every family; with tied embeddings
    # (Qwen2.5 0.5-3B, Gemma, Llama 3.2) the embedding's adapter is also the head's.
    from configs import finetune_hf
    from t5x_like.core.errors import UserError
    from t5x_like.modeling import peft_targets

    cfg = finetune_hf.get_config()
    cfg.model.tie_embeddings = True
    targets = peft_targets.lora_targets(cfg.peft, cfg.model)
    assert "embed" in targets and "lm_head" not in targets and "wq" in targets
    cfg.peft.targets = "attention,head"  # the head alone names a matrix a tied model lacks
    with pytest.raises(UserError, match="target 'embed' instead"):
        peft_targets.lora_targets(cfg.peft, cfg.model)


# ---------------------------------------------------------------------------------------------
# The `hf` lifecycle recipe (configs/lifecycle/hf.py): import -> SFT -> evaluate -> DPO ->
# serve + feedback -> DPO -> hf export.


def hf_recipe():
    from configs.lifecycle import hf as recipe
    return recipe.get_config()


def test_hf_recipe_checks_its_model_folder(tmp_path):
    from t5x_like.core.errors import UserError
    from t5x_like.experiments import lifecycle

    cfg = hf_recipe()
    names = lifecycle.stage_names(cfg)
    assert names[0] == "import" and names[-1] == "hf_export"
    assert {cfg.stages[n].kind for n in names} == {"import", "eval", "train", "export",
                                                   "feedback", "hf_export"}
    with pytest.raises(UserError, match="no folder was given; pass the model's folder .* "
                                        "--hf_dir"):
        lifecycle.run_lifecycle(cfg, str(tmp_path / "lc"))
    cfg.hf_dir = str(tmp_path / "missing")
    with pytest.raises(UserError, match="missing is not a folder"):
        lifecycle.run_lifecycle(cfg, str(tmp_path / "lc"))
    # A rerun continues what it imported; another model needs another workdir.
    (tmp_path / "a").mkdir()
    lifecycle.save_state(str(tmp_path / "lc"), {"stages": {"import": {
        "kind": "import", "done": True, "wall_s": 1.0, "hf_dir": str(tmp_path / "a")}}})
    cfg.hf_dir = str(tmp_path)
    with pytest.raises(UserError, match="imported .*/a \\(stage import\\), not --hf_dir="):
        lifecycle.run_lifecycle(cfg, str(tmp_path / "lc"))


@pytest.mark.slow
def test_hf_recipe_runs_every_stage_on_a_tiny_qwen(tmp_path):
    """`bash launch/lifecycle.sh --recipe=hf --hf_dir=... --quick` on a tiny Qwen2-style model
    with a tokenizer.json and ChatML template: every stage runs, the report shows each, and the
    final export loads in transformers as the class, tokenizer and template that came in."""
    src = qwen_release(tmp_path / "hf")
    workdir = tmp_path / "lc"
    cfg = hf_recipe()
    # 30 steps per train stage, SFT at a rate a tiny model learns the demo's short answers
    # with: its replies then end within the feedback round's max_tokens (a reply cut at the
    # limit gives no preference pair).
    sft_args = cfg.stages.sft.quick_args + " optimizer.lr=1e-2 optimizer.warmup_steps=2"
    start = time.monotonic()
    result = subprocess.run(
        ["bash", "launch/lifecycle.sh", "--recipe=hf", f"--hf_dir={src}", "--quick",
         f"--workdir={workdir}", "--config.quick_steps=30",
         f"--config.stages.sft.quick_args={sft_args}"],
        cwd=ROOT, env=dict(_env(), PYTHON=sys.executable), capture_output=True, text=True,
        timeout=3600)
    print(f"hf lifecycle (quick): {time.monotonic() - start:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    from t5x_like.experiments import lifecycle

    state = json.load(open(workdir / "lifecycle.json"))
    names = lifecycle.stage_names(cfg)
    assert [n for n in names if state["stages"].get(n, {}).get("done")] == names
    assert state["stages"]["import"]["hf_dir"] == src
    # The SFT run trained in the model's own template, with LoRA.
    sft = json.load(open(workdir / "sft" / "config.json"))
    assert sft["peft"]["method"] == "lora" and sft["init_from"] == str(workdir / "import")
    assert json.load(open(workdir / "sft" / "chat_template.json"))["chat_template"] == CHATML
    for name in ("eval_import", "eval_sft", "eval_dpo", "eval_final"):
        task = state["stages"][name]["results"]["tasks"]["arithmetic"]
        assert task["n"] == 8 and 0.0 <= task["metrics"]["exact_match"] <= 1.0
    fb = state["stages"]["feedback"]["feedback"]
    assert fb["replies"] == 16 and fb["preference_records"] > 0
    assert json.load(open(workdir / "dpo_feedback" / "config.json"))["data"]["source"] == (
        f"preference:{workdir / 'feedback' / 'train_pairs.jsonl'}")
    report = (workdir / "report.md").read_text()
    print({n: round(state["stages"][n]["wall_s"]) for n in names}, fb)
    for name in names:
        assert f"| {name} |" in report
    assert state["stages"]["hf_export"]["architectures"] == ["Qwen2ForCausalLM"]
    out = str(workdir / "hf_export")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert type(auto).__name__ == "Qwen2Tokenizer" and auto.chat_template == CHATML
    assert auto("The quick brown fox")["input_ids"] == transformers.AutoTokenizer.from_pretrained(
        src)("The quick brown fox")["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2ForCausalLM"
