"""The whole lifecycle in one command, with a report card.

    python -m t5x_like.lifecycle --config=configs/lifecycle/demo.py --workdir=runs/lifecycle
    (or: bash launch/lifecycle.sh [--recipe=demo] [--data=../shared/data] [--quick])
    bash launch/lifecycle.sh --recipe=hf --hf_dir=<a Hugging Face model folder>

The entry point only: the job is t5x_like/experiments/lifecycle.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    import os

    from absl import flags
    from ml_collections import config_flags

    from t5x_like.core import cli
    from t5x_like.experiments.lifecycle import REPO, main

    config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs/lifecycle/demo.py"),
                                    "Lifecycle recipe (configs/lifecycle/).")
    flags.DEFINE_string("workdir", None, "Where the stages run (default runs/lifecycle-<name>).")
    flags.DEFINE_bool("quick", False, "A few steps per stage: checks the plumbing in minutes.")
    flags.DEFINE_string("data", None, "Root of the real data ({data} in stage args).")
    flags.DEFINE_string("hf_dir", None, "The Hugging Face model folder the recipe's import "
                        "stage reads (--recipe=hf).")
    cli.run(main)
