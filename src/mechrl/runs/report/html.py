"""Rendering `Section`s into one self-contained HTML page: inline CSS, images as base64 data URIs,
no JavaScript, no external resource. Every string from a run (config values, prompts, completions,
titles) goes through `html.escape`; nothing is ever inserted raw."""

from __future__ import annotations

import base64
import html
import math
import re
from typing import Any

from mechrl.runs.report.sections import Figure, Section, Table

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1500px; padding: 1em 2em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; border-bottom: 2px solid #446; padding-bottom: .2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #bbb; }
h3 { font-size: 1.1em; margin-top: 1.5em; }
nav ul { columns: 3; font-size: .9em; }
table.tbl { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
table.tbl caption { caption-side: top; text-align: left; font-weight: 600; padding: .3em 0; }
table.tbl th, table.tbl td { border: 1px solid #ccc; padding: .2em .6em; vertical-align: top; }
table.tbl th { background: #eef; position: sticky; top: 0; }
table.tbl td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.tbl td.text { font-family: "DejaVu Sans Mono", monospace; white-space: pre-wrap;
                    max-width: 45em; word-break: break-word; }
table.tbl tr:nth-child(even) td { background: #fafafc; }
div.figures { display: flex; flex-wrap: wrap; gap: 1em 2em; align-items: flex-start; }
figure { margin: .5em 0 1.5em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; }
p.note { color: #555; }
"""


def _anchor(title: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
    anchor, i = base, 2
    while anchor in used:
        anchor, i = f"{base}-{i}", i + 1
    used.add(anchor)
    return anchor


def format_cell(value: Any, float_format: str) -> tuple[str, bool]:
    """(escaped text, is a number)."""
    if value is None:
        return "\u2014", False
    if isinstance(value, bool):
        return str(value), False
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a", True
        return html.escape(float_format.format(value)), True
    if isinstance(value, int):
        return str(value), True
    return html.escape(str(value)), False


def render_table(t: Table) -> str:
    out = [f'<table class="tbl" data-kind="{html.escape(t.kind, quote=True)}">']
    if t.caption:
        out.append(f"<caption>{html.escape(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
    for row in t.rows:
        cells = []
        for j, v in enumerate(row):
            text, is_num = format_cell(v, t.float_format)
            cls = "text" if j in t.text_columns else "num" if is_num else ""
            cells.append(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode("ascii")
    alt = html.escape(f.caption or "figure", quote=True)
    cap = f"<figcaption>{html.escape(f.caption)}</figcaption>" if f.caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">{cap}</figure>'


def _render_text(text: str) -> str:
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    return "\n".join(f'<p class="note">{html.escape(p)}</p>' for p in paras)


def render_section(s: Section, anchor: str, level: int, used: set[str]) -> str:
    out = [f'<section id="{anchor}"><h{level}>{html.escape(s.title)}</h{level}>']
    if s.text:
        out.append(_render_text(s.text))
    out += [render_table(t) for t in s.tables]
    if s.figures:
        out.append('<div class="figures">' + "\n".join(render_figure(f) for f in s.figures) + "</div>")
    for sub in s.subsections:
        out.append(render_section(sub, _anchor(sub.title, used), min(level + 1, 6), used))
    out.append("</section>")
    return "\n".join(out)


def render_page(title: str, sections: list[Section], intro: str = "") -> str:
    """The whole page: title, an optional intro, a table of contents, then the sections."""
    used: set[str] = set()
    anchors = [_anchor(s.title, used) for s in sections]
    toc = "".join(f'<li><a href="#{a}">{html.escape(s.title)}</a></li>' for s, a in zip(sections, anchors))
    body = "\n".join(render_section(s, a, 2, used) for s, a in zip(sections, anchors))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n<body>\n"
            f"<h1>{html.escape(title)}</h1>\n{_render_text(intro)}\n"
            f"<nav><ul>{toc}</ul></nav>\n{body}\n</body></html>\n")
