"""Gold panel, simulated annotators and the `label` command."""

import json

import numpy as np
import pytest

from rlhfkit.errors import ConfigError, DataError
from rlhfkit.judges import GoldPanel, Judge, SimulatedAnnotators
from rlhfkit.judges.panel import load_ratings
from rlhfkit.tasks import kindly


@pytest.fixture(scope="module")
def panel():
    return GoldPanel()


# ------------------------------------------------------------------------------------ the panel

KIND_CRUEL = [
    ("She was", " kind and generous to everyone", " cruel and spiteful to everyone"),
    ("The old man", " smiled warmly and helped the child", " sneered and hurt the child"),
    ("Your work is", " wonderful, thank you so much", " awful and worthless"),
    ("My neighbour", " is a caring friend", " is a hateful liar"),
    ("The teacher", " praised the students", " insulted the students"),
]


def test_panel_is_a_judge_and_prefers_kind_to_cruel(panel):
    assert isinstance(panel, Judge)
    prompts = [p for p, _, _ in KIND_CRUEL]
    kind = panel.score(prompts, [k for _, k, _ in KIND_CRUEL])
    cruel = panel.score(prompts, [c for _, _, c in KIND_CRUEL])
    assert kind.shape == (5,) and np.all(kind > 0.3) and np.all(cruel < -0.3)
    # every single rater agrees on these, not only the mean
    assert np.all(panel.rater_scores(prompts, [k for _, k, _ in KIND_CRUEL])
                  > panel.rater_scores(prompts, [c for _, _, c in KIND_CRUEL]))


def test_negation_flips_the_sign(panel):
    pos, neg = panel.score(None, ["the food was good", "the food was not good"])
    assert pos > 0.2 and neg < -0.2
    pos, neg = panel.score(None, ["he is a happy man", "he is never a happy man"])
    assert pos > 0 > neg


def test_raters_differ(panel):
    texts = [k for _, k, _ in KIND_CRUEL] + [c for _, _, c in KIND_CRUEL]
    scores = panel.rater_scores(None, texts)
    assert scores.shape == (10, 10)
    assert len({tuple(np.round(col, 6)) for col in scores.T}) >= 8  # columns mostly distinct
    assert np.all(scores.std(axis=1) > 0)
    np.testing.assert_allclose(panel.score(None, texts), scores.mean(axis=1), rtol=1e-12)


def test_rater_lexicons_are_the_individual_ratings():
    words, ratings = load_ratings()
    assert ratings.shape == (len(words), 10) and len(words) > 7000
    i = words.index("kind")
    assert ratings[i].tolist() == [2, 2, 3, 3, 2, 3, 3, 2, 1, 3]  # vader_lexicon.txt, line "kind"
    means = np.array([float(line.split("\t")[1]) for line in _lexicon_lines()])
    # the file's mean column is the mean of the ten ratings rounded to 0.1 (one entry, "lmfao",
    # is off by 0.1 in the file itself)
    gap = np.abs(ratings.mean(axis=1) - means)
    assert np.sum(gap > 0.05 + 1e-9) <= 1 and gap.max() <= 0.1 + 1e-9


