"""Plain-text tables, as the CLI and the benchmarks print them."""

from __future__ import annotations


def format_table(results: list[dict], columns: list[str] | None = None, transpose: bool = False) -> str:
    """A plain-text table: one row per result, or one row per metric when ``transpose``."""
    columns = columns or list(results[0])
    if transpose:
        rows = [[c] + [str(r.get(c, "")) for r in results] for c in columns]
    else:
        rows = [columns] + [[str(r.get(c, "")) for c in columns] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
