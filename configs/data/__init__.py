# Data recipes for `python -m data_pipelines.prepare --config=configs/data/<recipe>.py --out=...`.
