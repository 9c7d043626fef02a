"""The accuracy page's tables are generated from bench/results (bench/tables.py): a result
rerun without regenerating the page, or a table edited by hand, fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_accuracy_page_matches_its_results():
    tables = _tables()
    page = tables.PAGE.read_text()
    assert tables.render(page) == page, "run python bench/tables.py"


def test_the_packaged_known_error_matches_its_results():
    tables = _tables()
    assert tables.KNOWN_ERROR.read_text() == tables.known_error_text(), "run python bench/tables.py"


def test_the_published_comparison_is_todays_cost_model(tmp_path, capsys):
    """bench/results/published.json (and so the accuracy page and the README's rows) is what
    bench/bench_published.py computes with today's code. The figures are float arithmetic of
    the cost model, printed to two decimals: a relative 1e-9 is far below any shown digit and
    far above reassociation noise (about 1e-15)."""
    import json
    import math

    spec = importlib.util.spec_from_file_location("bench_published",
                                                  ROOT / "bench" / "bench_published.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--out", str(tmp_path / "published.json")])
    capsys.readouterr()
    fresh = json.loads((tmp_path / "published.json").read_text())
    stored = json.loads((ROOT / "bench" / "results" / "published.json").read_text())

    def same(a, b) -> bool:
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(
                same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, float) and isinstance(b, (int, float)):
            return math.isclose(a, b, rel_tol=1e-9)
        return a == b

    assert same(fresh, stored), "rerun python bench/bench_published.py --out " \
        "bench/results/published.json, then python bench/tables.py"


def test_a_hand_edited_table_is_caught():
    tables = _tables()
    page = tables.PAGE.read_text()
    edited = page.replace("<!-- /table:published -->", "| a row typed by hand |\n"
                          "<!-- /table:published -->")
    assert edited != page and tables.render(edited) != edited


def test_the_readme_stays_a_front_door():
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 150
    assert not any("../shared" in line for line in readme)


def test_the_documented_search_output_is_the_commands_own(tmp_path, monkeypatch, capsys):
    """docs/commands.md shows `moeplan search --model 1.3b-pr-moe --gpus 64`'s output: its plan
    table and figures (all but the search's own timing) are what the command prints today."""
    from test_cli import invoke

    from moeplan.cli import main as moeplan_cli

    page = (ROOT / "docs" / "commands.md").read_text()
    block = page.split("$ moeplan search --model 1.3b-pr-moe --gpus 64\n", 1)[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    code, out, err = invoke(moeplan_cli, ["search", "--model", "1.3b-pr-moe", "--gpus", "64"],
                            monkeypatch, capsys)
    assert code == 0, err
    printed = [line.rstrip() for line in out.splitlines()]
    for line in block.splitlines():
        if not line.startswith("searched "):  # it ends with the search's wall time
            assert line in printed, f"docs/commands.md is stale: {line!r}"


def test_the_documented_sizing_answer_is_the_commands_own(tmp_path, monkeypatch, capsys):
    """docs/capacity.md quotes the answer of a sweep whose target no point meets: it is what
    the quoted command prints today."""
    from test_cli import invoke

    from moeplan.cli import main as moeplan_cli

    page = (ROOT / "docs" / "capacity.md").read_text()
    command = "moeplan sweep --mode train --target-tokens-per-s 5e6"
    quoted = page.split(f"`{command}` ends with\n`", 1)[1].split("`", 1)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = invoke(moeplan_cli, command.split()[1:] + ["--jobs", "1", "--out", "s.csv"],
                            monkeypatch, capsys)
    assert code == 0, err
    assert quoted in (out + err).replace("\n", " "), "docs/capacity.md is stale"
