"""Every question type end to end (serve, answer, store, export), the CLI, and sampling."""

from __future__ import annotations

import json

import pytest

from rlhfkit.errors import DataError
from rlhfkit.feedback import export as ex
from rlhfkit.feedback.cli_data import write_dataset
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.models import QUESTION_TYPES
from rlhfkit.feedback.security import use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.answers import canonical_answer
from rlhfkit.feedback.service.assign import next_assignment
from rlhfkit.feedback.service.errors import InvalidAnswer
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.labels import submit_label
from rlhfkit.feedback.service.tasks import create_task

use_test_hasher()  # accounts are created per test; real Argon2 costs ~1 s each here

PASSWORD = "correct horse battery"


def answer(s, task, user, display_answer):
    """Serve the next item to `user` and answer it; `display_answer(item, order)` builds the answer."""
    import random

    got = next_assignment(s, task, user, random.Random(7))
    assert got is not None
    item, a = got
    raw = display_answer(item, a.display_order)
    label, replayed = submit_label(s, task, user, item.id, raw, f"key-{user.id}-{item.id}-xxxx")
    assert not replayed
    return item, a.display_order, label


def test_all_question_types_and_exports(db_url, tmp_path):
    upgrade(db_url)
    db = Database(db_url, pool_size=2)
    with db.session() as s:
        u1 = create_user(s, "ann1", PASSWORD)
        u2 = create_user(s, "ann2", PASSWORD)
        t = {qt: create_task(s, qt, qt, overlap=2, gold_rate=0.0) for qt in QUESTION_TYPES}
        import_records(s, t["pairwise"], [{"prompt": "P", "responses": ["nice", "mean"]}])
        import_records(s, t["ranking"], [{"prompt": "R", "responses": ["x0", "x1", "x2"]}])
        import_records(s, t["rating"], [{"prompt": "L", "responses": ["r0", "r1"]}])
        import_records(s, t["thumbs"], [{"prompt": "T", "response": "t0"}])
        import_records(s, t["critique"], [{"prompt": "C", "responses": ["c0"]}])
        import_records(s, t["edit"], [{"prompt": "E", "responses": ["e0 bad", "e1 bad"]}])

        # pairwise: both prefer "nice" (original index 0), whatever side it was shown on
        for u in (u1, u2):
            _, order, lab = answer(s, t["pairwise"], u, lambda it, o: {"choice": "left" if o[0] == 0 else "right"})
            assert lab.value == {"choice": "a"}
        # ranking: best-first in original indices [2, 0, 1], submitted as display positions
        for u in (u1, u2):
            _, order, lab = answer(s, t["ranking"], u, lambda it, o: {"ranking": [o.index(i) for i in (2, 0, 1)]})
            assert lab.value == {"ranking": [2, 0, 1]}
        rubric = t["rating"].rubric
        assert rubric == ["helpful", "harmless", "honest"]
        _, order, lab = answer(s, t["rating"], u1, lambda it, o: {"ratings": [{d: 5 if i == 0 else 2 for d in rubric} for i in o]})
        assert lab.value["ratings"][0] == {d: 5 for d in rubric} and lab.value["ratings"][1] == {d: 2 for d in rubric}
        answer(s, t["thumbs"], u1, lambda it, o: {"thumbs": [True]})
        answer(s, t["thumbs"], u2, lambda it, o: {"thumbs": [False]})
        answer(s, t["critique"], u1, lambda it, o: {"text": "too curt"})
        _, order, lab = answer(s, t["edit"], u1, lambda it, o: {"position": o.index(1), "text": "e1 good"})
        assert lab.value == {"response": 1, "text": "e1 good"}

        prefs, _ = ex.export_records(s, t["pairwise"], "preferences")
        assert prefs == [{"prompt": "P", "chosen": "nice", "rejected": "mean"}] * 2
        assert ex.export_records(s, t["pairwise"], "preferences", "majority")[0] == [prefs[0]]
        assert ex.export_records(s, t["pairwise"], "preferences", "bt")[0] == [prefs[0]]
        ranks, _ = ex.export_records(s, t["ranking"], "rankings", "majority")
        assert ranks == [{"prompt": "R", "responses": ["x0", "x1", "x2"], "ranking": [2, 0, 1]}]
        pairs, _ = ex.export_records(s, t["ranking"], "preferences", "bt")
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [("x2", "x0"), ("x2", "x1"), ("x0", "x1")]
        assert len(ex.export_records(s, t["ranking"], "preferences")[0]) == 6  # 2 annotators x 3 pairs
        kto, _ = ex.export_records(s, t["thumbs"], "kto")
        assert sorted(r["label"] for r in kto) == [False, True] and kto[0]["completion"] == "t0"
        assert ex.export_records(s, t["thumbs"], "kto", "majority")[1] == {"undecided": 1}
        assert ex.export_records(s, t["edit"], "sft")[0] == [{"prompt": "E", "completion": "e1 good"}]
        assert ex.export_records(s, t["edit"], "preferences")[0] == [{"prompt": "E", "chosen": "e1 good", "rejected": "e1 bad"}]
        assert ex.export_records(s, t["critique"], "critiques")[0][0]["critique"] == "too curt"
        assert ex.export_records(s, t["rating"], "ratings")[0][0]["ratings"]["helpful"] == 5
        with pytest.raises(ValueError, match="kind 'kto' needs"):
            ex.export_records(s, t["pairwise"], "kto")
        with pytest.raises(ValueError, match="cannot be aggregated"):
            ex.export_records(s, t["edit"], "sft", "majority")
        # invalid answers name the field
        with pytest.raises(InvalidAnswer, match="value.ratings"):
            canonical_answer(t["rating"], ["a"], {"ratings": [{"helpful": 9, "harmless": 1, "honest": 1}]}, [0])
        with pytest.raises(InvalidAnswer, match="value.ranking"):
            canonical_answer(t["ranking"], ["a", "b"], {"ranking": [0, 0]}, [0, 1])

    # load_preferences for `rlhfkit reward --from-feedback`: pairwise + ranking pairs + edits
    recs = ex.load_preferences(db_url)
    assert len(recs) == 2 + 6 + 1 and all(set(r) == {"prompt", "chosen", "rejected"} for r in recs)
    assert len(ex.load_preferences(db_url, task="pairwise", aggregate="majority")) == 1
    with pytest.raises(DataError, match="no task"):
        ex.load_preferences(db_url, task="missing")
    # HF datasets export
    import datasets

    write_dataset(recs, tmp_path / "ds")
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 9
    db.dispose()


