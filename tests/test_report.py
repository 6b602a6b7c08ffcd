"""HTML reports from run directories written with RunDir: every metric namespace gets a figure,
the evaluation numbers appear in the evaluation table, completions are escaped, the multi-run
diff lists exactly the differing keys, and bad input is one line and exit status 2."""

from __future__ import annotations

import base64
import re
import shutil
from html.parser import HTMLParser

import pytest
from report_runs import STEPS, XSS, accuracy_at, write_run

from mechrl.cli import main
from mechrl.runs.report import ReportError, Section, Table, build_report
from mechrl.runs.rundir import RunDir
from mechrl.studies.sft_vs_rl import phases_section


class _Page(HTMLParser):
    """Tables by data-kind (rows of cell texts), image sources and figure captions of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.imgs: list[str] = []
        self.captions: list[str] = []
        self.scripts = 0
        self._table = self._cell = self._cap = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(a["data-kind"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "img":
            self.imgs.append(a["src"])
        elif tag == "figcaption":
            self._cap = []
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self._table[-1].append("".join(self._cell))
            self._cell = None
        elif tag == "figcaption":
            self.captions.append("".join(self._cap))
            self._cap = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._cap is not None:
            self._cap.append(data)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return write_run(out, seed=1, lr=2e-3), write_run(out, seed=2, lr=1e-3)


@pytest.fixture(scope="module")
def single_page(two_runs, tmp_path_factory):
    path = build_report([two_runs[0]], tmp_path_factory.mktemp("rep") / "r.html")
    return path.read_text()


def test_every_namespace_has_a_figure_of_valid_png(single_page):
    page = _Page(single_page)
    for ns in ("train", "reward", "policy", "eval", "completions", "time"):
        assert any(c.endswith(f"{ns}/ metrics against training step") for c in page.captions), ns
    assert len(page.imgs) == 6
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def test_page_is_self_contained(single_page):
    page = _Page(single_page)
    assert page.scripts == 0
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", single_page)
    assert "<link" not in single_page


def test_eval_table_holds_the_numbers(single_page):
    rows = _Page(single_page).tables["eval"]
    header, body = rows[0], {(r[0], r[1]): r[2:] for r in rows[1:]}
    assert header == ["split", "rule family"] + [c for s in STEPS for c in (f"n @{s}", f"accuracy @{s}", f"format err @{s}")]
    assert body[("test", "all")] == ["16", f"{accuracy_at(1, 10):.3f}", "0.062", "16", f"{accuracy_at(1, 20):.3f}", "0.062"]
    assert body[("test", "all")][1] == "0.260" and body[("test", "all")][4] == "0.510"
    assert body[("test", "count_above")] == ["8", "0.875", "0.000"] * 2
    assert body[("test", "color_sum_diff")] == ["8", "0.125", "0.125"] * 2
    assert body[("ood_colors", "all")] == ["16", "0.312", "0.188"] * 2
    assert set(body) == {("test", "all"), ("test", "count_above"), ("test", "color_sum_diff"), ("ood_colors", "all")}


def test_config_table_is_the_resolved_config(single_page):
    cfg = dict((r[0], r[1]) for r in _Page(single_page).tables["config"][1:])
    assert cfg["seed"] == "1" and cfg["train.lr"] == "0.002" and cfg["train.max_steps"] == "20"
    assert cfg["kind"] == "sft" and cfg["task.name"] == "cards"


def test_samples_are_escaped(single_page):
    assert XSS not in single_page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; 7" in single_page
    samples = _Page(single_page).tables["samples"]
    assert [r[:2] for r in samples[1:]] == [[str(s), "test"] for s in STEPS]
    assert samples[1][3] == f" {XSS} & 7"  # the browser shows the original text


@pytest.fixture(scope="module")
def multi_page(two_runs, tmp_path_factory):
    """The two runs compared, through the command line."""
    out = tmp_path_factory.mktemp("rep") / "sub" / "cmp.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    return out.read_text()


def test_multi_run_diff_lists_exactly_the_differing_keys(two_runs, multi_page):
    page = _Page(multi_page)
    diff = page.tables["config-diff"]
    assert diff[0] == ["key", two_runs[0].name, two_runs[1].name]
    assert {r[0]: r[1:] for r in diff[1:]} == {"seed": ["1", "2"], "train.lr": ["0.002", "0.001"]}
    final = page.tables["final-eval"]
    assert final[1][0] == "test" and final[1][1] == f"{accuracy_at(1, 20):.3f}" and final[1][3] == f"{accuracy_at(2, 20):.3f}"
    # overlays: one figure per namespace; per-run sections each with their own six
    assert sum(c.endswith("one line per run") for c in page.captions) == 6
    assert len(page.imgs) == 6 + 2 * 6


def test_identical_configs_say_so(two_runs, tmp_path):
    other = tmp_path / two_runs[0].name  # a copy: same name and config, another folder
    shutil.copytree(two_runs[0], other)
    text = build_report([two_runs[0], other], tmp_path / "same.html").read_text()
    # same names: the labels add the parent folder
    assert _Page(text).tables["config-diff"] == [["key", f"{two_runs[0].parent.name}/{other.name}",
                                                  f"{tmp_path.name}/{other.name}"]]
    assert "The runs have identical configs." in text


def test_run_without_metrics_or_evals_says_so(tmp_path):
    from mechrl.config import load_config

    cfg, name = load_config("cards-sft", ["preset=smoke", f"out_dir={tmp_path}"], kind="sft")
    run = RunDir.start(cfg, name)
    run.metrics_path.write_text("")
    text = build_report([run.path], tmp_path / "r.html").read_text()
    assert "No metrics logged yet" in text and "No evaluations yet" in text and "No samples logged yet" in text
    assert "config" in _Page(text).tables


def test_extra_sections_from_a_study(two_runs, tmp_path):
    summary = {"phases": {p: {"run": f"/r/{p}", "step": s, "splits": {"test": {
        "accuracy": a, "format_error_rate": 0.0, "n": 8, "groups": {"g": {"accuracy": a / 2, "format_error_rate": 0.5, "n": 8}}}}}
        for p, s, a in (("sft", 20, 0.5), ("grpo", 5, 0.75))}}
    extra = [phases_section(summary), Section("Notes", text="a <b> note", tables=[Table(["x"], [[1.5]], kind="notes")])]
    text = build_report([two_runs[0]], tmp_path / "r.html", extra_sections=extra).read_text()
    page = _Page(text)
    assert page.tables["phases"] == [["split", "rule family", "sft accuracy @20", "sft format err", "grpo accuracy @5", "grpo format err"],
                                     ["test", "all", "0.500", "0.000", "0.750", "0.000"],
                                     ["test", "g", "0.250", "0.500", "0.375", "0.500"]]
    assert page.tables["notes"] == [["x"], ["1.500"]] and "a &lt;b&gt; note" in text


def test_table_rejects_ragged_rows():
    with pytest.raises(AssertionError, match="row 0 has 1 cells for 2 columns"):
        Table(["a", "b"], [[1]])


def _cli(capsys, *argv):
    code = main(["report", *argv])
    err = capsys.readouterr().err
    return code, err, [ln for ln in err.splitlines() if ln.strip()]


def test_cli_on_a_directory_that_is_no_run(capsys, tmp_path):
    code, err, lines = _cli(capsys, str(tmp_path))
    assert code == 2 and lines == [f"mechrl report: error: not a run directory: {tmp_path} (no config.yaml)"]


def test_cli_on_a_broken_metrics_line(capsys, two_runs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text((two_runs[0] / "config.yaml").read_text())
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, oops}\n[3]\n')
    code, err, lines = _cli(capsys, str(run))
    # a report of what can be read, with what could not listed first
    assert code == 0 and "Traceback" not in err
    html = (run / "report.html").read_text()
    skipped = _Page(html).tables["skipped"]
    assert [r[0] for r in skipped[1:]] == [f"{run}/metrics.jsonl:2", f"{run}/metrics.jsonl:3"]
    assert "JSON list, not an object" in skipped[2][1]
    assert html.index("Skipped while reading") < html.index("Overview")


def test_cli_writes_the_report(capsys, two_runs, tmp_path):
    out = tmp_path / "one.html"
    assert main(["report", str(two_runs[0]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_no_runs_is_a_user_error(tmp_path):
    with pytest.raises(ReportError, match="no runs given"):
        build_report([], tmp_path / "r.html")
