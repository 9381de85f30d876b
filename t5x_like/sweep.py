"""Hyperparameter sweeps: many runs of one job over config overrides, searched with Optuna.

    python -m t5x_like.sweep --config=configs/sweeps/pretrain_lr_batch.py --workdir=sweeps/lr_bs
    python -m t5x_like.sweep ... --parallel=2         two trials at a time on this machine
    python -m t5x_like.sweep ... --storage=postgresql://user:pw@db/optuna
                                                      workers on many hosts share one study
    python -m t5x_like.sweep ... --report_only        rewrite the results from the study alone

The entry point only: the job is t5x_like/experiments/sweep.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from absl import flags
    from ml_collections import config_flags

    from t5x_like.core import cli
    from t5x_like.experiments.sweep import main

    config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweeps/*.py).")
    flags.DEFINE_string("workdir", None, "Sweep directory: study, trials, results.", required=True)
    flags.DEFINE_integer("parallel", 1, "Trials run at once by this worker.")
    flags.DEFINE_string("storage", "", "Optuna storage URL shared by workers on many hosts "
                        "(e.g. postgresql://user:pw@host/db); default sqlite in --workdir.")
    flags.DEFINE_bool("report_only", False, "Only write the results of the study as it is.")
    cli.run(main)
