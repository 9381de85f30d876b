"""Markdown tables, as every report here writes them (report.md, results.md, data reports)."""

from typing import Any, Iterable, Sequence


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """The lines of a table: `| a | b |`, `|---|---|`, then one line per row; cells are str()
    of what is given (format numbers first)."""

    def line(cells):
        return "|" + "|".join(f" {c} " if str(c) else " " for c in cells) + "|"

    return [line(header), "|" + "---|" * len(header)] + [line(row) for row in rows]
