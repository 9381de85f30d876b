"""The lifecycle on the real data in ../shared/data: Shakespeare + chat sets + hh-rlhf pairs.

    bash launch/lifecycle.sh --recipe=shakespeare_chat --data=../shared/data

Prepares every shared source together (configs/data/shared_all.py: one tokenizer, cleaning,
dedup, a data report), pretrains on its text, fine-tunes on its chats (Alpaca, Self-Instruct,
SGD), trains a reward model and DPO on the hh-rlhf pairs, evaluates BLEU/ROUGE/chrF on the
shared evaluation sets (configs/eval/shared.py), serves the DPO model to simulated users whose
ratings come from the reward model, and runs one more DPO round on that feedback. About two
hours on a 2-core CPU; on an accelerator raise steps and sizes (see configs/lifecycle/pod.py).
The stage kinds and argument forms are documented in configs/lifecycle/demo.py.
"""

from configs.lifecycle.demo import stage


def get_config():
    from configs.lifecycle import demo
    cfg = demo.get_config()
    cfg.name = "shakespeare_chat"
    cfg.order = ("data,pretrain,sft,eval_sft,reward,dpo,eval_dpo,export,feedback,dpo_feedback,"
                 "eval_final")
    s = cfg.stages
    data = "data.source=prepared:{stage:data}"
    s.data = stage("prepare", config="configs/data/shared_all.py")
    s.pretrain = stage("train", config="configs/pretrain_tiny.py",
                       args=f"{data} steps=2000 model.max_len=256 model.dropout=0.1",
                       quick_args=f"{data} model.max_len=64")
    s.sft = stage("train", config="configs/sft_chat.py", init_from="pretrain",
                  args=f"{data} steps=600 model.max_len=256 data.batch_size=8",
                  quick_args=f"{data} model.max_len=64")
    s.eval_sft = shared_eval("sft", checkpoint="best")
    s.reward = stage("train", config="configs/reward.py", init_from="sft",
                     args=f"{data} model.max_len=256", quick_args=f"{data} model.max_len=64")
    s.dpo = stage("train", config="configs/dpo.py", init_from="sft",
                  args=f"{data} model.max_len=256", quick_args=f"{data} model.max_len=64")
    s.eval_dpo = shared_eval("dpo")
    s.export = stage("export", run="dpo")
    s.feedback = stage(
        "feedback", run="export",
        args="prompts={data}/sft/self_instruct_seed_tasks.jsonl conversations=48 n=2 "
             "temperature=0.9 max_tokens=48 judge=reward:reward",
        quick_args="prompts={data}/sft/self_instruct_seed_tasks.jsonl conversations=4 n=2 "
                   "temperature=0.9 max_tokens=8 judge=reward:reward")
    s.dpo_feedback = stage("train", config="configs/dpo.py", init_from="dpo",
                           data_from="feedback", args="model.max_len=256 data.validation_fraction=0.3",
                           quick_args="model.max_len=64 data.validation_fraction=0.3")
    s.eval_final = shared_eval("dpo_feedback")
    for unused in ("rl", "eval_rl", "eval_pretrain", "eval_pretrain_text"):
        del s[unused]
    return cfg


def shared_eval(run: str, checkpoint: str = "latest"):
    """BLEU/chrF (NTREX), ROUGE (SciTLDR, DialogSum, Self-Instruct): configs/eval/shared.py."""
    return stage("eval", run=run, suite="configs/eval/shared.py", checkpoint=checkpoint,
                 quick_args=" ".join(f"tasks.{t}.n=2" for t in (
                     "ntrex_en_de", "ntrex_en_fr", "scitldr", "dialogsum", "self_instruct")))
