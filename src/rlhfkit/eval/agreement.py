"""`rlhfkit agreement`: how far one label source stands from another on the same pairs.

    rlhfkit agreement --a human_export.jsonl --b judge:afinn --output agreement.json
    rlhfkit agreement --a sim_labels.jsonl --b ai_labels.jsonl

A source is a preference file (TRL columns ``prompt``/``chosen``/``rejected``, with ``tie`` or
``label`` 0.5 for ties: a human-feedback export, simulated or AI labels); ``feedback:DB_URL``,
the human labels of a feedback database; ``simulated``, simulated annotators labelling the other
source's pairs; or ``judge:SPEC``, an AI judge labelling the other source's pairs (each order
asked separately, so its position bias is measured).
Pairs are matched by prompt and the unordered pair of responses; a label is read as
"first better", "tie" or "second better" in a canonical (sorted) order of the two responses.

Reported (on the pairs both sources labelled):

* ``agreement``: share of identical labels; ``agreement_decided``: the same on pairs neither
  called a tie;
* Cohen's kappa (Cohen 1960) and Krippendorff's alpha, nominal (Krippendorff 2011), over the
  three labels (rlhfkit.feedback.agreement has both);
* a confusion table (rows: a's label, columns: b's);
* per source, the length bias: among decided pairs of unequal length (in words), the share where
  the longer response won (0.5 = no preference for length; compare with the other source's);
* per judge, the position bias: asked (x, y) and (y, x), the share of decided verdicts that
  chose the response shown first, minus 0.5, and how often the two orders agreed.

When a run folder holds ``agreement.json``, `rlhfkit report` shows it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from rlhfkit.config import require
from rlhfkit.errors import DataError
from rlhfkit.judges import SimulatedAnnotators, load_judge
from rlhfkit.train.runs import atomic_write_json

CLASSES = ("first", "tie", "second")


@dataclasses.dataclass
class Config:
    a: str = ""
    """First label source: a preference JSONL file, feedback:DB_URL, simulated or judge:SPEC."""
    b: str = ""
    """Second label source: a preference JSONL file, feedback:DB_URL, simulated or judge:SPEC."""
    items: str = ""
    """Pairs for judges to label when both sources are judges (a preference or a/b JSONL file)."""
    output: str = ""
    """JSON file to write (atomically); the summary is printed either way."""

    def __post_init__(self) -> None:
        require(bool(self.a) and bool(self.b), "a", "give two label sources, --a and --b (a file or judge:SPEC)")
        both_judges = _labels_others(self.a) and _labels_others(self.b)
        require(not both_judges or bool(self.items), "items", "two sources that label pairs need --items FILE")


def _labels_others(spec: str) -> bool:
    return spec.startswith("judge:") or spec == "simulated"


def pair_key(prompt, x, y) -> tuple[str, str, str]:
    p = json.dumps(prompt, sort_keys=True) if not isinstance(prompt, str) else prompt
    tx = json.dumps(x, sort_keys=True) if not isinstance(x, str) else x
    ty = json.dumps(y, sort_keys=True) if not isinstance(y, str) else y
    return (p, *sorted((tx, ty)))


def _key_text(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def canonical_label(key: tuple, chosen: str, tie: bool) -> str:
    if tie:
        return "tie"
    return "first" if chosen == key[1] else "second"


def read_labels(path: str) -> dict[tuple, dict]:
    """Preference file -> {pair key: {label, chosen, rejected, prompt}} (a repeated pair: the last label)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("file does not exist", source=path)
    out = {}
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not JSON ({e.msg})", source=path, line=n) from None
        if "a" in rec and "b" in rec and "chosen" not in rec:  # unlabelled items
            key = pair_key(rec.get("prompt", ""), rec["a"], rec["b"])
            out[key] = {"prompt": rec.get("prompt", ""), "x": rec["a"], "y": rec["b"], "label": None}
            continue
        for f in ("prompt", "chosen", "rejected"):
            if f not in rec:
                raise DataError("missing field", source=path, line=n, field=f)
        tie = bool(rec.get("tie")) or rec.get("label") == 0.5
        c, r = rec["chosen"], rec["rejected"]
        key = pair_key(rec["prompt"], c, r)
        out[key] = {"prompt": rec["prompt"], "x": c, "y": r, "label": canonical_label(key, _key_text(c), tie)}
    if not out:
        raise DataError("no labelled pairs", source=path)
    return out