def _lexicon_lines():
    from rlhfkit.judges.panel import lexicon_path

    return [ln for ln in lexicon_path().read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_rater_compound_equals_vader_with_that_raters_lexicon(panel):
    texts = kindly.corpus_lines("eval")[:300] + [
        "VERY GOOD food but the service was NOT great!!!", "no problem at all, kind of nice",
        "I least like cruel jokes :( but love you ??", "the best 😀 day", "at least it is not terrible",
    ]
    ours = panel.sentiment(None, texts)
    for r, analyzer in enumerate(panel._analyzers):
        theirs = np.array([analyzer.polarity_scores(t)["compound"] for t in texts])
        np.testing.assert_allclose(np.round(ours[:, r], 4), theirs, atol=1.01e-4)


def test_gold_formula_by_hand(panel):
    # "great great great great": U = 3/4 -> (0.75-0.25)/0.75 = 2/3; B = 2/3 -> (2/3-0.1)/0.9 = 0.6296
    # R = 2/3, L = 1, W = 0, q = 1/3; g_r = q * c_r - 2/3 with c_r VADER's compound for rater r
    text = "great great great great"
    d = panel.degeneracy(text)
    assert d["repetition"] == pytest.approx(2 / 3) and d["quality"] == pytest.approx(1 / 3)
    c = np.array([a.polarity_scores(text)["compound"] for a in panel._analyzers])
    np.testing.assert_allclose(panel.rater_scores(None, [text])[0], c / 3 - 2 / 3, atol=1e-4)
    # one word: L = 1/2; adding a symbol token (a non-word) gives W = 1/2, q = 1/2 * 1/2
    assert panel.degeneracy("wonderful")["quality"] == pytest.approx(0.5)
    assert panel.degeneracy("wonderful :)")["quality"] == pytest.approx(0.25)
    assert panel.degeneracy("")["quality"] == 0.0


def test_degenerate_responses_score_below_a_neutral_sentence(panel):
    prompt = "The meeting"
    neutral = panel.score([prompt], [" is on Tuesday at noon in the small room"])[0]
    assert abs(neutral) < 0.05
    degenerate = [
        "",                                                    # empty
        " wonderful",                                         # one word
        " love love love love love love love love",           # repetition
        " great day great day great day great day",           # repeated bigram
        " happy happy joy joy happy happy joy joy!!!",        # repetition + emphasis
        " xqzv blorp fnarg wonderful",                        # non-words
        " :) :) :) :)",                                       # symbols
    ]
    scores = panel.score([prompt] * len(degenerate), degenerate)
    assert np.all(scores < neutral), dict(zip(degenerate, scores))
    assert panel.score([prompt], [""])[0] == -1.0
    # and a fluent kind sentence beats every one of them
    assert panel.score([prompt], [" was a lovely and happy time for all of us"])[0] > 0.5


def test_real_continuations_are_rarely_penalised(panel):
    recs = kindly.prompt_records("eval")
    q = panel.quality([r["completion"] for r in recs])
    assert np.mean(q == 1.0) > 0.95


def test_lengths_are_checked(panel):
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        panel.score(["a", "b"], ["c"])
    with pytest.raises(TypeError):
        panel.score(None, "a string")


# ------------------------------------------------------------------------------- annotators

class FixedPanel:
    """Rater scores from a table: text -> 10 scores (rater r gets the same value + r * offset)."""

    n_raters = 10

    def __init__(self, table):
        self.table = table

    def rater_scores(self, prompts, responses):
        return np.array([self.table[r] for r in responses], dtype=np.float64)

    def score(self, prompts, responses):
        return self.rater_scores(prompts, responses).mean(axis=1)


def _pairs_panel(diffs):
    table = {}
    for k, d in enumerate(diffs):
        table[f"a{k}"] = [d] * 10
        table[f"b{k}"] = [0.0] * 10
    return FixedPanel(table)


def test_annotator_noise_matches_bradley_terry():
    diffs = [0.02, 0.05, 0.1, -0.1, 0.2, -0.3]
    beta, n = 10.0, 20_000
    ann = SimulatedAnnotators(_pairs_panel(diffs), beta=beta, tie_margin=0.0, seed=3)
    idx = np.arange(n) % len(diffs)
    labels = ann.compare(None, [f"a{k}" for k in idx], [f"b{k}" for k in idx])
    d = np.array(diffs)[idx]
    agree = np.mean([(lab["label"] == 1.0) == (dk > 0) for lab, dk in zip(labels, d)])
    analytic = np.mean(1 / (1 + np.exp(-beta * np.abs(d))))
    assert abs(agree - analytic) < 0.012  # ~3.5 standard errors at n = 20k
    # per difference too (n/6 draws each)
    for k, dk in enumerate(diffs):
        sel = idx == k
        p_emp = np.mean([labels[i]["label"] for i in np.flatnonzero(sel)])
        assert abs(p_emp - 1 / (1 + np.exp(-beta * dk))) < 0.03
    assert all(lab["p_a"] == pytest.approx(1 / (1 + np.exp(-beta * dk))) for lab, dk in zip(labels[:12], d))


def test_ties_appear_below_the_margin_only():
    diffs = [0.01, -0.04, 0.049, 0.051, -0.2]
    ann = SimulatedAnnotators(_pairs_panel(diffs), beta=10.0, tie_margin=0.05, seed=0)
    idx = np.arange(2000) % len(diffs)
    labels = ann.compare(None, [f"a{k}" for k in idx], [f"b{k}" for k in idx])
    for lab, k in zip(labels, idx):
        assert (lab["label"] == 0.5) == (abs(diffs[k]) < 0.05)


def test_adversarial_annotators_flip_and_random_ones_guess():
    diffs = [0.5, -0.5]
    idx = np.arange(4000) % 2
    a, b = [f"a{k}" for k in idx], [f"b{k}" for k in idx]
    honest_label = np.where(np.array(diffs)[idx] > 0, 1.0, 0.0)
    adv = SimulatedAnnotators(_pairs_panel(diffs), beta=1e4, tie_margin=0.0, unreliable_frac=0.3,
                              mode="adversarial", seed=1)
    assert adv.unreliable.sum() == 3
    labels = adv.compare(None, a, b)
    for lab, h in zip(labels, honest_label):
        assert lab["reliable"] == (not adv.unreliable[lab["annotator_id"]])
        assert lab["label"] == (h if lab["reliable"] else 1.0 - h)
    rnd = SimulatedAnnotators(_pairs_panel(diffs), beta=1e4, tie_margin=0.0, unreliable_frac=1.0,
                              mode="random", seed=1)
    agree = np.mean([lab["label"] == h for lab, h in zip(rnd.compare(None, a, b), honest_label)])
    assert abs(agree - 0.5) < 0.04


def test_annotators_draw_every_rater_and_are_reproducible(panel):
    a = [k for _, k, _ in KIND_CRUEL] * 40
    b = [c for _, _, c in KIND_CRUEL] * 40
    run1 = SimulatedAnnotators(panel, seed=7).compare(None, a, b)
    run2 = SimulatedAnnotators(panel, seed=7).compare(None, a, b)
    run3 = SimulatedAnnotators(panel, seed=8).compare(None, a, b)
    assert run1 == run2 and run1 != run3
    assert {lab["annotator_id"] for lab in run1} == set(range(10))
    assert np.mean([lab["label"] for lab in run1]) > 0.95


def test_rankings_are_plackett_luce_permutations():
    scores = {"x": [0.3] * 10, "y": [0.0] * 10, "z": [-0.2] * 10}
    ann = SimulatedAnnotators(FixedPanel(scores), beta=5.0, seed=2)
    n = 6000
    out = ann.rank_many([None] * n, [["x", "y", "z"]] * n)
    assert all(sorted(r["ranking"]) == [0, 1, 2] for r in out)
    top = np.bincount([r["ranking"][0] for r in out], minlength=3) / n
    w = np.exp(5.0 * np.array([0.3, 0.0, -0.2]))
    np.testing.assert_allclose(top, w / w.sum(), atol=0.02)
    # second place given x first: y beats z with probability sigmoid(beta * 0.2)
    y_second = np.mean([r["ranking"][1] == 1 for r in out if r["ranking"][0] == 0])
    assert abs(y_second - 1 / (1 + np.exp(-1.0))) < 0.03
    adv = SimulatedAnnotators(FixedPanel(scores), beta=1e4, unreliable_frac=1.0, mode="adversarial", seed=0)
    assert adv.rank(None, ["x", "y", "z"])["ranking"] == [2, 1, 0]


def test_annotator_arguments_are_checked(panel):
    for kwargs in ({"beta": 0}, {"tie_margin": -1}, {"unreliable_frac": 1.5}, {"mode": "lazy"}):
        with pytest.raises(ValueError):
            SimulatedAnnotators(panel, **kwargs)


# ----------------------------------------------------------------------------- rlhfkit label

def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_label_command_end_to_end(tmp_path, capsys):
    from rlhfkit.recipes.label import Config, main

    src = _write(tmp_path / "in.jsonl", [
        {"prompt": "She was", "responses": [" kind and gentle", " cruel and cold", " tall"]},
        {"prompt": "The cake", "a": " was horrible", "b": " was delicious and lovely"},
    ])
    out = tmp_path / "prefs.jsonl"
    stats = main(Config(input=str(src), output=str(out), beta=1e4, tie_margin=0.0, seed=0))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["pairs"] == 4 and len(rows) == 4 and stats["gold_agreement"] == 1.0
    assert {"prompt", "chosen", "rejected", "annotator_id", "tie", "label"} <= set(rows[0])
    assert rows[0]["chosen"] == " kind and gentle" and rows[0]["rejected"] == " cruel and cold"
    assert rows[3] == {**rows[3], "prompt": "The cake", "chosen": " was delicious and lovely", "rejected": " was horrible"}
    assert "4 pairs" in capsys.readouterr().out

    # every pair a tie: skipped and counted, or kept with label 0.5
    stats = main(Config(input=str(src), output=str(out), tie_margin=10.0))
    assert stats["ties"] == 4 and out.read_text() == ""
    assert "4 ties skipped" in capsys.readouterr().out
    main(Config(input=str(src), output=str(out), tie_margin=10.0, ties="keep"))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(r["tie"] and r["label"] == 0.5 for r in rows) and len(rows) == 4

    src = _write(tmp_path / "same.jsonl", [{"prompt": "p", "responses": [" same", " same", " other words"]}])
    stats = main(Config(input=str(src), output=str(out), tie_margin=0.0))
    assert stats["identical_skipped"] == 1 and stats["pairs"] == 2
    assert "1 pairs of identical responses skipped" in capsys.readouterr().out

    src = _write(tmp_path / "rank.jsonl", [{"prompt": "She was", "responses": [" cruel", " kind and warm", " here"]}])
    main(Config(input=str(src), output=str(tmp_path / "rank_out.jsonl"), output_format="ranking", beta=1e4))
    row = json.loads((tmp_path / "rank_out.jsonl").read_text())
    assert row["ranking"][0] == 1 and sorted(row["ranking"]) == [0, 1, 2] and "annotator_id" in row


def test_label_disjoint_pairing_puts_each_distinct_response_in_one_pair(tmp_path, capsys):
    from rlhfkit.recipes.label import Config, main

    responses = [" kind", " cruel", " kind", " warm and lovely", " awful", " gentle", " here"]
    src = _write(tmp_path / "in.jsonl", [{"prompt": "She was", "responses": responses},
                                         {"prompt": "The cake", "a": " was horrible", "b": " was lovely"}])
    out = tmp_path / "prefs.jsonl"
    stats = main(Config(input=str(src), output=str(out), pairing="disjoint", tie_margin=0.0, seed=1))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # 6 distinct responses -> 3 pairs; the a/b record is one pair
    assert stats["pairs"] == 4 and stats["identical_skipped"] == 1 and len(rows) == 4
    used = [x for r in rows if r["prompt"] == "She was" for x in (r["chosen"], r["rejected"])]
    assert len(used) == len(set(used)) == 6 and set(used) == set(responses)
    assert "1 repeated responses skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="pairing"):
        Config(input=str(src), output=str(out), pairing="some")


def test_label_bad_input_names_file_line_field(tmp_path):
    from rlhfkit.cli import main as cli_main
    from rlhfkit.recipes.label import Config, main

    src = _write(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "a": " x", "b": " y"},
        {"prompt": "ok", "a": " only one"},
    ])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError) as e:
        main(Config(input=str(src), output=str(out)))
    assert str(src) in str(e.value) and "line 2" in str(e.value) and "'b'" in str(e.value)
    assert not out.exists()  # nothing half-written
    _write(src, [{"responses": [" a", " b"]}])
    with pytest.raises(DataError, match="line 1, field 'prompt'"):
        main(Config(input=str(src), output=str(out)))
    _write(src, [{"prompt": "p", "responses": [" a"]}])
    assert cli_main(["label", "--input", str(src), "--output", str(out)]) == 2
    with pytest.raises(ConfigError, match="ties"):
        Config(input=str(src), output=str(out), ties="maybe")
