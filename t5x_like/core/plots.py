"""matplotlib for the reports: the file-only backend, and figures saved atomically.

Imported where a report draws, so that no other job pays for importing matplotlib.
"""

import os

from t5x_like.core import files


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str, **savefig_kwargs) -> str:
    """Writes `fig` to `path` (format from its extension) via a temporary name, then closes
    it; returns `path`."""
    fmt = os.path.splitext(path)[1][1:] or "png"
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, **savefig_kwargs)
    pyplot().close(fig)
    return path
