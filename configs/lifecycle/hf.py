"""The lifecycle of an open model: import a local Hugging Face model folder, chat-tune it, align
it, serve it to (simulated) users, tune on their feedback, and export it back to transformers.

    bash launch/lifecycle.sh --recipe=hf --hf_dir=~/models/Qwen2.5-0.5B-Instruct
    bash launch/lifecycle.sh --recipe=hf --hf_dir=<dir> --workdir=runs/lc-qwen \
        --config.stages.sft.args="data.source=chat:my_chats.jsonl"
    bash launch/lifecycle.sh --recipe=hf --hf_dir=<dir> --quick     # a few steps per stage

Stages (the kinds are documented in configs/lifecycle/demo.py; `import` and `hf_export` are
`python -m t5x_like.hf import|export`):
    import        the HF folder (config.json, *.safetensors, tokenizer.model or tokenizer.json
                  with its config files and chat template) -> a model directory
    eval_import   the imported model on the demo's held-out questions, in its own chat template
    sft           configs/finetune_hf.py: LoRA SFT, assistant-only loss, in the model's own
                  template (data.chat_template=auto); data: the demo's chats unless you set
                  data.source (chat:<jsonl>, alpaca:<json>)
    sft_model     the adapters folded into the base (export --merge, bfloat16): DPO starts from
                  a whole model
    eval_sft, dpo (configs/dpo.py with LoRA: the frozen base is DPO's reference, held once),
    dpo_model, eval_dpo,
    feedback      dpo_model served (`python -m t5x_like.serve`, the model's template and stop ids)
                  to simulated users asking the demo's training questions; replies rated by the
                  exact answer, wrong ones corrected -> preference pairs
    dpo_feedback  DPO (LoRA) from dpo_model on those pairs (plus replayed demo pairs)
    eval_final, hf_export   the last run exported for transformers / vLLM: its HF class, the
                  tokenizer files as imported and the chat template it trained with
Each stage runs in <workdir>/<stage>/; report.md shows every stage, its command and metrics.

Sizes, and why: the train stages use finetune_hf.py's setting for a 1-8B model on one
accelerator host (LoRA rank 16 on every projection plus embedding and head, bfloat16 base and
compute, full remat, 2048-token SFT rows); DPO rows are 1024 tokens (prompt and both replies of
a chat turn), 16 pairs per step, at dpo.py's learning rate 5e-5: for LoRA, which starts from
zero and is scaled by alpha / rank, about ten times the 5e-7..5e-6 of full-weight DPO on models
of this size (Zephyr, Tulu). The demo's data and judge are a smoke test of the plumbing on any
model; point data.source (and the feedback stage's prompts=, judge=reward:<stage>) at your own.
"""

import ml_collections

from configs.lifecycle.demo import demo_eval, stage

# LoRA as in configs/finetune_hf.py, for the DPO stages (dpo.py trains every weight), and
# finetune_hf.py's bfloat16 base and compute with full remat (not under --quick).
LORA = ("peft.method=lora peft.rank=16 peft.alpha=32 peft.dropout=0.05 "
        "peft.targets=all,embed,head")
BF16 = "peft.base_dtype=bfloat16 model.dtype=bfloat16 model.remat=full"
MERGE = "--merge --dtype=bfloat16"


def get_config():
    cfg = ml_collections.ConfigDict()
    cfg.name = "hf"
    cfg.hf_dir = ""  # --hf_dir=... in launch/lifecycle.sh: the HF model folder to import
    cfg.data_root = "../shared/data"  # --data=...; {data} in args
    cfg.quick = False
    cfg.quick_steps = 4
    cfg.quick_model = ""  # every train stage starts from an imported model: its own size
    cfg.train_launcher = ""  # as configs/lifecycle/demo.py (a pod launcher prefix)
    cfg.order = ("import,eval_import,sft,sft_model,eval_sft,dpo,dpo_model,eval_dpo,feedback,"
                 "dpo_feedback,eval_final,hf_export")
    cfg.stages = ml_collections.ConfigDict()
    s = cfg.stages
    s["import"] = stage("import")
    s.eval_import = demo_eval("import")
    # Under --quick: rows and batches a tiny model trains in seconds, float32 on a CPU.
    quick = ("model.max_len=256 data.batch_size=8 optimizer.grad_accum_steps=1 "
             "model.dtype=float32 peft.base_dtype=float32 model.remat=none")
    s.sft = stage("train", config="configs/finetune_hf.py", init_from="import", quick_args=quick)
    s.sft_model = stage("export", run="sft", args=MERGE, quick_args="--merge")
    s.eval_sft = demo_eval("sft", checkpoint="best")
    dpo = f"{LORA} {BF16} model.max_len=1024 data.batch_size=16"
    s.dpo = stage("train", config="configs/dpo.py", init_from="sft_model", args=dpo,
                  quick_args=f"{LORA} {quick}")
    s.dpo_model = stage("export", run="dpo", args=MERGE, quick_args="--merge")
    s.eval_dpo = demo_eval("dpo")
    s.feedback = stage("feedback", run="dpo_model",
                       args="conversations=64 n=2 temperature=1.0 max_tokens=16 replay=200",
                       quick_args="conversations=8 n=2 temperature=1.0 max_tokens=8 replay=16")
    s.dpo_feedback = stage("train", config="configs/dpo.py", init_from="dpo_model",
                           data_from="feedback", args=f"{dpo} steps=20",
                           quick_args=f"{LORA} {quick}")
    s.eval_final = demo_eval("dpo_feedback")
    s.hf_export = stage("hf_export", run="dpo_feedback", quick_args="")
    return cfg
