"""Data for t5x_like: readers, the embedded demo task, SentencePiece, TFDS builders, grain pipelines.

Kept import-light so `python -m data_pipelines.<job>` starts fast.
"""
