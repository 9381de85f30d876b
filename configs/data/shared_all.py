"""Everything in ../shared/data/pretrain, ../shared/data/sft and ../shared/data/preference,
prepared together: one tokenizer, per-source splits, and a report.

    python -m data_pipelines.prepare --config=configs/data/shared_all.py --out=data/shared_all

Tiny Shakespeare (text), Alpaca and the Self-Instruct seed tasks (instruction chats), the
Schema-Guided Dialogue dev set (multi-turn chats) and hh-rlhf harmless-base pairs
(preference). Pretraining on the result trains on its text source:

    python -m t5x_like.train --config=configs/pretrain_tiny.py --workdir=runs/all \
        --config.data.source=prepared:data/shared_all --config.model.dropout=0.1

Paths are relative to the repository root (where the commands run). hh-rlhf has two pairs
whose chosen and rejected conversations differ before the last reply: on_bad_record=skip
counts them in the report instead of stopping.
"""

import ml_collections

from configs import base

SHARED = "../shared/data"


def source(spec: str, weight: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"source": spec, "weight": weight})


def get_config():
    cfg = base.get_config()
    d = cfg.data
    # Weights are relative among sources of one kind: chat SFT would draw 60% Alpaca, 10%
    # Self-Instruct (175 human-written tasks, revisited often) and 30% SGD dialogues.
    d.sources.alpaca = source(f"alpaca:{SHARED}/sft/alpaca_subset.json", 0.6)
    d.sources.hh_rlhf = source(
        f"preference:{SHARED}/preference/hh_rlhf_harmless_base_test_shared.jsonl.gz", 1.0)
    d.sources.self_instruct = source(f"alpaca:{SHARED}/sft/self_instruct_seed_tasks.jsonl", 0.1)
    d.sources.sgd = source(f"sgd:{SHARED}/sft/sgd_dev_dialogues.json.gz", 0.3)
    d.sources.shakespeare = source(f"text:{SHARED}/pretrain/tinyshakespeare.txt", 1.0)
    d.on_bad_record = "skip"
    d.vocab_size = 8192
    d.num_workers = 2
    return cfg
