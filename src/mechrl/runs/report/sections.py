"""The report's building blocks: a `Section` holds a title, plain text, tables and figures.

This is the one interface a study uses to add its own part to a report:

    from mechrl.runs.report import Section, Table, build_report
    acc = Table(columns=["split", "sft", "grpo"], rows=[["test", 0.91, 0.95]], kind="phases")
    build_report([sft_dir, rl_dir], out / "report.html", extra_sections=[Section("Per phase", tables=[acc])])

Everything here is plain data; `html.py` renders it (and escapes every string), `plots.py` makes
the figures' PNG bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    """A table of cells. Floats print with `float_format`, None as an em dash.

    `kind` names the table in the page (`<table class="tbl" data-kind="...">`) so readers and
    tests can find e.g. the config or the evaluation table."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    kind: str = "table"
    float_format: str = "{:.3f}"
    #: indices of columns whose cells are long text (prompts, completions): wrapped, monospace
    text_columns: tuple[int, ...] = ()

    def __post_init__(self):
        assert self.columns, "Table: no columns"
        for i, row in enumerate(self.rows):
            assert len(row) == len(self.columns), \
                f"Table {self.kind!r}: row {i} has {len(row)} cells for {len(self.columns)} columns"


@dataclass
class Figure:
    """A PNG image (embedded in the page as base64) with a caption."""

    png: bytes
    caption: str = ""

    def __post_init__(self):
        assert self.png.startswith(b"\x89PNG"), f"Figure {self.caption!r}: not PNG bytes"


@dataclass
class Section:
    """One titled part of a report: text (paragraphs split on blank lines), then tables, then figures.
    `subsections` nest one level below."""

    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    subsections: list["Section"] = field(default_factory=list)