def _text(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and isinstance(v[-1], dict):
        return str(v[-1].get("content", ""))
    return str(v)


def judge_labels(judge, pairs: dict[tuple, dict]) -> tuple[dict[tuple, dict], dict]:
    """Label pairs with a judge in both orders; returns ({key: {..., label}}, position stats)."""
    keys = list(pairs)
    prompts = [_text(pairs[k]["prompt"]) for k in keys]
    xs = [_text(pairs[k]["x"]) for k in keys]
    ys = [_text(pairs[k]["y"]) for k in keys]
    # a judge that averages both orders itself would hide its position bias: ask each order raw
    both = getattr(judge, "both_orders", None)
    if both:
        judge.both_orders = False
    try:
        fwd = judge.compare(prompts, xs, ys)
        bwd = judge.compare(prompts, ys, xs)
    finally:
        if both:
            judge.both_orders = both
    out, first_shown, decided, consistent, both = {}, 0, 0, 0, 0
    for k, f, b in zip(keys, fwd, bwd):
        for v in (f, b):
            if v.label in (0.0, 1.0):
                decided += 1
                first_shown += v.label == 1.0
        if f.label is not None and b.label is not None:
            both += 1
            consistent += f.label == 1.0 - b.label
        # the verdict: the order-averaged P(x better) -- both orders, as MT-Bench (Zheng et al. 2023) asks
        ps = [v.p_a if v.label != 0.5 else 0.5 for v in (f,) if v.label is not None]
        ps += [1.0 - v.p_a if v.label != 0.5 else 0.5 for v in (b,) if v.label is not None]
        if not ps:
            label = None
        else:
            p_x = sum(ps) / len(ps)
            winner = pairs[k]["x"] if p_x > 0.5 else pairs[k]["y"]
            label = "tie" if p_x == 0.5 else canonical_label(k, _key_text(winner), False)
        out[k] = dict(pairs[k], label=label)
    stats = {"position_bias": (first_shown / decided - 0.5) if decided else float("nan"),
             "order_agreement": consistent / both if both else float("nan"),
             "abstained": sum(v["label"] is None for v in out.values()), "judge": judge.name}
    return out, stats


def length_bias(labels: dict[tuple, dict]) -> float:
    """Share of decided pairs of unequal word length where the longer response won."""
    longer = n = 0
    for k, v in labels.items():
        if v["label"] not in ("first", "second"):
            continue
        first, second = len(k[1].split()), len(k[2].split())
        if first == second:
            continue
        n += 1
        longer += (first > second) == (v["label"] == "first")
    return longer / n if n else float("nan")


def compare_sources(la: dict[tuple, dict], lb: dict[tuple, dict]) -> dict:
    from rlhfkit.feedback.agreement import cohen_kappa, krippendorff_alpha

    common = [k for k in la if k in lb and la[k]["label"] is not None and lb[k]["label"] is not None]
    a = [la[k]["label"] for k in common]
    b = [lb[k]["label"] for k in common]
    n = len(common)
    decided = [(x, y) for x, y in zip(a, b) if x != "tie" and y != "tie"]
    confusion = {r: {c: sum(1 for x, y in zip(a, b) if x == r and y == c) for c in CLASSES} for r in CLASSES}
    return {
        "pairs": n,
        "pairs_only_a": sum(k not in lb for k in la), "pairs_only_b": sum(k not in la for k in lb),
        "agreement": sum(x == y for x, y in zip(a, b)) / n if n else float("nan"),
        "agreement_decided": sum(x == y for x, y in decided) / len(decided) if decided else float("nan"),
        "decided_pairs": len(decided),
        "kappa": cohen_kappa(a, b) if n else float("nan"),
        "krippendorff_alpha": krippendorff_alpha([[x, y] for x, y in zip(a, b)], "nominal") if n else float("nan"),
        "confusion": confusion,
    }


def binary_agreement(labels: Sequence[float | None], truth: Sequence[float]) -> dict:
    """Agreement and Cohen's kappa of labels (1 a better, 0 b better, 0.5 tie, None abstain)
    against reference labels (1/0; 0.5 pairs left out), on the pairs both decided; plus coverage."""
    from rlhfkit.feedback.agreement import cohen_kappa

    pairs = [(x, y) for x, y in zip(labels, truth) if x is not None and x != 0.5 and y != 0.5]
    n_ref = sum(y != 0.5 for y in truth)
    a = [x for x, _ in pairs]
    b = [y for _, y in pairs]
    return {"agreement": sum(x == y for x, y in pairs) / len(pairs) if pairs else float("nan"),
            "kappa": cohen_kappa(a, b) if pairs else float("nan"),
            "decided": len(pairs), "coverage": len(pairs) / n_ref if n_ref else float("nan")}


def simulated_labels(pairs: dict[tuple, dict], seed: int = 0) -> dict[tuple, dict]:
    """Simulated annotators (one panel rater per pair, Bradley-Terry noise, ties) on the pairs."""

    keys = list(pairs)
    got = SimulatedAnnotators(seed=seed).compare([_text(pairs[k]["prompt"]) for k in keys],
                                                 [_text(pairs[k]["x"]) for k in keys], [_text(pairs[k]["y"]) for k in keys])
    out = {}
    for k, g in zip(keys, got):
        winner = pairs[k]["x"] if g["label"] == 1.0 else pairs[k]["y"]
        out[k] = dict(pairs[k], label="tie" if g["label"] == 0.5 else canonical_label(k, _key_text(winner), False))
    return out


def feedback_labels(db_url: str) -> dict[tuple, dict]:
    """Human labels straight from a feedback database (every preference task; one label per pair:
    the last exported), through the service's own export."""
    from rlhfkit.feedback.export import load_preferences

    out = {}
    for rec in load_preferences(db_url, ties="keep"):
        key = pair_key(rec["prompt"], rec["chosen"], rec["rejected"])
        tie = bool(rec.get("tie")) or rec.get("label") == 0.5
        out[key] = {"prompt": rec["prompt"], "x": rec["chosen"], "y": rec["rejected"],
                    "label": canonical_label(key, _key_text(rec["chosen"]), tie)}
    if not out:
        raise DataError("no preference labels in the feedback database", source=db_url)
    return out


def _load_source(spec: str, other: dict | None, items: dict | None) -> tuple[dict, dict]:
    pairs = items if items is not None else other
    if spec.startswith("judge:"):
        judge = load_judge(spec[len("judge:"):])
        return judge_labels(judge, pairs)
    if spec == "simulated":
        return simulated_labels(pairs), {}
    if spec.startswith("feedback:"):
        return feedback_labels(spec[len("feedback:"):]), {}
    return read_labels(spec), {}


def main(cfg: Config) -> dict:
    items = read_labels(cfg.items) if cfg.items else None
    files = {s: _load_source(s, None, None)[0] for s in (cfg.a, cfg.b) if not _labels_others(s)}
    first_file = next(iter(files.values()), None)
    la, sa = (files[cfg.a], {}) if cfg.a in files else _load_source(cfg.a, first_file, items)
    lb, sb = (files[cfg.b], {}) if cfg.b in files else _load_source(cfg.b, first_file, items)
    result = {"a": cfg.a, "b": cfg.b, **compare_sources(la, lb),
              "length_bias": {"a": length_bias(la), "b": length_bias(lb)}}
    if sa:
        result["position_bias_a"] = sa
    if sb:
        result["position_bias_b"] = sb
    if cfg.output:
        atomic_write_json(cfg.output, result)
    c = result["confusion"]
    print(f"agreement: {result['pairs']} common pairs; agreement {result['agreement']:.3f}, kappa {result['kappa']:.3f}, "
          f"Krippendorff alpha {result['krippendorff_alpha']:.3f}; longer response wins a {result['length_bias']['a']:.3f} "
          f"/ b {result['length_bias']['b']:.3f}")
    print("          b: " + " ".join(f"{x:>7}" for x in CLASSES))
    for r in CLASSES:
        print(f"  a {r:>7}: " + " ".join(f"{c[r][x]:>7}" for x in CLASSES))
    for name, s in (("a", sa), ("b", sb)):
        if s:
            print(f"  {name} ({s['judge']}): position bias {s['position_bias']:+.3f} (share choosing the first shown - 0.5), "
                  f"orders agree {s['order_agreement']:.3f}, abstained {s['abstained']}")
    return result
