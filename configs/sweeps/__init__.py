# Sweep recipes (`python -m t5x_like.sweep --config=configs/sweeps/<name>.py`); they start from
# `common.sweep()`, which holds every sweep default, and describe their space with
# `common.choice/uniform/log_uniform/integer`.
