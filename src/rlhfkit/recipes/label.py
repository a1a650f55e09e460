"""Label responses with simulated annotators: pairs -> preference data, lists -> rankings.

    rlhfkit label --input samples.jsonl --output prefs.jsonl
    rlhfkit label --input samples.jsonl --output ranked.jsonl --output_format ranking

Input records (JSONL, JSON, parquet or a `datasets` folder) hold a `prompt` and either
`responses` (a list of at least two) or two responses `a` and `b`. Prompts and responses may be
strings or conversations (lists of {"role", "content"}); the panel reads the last message's
content, and the output keeps the original values.

Outputs (written atomically):

* ``preference`` -- TRL columns ``prompt``, ``chosen``, ``rejected`` plus ``label`` (1.0, or 0.5
  for a tie), ``tie``, ``annotator_id`` and ``reliable``. A record with K responses gives every
  pair (i < j), or ``pairs_per_prompt`` of them drawn with the seed; ``pairing=disjoint`` instead
  pairs the distinct responses off at random so each is in one pair (K/2 pairs per prompt: at
  a fixed label budget the reward model sees twice as many distinct responses as with all pairs
  of 4, which measured better on the bundled task, docs/reward.md). Ties: ``ties=skip`` (default)
  leaves them out and prints how many; ``ties=keep`` writes them with ``tie: true`` and
  ``label: 0.5`` (chosen/rejected then keep the input order) for trainers that read the label.
* ``ranking`` -- ``prompt``, ``responses``, ``ranking`` (indices, best first), ``annotator_id``,
  ``reliable``; needs ``responses`` records.

RLAIF: ``--judge SPEC`` labels with any AI judge instead (``afinn``, ``textblob``, ``rm:PATH``,
``llm:PATH``, ``http:MODEL?base_url=...``; see :func:`rlhfkit.judges.load_judge`); the records
have the same columns, ``annotator_id`` naming the judge, plus ``p_chosen`` (the judge's
probability that chosen is better) and ``confidence``; with ``--chain_of_thought true`` the
judge's reasoning is kept as ``rationale`` (one text per order asked: the pair as given, then
swapped). A pair
the judge abstains on (timeouts, unreadable answers, after the retries) is left out and counted.
RL-CAI: ``--constitution FILE`` draws one principle per comparison (Bai et al. 2022, sec. 4.1)
and asks that principle's comparison question of ``--judge``, or of its own labeller where the
principle names one (that choice wins; a line says which principles ``--judge`` answers, or
that it answers none); the records carry a ``principle`` field.

    rlhfkit label --input samples.jsonl --output ai_prefs.jsonl --judge afinn
    rlhfkit label --input samples.jsonl --output cai_prefs.jsonl --constitution configs/constitution_kindly.md

A judge that abstains on every pair (an endpoint that fails every request) stops the command
with a one-line error and writes nothing. Interrupted (Ctrl-C), the command says what was kept:
an ``http:`` judge's verdict cache (``cache=FILE``) keeps every answer received, so the same
command resumes without asking or paying for them again; the output is written only at the end.

The annotators are :class:`rlhfkit.judges.SimulatedAnnotators` over the gold panel: Bradley-Terry
noise with inverse temperature ``beta``, ties below ``tie_margin``, and a share
``unreliable_frac`` of unreliable annotators (``unreliable_mode`` random or adversarial).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rlhfkit.config import require
from rlhfkit.data.readers import load_records, source_of
from rlhfkit.errors import ConfigError, DataError, RlhfkitError
from rlhfkit.judges import GoldPanel, SimulatedAnnotators, load_judge
from rlhfkit.judges.constitution import constitution_labeller, load_constitution
from rlhfkit.train.runs import atomic_path


@dataclasses.dataclass
class Config:
    input: str = ""
    """Records with `prompt` and `responses` (list) or `a` and `b`: .jsonl, .json, .parquet or a datasets folder."""
    output: str = ""
    """Output JSONL file (written atomically)."""
    output_format: str = "preference"
    """'preference' (prompt/chosen/rejected) or 'ranking' (prompt/responses/ranking)."""
    beta: float = 10.0
    """Bradley-Terry inverse temperature: P(a > b) = sigmoid(beta * (s_a - s_b)) on one rater's gold score."""
    tie_margin: float = 0.02
    """A pair whose score difference is below this is a tie."""
    ties: str = "skip"
    """Preference output: 'skip' ties (their count is printed) or 'keep' them with tie=true, label=0.5."""
    unreliable_frac: float = 0.0
    """Share of annotators that are unreliable."""
    unreliable_mode: str = "random"
    """Unreliable annotators answer at 'random' or are 'adversarial' (flip their label)."""
    n_annotators: int = 10
    """Size of the annotator pool (annotator j judges as panel rater j % 10)."""
    pairs_per_prompt: int = 0
    """Preference output from K responses: label this many random pairs per prompt (0: all the pairing gives)."""
    pairing: str = "all"
    """Preference output from K responses: 'all' K(K-1)/2 pairs, or 'disjoint': the distinct responses paired off at random, each in one pair."""
    judge: str = ""
    """Label with this AI judge instead of simulated annotators (RLAIF), e.g. afinn, textblob, rm:PATH, llm:PATH, http:MODEL?base_url=URL."""
    constitution: str = ""
    """RL-CAI: a constitution file (YAML or Markdown); one principle is drawn per comparison."""
    chain_of_thought: bool = False
    """With an LLM or HTTP judge (RLAIF or RL-CAI): let the judge reason before its verdict; its text is kept as `rationale`."""
    seed: int = 0
    """Seed of annotator draws, label noise and pair choice."""

    def __post_init__(self) -> None:
        require(bool(self.input), "input", "give the records to label (--input FILE)")
        require(bool(self.output), "output", "give the output JSONL path (--output FILE)")
        require(self.output_format in ("preference", "ranking"), "output_format",
                f"must be preference or ranking, got {self.output_format!r}")
        require(self.beta > 0, "beta", "must be > 0")
        require(self.tie_margin >= 0, "tie_margin", "must be >= 0")
        require(self.ties in ("skip", "keep"), "ties", f"must be skip or keep, got {self.ties!r}")
        require(0.0 <= self.unreliable_frac <= 1.0, "unreliable_frac", "must be in [0, 1]")
        require(self.unreliable_mode in ("random", "adversarial"), "unreliable_mode",
                f"must be random or adversarial, got {self.unreliable_mode!r}")
        require(self.n_annotators >= 1, "n_annotators", "must be >= 1")
        require(self.pairs_per_prompt >= 0, "pairs_per_prompt", "must be >= 0")
        require(self.pairing in ("all", "disjoint"), "pairing", f"must be all or disjoint, got {self.pairing!r}")
        require(not (self.constitution and self.output_format == "ranking"), "constitution",
                "RL-CAI labels pairs: use --output_format preference")


