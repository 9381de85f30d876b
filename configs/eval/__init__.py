# Evaluation suites (`python -m t5x_like.evaluate --config=configs/eval/<suite>.py`); they build
# their tasks with `common.task(...)`, which holds every task default.
