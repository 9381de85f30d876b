"""The demo suite (configs/eval/demo.py) plus its questions through lm-evaluation-harness.

    python -m t5x_like.evaluate --workdir=runs/sft --config=configs/eval/demo_harness.py

arithmetic_mc: lm-eval's multiple-choice accuracy on the 200 held-out questions of the demo
task, the right answer against its plausible wrong one (harness.py's t5x_demo_arithmetic_mc),
through the chat template like the other demo tasks (`template=plain` for a model that only
continues text). Needs the eval extra (pip install -e '.[eval]'); no network.
"""

from configs.eval import common, demo


def get_config():
    cfg = demo.get_config()
    cfg.tasks.arithmetic_mc = common.task("harness:t5x_demo_arithmetic_mc", "", n=200)
    return cfg
