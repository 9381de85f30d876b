"""Export a run's parameters as a model directory:
`python -m t5x_like.export --workdir=runs/x --out=models/x [--step=N] [--dtype=bfloat16]`.

The model directory holds `config.json`, the tokenizer (`tokenizer.model`, or `tokenizer.json`
with its config files) and `checkpoints/<step>/params` (no optimizer state, no data state): what
`sample`, `evaluate`, `serve` and `--config.init_from` load. It is written under a temporary
name and renamed when complete.

A PEFT run (t5x_like/modeling/peft.py) exports with `--merge` as a whole model, its adapters
folded into the base weights (for serving, init_from and `t5x_like.hf export`); without
`--merge` as an adapter directory: the adapters and `base.json` naming the base, which
`runs.load` reads with the base (checking it is the same one).
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import checkpoints
from t5x_like.core import cli
from t5x_like.core import config as config_lib
from t5x_like.core import files
from t5x_like.modeling import peft
from t5x_like.core import runs
from t5x_like.core.errors import UserError


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
           merge: bool = False) -> str:
    """Writes the model directory `out` from `workdir`'s checkpoint; returns `out`."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise UserError(f"{out} already exists; choose a new --out (exports never overwrite).")
    adapters = peft.read_ref(workdir) is not None and not merge
    run = runs.load(workdir, step=step)  # a PEFT run comes merged: a whole model
    cfg = config_lib.to_dict(run.cfg)
    if adapters:  # only what was trained, in float32 like the training run
        params = peft.load_trainable(run.cfg, workdir, run.step)
    else:
        params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), run.params)
        cfg["model"]["param_dtype"] = dtype
        if "peft" in cfg:  # merged: a plain model from now on
            cfg["peft"].update(method="none", trainable="", trainable_layers=0)
    with files.atomic_dir(out) as tmp:
        config_lib.save_json(ml_collections.ConfigDict(cfg), os.path.join(tmp, "config.json"))
        tokenizer_lib.install(run.tokenizer.path, tmp)  # with its config files
        if adapters:
            shutil.copyfile(os.path.join(workdir, peft.REF_FILE), os.path.join(tmp, peft.REF_FILE))
        checkpoints.save_params(tmp, run.step, params)
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    out = export(f.workdir, f.out, step=f.step, dtype=f.dtype, merge=f.merge)
    print(f"exported {f.workdir} -> {out}")


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    flags.DEFINE_string("workdir", None, "Run (or model) directory to export.", required=True)
    flags.DEFINE_string("out", None, "Model directory to create.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
    flags.DEFINE_bool("merge", False, "PEFT runs: fold the adapters into the base weights (a "
                      "whole model); otherwise export the adapters and the base reference.")
    cli.run(main)
