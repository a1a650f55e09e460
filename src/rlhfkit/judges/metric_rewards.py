"""Text metrics as rewards, against a reference column of the prompt data (as RL4LMs offers them:
Ramamurthy et al. 2023, "Is Reinforcement Learning (Not) for Natural Language Processing?").

    --reward metric:NAME[?column=COL&model=PATH]

    rouge1 | rouge2 | rougeL | rougeLsum   ROUGE F-measure (Lin 2004; Google's rouge-score, stemmer on)
    rouge                                  = rougeL
    bleu                                   sentence BLEU / 100 (Papineni et al. 2002; sacrebleu, exp smoothing)
    chrf                                   chrF / 100 (Popovic 2015; sacrebleu, beta 2, character 6-grams)
    ter                                    minus TER / 100 (Snover et al. 2006; sacrebleu): fewer edits, more reward
    distinct-N                             distinct-N of the completion itself (Li et al. 2016); no reference
    perplexity                             minus the mean token NLL of the completion after its prompt under
                                           a reference LM (`model=`, default the bundled base), i.e. -log PPL

The reference text of each prompt comes from its `column` (default ``reference``; a column of
several references, a list, is scored against all of them where the metric takes several). The
scorers come from maintained packages (``pip install 'rlhfkit[metrics]'``: rouge-score, sacrebleu),
imported when a metric reward is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.errors import ConfigError
from rlhfkit.logprobs import response_logprobs
from rlhfkit.models import load_policy, load_tokenizer

REFERENCE_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "rouge", "bleu", "chrf", "ter")


def _text(c: Any) -> str:
    """A completion as text: conversational completions are [{"role", "content"}]."""
    if isinstance(c, list):
        return "".join(str(m.get("content", "")) for m in c if isinstance(m, dict))
    return str(c)


def _refs(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def _sacrebleu():
    try:
        import sacrebleu  # optional: the metrics extra
    except ImportError as e:
        raise ConfigError("metric rewards bleu, chrf and ter need sacrebleu: pip install 'rlhfkit[metrics]'") from e
    return sacrebleu


def _rouge_scorer(kind: str) -> Callable[[str, list[str]], float]:
    try:
        from rouge_score import rouge_scorer  # optional: the metrics extra
    except ImportError as e:
        raise ConfigError("metric rewards rouge* need rouge-score: pip install 'rlhfkit[metrics]'") from e
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    # several references: the best F-measure (rouge-score's score_multi)
    return lambda hyp, refs: float(scorer.score_multi(refs, hyp)[kind].fmeasure)


def reference_metric(name: str) -> Callable[[str, list[str]], float]:
    """(hypothesis, references) -> score of a reference-based metric (module docstring)."""
    if name.startswith("rouge"):
        return _rouge_scorer("rougeL" if name == "rouge" else name)
    sb = _sacrebleu()
    if name == "bleu":
        return lambda hyp, refs: sb.sentence_bleu(hyp, refs).score / 100.0
    if name == "chrf":
        return lambda hyp, refs: sb.sentence_chrf(hyp, refs).score / 100.0
    return lambda hyp, refs: -sb.sentence_ter(hyp, refs).score / 100.0


class ReferenceMetricReward:
    """A reference-based metric as a reward function (TRL signature) reading `column`."""

    def __init__(self, name: str, column: str = "reference"):
        self.metric, self.column, self.__name__ = reference_metric(name), column, name

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        if self.column not in columns:
            have = ", ".join(sorted(k for k in columns if k not in ("completion_ids", "trainer_state", "log_extra",
                                                                     "log_metric"))) or "none"
            raise ConfigError(f"metric reward '{self.__name__}': the prompt data has no '{self.column}' column "
                              f"(columns: {have}); name the reference column with metric:{self.__name__}?column=NAME")
        refs = columns[self.column]
        return [self.metric(_text(c), _refs(r)) for c, r in zip(completions, refs)]


def distinct_in(text: str, n: int) -> float:
    """Unique n-grams over n-grams of one text's words; 0 when it has no n-gram."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class DistinctReward:
    """distinct-N of each completion (no reference)."""

    def __init__(self, n: int):
        self.n, self.__name__ = n, f"distinct-{n}"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        return [distinct_in(_text(c), self.n) for c in completions]


class PerplexityReward:
    """-mean token NLL (= -log perplexity) of each completion after its prompt under a reference LM."""

    __name__ = "perplexity"

    def __init__(self, model: str = "kindly", device: Any = "cpu", batch_size: int = 32):
        self.tokenizer = load_tokenizer(model)
        self.model = load_policy(model, trainable=False).to(device).eval()
        self.device, self.batch_size = device, batch_size

    def _encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        q = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        return q, r

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float | None]:
        out: list[float | None] = []
        pairs = [self._encode(_text(p), _text(c)) for p, c in zip(prompts, completions)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            qw, rw = max(len(q) for q, _ in chunk), max(max(len(r) for _, r in chunk), 1)
            ids = torch.full((len(chunk), qw + rw), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, (q, r) in enumerate(chunk):  # prompts left-padded, responses right-padded
                ids[i, qw - len(q):qw], attn[i, qw - len(q):qw] = torch.tensor(q, dtype=torch.long), 1
                ids[i, qw:qw + len(r)], attn[i, qw:qw + len(r)] = torch.tensor(r, dtype=torch.long), 1
            rmask = attn[:, qw:]
            lp, _ = response_logprobs(self.model, input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                      response_width=rw, response_mask=rmask.to(self.device))
            lp = (lp.double().cpu() * rmask).sum(-1)
            for total, n in zip(lp.tolist(), rmask.sum(-1).tolist()):
                out.append(total / n if n else None)  # an empty completion has no perplexity: abstain
        return out


def metric_reward(arg: str, opts: dict[str, str], device: Any = "cpu", batch_size: int = 32):
    """The reward function `metric:NAME?options` names (module docstring)."""
    name = arg.strip()
    unknown = set(opts) - {"column", "model"}
    if unknown:
        raise ConfigError(f"reward 'metric:{arg}': unknown option(s) {sorted(unknown)}; metric rewards take column= "
                          "(the reference column) and, for perplexity, model=")
    if name in REFERENCE_METRICS:
        return ReferenceMetricReward(name, opts.get("column", "reference"))
    if name.startswith("distinct-") and name[len("distinct-"):].isdigit() and int(name[len("distinct-"):]) >= 1:
        return DistinctReward(int(name[len("distinct-"):]))
    if name == "perplexity":
        return PerplexityReward(opts.get("model", "kindly"), device, batch_size)
    raise ConfigError(f"reward 'metric:{arg}': unknown metric {name!r}; choose from {', '.join(REFERENCE_METRICS)}, "
                      "distinct-N, perplexity")

