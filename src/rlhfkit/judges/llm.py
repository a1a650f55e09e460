"""LLM-as-judge with any local transformers causal LM (Zheng et al. 2023, "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena"; Lee et al. 2023, "RLAIF", sec. 2.1).

The rubric is a template (replaceable: ``pairwise_template=FILE``, ``pointwise_template=FILE``,
Python ``str.format`` fields ``{prompt}``, ``{response}``, ``{response_a}``, ``{response_b}``,
``{question}``). The verdict is read from the log-probabilities of the answer tokens after the
rubric, never from free text:

* pairwise: ``P(A) = softmax(log p(" A"), log p(" B"))`` (``"A"``/``"B"`` without the space when
  the rubric is a chat turn; ``answers=`` replaces them) (Lee et al. 2023 call these the AI
  preference probabilities). Each pair is asked in both orders and the two are averaged,
  ``p_a = (P(A | a shown first) + P(B | a shown second)) / 2``, which cancels a constant position
  bias (Zheng et al. 2023, sec. 3.3; Wang et al. 2023, "Large Language Models are not Fair
  Evaluators"). ``consistent`` reports whether both orders chose the same response, and
  ``stats["order_agreement"]`` the share that did. Orders that disagree are a tie by default
  (``inconsistent=abstain`` drops them; ``inconsistent=average`` keeps the averaged verdict), and
  so is an averaged ``p_a`` within ``tie_margin`` (default 0.1: 0.45 <= p_a <= 0.55) of a coin
  flip, so that rounding noise around 0.5 never becomes a confident label.
* pointwise (``score``, and ``compare`` when ``mode=pointwise``): the expected score ``sum_k k * P(k)`` over the answer tokens "1".."5" (the
  probability-weighted score of G-Eval, Liu et al. 2023).

Multi-token answers are scored by their summed token log-probs (teacher forcing). With a chat
template on the tokenizer the rubric becomes one user message. ``max_length`` defaults to what
the model can read: its config's ``max_position_embeddings`` (``n_positions``), or the
tokenizer's ``model_max_length`` when that is smaller and set (transformers marks an unset one
with a huge number); a larger ``max_length`` is cut down to it. A rubric too long (with the
reasoning budget, under chain of thought) is not truncated, which would hide one response: the
judge abstains and counts it in ``stats["too_long"]``.
``chain_of_thought=True`` (RL-CAI, Bai et al. 2022 sec. 4.1) lets the model write up to
``cot_tokens`` tokens of reasoning greedily before the answer prefix is appended.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhfkit.errors import ConfigError
from rlhfkit.judges.judge import (
    DEFAULT_TIE_MARGIN,
    INCONSISTENT,
    Preference,
    aligned,
    attach_rationales,
    combine_orders,
    new_stats,
    rubric_compare,
)
from rlhfkit.models import load_policy, load_tokenizer

PAIRWISE_TEMPLATE = """Compare two responses to the same prompt.
{question}

Prompt: {prompt}

Response A: {response_a}

Response B: {response_b}

Answer with A or B.
Answer:"""

POINTWISE_TEMPLATE = """Rate the response to the prompt from 1 (worst) to 5 (best).
{question}

Prompt: {prompt}

Response: {response}

