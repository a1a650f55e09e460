"""Data layer: readers, format detection, validators, comparisons (labels, ties, rankings)."""

from __future__ import annotations

import json
from itertools import combinations

import pytest

from rlhfkit.data import (
    DataError,
    detect_dataset_format,
    detect_format,
    iter_records,
    load_records,
    validate_comparisons,
    validate_preferences,
    validate_rankings,
    validate_records,
    validate_sft,
    validate_unpaired,
)
from rlhfkit.data.preference import Comparison, read_comparisons, strict_pairs
from rlhfkit.errors import ConfigError


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


CONV_PROMPT = [{"role": "user", "content": "Say something nice."}]
RECORDS = {
    "text": {"text": "A lovely day."},
    "prompt_completion": {"prompt": "The weather", "completion": " is nice."},
    "messages": {"messages": CONV_PROMPT + [{"role": "assistant", "content": "You are kind."}]},
    "preference": {"prompt": "Hi", "chosen": " friend", "rejected": " go away"},
    "ranking": {"prompt": "Hi", "responses": ["a", "b", "c"], "ranking": [1, 0, 2]},
    "unpaired": {"prompt": "Hi", "completion": " friend", "label": True},
    "prompt_only": {"prompt": "Hi"},
}


# ---------------------------------------------------------------- readers

def test_jsonl_reads_and_skips_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    records = load_records(path, required=["text"])
    assert records == [{"text": "a"}, {"text": "b"}]
    assert records.lines == [1, 4]
    assert records.source == str(path)
    tail = records[1:]
    assert isinstance(tail, type(records)) and tail.lines == [4] and tail.source == str(path)


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert "bad.jsonl" in str(info.value) and "line 3" in str(info.value)
    assert info.value.line == 3


def test_jsonl_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "arr.jsonl", [{"text": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=r"arr\.jsonl, line 2: expected a JSON object, got list"):
        load_records(path)


def test_missing_required_column_names_field_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"},
                                               {"prompt": "b", "chosen": "x"}])
    with pytest.raises(DataError) as info:
        load_records(path, required=["prompt", "chosen", "rejected"])
    err = info.value
    assert (err.line, err.field) == (2, "rejected")
    assert "p.jsonl" in str(err) and "line 2" in str(err) and "'rejected'" in str(err)


def test_json_list_and_json_lines_with_json_suffix(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert load_records(tmp_path / "a.json") == [{"text": "a"}, {"text": "b"}]
    write_jsonl(tmp_path / "b.json", [{"text": "a"}, {"text": "b"}])
    assert load_records(tmp_path / "b.json") == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "c.json").write_text(json.dumps({"text": "a"}))
    with pytest.raises(DataError, match="list of objects"):
        load_records(tmp_path / "c.json")
    (tmp_path / "d.json").write_text('[{"text": "a"},\n {"text": oops}]')
    with pytest.raises(DataError, match=r"d\.json, line 2"):
        load_records(tmp_path / "d.json")


def test_parquet_round_trip_with_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": CONV_PROMPT, "chosen": [{"role": "assistant", "content": "yes"}],
             "rejected": [{"role": "assistant", "content": "no"}]}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    records = load_records(tmp_path / "p.parquet", required=["prompt", "chosen"])
    assert records == rows
    assert detect_format(records[0]) == "preference"
    streamed = list(iter_records(tmp_path / "p.parquet", required=["chosen"]))
    assert streamed == rows


def test_parquet_missing_column_names_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "chosen": "b"}]), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet, line 1, field 'rejected'"):
        load_records(tmp_path / "p.parquet", required=["rejected"])


def test_datasets_folder_round_trip(tmp_path):
    import datasets

    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "c", "completion": " d"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load_records(tmp_path / "single") == rows
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_records(tmp_path / "dict", split="test") == rows[:1]
    with pytest.raises(DataError, match=r"split 'validation' not found; available splits: \['test', 'train'\]"):
        load_records(tmp_path / "dict", split="validation")
    # an in-memory Dataset is accepted as it is
    assert load_records(datasets.Dataset.from_list(rows)) == rows


def test_folder_of_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "t"}])
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "e"}])
    assert load_records(tmp_path, split="eval") == [{"text": "e"}]
    with pytest.raises(DataError, match="test.jsonl"):
        load_records(tmp_path, split="test")


