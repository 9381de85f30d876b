"""One trial of a sampling sweep (configs/sweeps/generate_sampling.py): evaluate a trained run
with an evaluation suite, writing the results into the trial's own workdir.

    python -m t5x_like.eval_trial --run=runs/sft --config=configs/eval/demo.py \
        --workdir=sweeps/sampling/trials/0003 [--checkpoint=latest|best|<step>] \
        --config.tasks.arithmetic.temperature=0.7 --config.tasks.arithmetic.top_p=0.9

It calls the evaluation module (branch `eval`): `evaluate.checkpoint_step(run, checkpoint)`,
`runs.load(run, step)`, then `eval_suite.run_suite(run, suite, workdir)`, which writes
`<workdir>/eval/<step>/results.json` and one line per task to `<workdir>/metrics.jsonl` (split
"eval/<task>"), the line a sweep's objective reads. The run itself is only read, so trials may
run side by side.
"""

from absl import flags, logging

from t5x_like.core import cli
from t5x_like.core import runs
from t5x_like.core.errors import UserError


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; options look like --config.x=y.")
    try:
        from t5x_like import evaluate
        from t5x_like.evaluation import eval_suite
        from t5x_like.evaluation import results as results_lib
    except ImportError as e:
        raise UserError(f"the evaluation suite is not in this checkout ({e}); sampling sweeps "
                        "need t5x_like/evaluate.py and eval_suite.py (branch eval).") from None
    f = flags.FLAGS
    step = evaluate.checkpoint_step(f.run, f.checkpoint)
    run = runs.load(f.run, step=step)
    logging.info("Evaluating %s step %d into %s", f.run, step, f.workdir)
    results = eval_suite.run_suite(run, f.config, f.workdir, checkpoint=f.checkpoint)
    print(results_lib.markdown(results), end="")


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Evaluation suite (configs/eval/*.py).")
    flags.DEFINE_string("run", None, "The trained run (workdir) to evaluate.", required=True)
    flags.DEFINE_string("workdir", None, "This trial's folder: results and metrics.jsonl.",
                        required=True)
    flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number.")
    cli.run(main)