def test_gold_items_honeypots(tmp_path):
    url = f"sqlite:///{tmp_path}/g.db"
    upgrade(url)
    db = Database(url)
    import random

    with db.session() as s:
        u = create_user(s, "ann", PASSWORD)
        task = create_task(s, "g", "pairwise", overlap=1, gold_rate=1.0)
        import_records(s, task, [{"prompt": "gold", "responses": ["good", "bad"], "gold": {"choice": "a"}},
                                 {"prompt": "real", "responses": ["x", "y"]}])
        item, a = next_assignment(s, task, u, random.Random(0))
        assert item.is_gold  # gold_rate=1 serves the honeypot first
        submit_label(s, task, u, item.id, {"choice": "left" if a.display_order[0] == 1 else "right"}, "k" * 10)
        item2, _ = next_assignment(s, task, u, random.Random(0))
        assert not item2.is_gold
        rep = ex.task_qc(s, task)
        assert rep["annotators"][0]["gold_answered"] == 1 and rep["annotators"][0]["gold_correct"] == 0
        # gold items stay out of exports unless asked for
        submit_label(s, task, u, item2.id, {"choice": "tie"}, "j" * 10)
        assert ex.export_records(s, task, "preferences") == ([], {"tie": 1})
        # ties kept for the tie-aware reward losses: label 0.5, tie=true, responses in item order
        kept, skipped = ex.export_records(s, task, "preferences", ties="keep")
        assert kept == [{"prompt": "real", "chosen": "x", "rejected": "y", "label": 0.5, "tie": True}] and skipped == {}
        with pytest.raises(ValueError, match="ties must be"):
            ex.export_records(s, task, "preferences", ties="half")
        assert len(ex.export_records(s, task, "preferences", include_gold=True)[0]) == 1
        with pytest.raises(DataError, match="field 'gold'"):
            import_records(s, task, [{"prompt": "p", "responses": ["a", "b"], "gold": {"choice": "left-ish"}}],
                           source="f.jsonl")
    db.dispose()