def test_hub_name_offline_error_is_clear(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/prefs' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_records("org/prefs")
    message = str(info.value)
    assert message.startswith("org/prefs:") and "Hugging Face Hub" in message and "save_to_disk" in message


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type '.csv'"):
        load_records(tmp_path / "x.csv")


def test_streaming_jsonl_checks_required_per_line(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": "a"}, {"text": "b"}, {"other": 1}])
    stream = iter_records(path, required=["text"])
    assert next(stream) == {"text": "a"} and next(stream) == {"text": "b"}
    with pytest.raises(DataError, match=r"s\.jsonl, line 3, field 'text'"):
        next(stream)


# ---------------------------------------------------------------- detection

@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_detect_format(fmt):
    assert detect_format(RECORDS[fmt]) == fmt


def test_detect_conversational_and_implicit_prompt_preferences():
    implicit = {"chosen": CONV_PROMPT + [{"role": "assistant", "content": "yes"}],
                "rejected": CONV_PROMPT + [{"role": "assistant", "content": "no"}]}
    assert detect_format(implicit) == "preference"
    assert detect_format({"prompt": CONV_PROMPT, "completion": [{"role": "assistant", "content": "x"}],
                          "label": False}) == "unpaired"


def test_detect_unknown_columns_and_mixed_file(tmp_path):
    with pytest.raises(DataError, match=r"cannot tell the data format from columns \['foo'\]"):
        detect_format({"foo": 1})
    path = write_jsonl(tmp_path / "mix.jsonl", [RECORDS["preference"], RECORDS["preference"], RECORDS["text"]])
    with pytest.raises(DataError, match=r"mix\.jsonl, line 3: record is in format 'text'"):
        detect_dataset_format(load_records(path))


# ---------------------------------------------------------------- preferences

def test_validate_preferences_errors_name_line_and_field(tmp_path):
    good = {"prompt": "Hi", "chosen": " yes", "rejected": " no"}
    cases = [({"prompt": "Hi", "chosen": " yes"}, "rejected", "missing column"),
             ({"prompt": "Hi", "chosen": " same", "rejected": " same"}, "rejected", "chosen identical to rejected"),
             ({"prompt": "Hi", "chosen": "   ", "rejected": " no"}, "chosen", "empty text"),
             ({"prompt": "Hi", "chosen": " yes", "rejected": [{"role": "assistant", "content": "no"}]},
              "rejected", "mix text and conversation"),
             ({"prompt": "Hi", "chosen": " a", "rejected": " b", "margin": "big"}, "margin", "finite number")]
    for bad, field, reason in cases:
        path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad])
        with pytest.raises(DataError) as info:
            validate_preferences(load_records(path))
        assert (info.value.line, info.value.field) == (3, field), bad
        assert reason in str(info.value) and "prefs.jsonl" in str(info.value)


