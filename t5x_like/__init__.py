"""t5x_like: train, fine-tune, align and serve chat language models in JAX.

Kept import-light (no JAX here) so entry points can set XLA flags before JAX starts.
"""

__version__ = "0.1.0"