Score:"""

DEFAULT_QUESTION = "Which response is better: more helpful, honest and kind?"
COT_PREFIX = "\nLet's think step by step:"
COT_SUFFIX = "\nTherefore, the better response is"


def _read_template(value: str, default: str) -> str:
    if not value:
        return default
    p = Path(value)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    if "{" in value:
        return value
    raise ConfigError(f"template {value!r} is neither a file nor a template with {{fields}}")


FALLBACK_MAX_LENGTH = 2048
_UNSET_TOKENIZER_LENGTH = 1_000_000  # transformers' "no limit" is int(1e30)


def context_limit(model, tokenizer, max_length: int = 0) -> int:
    """The longest sequence the judge may feed: `max_length` (0: no wish) capped by the model's
    positions and a set tokenizer limit; 2048 when neither the wish nor the model gives one."""
    cfg = getattr(model, "config", None)
    limits = [getattr(cfg, k, None) for k in ("max_position_embeddings", "n_positions")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    known = [int(x) for x in limits if isinstance(x, int) and 0 < x < _UNSET_TOKENIZER_LENGTH]
    if max_length > 0:
        known.append(max_length)
    return min(known) if known else FALLBACK_MAX_LENGTH


class LLMJudge:
    """A local causal LM judging by the log-probs of its answer tokens (module docstring)."""

    def __init__(self, model: str, mode: str = "pairwise", pairwise_template: str = "", pointwise_template: str = "",
                 question: str = DEFAULT_QUESTION, answers: str = "", points: str = "",
                 both_orders: bool = True, batch_size: int = 8, max_length: int = 0, device: str = "",
                 dtype: str = "float32", tie_margin: float = DEFAULT_TIE_MARGIN, inconsistent: str = "tie",
                 chat: str = "auto", cot_tokens: int = 128, name: str = "", _model=None, _tokenizer=None):
        if mode not in ("pairwise", "pointwise"):
            raise ConfigError(f"llm judge: mode must be pairwise or pointwise, got {mode!r}")
        if inconsistent not in INCONSISTENT:
            raise ConfigError(f"llm judge: inconsistent must be one of {', '.join(INCONSISTENT)}, got {inconsistent!r}")
        if _model is None:
            try:
                _tokenizer = load_tokenizer(model)
                _model = load_policy(model, dtype=dtype, trainable=False)
            except OSError as e:
                raise ConfigError(f"llm judge: cannot load a causal LM from {model!r} ({e})") from e
        self.model, self.tok = _model.eval(), _tokenizer
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        self.mode, self.question, self.both_orders = mode, question, bool(both_orders)
        self.pairwise_template = _read_template(pairwise_template, PAIRWISE_TEMPLATE)
        self.pointwise_template = _read_template(pointwise_template, POINTWISE_TEMPLATE)
        self.batch_size, self.tie_margin = int(batch_size), float(tie_margin)
        self.max_length = context_limit(self.model, self.tok, int(max_length))
        self.use_chat = bool((chat == "auto" and getattr(self.tok, "chat_template", None)) or chat is True or chat == "true")
        # after "Answer:" a base model's next token carries a space; an assistant turn starts bare
        space = "" if self.use_chat else " "
        self.answers = answers.split(",") if answers else [f"{space}A", f"{space}B"]
        self.points = points.split(",") if points else [f"{space}{k}" for k in range(1, 6)]
        if len(self.answers) != 2:
            raise ConfigError(f"llm judge: answers must name two answer strings, got {answers!r}")
        self.cot_tokens, self.inconsistent = int(cot_tokens), inconsistent
        self.name = name or f"llm:{model}"
        self.stats = new_stats() | {"too_long": 0, "order_consistent": 0, "order_pairs": 0}

    # -- prompts ------------------------------------------------------------------------------

    def _wrap(self, text: str) -> str:
        if not self.use_chat:
            return text
        return self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=not self.use_chat)["input_ids"]

    @torch.no_grad()
    def answer_logprobs(self, contexts: Sequence[str], answers: Sequence[str]) -> list[list[float] | None]:
        """log p(answer | context) for every answer after every context (None: context too long)."""
        ans_ids = [self.tok(a, add_special_tokens=False)["input_ids"] for a in answers]
        if any(not a for a in ans_ids):
            raise ConfigError(f"llm judge: an answer string encodes to no tokens: {answers!r}")
        jobs, out = [], [None] * len(contexts)
        for i, c in enumerate(contexts):
            if c is None:  # already found too long (chain of thought)
                continue
            ids = self._ids(c)
            if len(ids) + max(map(len, ans_ids)) > self.max_length:
                self.stats["too_long"] += 1
                continue
            out[i] = [0.0] * len(answers)
            jobs += [(i, k, ids, a) for k, a in enumerate(ans_ids)]
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        # disable=None: a bar on a terminal only, none in logs and tests
        for s in tqdm(range(0, len(jobs), self.batch_size), desc=f"{self.name} judging", unit="batch",
                      disable=None, leave=False):
            chunk = jobs[s:s + self.batch_size]
            seqs = [ids + a for _, _, ids, a in chunk]
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, q in enumerate(seqs):
                input_ids[r, :len(q)] = torch.tensor(q)
                mask[r, :len(q)] = 1
            logits = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            for r, (i, k, ids, a) in enumerate(chunk):
                pos = torch.arange(len(ids) - 1, len(ids) + len(a) - 1)
                out[i][k] = float(logp[r, pos.to(logp.device), torch.tensor(a, device=logp.device)].sum())
        return out

    # -- pairwise -----------------------------------------------------------------------------

    def _p_first(self, prompts, first, second, question, chain_of_thought=False) -> tuple[list[float | None], list[str]]:
        """P(the response shown first is better) for each pair, from the answer log-probs, and the
        reasoning written before it (chain of thought; else empty strings)."""
        ctx = [self._wrap(self.pairwise_template.format(prompt=p or "", response_a=x, response_b=y, question=question))
               for p, x, y in zip(prompts, first, second)]
        if chain_of_thought:
            ctx = [c + COT_PREFIX for c in ctx]
            longest_answer = max(len(self.tok(a, add_special_tokens=False)["input_ids"]) for a in self.answers)
            suffix = len(self.tok(COT_SUFFIX, add_special_tokens=False)["input_ids"])
            fits = [len(self._ids(c)) + self.cot_tokens + suffix + longest_answer <= self.max_length for c in ctx]
            self.stats["too_long"] += fits.count(False)
            written = self.generate_raw([c for c, ok in zip(ctx, fits) if ok], self.cot_tokens)
            reasons = [written.pop(0) if ok else "" for ok in fits]
            ctx = [c + r + COT_SUFFIX if ok else None for c, r, ok in zip(ctx, reasons, fits)]
        else:
            reasons = [""] * len(ctx)
        out = []
        for lp in self.answer_logprobs(ctx, self.answers):
            if lp is None or not all(math.isfinite(x) for x in lp):
                out.append(None)
                continue
            m = max(lp)
            ea, eb = math.exp(lp[0] - m), math.exp(lp[1] - m)
            out.append(ea / (ea + eb))
        return out, reasons

    def compare_with_question(self, prompts, a, b, question: str, chain_of_thought: bool = False) -> list[Preference]:
        prompts = aligned(prompts, a, b)
        p1, r1 = self._p_first(prompts, a, b, question, chain_of_thought)
        p2, r2 = self._p_first(prompts, b, a, question, chain_of_thought) if self.both_orders else (None, None)
        out = combine_orders(p1, p2, self.both_orders, self.tie_margin, self.stats,
                             f"rubric longer than the judge's {self.max_length} positions", self.inconsistent)
        if chain_of_thought:
            attach_rationales(out, r1, r2)
        return out

    def compare(self, prompts, a, b) -> list[Preference]:
        """mode=pairwise: the pairwise rubric in both orders; mode=pointwise: the higher expected score."""
        return rubric_compare(self, prompts, a, b)

    # -- pointwise ----------------------------------------------------------------------------

    def score(self, prompts, responses) -> list[float | None]:
        """The pointwise rubric's expected score (whatever the mode: a score needs one response)."""
        prompts = aligned(prompts, responses)
        ctx = [self._wrap(self.pointwise_template.format(prompt=p or "", response=r, question=self.question))
               for p, r in zip(prompts, responses)]
        values = []
        for v in self.points:
            try:
                values.append(float(v))
            except ValueError as e:
                raise ConfigError(f"llm judge: points must be numbers, got {v!r}") from e
        out = []
        for lp in self.answer_logprobs(ctx, self.points):
            if lp is None:
                out.append(None)
                continue
            m = max(lp)
            w = [math.exp(x - m) for x in lp]
            out.append(sum(wi * v for wi, v in zip(w, values)) / sum(w))
        self.stats["scored"] += len(out)
        self.stats["abstained"] += sum(x is None for x in out)
        return out

    # -- generation (critiques and revisions of SL-CAI) -----------------------------------------

    @torch.no_grad()
    def generate_raw(self, contexts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of already-wrapped contexts."""
        out = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for c in contexts:
            ids = torch.tensor([self._ids(c)], device=self.device)
            room = min(max_new_tokens, self.max_length - ids.shape[1])
            if room < 1:  # the instruction alone fills the model's positions: no answer (counted by the caller)
                self.stats["too_long"] += 1
                out.append("")
                continue
            gen = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=room,
                                      do_sample=False, pad_token_id=pad)
            out.append(self.tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    def generate(self, instructions: Sequence[str], max_new_tokens: int = 128) -> list[str]:
        """Answer each instruction (as a chat turn when the tokenizer has a chat template)."""
        return [t.strip() for t in self.generate_raw([self._wrap(i) for i in instructions], max_new_tokens)]