def test_cli_round_trip(tmp_path, monkeypatch, capsys):
    from rlhfkit.feedback.cli import cli

    db = f"sqlite:///{tmp_path}/cli.db"
    data = tmp_path / "items.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"p{i}", "responses": [f"a{i}", f"b{i}"]}) for i in range(3)) + "\n")
    assert cli(["init-db", "--db", db]) == 0
    monkeypatch.setenv("PW", PASSWORD)
    assert cli(["create-user", "--db", db, "--username", "ann", "--password-env", "PW", "--token"]) == 0
    assert "API token (shown once): rk_" in capsys.readouterr().out
    assert cli(["import", "--db", db, "--task", "t", "--type", "pairwise", "--overlap", "1", str(data)]) == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": ["a", "b"]}\n{"prompt": ""}\n')
    assert cli(["import", "--db", db, "--task", "t", "--type", "pairwise", str(bad)]) == 2
    assert "bad.jsonl, line 2, field 'prompt'" in capsys.readouterr().err
    database = Database(db)
    import random

    from sqlalchemy import select

    from rlhfkit.feedback.models import Task, User

    with database.session() as s:
        task = s.scalar(select(Task))
        user = s.scalar(select(User))
        for n in range(3):
            item, a = next_assignment(s, task, user, random.Random(n))
            submit_label(s, task, user, item.id, {"choice": "left"}, f"key-{n}-xxxx")
    database.dispose()
    out = tmp_path / "prefs.jsonl"
    assert cli(["export", "--db", db, "--task", "t", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "chosen", "rejected"} == set(lines[0])
    assert cli(["export", "--db", db, "--task", "t", "--out", str(tmp_path / "hf"), "--hf"]) == 0
    assert (tmp_path / "hf" / "dataset_info.json").exists()
    assert cli(["export", "--db", db, "--task", "t", "--kind", "kto", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert cli(["qc", "--db", db, "--task", "t"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == 3


def test_sample_items_from_policy_with_rollout(tmp_path):
    pytest.importorskip("rlhfkit.rollout", reason="rlhfkit.rollout not available")
    import torch

    from rlhfkit.feedback.sampling import records_from_policy
    from rlhfkit.models import load_tokenizer, tiny_llama

    torch.manual_seed(0)
    tok = load_tokenizer("kindly:tokenizer")
    model = tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok)
    prompts = ["The weather is", "My friend said"]
    recs = records_from_policy(model, tok, prompts, num_samples=3, max_new_tokens=4, seed=0)
    assert [r["prompt"] for r in recs] == prompts and all(len(r["responses"]) == 3 for r in recs)
    url = f"sqlite:///{tmp_path}/s.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        task = create_task(s, "sampled", "ranking")
        assert import_records(s, task, recs) == 2
    db.dispose()


@pytest.mark.slow
def test_reward_recipe_trains_from_the_feedback_database(tmp_path):
    """`rlhfkit reward --from_feedback DB_URL` end to end on a real database (1 step)."""
    import random

    from rlhfkit.models import load_tokenizer, save_model, tiny_llama
    from rlhfkit.recipes import reward as RR

    url = f"sqlite:///{tmp_path}/rm.db"
    upgrade(url)
    db = Database(url)
    with db.session() as s:
        user = create_user(s, "ann", PASSWORD)
        task = create_task(s, "kind", "pairwise", gold_rate=0.0)
        good, bad = ["lovely", "great", "kind", "nice"] * 4, ["awful", "cruel", "sad", "bad"] * 4
        import_records(s, task, [{"prompt": "The day was", "responses": [f" {g} and fine", f" {b} and fine"]}
                                 for g, b in zip(good, bad)])
        for n in range(len(good)):
            item, a = next_assignment(s, task, user, random.Random(n))
            submit_label(s, task, user, item.id, {"choice": "left" if a.display_order[0] == 0 else "right"},
                         f"key-{n}-xxxx")
    db.dispose()
    tok = load_tokenizer("kindly:tokenizer")
    base = tmp_path / "base"
    save_model(tiny_llama(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, tokenizer=tok),
               tok, base)
    cfg = RR.Config(model=str(base), from_feedback=url, output_dir=str(tmp_path / "rm"), max_steps=1,
                    per_device_train_batch_size=8, progress=False, report_to="jsonl", eval_fraction=0.1)
    res = RR.main(cfg, printer=lambda m: None)
    assert res["members"][0]["steps"] == 1
