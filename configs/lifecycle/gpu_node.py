"""The lifecycle at real size: a ~1B Llama on one 8-GPU node (or a TPU pod through a launcher).

    bash launch/lifecycle.sh --recipe=gpu_node --data=/data --workdir=/shared/runs/lc1b
    # TPU v5p-8: the train stages on every worker, the rest on this host (workdir on GCS):
    bash launch/lifecycle.sh --recipe=gpu_node --workdir=gs://bucket/lc1b \
        --config.train_launcher="bash launch/tpu_pod.sh --tpu=lc --zone=us-east5-a --accelerator=v5p-8 --"

Same stages as shakespeare_chat, with configs/llama_1b.py (FSDP over the node, sized by
`python -m t5x_like.plan --config=configs/llama_1b.py --devices=8 --device_kind=h100`:
22 GiB of 80 per GPU) pretrained on the prepared text for 20k steps of 0.5M tokens, SFT at
sequence length 2048, DPO and a reward model from SFT, and the shared evaluation suite.
Point `stages.data.config` at a data config listing your own corpora for a real pretraining.
"""


def get_config():
    from configs.lifecycle import shakespeare_chat
    cfg = shakespeare_chat.get_config()
    cfg.name = "gpu_node"
    s = cfg.stages
    data = "data.source=prepared:{stage:data}"
    s.pretrain.config = "configs/llama_1b.py"
    s.pretrain.args = f"{data} steps=20000 mesh.fsdp=-1 mesh.data=1"
    s.sft.args = f"{data} steps=3000 model.max_len=2048 data.batch_size=64 mesh.fsdp=-1 mesh.data=1"
    s.reward.args = f"{data} model.max_len=2048 data.batch_size=64 mesh.fsdp=-1 mesh.data=1"
    s.dpo.args = f"{data} model.max_len=2048 data.batch_size=64 mesh.fsdp=-1 mesh.data=1"
    s.dpo_feedback.args = "model.max_len=2048 data.batch_size=32 mesh.fsdp=-1 mesh.data=1"
    s.feedback.args = ("prompts={data}/sft/self_instruct_seed_tasks.jsonl conversations=512 n=4 "
                       "temperature=0.9 max_tokens=256 judge=reward:reward")
    return cfg
