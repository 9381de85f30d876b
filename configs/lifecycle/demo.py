"""The whole lifecycle on the embedded arithmetic task: CPU, no files, about 20 minutes.

    bash launch/lifecycle.sh                     # = python -m t5x_like.lifecycle --config=<this>
    bash launch/lifecycle.sh --quick             # a few steps per stage (what the test runs)

Stages run in `order`; each is an ordinary job (its command is in the report) in
<workdir>/<stage>/ and is skipped when a rerun finds it done. Kinds:
    prepare   python -m data_pipelines.prepare --config=<config> --out=<workdir>/<stage>
    train     python -m t5x_like.train --config=<config> <args> [--config.init_from=<stage>]
    eval      python -m t5x_like.evaluate on <run>'s checkpoint (<checkpoint>) with <suite>
    export    python -m t5x_like.export of <run>
    feedback  serve <run>, send simulated users' conversations through the API, rate each
              reply, export the database as preference pairs and SFT conversations; args:
              conversations=N n=<replies per prompt> temperature=T max_tokens=N
              prompts=demo|<chat JSONL or Alpaca file>  judge=demo|reward:<reward stage>
              replay=N (the demo's own training pairs added to the feedback pairs)
              reviewed_only=0|1 (1: corrections and reports only once a review approved them;
              the report says which was used and what the export left out)
A train stage with `data_from` = a feedback stage trains on that stage's exported pairs (plus
the replayed ones: feedback/train_pairs.jsonl).
`args` are config overrides (key=value, or whole --flags); `quick_args` replace them under
--quick; {data} is --data, {stage:NAME} a stage's directory.
"""

import importlib.util

import ml_collections

# With lm-evaluation-harness installed (the eval extra), every evaluation also runs the demo's
# multiple-choice questions through it (configs/eval/demo_harness.py): a harness column in the
# report card.
HARNESS = importlib.util.find_spec("lm_eval") is not None


def stage(kind: str, **fields) -> ml_collections.ConfigDict:
    base = {"kind": kind, "config": "", "args": "", "init_from": "", "run": "",
            "checkpoint": "latest", "suite": "", "data_from": "", "quick_args": ""}
    base.update(fields)
    return ml_collections.ConfigDict(base)


def demo_eval(run: str, checkpoint: str = "latest", args: str = "", template: str = "chat",
              quick_harness: bool = False) -> ml_collections.ConfigDict:
    """Held-out exact match (200 questions) and chat loss of `run` (configs/eval/demo.py), and
    with HARNESS the same questions as lm-eval multiple choice; `template`: of both. Under
    --quick the harness task runs only where `quick_harness` (its start-up costs seconds)."""
    args = f"{args} tasks.arithmetic.template={template}".strip()
    quick = f"{args} tasks.arithmetic.n=8 tasks.arithmetic_chat.n=8"
    if HARNESS:
        args += f" tasks.arithmetic_mc.template={template}"
        quick += (f" tasks.arithmetic_mc.template={template} tasks.arithmetic_mc.n=8"
                  if quick_harness else " only=arithmetic,arithmetic_chat")
    return stage("eval", run=run, checkpoint=checkpoint, args=args, quick_args=quick,
                 suite="configs/eval/demo_harness.py" if HARNESS else "configs/eval/demo.py")


def get_config():
    cfg = ml_collections.ConfigDict()
    cfg.name = "demo"
    cfg.data_root = "../shared/data"  # --data=... in launch/lifecycle.sh; {data} in args
    cfg.quick = False  # every train stage runs quick_steps, stages use quick_args (tests)
    cfg.quick_steps = 4
    cfg.quick_model = "model.hidden_dim=64 model.num_layers=2 model.mlp_dim=192"  # under --quick
    # Train stages run `python -m t5x_like.train <args>` here; a launcher prefix runs them on a
    # pod instead, e.g. "bash launch/tpu_pod.sh --tpu=NAME --zone=Z --accelerator=v5p-8 --"
    # (the workdir must then be on storage every worker and this host see, e.g. gs://).
    cfg.train_launcher = ""
    # RL (stages rl, eval_rl) is defined but not in the default order: it samples inside the
    # loop and doubles the CPU time. Add it back with
    # --config.order=pretrain,eval_pretrain,sft,eval_sft,dpo,eval_dpo,rl,eval_rl,export,...
    cfg.order = ("pretrain,eval_pretrain,eval_pretrain_text,sft,eval_sft,dpo,eval_dpo,export,"
                 "feedback,dpo_feedback,eval_final")
    cfg.stages = ml_collections.ConfigDict()
    s = cfg.stages
    # Longer than pretrain_tiny's 600 steps and without dropout: the units digit of an answer
    # (a lookup over both operands' last digits) is learned only after ~1,000 steps.
    s.pretrain = stage("train", config="configs/pretrain_tiny.py",
                       args="steps=1500 model.dropout=0.0")
    # The pretrained model asked in chat form (what SFT teaches), and as plain text (what it
    # already knows).
    s.eval_pretrain = demo_eval("pretrain")
    s.eval_pretrain_text = demo_eval("pretrain", template="plain")
    s.sft = stage("train", config="configs/sft_chat.py", init_from="pretrain")
    s.eval_sft = demo_eval("sft", checkpoint="best")
    s.dpo = stage("train", config="configs/dpo.py", init_from="sft")
    s.eval_dpo = demo_eval("dpo")
    s.rl = stage("train", config="configs/rl.py", init_from="sft")
    s.eval_rl = demo_eval("rl")
    s.export = stage("export", run="dpo")
    # Simulated users ask training-split questions (never the held-out ones evaluation uses);
    # the demo judge marks a reply up when its number is right, else down with the right answer
    # as the correction -> (corrected > original) preference pairs.
    s.feedback = stage("feedback", run="export",
                       args="conversations=64 n=2 temperature=1.0 replay=200",
                       quick_args="conversations=8 n=2 temperature=0.8 replay=40")
    # A feedback round gives tens of pairs, not thousands: hold out a larger share to validate.
    # A handful of feedback pairs plus 200 replayed ones: a short round.
    s.dpo_feedback = stage("train", config="configs/dpo.py", init_from="dpo",
                           data_from="feedback", args="steps=20")
    s.eval_final = demo_eval("dpo_feedback", quick_harness=True)
    return cfg
