"""HTML reports of run directories: one self-contained file (inline CSS, PNG plots as base64,
no JavaScript, nothing fetched).

    mechrl report runs/cards-sft runs/cards-grpo --out report.html

    from mechrl.runs.report import build_report, Section, Table
    build_report([run_dir], run_dir / "report.html", extra_sections=[Section("Notes", text="...")])

Modules: `sections.py` (the data a report is made of), `rundata.py` (reading a run directory),
`plots.py` (matplotlib figures), `html.py` (rendering and escaping), `build.py` (assembling it).
"""

from mechrl.runs.report.build import build_report, write_run_report
from mechrl.runs.report.rundata import ReportError, RunData, load_run
from mechrl.runs.report.sections import Figure, Section, Table

__all__ = ["build_report", "write_run_report", "load_run", "RunData", "ReportError", "Section", "Table", "Figure"]