def test_validate_preferences_skip_reports_and_keeps_extras(tmp_path, capsys):
    rows = [{"prompt": "Hi", "chosen": " yes", "rejected": " no", "margin": 2.0, "annotator_id": "ann-3"},
            {"prompt": "Hi", "chosen": " same", "rejected": " same"},
            {"prompt": "Hi", "chosen": " ok"},
            {"prompt": "Hi", "chosen": " good", "rejected": " bad"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    kept = validate_preferences(load_records(path), on_error="skip")
    assert kept == [rows[0], rows[3]]
    assert kept.lines == [1, 4]
    assert kept[0]["margin"] == 2.0 and kept[0]["annotator_id"] == "ann-3"
    report = kept.report
    assert (report.total, report.kept, report.skipped) == (4, 2, 2)
    assert report.reasons == {"chosen identical to rejected": 1, "missing column": 1}
    printed = capsys.readouterr().err
    assert "kept 2 of 4" in printed and "skipped 2" in printed and "prefs.jsonl, line 2" in printed
    # nothing skipped: nothing printed
    validate_preferences(kept, on_error="skip")
    assert capsys.readouterr().err == ""
    with pytest.raises(ConfigError):
        validate_preferences(kept, on_error="ignore")


def test_implicit_prompt_conversations():
    ok = {"chosen": CONV_PROMPT + [{"role": "assistant", "content": "yes"}],
          "rejected": CONV_PROMPT + [{"role": "assistant", "content": "no"}]}
    assert validate_preferences([ok]) == [ok]
    differ_early = {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                    "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"line 1, field 'chosen\[0\]\.role': chosen and rejected differ before"):
        validate_preferences([differ_early])
    bad_role = {"prompt": "Hi", "chosen": [{"role": "robot", "content": "x"}],
                "rejected": [{"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match=r"field 'chosen\[0\]\.role': unknown role"):
        validate_preferences([bad_role])


# ---------------------------------------------------------------- rankings

def test_validate_rankings_rejects_bad_rankings():
    base = {"prompt": "Hi", "responses": ["a", "b", "c"]}
    cases = [([0, 0, 1], "duplicate ranking index"), ([0, 1, 3], "out of range"), ([2], "at least 2"),
             ([0, 1, -1], "out of range"), ([True, 0, 2], "integer indices"), ("012", "integer indices")]
    for ranking, reason in cases:
        with pytest.raises(DataError, match=reason) as info:
            validate_rankings([{"prompt": "Hi", "responses": ["a", "b", "c"], "ranking": [0, 1, 2]},
                               {**base, "ranking": ranking}], source="r.jsonl")
        assert (info.value.line, info.value.field) == (2, "ranking")
    with pytest.raises(DataError, match="identical responses"):
        validate_rankings([{"prompt": "Hi", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}])
    with pytest.raises(DataError, match=r"field 'responses': ranked responses mix text and conversation"):
        validate_rankings([{"prompt": "Hi", "responses": ["a", [{"role": "assistant", "content": "b"}]],
                            "ranking": [0, 1]}])
    # partial: the ranked responses must differ and be valid; unranked ones are compared with nothing
    assert validate_rankings([{**base, "ranking": [2, 0]}]) and validate_rankings(
        [{"prompt": "Hi", "responses": ["a", "b", "a"], "ranking": [0, 1]}])
    with pytest.raises(DataError, match=r"field 'responses\[2\]': empty text"):
        validate_rankings([{"prompt": "Hi", "responses": ["a", "b", " "], "ranking": [0, 1]}])
    with pytest.raises(DataError, match="at least 2 responses"):
        validate_rankings([{"prompt": "Hi", "responses": ["a"], "ranking": [0]}])
    kept = validate_rankings([{**base, "ranking": [0, 0, 1]}, {**base, "ranking": [2, 1, 0]}],
                             on_error="skip", log=None)
    assert len(kept) == 1 and kept.report.reasons == {"duplicate ranking index": 1}


def test_rankings_give_their_pairs_best_first():
    records = [{"prompt": "p0", "responses": ["r0", "r1", "r2", "r3"], "ranking": [2, 0, 3, 1],
                "annotator_id": 7},
               {"prompt": "p1", "responses": ["s0", "s1", "s2", "s3"], "ranking": [1, 2, 0]}]  # s3 unranked
    comps = read_comparisons(records)
    assert [c.ranked for c in comps] == [True, True] and comps[0].responses == ("r2", "r0", "r3", "r1")
    first = comps[0].pairs()
    assert len(first) == 6  # C(4,2)
    assert [p.responses for p in first] == [(f"r{a}", f"r{b}") for a, b in combinations([2, 0, 3, 1], 2)]
    assert all(p.prompt == "p0" and p.label == 1.0 and not p.ranked for p in first)
    assert [p.responses for p in comps[1].pairs()] == [("s1", "s2"), ("s1", "s0"), ("s2", "s0")]


def test_labels_and_ties_one_rule():
    records = [{"prompt": "p", "chosen": " a", "rejected": " b"},
               {"prompt": "p", "chosen": " c", "rejected": " d", "label": 0},
               {"prompt": "p", "chosen": " e", "rejected": " f", "label": 0.5},
               {"prompt": "p", "chosen": " g", "rejected": " h", "tie": True, "margin": 2, "annotator_id": 3},
               {"prompt": "p", "chosen": " i", "rejected": " j", "label": 0.25}]
    comps = read_comparisons(records, source="prefs.jsonl")
    assert [c.label for c in comps] == [1.0, 0.0, 0.5, 0.5, 0.25]
    assert (comps[3].margin, comps[3].annotator, comps[3].line) == (2.0, "3", 4)
    kept, ties = strict_pairs(comps)
    assert ties == 2
    assert [(c.responses, c.label) for c in kept] == [((" a", " b"), 1.0), ((" d", " c"), 1.0), ((" j", " i"), 0.75)]
    for bad, field, reason in [({"label": 2}, "label", r"label must be a number in \[0, 1\].*got 2"),
                               ({"label": "yes"}, "label", "label must be a number"),
                               ({"tie": "yes"}, "tie", "tie must be true or false"),
                               ({"tie": True, "label": 1}, "label", "contradicts")]:
        with pytest.raises(DataError, match=reason) as info:
            validate_comparisons([records[0], {**records[0], **bad}], source="prefs.jsonl")
        assert (info.value.line, info.value.field) == (2, field)


def test_comparisons_mix_pairs_and_rankings_and_refuse_other_layouts():
    mixed = [RECORDS["preference"], RECORDS["ranking"]]
    assert validate_comparisons(mixed) == mixed
    assert isinstance(read_comparisons(mixed)[0], Comparison)
    with pytest.raises(DataError, match=r"x\.jsonl, line 2: not a comparison record: a 'text' record"):
        validate_comparisons([RECORDS["preference"], RECORDS["text"]], source="x.jsonl")
    kept = validate_comparisons([RECORDS["preference"], RECORDS["text"], RECORDS["ranking"]], on_error="skip", log=None)
    assert kept.lines == [1, 3] and kept.report.reasons == {"not a comparison record": 1}


# ---------------------------------------------------------------- SFT and unpaired

def test_validate_sft_and_unpaired():
    assert validate_sft([RECORDS["text"], RECORDS["prompt_completion"], RECORDS["messages"]])
    with pytest.raises(DataError, match=r"field 'messages\[0\]\.role': response does not end with an assistant"):
        validate_sft([{"messages": CONV_PROMPT}])
    with pytest.raises(DataError, match=r"line 1, field 'completion': empty text"):
        validate_sft([{"prompt": "a", "completion": ""}])
    with pytest.raises(DataError, match="not an SFT record"):
        validate_sft([RECORDS["preference"]])
    kept = validate_unpaired([{"prompt": "a", "completion": " b", "label": 1},
                              {"prompt": "a", "completion": " c", "label": False}])
    assert [r["label"] for r in kept] == [True, False]
    with pytest.raises(DataError, match=r"field 'label': label must be true or false"):
        validate_unpaired([{"prompt": "a", "completion": " b", "label": "yes"}])
    with pytest.raises(DataError, match=r"field 'label': missing column"):
        validate_unpaired([{"prompt": "a", "completion": " b", "label": None}])


def test_validate_records_dispatches_on_format(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [RECORDS["unpaired"], {**RECORDS["unpaired"], "label": 0}])
    kept = validate_records(load_records(path))
    assert [r["label"] for r in kept] == [True, False]


def test_load_prompts_from_every_source(tmp_path):
    from rlhfkit.data.prompts import load_prompts
    from rlhfkit.errors import DataError
    from rlhfkit.models import load_tokenizer
    from rlhfkit.tasks import kindly

    assert load_prompts("kindly", "eval") == list(kindly.prompts("eval"))
    assert load_prompts("kindly:train", "eval", limit=3) == list(kindly.prompts("train"))[:3]
    txt = tmp_path / "p.txt"
    txt.write_text("She was\n\n  \nThe day\n")
    assert load_prompts(str(txt)) == ["She was", "The day"]
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Say"}]
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "plain"}, {"prompt": conv}])
    assert load_prompts(str(src)) == ["plain", "Hi\nHello\nSay"]
    tok = load_tokenizer("kindly:tokenizer")
    rendered = load_prompts(str(src), tokenizer=tok)[1]
    assert rendered == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "   "}])
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 2.*field 'prompt'"):
        load_prompts(str(bad))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no prompts found"):
        load_prompts(str(tmp_path / "empty.txt"))