def as_text(value: Any, source: str | None, line: int, field: str) -> str:
    """A string as is; a conversation -> its last message's content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        content = value[-1]["content"]
        if isinstance(content, str):
            return content
    raise DataError(f"expected a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}",
                    source=source, line=line, field=field)


def read_items(cfg: Config) -> list[dict]:
    """Each record -> {prompt, responses(list of original values), texts, line}, checked field by field."""
    records = load_records(cfg.input)
    src = source_of(records, cfg.input)
    items = []
    for i, rec in enumerate(records):
        line = records.line_of(i)
        if "prompt" not in rec or rec["prompt"] is None:
            raise DataError("missing field (every record needs a prompt)", source=src, line=line, field="prompt")
        if "responses" in rec:
            responses, names = rec["responses"], None
            if not isinstance(responses, list) or len(responses) < 2:
                raise DataError("must be a list of at least 2 responses", source=src, line=line, field="responses")
        elif "a" in rec or "b" in rec:
            for name in ("a", "b"):
                if rec.get(name) is None:
                    raise DataError("missing field (pairs need both a and b)", source=src, line=line, field=name)
            responses, names = [rec["a"], rec["b"]], ["a", "b"]
            if cfg.output_format == "ranking":
                raise DataError("ranking output needs a 'responses' list", source=src, line=line, field="responses")
        else:
            raise DataError("missing field (give 'responses' as a list, or 'a' and 'b')",
                            source=src, line=line, field="responses")
        texts = [as_text(r, src, line, names[k] if names else f"responses[{k}]") for k, r in enumerate(responses)]
        items.append({"prompt": rec["prompt"], "prompt_text": as_text(rec["prompt"], src, line, "prompt"),
                      "responses": responses, "texts": texts, "line": line})
    if not items:
        raise DataError("no records to label", source=src)
    return items


def choose_pairs(cfg: Config, items: list[dict]) -> tuple[list[tuple[int, int, int]], int]:
    """(item, i, j) of every pair to label, and how many identical responses were left out."""
    rng = np.random.default_rng(cfg.seed + 1)
    which, identical = [], 0
    for n, item in enumerate(items):
        texts = item["texts"]
        if cfg.pairing == "all":
            pairs = list(itertools.combinations(range(len(texts)), 2))
            # a response compared with its own copy says nothing and makes chosen == rejected
            kept = [(i, j) for i, j in pairs if texts[i] != texts[j]]
            identical += len(pairs) - len(kept)
            pairs = kept
        else:
            first: dict[str, int] = {}
            for i, t in enumerate(texts):
                first.setdefault(t, i)
            identical += len(texts) - len(first)  # later copies of a text are left out
            idx = list(first.values())
            order = rng.permutation(len(idx))
            pairs = [(min(idx[a], idx[b]), max(idx[a], idx[b])) for a, b in zip(order[0::2], order[1::2])]
        if cfg.pairs_per_prompt and len(pairs) > cfg.pairs_per_prompt:
            keep = rng.choice(len(pairs), size=cfg.pairs_per_prompt, replace=False)
            pairs = [pairs[k] for k in sorted(keep)]
        which += [(n, i, j) for i, j in pairs]
    return which, identical


def judge_labeller(judge, chain_of_thought: bool = False):
    """judge.compare -> label dicts (label None = abstained) with the judge's name as annotator_id;
    with chain of thought (LLM and HTTP judges) the judge reasons first and its text is kept."""
    if chain_of_thought and not hasattr(judge, "compare_with_question"):
        raise ConfigError(f"chain_of_thought: judge {judge.name!r} cannot reason in text; use an llm: or http: judge")

    def label(prompts, a, b):
        out = []
        verdicts = (judge.compare_with_question(prompts, a, b, judge.question, chain_of_thought=True)
                    if chain_of_thought else judge.compare(prompts, a, b))
        for v in verdicts:
            row = {"label": v.label, "annotator_id": judge.name, "reliable": True, "p_a": v.p_a,
                   "confidence": v.confidence}
            if v.consistent is not None:
                row["order_consistent"] = v.consistent
            if v.rationale:
                row["rationale"] = v.rationale
            out.append(row)
        return out
    return label


def label_pairs(cfg: Config, items: list[dict], labeller) -> tuple[list[dict], dict]:
    """Label the chosen pairs with `labeller(prompts, a, b) -> [{label, annotator_id, reliable, ...}]`."""
    which, identical = choose_pairs(cfg, items)
    prompts = [items[n]["prompt_text"] for n, _, _ in which]
    labels = labeller(prompts, [items[n]["texts"][i] for n, i, _ in which],
                      [items[n]["texts"][j] for n, _, j in which])
    rows, ties, abstained = [], 0, 0
    for (n, i, j), lab in zip(which, labels):
        if lab["label"] is None:
            abstained += 1
            continue
        tie = lab["label"] == 0.5
        ties += tie
        if tie and cfg.ties == "skip":
            continue
        first, second = (i, j) if lab["label"] >= 0.5 else (j, i)
        row = {"prompt": items[n]["prompt"], "chosen": items[n]["responses"][first],
               "rejected": items[n]["responses"][second], "label": 1.0 if not tie else 0.5,
               "tie": bool(tie), "annotator_id": lab["annotator_id"], "reliable": lab["reliable"]}
        for key in ("principle", "confidence", "order_consistent", "rationale"):
            if key in lab:
                row[key] = lab[key]
        if lab.get("p_a") is not None:  # P(chosen better) as the judge saw it
            row["p_chosen"] = lab["p_a"] if first == i else 1.0 - lab["p_a"]
        rows.append(row)
    # how often the labels agree with the panel's mean (the noiseless gold) where it is not even

    panel = GoldPanel()
    gold_a = panel.score(prompts, [items[n]["texts"][i] for n, i, _ in which])
    gold_b = panel.score(prompts, [items[n]["texts"][j] for n, _, j in which])
    lab = np.array([np.nan if x["label"] is None else x["label"] for x in labels])
    decided = (lab != 0.5) & ~np.isnan(lab) & (gold_a != gold_b)
    agree = float(((lab == 1.0) == (gold_a > gold_b))[decided].mean()) if decided.any() else float("nan")
    return rows, {"pairs": len(which), "ties": ties, "ties_skipped": ties if cfg.ties == "skip" else 0,
                  "identical_skipped": identical, "abstained": abstained, "gold_agreement": agree}


def label_rankings(cfg: Config, items: list[dict], annotators: SimulatedAnnotators | None,
                   judge=None) -> tuple[list[dict], dict]:
    if judge is None:
        ranked = annotators.rank_many([it["prompt_text"] for it in items], [it["texts"] for it in items])
    else:  # a judge ranks by its scores (stable for equal scores); an abstention drops the record
        flat = judge.score([it["prompt_text"] for it in items for _ in it["texts"]],
                           [t for it in items for t in it["texts"]])
        ranked, start = [], 0
        for it in items:
            s = flat[start:start + len(it["texts"])]
            start += len(it["texts"])
            ranked.append(None if any(x is None for x in s) else
                          {"ranking": sorted(range(len(s)), key=lambda k: -s[k]),
                           "annotator_id": judge.name, "reliable": True})
    rows = [{"prompt": it["prompt"], "responses": it["responses"], "ranking": r["ranking"],
             "annotator_id": r["annotator_id"], "reliable": r["reliable"]}
            for it, r in zip(items, ranked) if r is not None]
    return rows, {"rankings": len(rows), "abstained": sum(r is None for r in ranked)}


def main(cfg: Config) -> dict:
    items = read_items(cfg)
    judge = annotators = None
    if cfg.judge or cfg.constitution:
        judge = load_judge(cfg.judge) if cfg.judge else None
    if cfg.constitution:
        principles = load_constitution(cfg.constitution)
        if judge is not None:
            print(judge_use_note(principles, judge.name, cfg.constitution))
        labeller = constitution_labeller(principles, judge, seed=cfg.seed, chain_of_thought=cfg.chain_of_thought)
    elif judge is not None:
        labeller = judge_labeller(judge, cfg.chain_of_thought)
    else:
        annotators = SimulatedAnnotators(GoldPanel(), beta=cfg.beta, tie_margin=cfg.tie_margin,
                                         unreliable_frac=cfg.unreliable_frac, mode=cfg.unreliable_mode,
                                         seed=cfg.seed, n_annotators=cfg.n_annotators)
        labeller = annotators.compare
    out = Path(cfg.output)
    try:
        if cfg.output_format == "preference":
            rows, stats = label_pairs(cfg, items, labeller)
        else:
            rows, stats = label_rankings(cfg, items, annotators, judge)
    except KeyboardInterrupt:
        # the CLI's generic "nothing was saved" would be wrong where a verdict cache kept the answers
        print(f"\nrlhfkit label: interrupted; {interrupted_note(judge, out)}", file=sys.stderr)
        raise SystemExit(130) from None
    if judge is not None and not rows and stats.get("abstained"):
        n = stats.get("pairs", stats["abstained"])
        raise RlhfkitError(f"the judge {judge.name} abstained on all {n} {'pairs' if 'pairs' in stats else 'records'} "
                           f"({judge_counters(judge)}); nothing was written to {out}: check the judge "
                           f"(its endpoint, key and model), or raise its max_retries or timeout")
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats.update(records=len(items), written=len(rows), output=str(out),
                 unreliable_annotators=int(annotators.unreliable.sum()) if annotators is not None else 0)
    if judge is not None:
        stats["judge"] = {"name": judge.name, **{k: v for k, v in judge.stats.items() if not isinstance(v, dict)}}
    abstain_note = (f", {stats['abstained']} abstained (judge failed after retries; left out)"
                    if stats.get("abstained") else "")
    if cfg.output_format == "preference":
        tie_note = (f", {stats['ties']} ties skipped" if cfg.ties == "skip"
                    else f", {stats['ties']} ties kept with label 0.5")
        if stats["identical_skipped"]:
            what = "pairs of identical responses" if cfg.pairing == "all" else "repeated responses"
            tie_note += f", {stats['identical_skipped']} {what} skipped"
        print(f"label: {stats['records']} records -> {stats['pairs']} pairs{tie_note}{abstain_note}; "
              f"wrote {len(rows)} preferences to {out} (agreement with the panel mean "
              f"{stats['gold_agreement']:.3f})")
    else:
        print(f"label: wrote {len(rows)} rankings to {out}{abstain_note}")
    if judge is not None:  # retries, failures, tokens and cost: whatever the judge counts
        print(f"label: judge {judge.name}: {judge_counters(judge)}")
    return stats


def judge_use_note(principles, judge_name: str, path: str) -> str:
    """Which principles --judge answers: a principle that names its own judge keeps it."""
    own = [p.name for p in principles if p.judge]
    asked = [p.name for p in principles if not p.judge]
    if not asked:
        return (f"label: --judge {judge_name} is not used: every principle of {path} names its own judge "
                f"(remove their judge: lines to ask {judge_name} instead)")
    if own:
        return (f"label: --judge {judge_name} answers principles {', '.join(asked)}; "
                f"{', '.join(own)} use the judges they name")
    return f"label: --judge {judge_name} answers every principle of {path}"


def judge_counters(judge) -> str:
    """The judge's non-zero counters, and its order agreement whenever it asked both orders (0 included:
    a judge whose two orders never agree shows position bias, not preferences)."""
    shown = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in judge.stats.items()
             if not isinstance(v, dict) and v and not (k == "order_agreement" and v != v)}
    if judge.stats.get("order_pairs"):
        shown["order_agreement"] = round(judge.stats["order_agreement"], 3)
    return ", ".join(f"{k} {v}" for k, v in shown.items()) or "no counters"


def _caches(judge) -> list:
    """The verdict caches of a judge and of its ensemble members."""
    if judge is None:
        return []
    found = [judge.cache] if getattr(judge, "cache", None) is not None else []
    for member in getattr(judge, "members", []):
        found += _caches(member)
    return found


def interrupted_note(judge, out: Path) -> str:
    """What an interrupted run kept, where, and how to go on."""
    caches = _caches(judge)
    if caches:
        kept = "; ".join(f"{len(c)} verdicts are kept in {c.path}" for c in caches)
        return (f"{kept}; run the same command again to resume (cached requests are answered from the "
                f"cache, not asked or paid again); nothing was written to {out}")
    if judge is None:
        return f"nothing was written to {out}; run the command again"
    return (f"no verdicts were kept and nothing was written to {out}; add cache=FILE to an http: judge spec "
            f"to keep the answered verdicts for the next run")
