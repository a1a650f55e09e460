"""Every figure in the README's benchmark table and docs/eval.md's demo paragraph is read from benchmarks/results/*.json."""

import json

from benchmarks import _readme


def test_readme_table_is_the_one_the_results_give():
    readme = _readme.README.read_text()
    assert _readme.START in readme and _readme.END in readme
    assert _readme.render(readme) == readme, "README.md's benchmark table is stale: run `python -m benchmarks readme`"


def test_docs_demo_figures_are_the_ones_the_results_give():
    text = _readme.DOCS_EVAL.read_text()
    assert _readme.render_block(text, _readme.DOCS_EVAL, _readme.DEMO_START, _readme.DEMO_END,
                                _readme.demo_paragraph) == text, "docs/eval.md's demo figures are stale: run `python -m benchmarks readme`"


def test_docs_loop_figures_are_the_ones_the_results_give():
    text = _readme.DOCS_EVAL.read_text()
    assert _readme.render_block(text, _readme.DOCS_EVAL, _readme.LOOP_START, _readme.LOOP_END,
                                _readme.loop_paragraph) == text, "docs/eval.md's loop figures are stale: run `python -m benchmarks readme`"


def test_table_changes_when_a_result_changes(tmp_path, monkeypatch):
    """The check can fail: a changed figure in a results file changes the rendered table."""
    for src in _readme.RESULTS.glob("*.json"):
        (tmp_path / src.name).write_text(src.read_text())
    before = _readme.table()
    data = json.loads((tmp_path / "sft_speed.json").read_text())
    data["ratio"] = data["ratio"] + 1.0
    (tmp_path / "sft_speed.json").write_text(json.dumps(data))
    monkeypatch.setattr(_readme, "RESULTS", tmp_path)
    after = _readme.table()
    assert before != after
    assert f"{data['ratio']:.2f}x TRL SFTTrainer" in after
