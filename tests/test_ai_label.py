"""`rlhfkit label --judge`: what its summary shows, and what it leaves behind when the judge fails
or the run is interrupted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _judge_stub import StubServer
from rlhfkit.errors import RlhfkitError
from rlhfkit.recipes.label import Config, main

PAIRS = [("what a lovely kind day", "what an awful day"), ("you are cruel", "you are good and warm"),
         ("a horrible day", "a good day")]


def _input(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "a": a, "b": b}) + "\n" for a, b in PAIRS))
    return path


def test_a_zero_order_agreement_is_shown(tmp_path, capsys):
    """The stub answers "A" on a tie of kindness: every order disagrees, agreement 0.000."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": "", "a": f"plain {i}", "b": f"dull {i}"}) + "\n" for i in range(2)))
    with StubServer() as srv:
        stats = main(Config(input=str(inp), output=str(tmp_path / "o.jsonl"), ties="keep",
                            judge=f"http:stub?base_url={srv.url}&backoff=0.01"))
    assert stats["judge"]["order_agreement"] == 0.0
    assert "order_agreement 0.0" in capsys.readouterr().out


def test_every_request_failing_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "o.jsonl"
    with StubServer() as srv:
        srv.always = {"stub": "500"}
        with pytest.raises(RlhfkitError) as e:
            main(Config(input=str(_input(tmp_path)), output=str(out),
                        judge=f"http:stub?base_url={srv.url}&backoff=0.001&max_retries=1"))
    msg = str(e.value)
    assert "\n" not in msg and "abstained on all 3 pairs" in msg and "server_errors 12" in msg
    assert not out.exists() and not list(tmp_path.glob(".o.jsonl*"))


def test_the_command_exits_non_zero_with_one_line(tmp_path):
    out = tmp_path / "o.jsonl"
    with StubServer() as srv:
        srv.always = {"stub": "500"}
        r = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", "--input", str(_input(tmp_path)),
                            "--output", str(out), "--judge", f"http:stub?base_url={srv.url}&backoff=0.001&max_retries=0"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "abstained on all 3" in r.stderr
    assert not out.exists()


def test_interrupted_labelling_says_what_the_cache_kept(tmp_path, monkeypatch, capsys):
    from rlhfkit.judges.http import HTTPJudge

    cache, out = tmp_path / "verdicts.sqlite", tmp_path / "o.jsonl"
    spec_opts = f"backoff=0.01&cache={cache}"
    original = HTTPJudge.compare_with_question

    def interrupted(self, prompts, a, b, question, chain_of_thought=False):
        original(self, prompts[:1], a[:1], b[:1], question)  # one pair answered (both orders), then Ctrl-C
        raise KeyboardInterrupt

    with StubServer() as srv:
        monkeypatch.setattr(HTTPJudge, "compare_with_question", interrupted)
        with pytest.raises(SystemExit) as e:
            main(Config(input=str(_input(tmp_path)), output=str(out), judge=f"http:stub?base_url={srv.url}&{spec_opts}"))
        err = capsys.readouterr().err
        assert e.value.code == 130 and not out.exists()
        assert "nothing was saved" not in err and f"2 verdicts are kept in {cache}" in err
        assert "run the same command again" in err
        monkeypatch.setattr(HTTPJudge, "compare_with_question", original)
        stats = main(Config(input=str(_input(tmp_path)), output=str(out), judge=f"http:stub?base_url={srv.url}&{spec_opts}"))
    assert stats["judge"]["cache_hits"] == 2 and stats["judge"]["requests"] == 4


def test_interrupted_labelling_without_a_cache_says_how_to_keep_verdicts(tmp_path, monkeypatch, capsys):
    from rlhfkit.judges.lexicon import AfinnJudge

    def interrupted(self, prompts, a, b):
        raise KeyboardInterrupt

    monkeypatch.setattr(AfinnJudge, "compare", interrupted)
    with pytest.raises(SystemExit):
        main(Config(input=str(_input(tmp_path)), output=str(tmp_path / "o.jsonl"), judge="afinn"))
    err = capsys.readouterr().err
    assert "no verdicts were kept" in err and "cache=FILE" in err


def test_a_judge_a_constitution_does_not_use_is_named(tmp_path, capsys):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    main(Config(input=str(_input(tmp_path)), output=str(tmp_path / "o.jsonl"), judge="afinn",
                constitution=str(root / "constitution_kindly.md")))
    out = capsys.readouterr().out
    assert "--judge afinn is not used: every principle of" in out
    mixed = tmp_path / "mixed.md"
    mixed.write_text("## kind\ncritique: c\nrevision: r\ncomparison: Which is kinder?\njudge: principle:kind\n\n"
                     "## honest\ncritique: c\nrevision: r\ncomparison: Which is more honest?\n")
    with StubServer() as srv:
        main(Config(input=str(_input(tmp_path)), output=str(tmp_path / "o.jsonl"), constitution=str(mixed),
                    judge=f"http:stub?base_url={srv.url}"))
    assert "--judge http:stub answers principles honest; kind use the judges they name" in capsys.readouterr().out


def test_chain_of_thought_text_is_kept_as_the_rationale(tmp_path):
    out = tmp_path / "o.jsonl"
    with StubServer() as srv:
        main(Config(input=str(_input(tmp_path)), output=str(out), chain_of_thought=True,
                    judge=f"http:stub?base_url={srv.url}"))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    first = next(r for r in rows if r["chosen"] == "what a lovely kind day")
    # one text per order: the pair as given (a shown as Response A), then swapped
    assert first["rationale"] == ["Response A scores 2, response B scores -1.\nAnswer: A",
                                  "Response A scores -1, response B scores 2.\nAnswer: B"]
    with pytest.raises(RlhfkitError, match="cannot reason in text"):
        main(Config(input=str(_input(tmp_path)), output=str(out), chain_of_thought=True, judge="afinn"))


def test_the_local_judge_keeps_its_reasoning(tmp_path):
    from _data_tokenizers import bundled_tokenizer
    from rlhfkit.judges.llm import LLMJudge
    from rlhfkit.models.factory import tiny_llama

    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    model = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       max_position_embeddings=256, seed=0, tokenizer=tok)
    judge = LLMJudge("tiny", chat="false", cot_tokens=4, _model=model, _tokenizer=tok)
    [v] = judge.compare_with_question(["The day"], ["is kind"], ["is awful"], "Which?", chain_of_thought=True)
    from rlhfkit.judges.llm import COT_PREFIX, PAIRWISE_TEMPLATE

    ctx = PAIRWISE_TEMPLATE.format(prompt="The day", response_a="is kind", response_b="is awful", question="Which?")
    assert len(v.rationale) == 2 and v.rationale[0] == judge.generate_raw([ctx + COT_PREFIX], 4)[0]
