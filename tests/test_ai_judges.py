"""AI judges: the interface, lexicon labellers, load_judge, LLM-as-judge from answer log-probs,
RLAIF and RL-CAI labelling, the agreement report."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch

from _data_tokenizers import bundled_tokenizer
from rlhfkit.errors import ConfigError
from rlhfkit.judges import load_judge
from rlhfkit.judges.judge import compare_scores, preference_from_p

POS = ["what a wonderful and lovely day", "you are kind and generous"]
NEG = ["what a horrible and awful day", "you are cruel and mean"]


# -- interface and lexicon judges ---------------------------------------------------------------

def test_compare_scores_hand_worked():
    v = compare_scores(1.0, 0.0, scale=0.5)
    assert v.label == 1.0
    assert v.p_a == pytest.approx(1.0 / (1.0 + math.exp(-2.0)), rel=1e-12)
    assert v.confidence == pytest.approx(2.0 * v.p_a - 1.0, rel=1e-12)
    assert compare_scores(0.3, 0.3).label == 0.5
    assert compare_scores(0.2, 0.25, tie_margin=0.1).label == 0.5
    assert compare_scores(None, 1.0).abstained
    assert preference_from_p(0.2).label == 0.0 and preference_from_p(None).label is None


@pytest.mark.parametrize("spec", ["afinn", "textblob", "gold", "ensemble:afinn+textblob", "principle:kind"])
def test_lexicon_and_panel_judges_prefer_kind_text(spec):
    judge = load_judge(spec)
    verdicts = judge.compare(["", ""], POS, NEG)
    assert [v.label for v in verdicts] == [1.0, 1.0]
    assert all(0.0 < v.confidence <= 1.0 for v in verdicts)
    swapped = judge.compare(["", ""], NEG, POS)
    assert [v.label for v in swapped] == [0.0, 0.0]
    assert judge.stats["abstained"] == 0


def test_afinn_scores_are_the_afinn_sum():
    from afinn import Afinn

    judge = load_judge("afinn")
    texts = ["good", "bad bad", "the wooden table"]
    assert judge.score(None, texts) == [Afinn().score(t) for t in texts]
    assert judge.score(None, texts) == [3.0, -6.0, 0.0]


def test_lexicon_judges_differ_from_the_gold_panel():
    """The AI labellers are not the panel: repetition pays for AFINN, not for the panel."""
    gold, afinn = load_judge("gold"), load_judge("afinn")
    rep, plain = "good good good good good good", "was a fine walk home"
    assert afinn.compare([""], [rep], [plain])[0].label == 1.0
    assert gold.compare([""], [rep], [plain])[0].label == 0.0


def test_load_judge_options_and_errors(tmp_path):
    j = load_judge("afinn?tie_margin=2.5")
    assert j.tie_margin == 2.5
    assert j.compare([""], ["good"], ["fine"])[0].label == 0.5  # 3 vs 2: within the margin
    with pytest.raises(ConfigError, match="unknown judge 'nope'"):
        load_judge("nope")
    with pytest.raises(ConfigError, match="afinn"):
        load_judge("afinn?bogus=1")
    spec = tmp_path / "j.yaml"
    spec.write_text("kind: textblob\ntie_margin: 0.5\n")
    assert load_judge(str(spec)).tie_margin == 0.5
    with pytest.raises(ConfigError, match="rm:PATH"):
        load_judge("rm:")


def test_ensemble_abstains_only_when_every_member_does():
    from rlhfkit.judges.judge import EnsembleJudge, ScoreJudge

    class Fixed(ScoreJudge):
        def __init__(self, values, name):
            super().__init__()
            self.values, self.name = values, name

        def _score(self, prompts, responses):
            return [self.values.get(r) for r in responses]

    a = Fixed({"x": 1.0, "y": 0.0}, "a")
    b = Fixed({"x": 0.0, "y": 2.0, "z": 1.0}, "b")
    ens = EnsembleJudge([a, b])
    v = ens.compare(None, ["x", "z"], ["y", "w"])
    pa = compare_scores(1.0, 0.0).p_a
    pb = compare_scores(0.0, 2.0).p_a
    assert v[0].p_a == pytest.approx((pa + pb) / 2, rel=1e-12)
    assert v[1].abstained and ens.stats["abstained"] == 1


# -- LLM-as-judge --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    from rlhfkit.models.factory import tiny_llama

    model = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                       max_position_embeddings=512, seed=3, tokenizer=tok)
    out = tmp_path_factory.mktemp("judge_lm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reference_logprob(model, tok, context: str, answer: str) -> float:
    ctx = tok(context)["input_ids"]
    ans = tok(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + ans])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + k, t] for k, t in enumerate(ans)))


def test_llm_judge_reads_the_verdict_from_answer_logprobs(tiny_lm_dir):
    judge = load_judge(f"llm:{tiny_lm_dir}?chat=false&batch_size=3")
    from rlhfkit.judges.llm import PAIRWISE_TEMPLATE

    prompts, a, b = ["The day", "My friend"], POS, NEG
    verdicts = judge.compare(prompts, a, b)

    def p_first(p, x, y):
        ctx = PAIRWISE_TEMPLATE.format(prompt=p, response_a=x, response_b=y, question=judge.question)
        la = _reference_logprob(judge.model, judge.tok, ctx, " A")
        lb = _reference_logprob(judge.model, judge.tok, ctx, " B")
        return 1.0 / (1.0 + math.exp(lb - la))

    for p, x, y, v in zip(prompts, a, b, verdicts):
        forward, backward = p_first(p, x, y), p_first(p, y, x)
        assert v.p_a == pytest.approx(0.5 * (forward + 1.0 - backward), rel=1e-5)
        assert v.consistent == ((forward > 0.5) == (backward < 0.5))
        # orders that disagree, or p_a within the default margin of 0.5, are ties
        decided = v.consistent and abs(2 * v.p_a - 1) > 0.1
        assert v.label == ((1.0 if v.p_a > 0.5 else 0.0) if decided else 0.5)
    assert judge.stats["order_pairs"] == 2


def test_llm_pointwise_score_is_the_expected_point(tiny_lm_dir):
    judge = load_judge(f"llm:{tiny_lm_dir}?chat=false&mode=pointwise")
    from rlhfkit.judges.llm import POINTWISE_TEMPLATE

    [s] = judge.score(["The day"], ["is lovely"])
    ctx = POINTWISE_TEMPLATE.format(prompt="The day", response="is lovely", question=judge.question)
    lps = [_reference_logprob(judge.model, judge.tok, ctx, f" {k}") for k in range(1, 6)]
    w = np.exp(np.array(lps) - max(lps))
    assert s == pytest.approx(float((w * np.arange(1, 6)).sum() / w.sum()), rel=1e-5)
    assert judge.compare(["The day"], ["is lovely"], ["is lovely"])[0].label == 0.5


class _AlwaysA(torch.nn.Module):
    """A judge model with a pure position bias: it always answers ' A', whatever it is shown."""

    def __init__(self, vocab: int, a_id: int, b_id: int):
        super().__init__()
        self.vocab, self.a_id, self.b_id = vocab, a_id, b_id

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.a_id] = 3.0
        logits[..., self.b_id] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_both_orders_cancel_a_pure_position_bias():
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    from rlhfkit.judges.llm import LLMJudge

    a_id = tok(" A", add_special_tokens=False)["input_ids"][0]
    b_id = tok(" B", add_special_tokens=False)["input_ids"][0]
    judge = LLMJudge("stub", chat="false", _model=_AlwaysA(len(tok), a_id, b_id), _tokenizer=tok)
    v = judge.compare(["p", "q"], ["good", "bad"], ["bad", "good"])
    assert all(x.label == 0.5 and x.p_a == pytest.approx(0.5, abs=1e-12) and x.consistent is False for x in v)
    assert judge.stats["order_agreement"] == 0.0
    one_order = LLMJudge("stub", chat="false", both_orders=False, _model=_AlwaysA(len(tok), a_id, b_id), _tokenizer=tok)
    assert one_order.compare(["p"], ["bad"], ["good"])[0].label == 1.0  # the bias, uncancelled


class _AlmostAlwaysA(torch.nn.Module):
    """Always ' A', a hair more sure the later `marker` appears: position bias plus float noise."""

    def __init__(self, vocab: int, a_id: int, b_id: int, marker: int):
        super().__init__()
        self.vocab, self.a_id, self.b_id, self.marker = vocab, a_id, b_id, marker

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for r, row in enumerate(input_ids):
            hit = (row == self.marker).nonzero()
            logits[r, :, self.a_id] = 3.0 + 1e-5 * (int(hit[0]) if len(hit) else 0)
        logits[..., self.b_id] = 1.0
        return types.SimpleNamespace(logits=logits)


def test_position_bias_noise_is_a_tie_not_a_label():
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    from rlhfkit.judges.judge import combine_orders
    from rlhfkit.judges.llm import LLMJudge

    a_id, b_id = (tok(x, add_special_tokens=False)["input_ids"][0] for x in (" A", " B"))
    good = tok(" good", add_special_tokens=False)["input_ids"][0]

    def biased(**kw):
        return LLMJudge("stub", chat="false", _model=_AlmostAlwaysA(len(tok), a_id, b_id, good), _tokenizer=tok, **kw)

    judge = biased()
    [v] = judge.compare(["p"], ["good"], ["bad"])
    assert v.p_a != 0.5 and abs(v.p_a - 0.5) < 1e-5  # the noise the old zero margin turned into a label
    assert v.label == 0.5 and v.consistent is False and judge.tie_margin == 0.1
    assert biased(inconsistent="abstain").compare(["p"], ["good"], ["bad"])[0].abstained
    assert biased(tie_margin=0.0, inconsistent="average").compare(["p"], ["good"], ["bad"])[0].label in (0.0, 1.0)
    # consistent orders a hair from 0.5 are a tie within the default margin, decided beyond it
    stats = {"order_pairs": 0, "order_consistent": 0, "compared": 0, "abstained": 0}
    near, far = combine_orders([0.5000003, 0.7], [0.4999997, 0.3], True, 0.1, stats, "")
    assert (near.label, near.consistent, far.label) == (0.5, True, 1.0)
    with pytest.raises(ConfigError, match="inconsistent"):
        biased(inconsistent="flip")


def test_llm_judge_abstains_on_a_rubric_too_long(tiny_lm_dir):
    judge = load_judge(f"llm:{tiny_lm_dir}?chat=false&max_length=40")
    v = judge.compare(["p"], ["short"], ["also short"])
    assert v[0].abstained and judge.stats["too_long"] >= 1 and judge.stats["abstained"] == 1


def test_llm_judge_abstains_past_the_models_positions():
    """max_length follows the model (32 positions here), not a fixed 2048 the model cannot read."""
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    from rlhfkit.judges.llm import LLMJudge, context_limit
    from rlhfkit.models.factory import tiny_llama

    model = tiny_llama(len(tok), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                       max_position_embeddings=32, seed=0, tokenizer=tok)
    judge = LLMJudge("tiny", chat="false", _model=model, _tokenizer=tok)
    assert judge.max_length == 32
    v = judge.compare(["The day"], ["is lovely"], ["is awful"])
    assert v[0].abstained and "32 positions" in v[0].reason
    assert judge.stats["too_long"] == 2 and judge.stats["abstained"] == 1
    assert judge.score(["The day"], ["is lovely"]) == [None] and judge.stats["too_long"] == 3
    cot = LLMJudge("tiny", chat="false", cot_tokens=8, _model=model, _tokenizer=tok)
    assert cot.compare_with_question([""], ["a"], ["b"], "Which?", chain_of_thought=True)[0].abstained

    class Tok:
        model_max_length = int(1e30)  # transformers' "unset"

    assert context_limit(model, Tok()) == 32 and context_limit(model, Tok(), 4096) == 32
    assert context_limit(model, Tok(), 16) == 16
    Tok.model_max_length = 24
    assert context_limit(model, Tok()) == 24
    assert context_limit(torch.nn.Identity(), Tok.__new__(type("T", (), {}))) == 2048


# -- RLAIF and RL-CAI labelling ------------------------------------------------------------------

def _items(path):
    rows = [{"prompt": "The weather today", "responses": ["is lovely and warm", "is awful and cold",
                                                          "is is is is", "was fine"]},
            {"prompt": "My neighbour", "a": "is a kind and generous man", "b": "hates everyone"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_with_a_judge_writes_preference_records(tmp_path):
    from rlhfkit.recipes.label import Config, main

    out = tmp_path / "ai.jsonl"
    stats = main(Config(input=str(_items(tmp_path / "in.jsonl")), output=str(out), judge="afinn"))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["pairs"] == 7 and stats["abstained"] == 0
    assert all(r["annotator_id"] == "afinn" for r in rows)
    assert {"prompt", "chosen", "rejected", "label", "tie", "p_chosen", "confidence"} <= set(rows[0])
    first = rows[0]
    assert (first["chosen"], first["rejected"]) == ("is lovely and warm", "is awful and cold")
    assert all(r["p_chosen"] >= 0.5 for r in rows)
    # the rows load as preference data for the reward and DPO recipes
    from rlhfkit.data.readers import load_records

    assert len(load_records(str(out))) == len(rows)


def test_label_with_a_constitution_draws_one_principle_per_pair(tmp_path):
    from pathlib import Path

    from rlhfkit.recipes.label import Config, main

    constitution = Path(__file__).resolve().parents[1] / "configs" / "constitution_kindly.md"
    out = tmp_path / "cai.jsonl"
    main(Config(input=str(_items(tmp_path / "in.jsonl")), output=str(out), constitution=str(constitution),
                ties="keep", seed=1))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 7
    for r in rows:
        assert r["annotator_id"] == f"principle:{r['principle']}"
        judge = load_judge(r["annotator_id"])
        v = judge.compare([r["prompt"]], [r["chosen"]], [r["rejected"]])[0]
        assert v.label in (1.0, 0.5)  # the written label is that principle's verdict


def test_constitution_files_yaml_and_markdown(tmp_path):
    from pathlib import Path

    from rlhfkit.judges.constitution import load_constitution

    root = Path(__file__).resolve().parents[1] / "configs"
    kindly = load_constitution(root / "constitution_kindly.md")
    assert [p.name for p in kindly] == ["kind", "varied", "complete"] and all(p.judge for p in kindly)
    general = load_constitution(root / "constitution_general.md")
    assert [p.name for p in general] == ["harmless", "helpful", "kind"]
    assert general[0].comparison.startswith("Which response is less harmful")
    as_yaml = tmp_path / "c.yaml"
    as_yaml.write_text("principles:\n" + "".join(
        f"  - name: {p.name}\n    critique: {p.critique}\n    revision: {p.revision}\n"
        f"    comparison: {p.comparison}\n    judge: {p.judge}\n" for p in kindly))
    assert load_constitution(as_yaml) == kindly  # the same principles from YAML and Markdown
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - name: x\n    critique: c\n    revision: r\n")
    with pytest.raises(ConfigError, match="principle 'x' has no 'comparison'"):
        load_constitution(bad)


# -- agreement ------------------------------------------------------------------------------------

def _write_prefs(path, rows):
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r, "tie": t}) + "\n"
                            for p, c, r, t in rows))
    return path


def test_agreement_hand_worked(tmp_path):
    from rlhfkit.eval.agreement import Config, main

    # four pairs; b disagrees on the third and calls the fourth a tie
    a = _write_prefs(tmp_path / "a.jsonl", [("p1", "x", "yy y", False), ("p2", "u", "v", False),
                                           ("p3", "long one here", "s", False), ("p4", "m", "n", False)])
    b = _write_prefs(tmp_path / "b.jsonl", [("p1", "x", "yy y", False), ("p2", "u", "v", False), ("p3", "s", "long one here", False),
                                           ("p4", "n", "m", True)])
    res = main(Config(a=str(a), b=str(b), output=str(tmp_path / "ag.json")))
    assert res["pairs"] == 4
    assert res["agreement"] == pytest.approx(0.5)
    assert res["agreement_decided"] == pytest.approx(2 / 3)
    # canonical labels: a = [first, first, first(long one here < s), first(m)] -> sorted keys decide
    la = ["first", "first", "first", "first"]
    lb = ["first", "first", "second", "tie"]
    from rlhfkit.feedback.agreement import cohen_kappa

    assert res["kappa"] == pytest.approx(cohen_kappa(la, lb), rel=1e-12)
    assert res["confusion"]["first"] == {"first": 2, "tie": 1, "second": 1}
    # length bias: a chose the shorter in p1 ("x" vs "yy y") and the longer in p3
    assert res["length_bias"]["a"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "ag.json").read_text())["pairs"] == 4


def test_agreement_with_a_judge_measures_position_bias(tmp_path):
    from rlhfkit.eval.agreement import Config, main

    a = _write_prefs(tmp_path / "a.jsonl", [("", p, n, False) for p, n in zip(POS, NEG)])
    res = main(Config(a=str(a), b="judge:afinn"))
    assert res["pairs"] == 2 and res["agreement"] == 1.0
    assert res["position_bias_b"]["position_bias"] == 0.0
    assert res["position_bias_b"]["order_agreement"] == 1.0


def test_binary_agreement_against_gold():
    from rlhfkit.eval.agreement import binary_agreement

    res = binary_agreement([1.0, 0.0, None, 0.5, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.5, 0.0])
    # decided by both: pairs 0, 1, 5 -> labels [1, 0, 0] vs truth [1, 1, 0]
    assert res["decided"] == 3 and res["agreement"] == pytest.approx(2 / 3)
    # kappa: p_o = 2/3; p_e = (1/3*2/3) + (2/3*1/3) = 4/9; (2/3 - 4/9)/(5/9) = 0.4
    assert res["kappa"] == pytest.approx(0.4, rel=1e-12)
    assert res["coverage"] == pytest.approx(3 / 5)


def test_eval_accepts_any_judge_and_refuses_abstentions():
    from rlhfkit.errors import RlhfkitError
    from rlhfkit.eval.run_eval import make_judge
    from rlhfkit.judges.judge import ArrayScores, ScoreJudge

    judge = make_judge("judge:afinn")
    assert judge.score(["", ""], ["good", "bad bad"]).tolist() == [3.0, -6.0]

    class Half(ScoreJudge):
        name = "half"

        def _score(self, prompts, responses):
            return [1.0 if i % 2 else None for i in range(len(responses))]

    with pytest.raises(RlhfkitError, match="abstained on 2 of 3"):
        ArrayScores(Half()).score(None, ["a", "b", "c"])


def test_reward_model_judge_compares_by_its_scores(tmp_path):
    from rlhfkit.models import load_tokenizer, save_model, tiny_reward_model
    from rlhfkit.models.reward import RewardScorer

    tok = load_tokenizer("kindly:tokenizer")
    save_model(tiny_reward_model(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                 tokenizer=tok, seed=3), tok, tmp_path / "rm")
    judge = load_judge(f"rm:{tmp_path / 'rm'}")
    prompts, a, b = ["The day", "My friend"], POS, NEG
    sa = RewardScorer(str(tmp_path / "rm")).score(prompts, a)
    sb = RewardScorer(str(tmp_path / "rm")).score(prompts, b)
    assert judge.score(prompts, a) == pytest.approx(sa.tolist(), rel=1e-6)
    for v, x, y in zip(judge.compare(prompts, a, b), sa, sb):
        assert v.label == (1.0 if x > y else 0.0)
        assert v.p_a == pytest.approx(1.0 / (1.0 + math.exp(-(x - y))), rel=1e-6)


def test_label_rankings_with_a_judge(tmp_path):
    from rlhfkit.recipes.label import Config, main

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "", "responses": ["bad day", "good day", "a day", "wonderful day"]}) + "\n")
    main(Config(input=str(inp), output=str(tmp_path / "r.jsonl"), judge="afinn", output_format="ranking"))
    [row] = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert row["ranking"] == [3, 1, 2, 0] and row["annotator_id"] == "afinn"  # 4, 3, 0, -3


def test_label_with_a_general_constitution_asks_the_http_judge_each_principle(tmp_path):
    from pathlib import Path

    from _judge_stub import StubServer
    from rlhfkit.recipes.label import Config, main

    constitution = Path(__file__).resolve().parents[1] / "configs" / "constitution_general.md"
    with StubServer() as srv:
        main(Config(input=str(_items(tmp_path / "in.jsonl")), output=str(tmp_path / "o.jsonl"),
                    constitution=str(constitution), judge=f"http:stub?base_url={srv.url}&backoff=0.01",
                    chain_of_thought=True, ties="keep"))
        questions = {s["body"]["messages"][0]["content"].split("\n")[1] for s in srv.seen}
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["annotator_id"] == "http:stub" for r in rows)
    assert all(len(r["rationale"]) == 2 and "Answer:" in r["rationale"][0] for r in rows)
    from rlhfkit.judges.constitution import load_constitution

    asked = {p.comparison for p in load_constitution(constitution)}
    assert questions <= asked and len(questions) >= 2  # each comparison asked one drawn principle's question
    assert {r["principle"] for r in rows} <= {"harmless", "helpful", "kind"}
    kind = [r for r in rows if r["chosen"] == "is a kind and generous man"]
    assert kind and kind[0]["label"] == 1.0


def test_cai_revise_with_a_local_causal_lm(tiny_lm_dir, tmp_path):
    """The local model writes nonsense, but every step is taken, recorded or counted as failed."""
    from pathlib import Path

    from rlhfkit.recipes.cai import Config, main

    (tmp_path / "p.txt").write_text("The day\nMy friend\n")
    constitution = Path(__file__).resolve().parents[1] / "configs" / "constitution_general.md"
    stats = main(Config(model=f"llm:{tiny_lm_dir}?chat=false", constitution=str(constitution), prompts=str(tmp_path / "p.txt"),
                        output=str(tmp_path / "o.jsonl"), revisions=2, max_new_tokens=4))
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert len(rows) == stats["records"] == 2 - stats["failed_samples"]
    assert stats["steps"] == 2 * len(rows)
    for r in rows:
        assert r["completion"] == (r["revisions"][-1]["revision"] if r["revisions"] else r["initial"])
    done = sum(len(r["revisions"]) for r in rows)
    assert done + stats["failed_critiques"] + stats["failed_revisions"] == 2 * len(rows)


def test_agreement_reports_the_raw_position_bias_of_an_order_averaging_judge(tmp_path):
    tok = bundled_tokenizer()
    if tok is None:
        pytest.skip("bundled tokenizer missing")
    from rlhfkit.eval.agreement import judge_labels, read_labels
    from rlhfkit.judges.llm import LLMJudge

    a_id = tok(" A", add_special_tokens=False)["input_ids"][0]
    b_id = tok(" B", add_special_tokens=False)["input_ids"][0]
    judge = LLMJudge("stub", chat="false", _model=_AlwaysA(len(tok), a_id, b_id), _tokenizer=tok)
    pairs = read_labels(str(_write_prefs(tmp_path / "a.jsonl", [("", p, n, False) for p, n in zip(POS, NEG)])))
    labels, stats = judge_labels(judge, pairs)
    assert stats["position_bias"] == 0.5 and stats["order_agreement"] == 0.0  # always the first shown
    assert all(v["label"] == "tie" for v in labels.values()) and judge.both_orders is True


def test_llm_chain_of_thought_reads_the_answer_after_its_own_reasoning(tiny_lm_dir):
    from rlhfkit.judges.llm import COT_PREFIX, COT_SUFFIX, PAIRWISE_TEMPLATE

    judge = load_judge(f"llm:{tiny_lm_dir}?chat=false&cot_tokens=5&both_orders=false")
    [v] = judge.compare_with_question(["The day"], [POS[0]], [NEG[0]], question="Which is kinder?", chain_of_thought=True)
    ctx = PAIRWISE_TEMPLATE.format(prompt="The day", response_a=POS[0], response_b=NEG[0], question="Which is kinder?")
    ctx += COT_PREFIX
    ctx += judge.generate_raw([ctx], 5)[0] + COT_SUFFIX
    la = _reference_logprob(judge.model, judge.tok, ctx, " A")
    lb = _reference_logprob(judge.model, judge.tok, ctx, " B")
    assert v.p_a == pytest.approx(1.0 / (1.0 + math.exp(lb - la)), rel=1e-5)


def test_agreement_with_simulated_annotators_and_a_feedback_database(tmp_path):
    from rlhfkit.eval.agreement import Config, main
    from rlhfkit.feedback.db import Database, upgrade
    from rlhfkit.feedback.security import use_test_hasher
    from rlhfkit.feedback.service.accounts import create_user
    from rlhfkit.feedback.service.assign import next_assignment
    from rlhfkit.feedback.service.items import import_records
    from rlhfkit.feedback.service.labels import submit_label
    from rlhfkit.feedback.service.tasks import create_task

    use_test_hasher()
    url = f"sqlite:///{tmp_path}/fb.db"
    upgrade(url)
    db = Database(url, pool_size=2)
    with db.session() as s:
        user = create_user(s, "ann", "correct horse battery")
        task = create_task(s, "pairs", "pairwise", gold_rate=0.0, randomize_order=False)
        import_records(s, task, [{"prompt": f"Q{i}:", "responses": [p, n]} for i, (p, n) in enumerate(zip(POS, NEG))])
        for k in range(2):
            item, _ = next_assignment(s, task, user)
            submit_label(s, task, user, item.id, {"choice": "left" if k == 0 else "right"}, f"key-{k}-abcdef")
    db.dispose()
    res = main(Config(a=f"feedback:{url}", b="judge:afinn"))
    assert res["pairs"] == 2 and res["agreement"] == 0.5  # the person chose the unkind response once
    res = main(Config(a=f"feedback:{url}", b="simulated"))
    assert res["pairs"] == 2


def test_trl_pairwise_call():
    from rlhfkit.judges.judge import TRLPairwiseJudge

    trl = TRLPairwiseJudge(load_judge("afinn"))
    assert trl.judge(["", "", ""], [[POS[0], NEG[0]], [NEG[1], POS[1]], ["a day", "a night"]]) == [0, 1, -1]


def test_llm_judge_with_a_chat_template_asks_one_user_turn(tiny_lm_dir):
    from rlhfkit.judges.llm import PAIRWISE_TEMPLATE

    judge = load_judge(f"llm:{tiny_lm_dir}?both_orders=false")
    assert judge.use_chat and judge.answers == ["A", "B"]
    [v] = judge.compare(["The day"], [POS[0]], [NEG[0]])
    text = PAIRWISE_TEMPLATE.format(prompt="The day", response_a=POS[0], response_b=NEG[0], question=judge.question)
    ctx = judge.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    ids = judge.tok(ctx, add_special_tokens=False)["input_ids"]

    def logprob(answer):
        ans = judge.tok(answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(judge.model(torch.tensor([ids + ans])).logits[0].double(), -1)
        return float(sum(lp[len(ids) - 1 + k, t] for k, t in enumerate(ans)))

    assert v.p_a == pytest.approx(1.0 / (1.0 + math.exp(logprob("B") - logprob("A"))), rel=1e-5)