# ---------------------------------------------------------------- community layouts

ALPACA = [{"instruction": "Say something kind.", "input": "", "output": "You are lovely."},
          {"instruction": "Add the numbers.", "input": "1 and 2", "output": "3", "id": 7},
          {"instruction": "Name a colour.", "output": "Blue."}]
SHAREGPT = [{"id": "a", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                          {"from": "gpt", "value": "Hello!"}]},
            {"id": "b", "system": "Be brief.", "conversations": [{"from": "human", "value": "Weather?"},
                                                                 {"from": "gpt", "value": "Warm."},
                                                                 {"from": "human", "value": "Thanks"},
                                                                 {"from": "gpt", "value": "Welcome."}]}]


def test_alpaca_becomes_prompt_completion(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", ["", *ALPACA])  # a blank first line: lines still count
    records = load_records(path)
    assert list(records) == [{"prompt": "Say something kind.", "completion": "You are lovely."},
                             {"prompt": "Add the numbers.\n\n1 and 2", "completion": "3", "id": 7},
                             {"prompt": "Name a colour.", "completion": "Blue."}]
    assert records.lines == [2, 3, 4] and detect_dataset_format(records) == "prompt_completion"
    assert [r["prompt"] for r in iter_records(path)] == [r["prompt"] for r in records]


def test_sharegpt_becomes_messages(tmp_path):
    records = load_records(write_jsonl(tmp_path / "sharegpt.jsonl", SHAREGPT))
    assert records[0] == {"id": "a", "messages": [{"role": "system", "content": "Be kind."},
                                                  {"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"}]}
    assert [m["role"] for m in records[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert records[1]["messages"][0]["content"] == "Be brief." and "system" not in records[1]
    assert detect_dataset_format(records) == "messages"
    validate_sft(records)


@pytest.mark.parametrize("bad, field, words", [
    ({"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from", "human, gpt, system, tool"),
    ({"conversations": [{"from": "human"}]}, "conversations[0].value", "string"),
    ({"conversations": "hi"}, "conversations", "list"),
    ({"instruction": "x", "input": 3, "output": "y"}, "input", "string"),
    ({"instruction": "x", "output": ["y"]}, "output", "string"),
])
def test_community_layout_errors_name_file_line_and_field(tmp_path, bad, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [ALPACA[0] if "instruction" in bad else SHAREGPT[0], bad])
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 2, field '{field}'") and words in msg and "\n" not in msg


def test_wrong_columns_for_sft_name_file_line_and_expected_columns(tmp_path):
    from rl_helpers import tiny_tokenizer
    from rlhfkit.recipes.sft import load_sft_examples

    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Hi?", "answer": "Yes"}])
    with pytest.raises(DataError) as err:
        load_sft_examples(str(path), tiny_tokenizer(), max_length=32)
    msg = str(err.value)
    assert msg.startswith(f"{path}, line 1") and "answer, question" in msg
    for expected in ("text", "prompt+completion", "messages", "instruction", "conversations"):
        assert expected in msg
    prefs = write_jsonl(tmp_path / "prefs.jsonl", [RECORDS["preference"]])
    with pytest.raises(DataError, match=rf"{prefs}, line 1: .*SFT takes"):
        load_sft_examples(str(prefs), tiny_tokenizer(), max_length=32)


@pytest.fixture(scope="module")
def tiny_chat_policy(tmp_path_factory):
    from rl_helpers import save_tiny, tiny_policy, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return save_tiny(tmp_path_factory.mktemp("policy") / "p", tiny_policy(tok), tok)


@pytest.mark.parametrize("layout", ["alpaca", "sharegpt"])
def test_sft_and_grpo_read_community_layouts(tiny_chat_policy, tmp_path, layout):
    from rlhfkit.recipes import grpo, sft

    rows = ALPACA if layout == "alpaca" else SHAREGPT * 2
    data = write_jsonl(tmp_path / f"{layout}.jsonl", rows)
    res = sft.main(sft.Config(model=tiny_chat_policy, dataset=str(data), output_dir=str(tmp_path / "sft"), max_steps=1,
                              per_device_train_batch_size=2, progress=False, report_to="jsonl", max_length=32))
    assert res["steps"] == 1
    # as prompts: Alpaca's prompt; ShareGPT conversations that end with the human's turn
    prompts = rows if layout == "alpaca" else [{**r, "conversations": r["conversations"][:-1]} for r in SHAREGPT]
    seen = []

    def reward(prompts, completions, **kw):
        seen.extend(prompts)
        return [0.0] * len(completions)

    grpo.main(grpo.Config(model=tiny_chat_policy, prompts=str(write_jsonl(tmp_path / "p.jsonl", prompts)),
                          output_dir=str(tmp_path / "grpo"), max_steps=1, prompts_per_step=2, num_generations=2,
                          max_completion_length=3, per_device_train_batch_size=4, report_to="jsonl", progress=False),
              reward_funcs=[reward])
    if layout == "alpaca":
        assert set(seen) <= {"Say something kind.", "Add the numbers.\n\n1 and 2", "Name a colour."}
    else:
        assert all(p[-1]["role"] == "user" and p[0]["role"] == "system" for p in seen)
