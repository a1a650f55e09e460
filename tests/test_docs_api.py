"""docs/api.md: its Python examples run as written, in order, in one process."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} example {i + 1}", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "runs" / "dpo" / "final" / "config.json").is_file()
    assert (tmp_path / "runs" / "grpo" / "final").is_dir()
    assert "datasets.Dataset: 16 rows" in (tmp_path / "runs" / "rm" / "config.yaml").read_text()
