"""The paper's published Table 1 as data, and our table beside it (``modlora table --compare-paper``).

The file (``assets/paper_table1.json``; any file of the same shape with ``--compare-paper FILE``)::

    {"source": "<citation>", "metric": "chrF++", "langs": ["en", "fr", ...],
     "rows": [{"label": "Pre-train", "percent": 0.0,
               "from": {"en": 40.1, ...}, "to": {"en": 52.3, ...}, "avg": 45.0}, ...]}

``label`` is the paper's row name (:attr:`modlora.evaluate.EvalConfig.label`), ``from``/``to`` the
per-source (``x->``) and per-target (``->x``) chrF++ averages; a number the paper does not print
(or that is not filled in yet) is ``null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .fileio import read_json
from .validate import InputError, Rule, checked_field

PAPER_TABLE = Path(__file__).parent / "assets" / "paper_table1.json"
_PERCENT = Rule(float, low=0, high=100, optional=True)  # chrF++ scores and trainable percentages


def _line(value, where: str) -> str:
    """A string printed into one line of compare.md (a table row: no line break, no column bar)."""
    if not isinstance(value, str) or any(c in value for c in "\r\n|"):
        raise InputError(f"{where} must be one line of text without '|', got {value!r:.80}")
    return value


def load_paper_table(path: str | Path = PAPER_TABLE) -> dict:
    """Read and check a paper table file; returns ``{"source", "metric", "langs", "rows": {label: row}}``."""
    raw = read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("rows"), list) or not isinstance(raw.get("langs"), list):
        raise InputError(f"{path}: expected an object with 'langs' and 'rows' lists")
    langs = [_line(x, f"{path}: langs[{i}]") for i, x in enumerate(raw["langs"])]
    rows: dict[str, dict] = {}
    for i, row in enumerate(raw["rows"]):
        where = f"{path}: rows[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("label"), str):
            raise InputError(f"{where} must be an object with a 'label' string")
        if row["label"] in rows:
            raise InputError(f"{where}: label {row['label']!r} appears twice")
        parsed = {"percent": checked_field(_PERCENT, row.get("percent"), f"{where}.percent"),
                  "avg": checked_field(_PERCENT, row.get("avg"), f"{where}.avg")}
        for part in ("from", "to"):
            values = row.get(part, {})
            if not isinstance(values, dict) or set(values) - set(langs):
                raise InputError(f"{where}.{part} must map languages of {langs} to numbers")
            parsed[part] = {x: checked_field(_PERCENT, values.get(x), f"{where}.{part}.{x}") for x in langs}
        rows[row["label"]] = parsed
    return {"source": _line(raw.get("source", ""), f"{path}: source"),
            "metric": _line(raw.get("metric", "chrF++"), f"{path}: metric"), "langs": langs, "rows": rows}


def _side_by_side(ours: float | None, theirs: float | None) -> str:
    if ours is None:
        return "-"
    if theirs is None:
        return f"{ours:.1f} / n/a"
    return f"{ours:.1f} / {theirs:.1f} ({ours - theirs:+.1f})"


def compare_markdown(rows: Sequence[dict], langs: Sequence[str], paper: dict) -> str:
    """Our Table 1 rows beside the paper's: each cell ``ours / paper (ours - paper)``; ``n/a`` where the
    paper has no number (a row it does not have, such as the learned weights, or a language it lacks)."""
    head = ["", *(f"{x}→" for x in langs), *(f"→{x}" for x in langs), "avg"]
    lines = [f"chrF++, ours / paper (difference); paper: {paper['source'] or 'unknown source'}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    missing = {"from": {}, "to": {}, "avg": None}
    filled = 0
    for row in rows:
        s = row["summary"]
        theirs = paper["rows"].get(row["label"], missing)
        cells = [_side_by_side(s["from"][x], theirs["from"].get(x)) for x in langs]
        cells += [_side_by_side(s["to"][x], theirs["to"].get(x)) for x in langs]
        cells.append(_side_by_side(s["avg"], theirs["avg"]))
        filled += sum("n/a" not in c for c in cells)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    if not filled:
        lines.append("\nThe paper table holds no number for these rows and languages: nothing to compare.")
    return "\n".join(lines) + "\n"
