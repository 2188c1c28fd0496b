"""Number and cell formatting shared by the evaluations' tables."""
from __future__ import annotations

import math
import numbers


def number(v, digits: int | None = 3) -> str:
    """``v`` with ``digits`` decimals (None: 4 significant digits); 'n/a' for None or NaN."""
    if not is_number(v):
        return "n/a"
    return f"{v:.4g}" if digits is None else f"{v:.{digits}f}"


def is_number(v) -> bool:
    """A real number that is not NaN (numpy's scalars too); not None, not text (a hand-edited file's "abc"
    stopped a report formatting it)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))


def csv_row(row: dict, digits: int = 6) -> dict:
    """Floats rounded, NaN as an empty cell."""
    return {k: (("" if math.isnan(v) else round(v, digits)) if isinstance(v, float) else v) for k, v in row.items()}


def cell(text) -> str:
    """A name as one cell of a Markdown table: its ``|`` escaped (a reader named "A|B" would
    otherwise split the row, every later column one to the right)."""
    return str(text).replace("|", "\\|")


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (``cell``'s escaped ``|`` kept within its cell)."""
    import re
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [c.replace("\\|", "|").strip() for c in re.split(r"(?<!\\)\|", inner)]
