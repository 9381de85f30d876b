"""Train a model: `python -m t5x_like.train --config=configs/pretrain_tiny.py --workdir=runs/tiny`.

Any config key can be overridden: `--config.optimizer.lr=1e-3 --config.data.source=text:a.txt`.
Rerunning the same command resumes from the workdir's latest checkpoint; changing what the
checkpoints continue (model, data, batch size, optimizer...) then needs
--allow_config_change=<key>. Several processes (hosts) run the same command; see
t5x_like/training/distributed.py and launch/.
"""

import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from t5x_like.core import cli
from t5x_like.training import distributed
from t5x_like.core import metrics
from t5x_like.training import trainer
from t5x_like.core.errors import UserError


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; options look like --config.x=y.")
    cfg = flags.FLAGS.config
    distributed.initialize(cfg.distributed)  # before anything touches the devices
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)  # one log for the job: process 0's
    logging.info("t5x_like on Python %s, jax %s, %d %s devices", sys.version.split()[0],
                 jax.__version__, jax.device_count(), jax.devices()[0].platform)
    result = trainer.train_and_evaluate(
        cfg, flags.FLAGS.workdir, overrides=set(flags.FLAGS["config"].override_values),
        allow_changes=flags.FLAGS.allow_config_change)
    if result.pop("preempted", False):
        print(f"preempted at step {result['step']}: checkpoint saved; rerun to resume")
        return
    if result.pop("early_stopped", False):
        print(f"early stopping at step {result.pop('step')}")
    print("final validation: " + " ".join(f"{k}={metrics.format_value(v)}"
                                           for k, v in result.items()))


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    config_flags.DEFINE_config_file("config", None, "Job config file (configs/*.py).")
    flags.DEFINE_string("workdir", None, "Run directory: config, metrics, checkpoints.",
                        required=True)
    flags.DEFINE_list("allow_config_change", [], "Config keys (or sections) a resumed run may "
                      "change from its config.json besides the free ones (steps, eval, "
                      "checkpoint, mesh...), e.g. data.batch_size,optimizer.lr.")
    cli.run(main)
