"""Hugging Face interop: import Llama-family checkpoints to fine-tune, export trained models.

    python -m t5x_like.hf import --hf_dir=<dir> --out=<model dir> [--tokenizer=<.model>]
    python -m t5x_like.hf export --workdir=<run or model dir> --out=<dir> [--step=N]
                                 [--dtype=bfloat16]

The entry point only: the job is t5x_like/interop/hf.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from t5x_like.core import cli
    from t5x_like.interop.hf import COMMANDS

    cli.run_command("t5x_like.hf", COMMANDS)
