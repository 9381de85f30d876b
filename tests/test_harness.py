"""lm-evaluation-harness on our models (t5x_like/evaluation/harness.py), offline: task YAMLs
over local files, each number checked against our own computation of it.

A random-initialized tiny chat model (tests/chat_model.py) on the 8 fake CPU devices (the
harness model splits its batches over them); references run on one device. The slow test
trains a pretrained and an SFT model for the rise in multiple-choice accuracy.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

import chat_model
from conftest import ROOT, SHARED_DATA
from data_pipelines import chat_template, sources, synthetic
from t5x_like.core import runs
from t5x_like.core.errors import UserError
from t5x_like.evaluation import eval_suite, eval_tasks, harness
from t5x_like.modeling import decoding, model

SHAKESPEARE = os.path.join(SHARED_DATA, "pretrain", "tinyshakespeare.txt")
MC, GEN, PPL = harness.LOCAL_TASKS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return chat_model.make(str(tmp_path_factory.mktemp("model")), max_len=128)


@pytest.fixture(scope="module")
def run(model_dir):
    """The reference: the run on one device."""
    return runs.load(model_dir)


@pytest.fixture(scope="module")
def lm(model_dir):
    """The harness model: the run on every (fake) device, 16 rows split 8 ways."""
    lm = harness.RunLM(harness.load_run(model_dir), batch_size=16)
    assert lm.run.mesh.shape["data"] == 8
    return lm


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return harness.write_local_tasks(str(tmp_path_factory.mktemp("tasks")),
                                     data_root=SHARED_DATA, n_demo=40)


def logprobs(run, tokens) -> np.ndarray:
    """log p(tokens[i + 1] | tokens[:i + 1]) by the model on the whole sequence, log-softmax in
    numpy (padded after the end to a fixed length: causal attention never looks there)."""
    length = run.cfg.model.max_len
    padded = np.zeros((1, length), np.int32)
    padded[0, :len(tokens) - 1] = tokens[:-1]
    logits = np.asarray(_apply(run.graphdef, run.params, padded), np.float64)[0, :len(tokens) - 1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return logits[np.arange(len(tokens) - 1), tokens[1:]] - logz


_apply = jax.jit(model.apply, static_argnums=0)


def our_likelihood(run, ctx, cont) -> tuple[float, bool]:
    """The continuation's log-likelihood and greedy check through eval_suite.likelihood (the
    training pipeline's eval step), scoring only the continuation's tokens."""
    tokens = np.asarray(ctx + cont, np.int32)
    weights = np.asarray([0.0] * len(ctx) + [1.0] * len(cont), np.float32)
    got = eval_suite.likelihood(run, [{}], batch_size=1,
                                encode=lambda _: {"tokens": tokens, "weights": weights})
    assert got["tokens"] == len(cont)
    return -got["loss"] * got["tokens"], got["accuracy"] == 1.0


def requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in args]


def test_loglikelihood_equals_our_likelihood_of_the_same_tokens(lm, run):
    tok = run.tokenizer
    chat = lm.apply_chat_template([{"role": "user", "content": "What is 12 + 9?"}])
    pairs = [("What is 12 + 9?", " 21"),
             ("", "What is 3 + 4? 7"),  # no context: <bos> is the context
             ("Wh", "at is 5 + 2? 7"),  # "What" is one token: it spans the boundary
             ("What is 8 - 3? ", "5"),  # the trailing space moves to the continuation
             (chat, "21"),
             (" ".join(synthetic.text_document(i) for i in range(8)), "\nWhat is 1 + 1? 2")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        if context:
            ctx, cont = harness.encode_pair(tok, context, continuation)
        else:
            ctx, cont = [tok.bos_id], harness.encode(tok, continuation, bos=False)
        assert tok.decode(ctx + cont) == context + continuation  # every character scored once
        full = ctx + cont
        if len(full) > lm.max_length + 1:  # the long one: context cut from the left, as HFLM
            ctx = full[-(lm.max_length + 1):-len(cont)]
        want, want_greedy = our_likelihood(run, ctx, cont)
        assert logprob == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # The boundary case really merges: "Wh" alone is not the whole string's first tokens.
    ctx, cont = harness.encode_pair(tok, "Wh", "at is 5 + 2? 7")
    assert ctx == [tok.bos_id] and tok.decode(cont[:1]).startswith("Wh")
    assert len(harness.encode(tok, "Wh")) > 1 and len(harness.encode(tok, "What")) == 2
    assert len(harness.encode(tok, " ".join(synthetic.text_document(i) for i in range(8)))) > 129
    # The chat prompt is the template's own ids.
    assert lm.tok_encode(chat) == chat_template.prompt(
        tok, [{"role": "user", "content": "What is 12 + 9?"}])

    # is_greedy: the model's own argmax continuation is greedy; one token changed is not.
    ctx = [tok.bos_id, *tok.encode("What is 4 + 4?")]
    greedy = []
    for _ in range(3):
        greedy.append(int(np.argmax(np.asarray(model.apply(
            run.graphdef, run.params, jnp.asarray([ctx + greedy])))[0, -1])))
    other = greedy[:2] + [(greedy[2] + 1) % tok.vocab_size]
    (lp_greedy, is_greedy), (lp_other, is_other) = lm._loglikelihood_tokens(
        [(None, ctx, greedy), (None, ctx, other)])
    assert is_greedy and not is_other and lp_greedy > lp_other


def test_either_tokenizer_backend_gives_the_same_numbers(model_dir, lm, tmp_path):
    """The run's SentencePiece model as an equivalent tokenizer.json (the Hugging Face
    backend): the same ids, so the same log-likelihoods, chat prompts and greedy checks."""
    from data_pipelines import tokenizer as tokenizer_lib

    copy = tmp_path / "json_tokenizer"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("tokenizer.model", "eval",
                                                                   "metrics.jsonl"))
    (copy / "tokenizer.json").write_text(tokenizer_lib.to_tokenizer_json(lm.tok))
    tok = lm.tok
    (copy / "tokenizer_config.json").write_text(json.dumps(
        {f"{k}_token": tok.id_to_piece(getattr(tok, f"{k}_id")) for k in ("bos", "eos", "pad")}))
    other = harness.RunLM(harness.load_run(str(copy)), batch_size=16)
    assert (lm.tok.backend, other.tok.backend) == ("sentencepiece", "hf")
    chat = lm.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    assert other.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}]) == chat
    pairs = [("What is 12 + 9?", " 21"), ("", "7 + 7 = 14"), (chat, "4"), ("Wh", "at is 1 + 1?")]
    for a, b in zip(lm.loglikelihood(requests("loglikelihood", pairs)),
                    other.loglikelihood(requests("loglikelihood", pairs))):
        assert a[0] == pytest.approx(b[0], abs=1e-5) and a[1] == b[1]
    for context, continuation in pairs[2:]:
        assert harness.encode_pair(lm.tok, context, continuation) == harness.encode_pair(
            other.tok, context, continuation)


def test_rolling_windows_score_every_token_once(lm, run):
    """A document of ~1,000 tokens in 128-token windows: the sum equals a direct computation
    over lm-eval's windows (the last window filled with earlier context), and a document that
    fits is the plain log-likelihood after <bos>."""
    tok = run.tokenizer
    text = next(iter(sources.read_text([SHAKESPEARE], "paragraph", 1000)))
    short = "What is 2 + 2? 4"
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,), (short,)]))
    ids = tok.encode(text)
    L, n = lm.max_length, len(ids)
    assert n > 5 * L
    seq = [tok.bos_id, *ids]
    want, end = 0.0, 0
    while end < n:  # window predicting ids[start:end] from the L tokens before each
        start, end = end, min(end + L, n)
        window = seq[max(0, end - L):end + 1]
        want += logprobs(run, window)[-(end - start):].sum()
    assert got[0] == pytest.approx(want, abs=1e-3)
    assert got[1] == pytest.approx(logprobs(run, [tok.bos_id, *tok.encode(short)]).sum(),
                                   abs=1e-4)


def test_rolling_bits_per_byte_equals_the_likelihood_task(tmp_path_factory):
    """The local Shakespeare task through lm-eval gives the bits/byte of evaluate's likelihood
    task on the same text file (the same documents, each inside a 2,048-token context)."""
    path = chat_model.make(str(tmp_path_factory.mktemp("long")), max_len=2048)
    folder = harness.write_local_tasks(str(tmp_path_factory.mktemp("ppl")),
                                       data_root=SHARED_DATA)
    one = runs.load(path)
    n = 3
    from configs.eval import common

    ours = eval_suite.likelihood_task(one, common.task("likelihood", f"text:{SHAKESPEARE}",
                                                       n=n), batch_size=1, workdir=path)
    docs = [json.loads(line)["text"] for line in open(os.path.join(folder,
                                                                   "t5x_shakespeare.jsonl"))][:n]
    assert all(len(one.tokenizer.encode(d)) + 2 <= 2048 for d in docs)  # one window each
    out = harness.run_tasks(harness.RunLM(harness.load_run(path), batch_size=8), [PPL],
                            include_path=[folder], limit=n, bootstrap_iters=0)
    got = out.tasks[f"harness:{PPL}"]
    assert got["n"] == n == ours["n"]
    assert got["metrics"]["bits_per_byte"] == pytest.approx(ours["metrics"]["bits_per_byte"],
                                                            rel=1e-5)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert got["metrics"]["byte_perplexity"] == pytest.approx(
        2 ** got["metrics"]["bits_per_byte"], rel=1e-6) and nbytes > 3000


def mc_exact(run, records, chat: bool) -> tuple[float, list[list[float]]]:
    """Multiple-choice accuracy computed here: each choice's summed log-probs after the prompt
    (the chat template's, or the question with " " before the answer), the best one chosen."""
    tok = run.tokenizer
    correct, scores = 0, []
    for r in records:
        row = []
        for choice in r["choices"]:
            if chat:
                ctx = chat_template.prompt(tok, [{"role": "user", "content": r["question"]}])
                seq = ctx + tok.encode(choice)
            else:
                ctx = [tok.bos_id, *tok.encode(r["question"])]
                seq = [tok.bos_id, *tok.encode(r["question"] + " " + choice)]
                assert seq[:len(ctx)] == ctx
            row.append(float(logprobs(run, seq)[len(ctx) - 1:].sum()))
        scores.append(row)
        correct += int(np.argmax(row)) == r["label"]
    return correct / len(records), scores


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_demo_multiple_choice_accuracy_is_our_exact_computation(lm, run, tasks, chat):
    n = 24
    out = harness.run_tasks(lm, [MC], include_path=[tasks], limit=n, chat=chat)
    got = out.tasks[f"harness:{MC}"]
    records = harness.demo_mc_records(n)
    accuracy, scores = mc_exact(run, records, chat)
    assert got["n"] == n and got["metrics"]["acc"] == pytest.approx(accuracy)
    assert {r["label"] for r in records} == {0, 1}  # the right answer is not always first
    samples = sorted(out.samples[MC], key=lambda s: s["doc_id"])
    for sample, want in zip(samples, scores):
        assert [ll for ll, _ in sample["filtered_resps"]] == pytest.approx(want, abs=1e-4)
    assert got["settings"]["template"] == ("chat" if chat else "plain")


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_generation_task_replies_are_the_decoders(lm, run, tasks, chat):
    """generate_until gives what eval_suite.generate (the KV-cache decoder behind our own
    generation tasks) gives for the same prompts, and exact match reads their first integer."""
    n = 12
    out = harness.run_tasks(lm, [GEN], include_path=[tasks], limit=n, chat=chat)
    records = harness.demo_mc_records(n)
    examples = [eval_tasks.Example(str(r["id"]), [{"role": "user", "content": r["question"]}],
                                   r["question"], [r["answer"]]) for r in records]
    # The harness ends a reply at the template's end of turn (and eos), as eval_suite's plain
    # generation with that stop token does; eval_suite's chat replies also end at any token
    # that starts a turn (chat_template.reply_stop_ids), so theirs are prefixes of ours.
    tok = run.tokenizer
    replies, _ = eval_suite.generate(run, examples, decoding.Sampling(
        max_new_tokens=8, stop_strings=("\n",), stop_tokens=(chat_template.end_id(tok),)),
        template="chat" if chat else "plain", batch_size=8)
    samples = sorted(out.samples[GEN], key=lambda s: s["doc_id"])
    ours = [s["resps"][0][0] for s in samples]
    controls = tuple(chat_template.control_tokens(tok).values())
    for got, want in zip(ours, replies):
        if chat and got.strip() != want.text:
            assert got.lstrip().startswith(want.text)
            assert got.lstrip()[len(want.text):].startswith(controls)
        else:
            assert got.strip() == want.text
    assert not any("\n" in r for r in ours)
    matches = [synthetic.check_answer(r["question"], reply) for r, reply in zip(records, ours)]
    assert out.tasks[f"harness:{GEN}"]["metrics"]["exact_match"] == pytest.approx(
        sum(matches) / n)


def test_generate_until_cuts_at_stop_strings(lm):
    # 12 prompts of the generation test's lengths: the same compiled decoder programs.
    context = "What is 3 + 5?"
    free = lm.generate_until(requests("generate_until",
                                      [(context, {"until": [], "max_gen_toks": 8})] * 12))
    assert len(set(free)) == 1 and len(free[0]) >= 4  # greedy: the same reply in every row
    stop = free[0][2:4]
    cut = lm.generate_until(requests("generate_until",
                                     [(context, {"until": [stop], "max_gen_toks": 8})] * 12))
    assert cut == [free[0][:free[0].index(stop)]] * 12


def test_chat_template_prompts_and_open_final_message(lm, run):
    tok = run.tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 2 + 3?"}]
    assert lm.tok_encode(lm.apply_chat_template(messages)) == chat_template.prompt(tok, messages)
    prefill = lm.apply_chat_template(messages + [{"role": "assistant", "content": "The"}],
                                     add_generation_prompt=False)
    assert prefill.endswith(f"{chat_template.ASSISTANT}The")
    ids, _ = chat_template.encode(tok, messages + [{"role": "assistant", "content": "The"}])
    assert lm.tok_encode(prefill) == ids.tolist()[:-1]  # all but the closing <|end|>


def test_suite_task_and_its_validation(run, model_dir, monkeypatch, tmp_path):
    from configs.eval import common

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    suite = common.suite()
    suite.data_dir = os.path.join(SHARED_DATA, "eval")
    suite.tasks.mc = common.task(f"harness:{MC}", "", n=8, template="plain")
    results = eval_suite.run_suite(run, suite, str(tmp_path / "out"))
    mc = results["tasks"]["mc"]
    assert mc["kind"] == "harness" and mc["source"] == MC and mc["n"] == 8
    assert mc["metrics"]["acc"] == pytest.approx(mc_exact(run, harness.demo_mc_records(8),
                                                          chat=False)[0])
    folder = tmp_path / "out" / "eval" / "0"
    assert (folder / mc["lm_eval_results"]).is_file()
    assert "| mc | harness |" in (folder / "results.md").read_text()
    for change, says in [({"kind": "harness:"}, "tasks.mc.kind"),
                         ({"metrics": "acc"}, "leave it empty"),
                         ({"num_fewshot": -2}, "tasks.mc.num_fewshot")]:
        suite.tasks.mc.update(change)
        with pytest.raises(UserError, match=says):
            eval_suite.validate(suite)
        suite.tasks.mc = common.task(f"harness:{MC}", "", n=8)
    with pytest.raises(UserError, match="is not a folder of lm-eval task YAMLs"):
        harness.task_manager([MC], [str(tmp_path / "nowhere")])


def test_harness_command_writes_lm_evals_json_our_table_and_metric_lines(model_dir, tmp_path):
    import conftest

    # One CPU device, the tests' fast compiles and their compilation cache.
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"),
               XLA_FLAGS=conftest.TEST_XLA_FLAGS,
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.evaluate", "harness", f"--workdir={model_dir}",
         f"--tasks={MC},{GEN}", "--limit=4", "--template=chat", f"--data={SHARED_DATA}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = os.path.join(model_dir, "eval", "0")
    results = json.load(open(os.path.join(out, "results.json")))
    mc = results["tasks"][f"harness:{MC}"]
    assert mc["n"] == 4 and set(mc["metrics"]) >= {"acc", "acc_norm"}
    assert results["tasks"][f"harness:{GEN}"]["settings"]["template"] == "chat"
    raw = json.load(open(os.path.join(out, mc["lm_eval_results"])))
    assert raw["results"][MC]["acc,none"] == mc["metrics"]["acc"]
    assert raw["n-samples"][MC]["effective"] == 4
    samples = [p for p in os.listdir(os.path.join(out, "harness")) if p.startswith("samples_")]
    assert len(samples) == 2
    table = open(os.path.join(out, "results.md")).read()
    assert f"| harness:{MC} | harness | {MC} | 4 | acc |" in table and table in result.stdout
    lines = [json.loads(line) for line in open(os.path.join(model_dir, "metrics.jsonl"))]
    assert {r["split"] for r in lines} >= {f"eval/harness:{MC}", f"eval/harness:{GEN}"}


def test_through_the_server_the_numbers_are_the_in_process_ones(model_dir, lm, tasks, tmp_path):
    """lm-eval's completions model against `t5x_like.serve` (/v1/completions with echo and
    logprobs) gives the in-process log-likelihoods, accuracy and replies (same limit)."""
    from t5x_like.serving import server as serve

    served = runs.load(model_dir)
    app = serve.create_app(served, db_path=str(tmp_path / "feedback.sqlite"), model_name="tiny")
    n = 8
    local = harness.run_tasks(lm, [MC, GEN], include_path=[tasks], limit=n, chat=True)
    with chat_model.serving(app) as url:
        remote_lm = harness.completions_model(f"{url}/v1/completions", served.tokenizer,
                                              max_length=served.cfg.model.max_len, batch_size=4)
        remote = harness.run_tasks(remote_lm, [MC, GEN], include_path=[tasks], limit=n,
                                   chat=True)
    for task in (MC, GEN):
        assert remote.tasks[f"harness:{task}"]["metrics"] == pytest.approx(
            local.tasks[f"harness:{task}"]["metrics"])
    by_id = lambda out, t: sorted(out.samples[t], key=lambda s: s["doc_id"])
    for a, b in zip(by_id(local, MC), by_id(remote, MC)):
        assert [x for x, _ in a["filtered_resps"]] == pytest.approx(
            [x for x, _ in b["filtered_resps"]], abs=1e-4)
    assert [s["resps"] for s in by_id(local, GEN)] == [s["resps"] for s in by_id(remote, GEN)]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_multiple_choice_accuracy_rises_from_pretrained_to_sft(tmp_path):
    """A small model pretrained on the demo's text for 500 steps, then SFT on its dialogues for
    300 (the demo recipes, shortened): through the chat template the SFT model picks the right
    answer of the 200 held-out questions more often than the model it started from."""
    from configs import base, sft_chat
    from t5x_like.training import trainer

    pre = base.get_config()
    pre.steps = 500
    pre.model.update(dict(hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192,
                          max_len=64, dropout=0.0))
    pre.data.update(dict(batch_size=32, synthetic_docs=4000, vocab_size=400))
    pre.optimizer.update(dict(lr=3e-3, warmup_steps=20))
    pre.checkpoint.every_steps = 500
    pre.eval.every_steps = 0
    trainer.train_and_evaluate(pre, str(tmp_path / "pretrain"))
    sft = sft_chat.get_config()
    sft.init_from = str(tmp_path / "pretrain")
    sft.steps = 300
    sft.model.update(dict(max_len=64, dropout=0.0))
    sft.optimizer.lr = 2e-3
    sft.eval.update(dict(every_steps=0, early_stop_by=""))
    sft.checkpoint.update(dict(every_steps=300, keep_best_by=""))
    trainer.train_and_evaluate(sft, str(tmp_path / "sft"))
    folder = harness.write_local_tasks(str(tmp_path / "tasks"), data_root=SHARED_DATA)
    acc = {}
    for name in ("pretrain", "sft"):
        out = harness.run_tasks(harness.RunLM(harness.load_run(str(tmp_path / name))), [MC],
                                include_path=[folder], chat=True, bootstrap_iters=0)
        acc[name] = out.tasks[f"harness:{MC}"]["metrics"]["acc"]
        assert out.tasks[f"harness:{MC}"]["n"] == 200
    assert acc["sft"] > acc["pretrain"] + 0.1, acc


def test_report_card_carries_harness_columns(tmp_path):
    """The lifecycle's report card: a harness task's accuracy is a headline column, and the
    card says which lm-eval task it was."""
    from configs.lifecycle import demo
    from t5x_like.experiments import lifecycle_report

    cfg = demo.get_config()
    assert cfg.stages.eval_sft.suite == "configs/eval/demo_harness.py"  # lm-eval is installed
    assert "tasks.arithmetic_mc.template=plain" in cfg.stages.eval_pretrain_text.args
    names = ["eval_pretrain", "eval_sft"]
    cfg.order = ",".join(names)
    stages = {}
    for name, acc in zip(names, (0.55, 0.9)):
        tasks = {"arithmetic": {"kind": "generate", "metrics": {"exact_match": acc - 0.1}},
                 "arithmetic_mc": {"kind": "harness", "source": MC, "n": 200,
                                   "lm_eval_version": "0.4.13",
                                   "metrics": {"acc": acc, "acc_norm": acc}}}
        stages[name] = {"kind": "eval", "done": True, "wall_s": 1.0, "command": ["python"],
                        "results": {"tasks": tasks, "workdir": "", "step": 0}}
    report = open(lifecycle_report.write(cfg, str(tmp_path), {"stages": stages}, names)).read()
    headline = report.split("## Headline")[1].split("##")[0]
    assert "arithmetic_mc/acc" in headline and "0.9 |" in headline and "acc_norm" not in headline
    assert f"arithmetic_mc is its task {MC} (lm-eval 0.4.13)" in headline
