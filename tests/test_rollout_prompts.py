"""Prompt files: an error names the record's line in the file, blank lines included."""

from __future__ import annotations

import pytest

from rlhfkit.errors import DataError
from rlhfkit.rollout.prompts import load_prompt_set


def test_jsonl_error_names_the_file_line_after_blank_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the cat"}\n\n\n{"prompt": ""}\n')
    with pytest.raises(DataError) as err:
        load_prompt_set(str(path))
    assert "line 4" in str(err.value) and "prompts.jsonl" in str(err.value)


def test_missing_column_names_the_file_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "answer": 1}\n\n{"prompt": "b"}\n')
    with pytest.raises(DataError) as err:
        load_prompt_set(str(path))
    assert "line 3" in str(err.value) and "answer" in str(err.value)


def test_txt_prompts_keep_their_line_numbers(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("the cat\n\n   \nthe dog\n")
    prompts = load_prompt_set(str(path))
    assert prompts.prompts == ["the cat", "the dog"]
