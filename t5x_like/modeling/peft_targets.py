"""Which projections LoRA adapts: `peft.targets` names (short names, groups, patterns) ->
model parameter names.

Apart from peft.py, and free of JAX, so that config validation can check the names without
importing the model.
"""

import fnmatch

from t5x_like.core.errors import UserError

# Short target names -> model parameters; groups of them.
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
           "down": "w_down", "embed": "embed", "head": "lm_head"}
GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down"),
          "all": ("q", "k", "v", "o", "gate", "up", "down")}


def lora_targets(peft_cfg, model_cfg) -> tuple[str, ...]:
    """peft.targets ("q,v", "attention,head", "w_*", ...) -> model parameter names, in order."""
    if peft_cfg.method != "lora":
        return ()
    chosen: list[str] = []
    for entry in filter(None, (e.strip() for e in peft_cfg.targets.split(","))):
        shorts = GROUPS.get(entry, (entry,) if entry in TARGETS else ())
        names = [TARGETS[s] for s in shorts] or [
            p for s, p in TARGETS.items() if fnmatch.fnmatchcase(s, entry)
            or fnmatch.fnmatchcase(p, entry)]
        if not names:
            raise UserError(f"config key 'peft.targets': {entry!r} names no projection; use "
                            f"{', '.join(TARGETS)}, a group ({', '.join(GROUPS)}) or a pattern "
                            "over them (e.g. 'w_*').")
        chosen += [n for n in names if n not in chosen]
    if not chosen:
        raise UserError("config key 'peft.targets' is empty; name the projections LoRA adapts "
                        "(e.g. 'attention' or 'q,v').")
    if "lm_head" in chosen and model_cfg.tie_embeddings and "embed" in chosen:
        # Tied: the embedding's adapter is the output head's too (model.output_head), so
        # "embed,head" (configs/finetune_hf.py, for any family) means the embedding's.
        chosen.remove("lm_head")
    if "lm_head" in chosen and model_cfg.tie_embeddings:
        raise UserError("config key 'peft.targets': 'head' with model.tie_embeddings, where the "
                        "output projection is the embedding; target 'embed' instead.")
    return tuple(n for n in TARGETS.values() if n in chosen)
