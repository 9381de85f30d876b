"""The shared evaluation sets (../shared/data/eval), 40 examples each, 200 in all.

    python -m t5x_like.evaluate --workdir=runs/sft --config=configs/eval/shared.py

NTREX-128 English->German/French (BLEU, chrF), SciTLDR and DialogSum summarization (ROUGE),
self-instruct user-oriented instructions (ROUGE, token F1). Prompts longer than the model's
context are shortened (the counts are in results.json as truncated_prompts).
"""

from configs.eval import common


def get_config():
    cfg = common.suite()
    n = 40
    cfg.tasks.ntrex_en_de = common.task("generate", "ntrex:en-de", n=n, max_new_tokens=64)
    cfg.tasks.ntrex_en_fr = common.task("generate", "ntrex:en-fr", n=n, max_new_tokens=64)
    cfg.tasks.scitldr = common.task("generate", "scitldr", n=n, max_new_tokens=48)
    cfg.tasks.dialogsum = common.task("generate", "dialogsum", n=n, max_new_tokens=48)
    cfg.tasks.self_instruct = common.task("generate", "self_instruct", n=n, max_new_tokens=64)
    return cfg
