"""Opening a trained run (a workdir): its config, tokenizer and parameters.

sample, evaluate and serve all start here, so a run is always rebuilt the same way: the model
from `config.json`, the vocabulary from `tokenizer.model`, the weights from a checkpoint.
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.core.errors import UserError


@dataclasses.dataclass
class Run:
    cfg: Any  # FrozenConfigDict of the run
    tokenizer: tokenizer_lib.Tokenizer
    graphdef: Any
    params: dict
    step: int
    mesh: jax.sharding.Mesh
    lora: dict | None = None  # unmerged LoRA adapters (load(merge=False)); model.apply(lora=)


def load(workdir: str, *, step: int | None = None, mesh=None, merge: bool = True,
         base: str | None = None) -> Run:
    """Restores a run's parameters (latest checkpoint unless `step`) onto `mesh`.

    The default mesh is one device: the model replicated, fine for sampling small models.
    A PEFT run (adapters + base.json) loads its base, checked against the recorded one (`base`
    points elsewhere if it moved); merge=True folds the adapters into the weights, so `params`
    is a plain model, merge=False keeps them apart in `lora`.
    """
    cfg = config_lib.load_json(os.path.join(workdir, "config.json"))
    tok_path = tokenizer_lib.find(workdir, required=False)
    if tok_path is None:
        raise UserError(f"{workdir} has no tokenizer.model or tokenizer.json; was it written by "
                        "t5x_like.train?")
    tokenizer = tokenizer_lib.load(tok_path)
    chat_template.for_run(cfg, tokenizer, workdir)  # the template it trained with
    if mesh is None:
        one_device = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
        mesh = partitioning.make_mesh(one_device, jax.devices()[:1])
    graphdef, abstract, names = model.abstract_model(cfg.model, cfg.seed)
    if peft.read_ref(workdir) is not None:
        with jax.set_mesh(mesh):
            params, lora, step = peft.load_adapted(cfg, workdir, abstract, names, mesh, step=step,
                                                   base_dir=base, merge_adapters=merge)
        return Run(cfg, tokenizer, graphdef, params, step, mesh, lora)
    with jax.set_mesh(mesh):
        shardings = partitioning.tree_shardings(mesh, abstract, names)
        target = checkpoints.abstract_with_shardings(abstract, shardings)
        params, step = checkpoints.restore_params(workdir, target, step)
    return Run(cfg, tokenizer, graphdef, params, step, mesh)

