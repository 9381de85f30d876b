"""The whole lifecycle on the embedded arithmetic task: CPU, no files, about 20 minutes.

    bash launch/lifecycle.sh                     # = python -m t5x_like.lifecycle --config=<this>
    bash launch/lifecycle.sh --quick             # a few steps per stage (what the test runs)

Stages run in `order`; each is an ordinary job (its command is in the report) in
<workdir>/<stage>/ and is skipped when a rerun finds it done. Kinds:
    train     python -m t5x_like.train --config=<config> <args> [--config.init_from=<stage>]
    eval      python -m t5x_like.evaluate on <run>'s checkpoint (<checkpoint>) with <suite>
    export    python -m t5x_like.export of <run>
    feedback  serve <run>, send <conversations> of simulated users through the API, rate each
              reply (<judge>), export the database as preference pairs (and SFT conversations)
A train stage with `data_from` = a feedback stage trains on that stage's exported pairs.
"""

import ml_collections


def stage(kind: str, **fields) -> ml_collections.ConfigDict:
    base = {"kind": kind, "config": "", "args": "", "init_from": "", "run": "",
            "checkpoint": "latest", "suite": "", "data_from": "", "quick_args": ""}
    base.update(fields)
    return ml_collections.ConfigDict(base)


def get_config():
    cfg = ml_collections.ConfigDict()
    cfg.name = "demo"
    cfg.data_root = "../shared/data"  # --data=... in launch/lifecycle.sh; {data} in args
    cfg.quick = False  # every train stage runs quick_steps, evals quick_n examples (tests)
    cfg.quick_steps = 4
    cfg.quick_n = 8
    cfg.order = ("pretrain,sft,eval_sft,dpo,eval_dpo,rl,eval_rl,export,feedback,"
                 "dpo_feedback,eval_final")
    cfg.stages = ml_collections.ConfigDict()
    s = cfg.stages
    s.pretrain = stage("train", config="configs/pretrain_tiny.py")
    s.sft = stage("train", config="configs/sft_chat.py", init_from="pretrain")
    s.eval_sft = stage("eval", run="sft", suite="configs/eval/demo.py", checkpoint="best")
    s.dpo = stage("train", config="configs/dpo.py", init_from="sft")
    s.eval_dpo = stage("eval", run="dpo", suite="configs/eval/demo.py")
    s.rl = stage("train", config="configs/rl.py", init_from="sft")
    s.eval_rl = stage("eval", run="rl", suite="configs/eval/demo.py")
    s.export = stage("export", run="dpo")
    # Simulated users ask training-split questions (never the held-out ones evaluation uses);
    # the demo judge marks a reply up when its number is right, else down with the right answer
    # as the correction -> (corrected > original) preference pairs.
    s.feedback = stage("feedback", run="export", args="conversations=48 n=2 temperature=0.8",
                       quick_args="conversations=4 n=2 temperature=0.8")
    s.dpo_feedback = stage("train", config="configs/dpo.py", init_from="dpo",
                           data_from="feedback")
    s.eval_final = stage("eval", run="dpo_feedback", suite="configs/eval/demo.py")
    return cfg
