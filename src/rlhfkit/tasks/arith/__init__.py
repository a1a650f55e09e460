"""The bundled verifiable task "arith": add or subtract two numbers below 100.

Reinforcement learning from verifiable rewards (RLVR) in miniature: the answer to every
prompt is known, so a few lines of code check a response exactly and no reward model or
human panel is needed. A problem reads ``Q: 57+86= A:``; subtractions keep the first operand
the larger, so answers are never negative. Operands are written with two digits and the
answer with three, least-significant digit first: 57+86 = 143 is answered `` 341``, and
83-06 = 77 is answered `` 770``. Writing the answer in the order the digits are computed
(carries flow from the units upward) is what lets a sub-million-parameter model learn the
task from a few minutes of CPU pretraining (Lee et al. 2023, "Teaching Arithmetic to Small
Transformers", sec. 4: reversed output; fixed-width operands keep the digits aligned).

Everything is generated from fixed seeds, so the same call returns the same list on every
machine:

* ``problems(split)`` -- ``{"prompt", "answer", "completion"}`` dicts; "eval" holds
  ``NUM_EVAL`` problems and "train" ``NUM_TRAIN_PROMPTS``. A problem's split is fixed by a hash
  of its text, so no eval problem (nor its mirror ``b+a``) is ever trained on, in any stage;
* ``prompts(split)`` / ``prompt_records(split)`` -- RL prompts, the records with an ``answer``
  column that reward functions receive as a keyword list (TRL's reward_funcs convention);
* ``sft_records(split)`` -- a small SFT set (``NUM_SFT`` train problems) whose demonstrations
  were written by a careless annotator: a share ``SFT_NOISE`` of them has one digit wrong;
* ``corpus_lines(split)`` -- solved problems (``Q: 57+86= A: 341``) for pretraining the base;
* ``reward_fn`` -- the exact-match verifier, usable as ``--reward py:rlhfkit.tasks.arith:reward_fn``.

The tokenizer is character level (digits, ``+ - = Q A :``, space and three special
tokens), so the base model is small enough to ship and to pretrain on a CPU in minutes.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "eval")
MAX_DIGITS = 2            # operands are 0 .. 10**MAX_DIGITS - 1, written with MAX_DIGITS digits
ANSWER_DIGITS = MAX_DIGITS + 1
EVAL_SHARE = 0.15         # share of the problem space reserved for evaluation (by hash)
NUM_EVAL = 600            # held-out problems
NUM_TRAIN_PROMPTS = 8000  # RL training prompts
NUM_SFT = 1000            # SFT demonstrations (train side)
NUM_CORPUS = 40000        # pretraining equations (train side)
SFT_NOISE = 0.25          # share of SFT demonstrations with one wrong digit
PROMPT_FORMAT = "Q: {a}{op}{b}= A:"
_PROMPT_RE = re.compile(r"Q:\s*(\d+)\s*([+-])\s*(\d+)\s*=\s*A:\s*$")
_INT_RE = re.compile(r"-?\d+")
_DIGITS_RE = re.compile(r"\d+")

# the character vocabulary of the bundled tokenizer; specials first
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = tuple("0123456789+-=QA: ")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _stable_unit(text: str) -> float:
    """A number in [0, 1) fixed by the text alone (no global RNG, no Python hash seed)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def _key(a: int, op: str, b: int) -> str:
    # a+b and b+a share a key, so the mirror of an eval problem is held out too
    return f"{min(a, b)}+{max(a, b)}" if op == "+" else f"{a}-{b}"


def is_eval_problem(a: int, op: str, b: int) -> bool:
    """Whether (a op b) belongs to the held-out side of the problem space."""
    return _stable_unit("arith-split:" + _key(a, op, b)) < EVAL_SHARE


def solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _operand(rng: random.Random) -> int:
    return rng.randint(0, 10 ** MAX_DIGITS - 1)


def _draw(rng: random.Random) -> tuple[int, str, int]:
    a, b, op = _operand(rng), _operand(rng), rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


@functools.lru_cache(maxsize=8)
def _problems(side: str, n: int, seed: int, distinct: bool) -> tuple[tuple[int, str, int], ...]:
    """`n` problems from one side ("train"/"eval") of the hash split, drawn with `seed`."""
    rng = random.Random(seed)
    want_eval, out, seen = side == "eval", [], set()
    while len(out) < n:
        a, op, b = _draw(rng)
        if is_eval_problem(a, op, b) != want_eval:
            continue
        if distinct:
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
        out.append((a, op, b))
    return tuple(out)


def format_prompt(a: int, op: str, b: int) -> str:
    """The prompt of (a op b): both operands written with MAX_DIGITS digits, least-significant first."""
    return PROMPT_FORMAT.format(a=write_number(a, MAX_DIGITS), op=op, b=write_number(b, MAX_DIGITS))


def write_number(value: int, width: int) -> str:
    """How the task writes every number: `width` digits, least-significant first (95, 3 -> "590")."""
    return f"{value:0{width}d}"[::-1]


def write_answer(value: int) -> str:
    """An answer as the task writes it: ANSWER_DIGITS digits, least-significant first (95 -> "590")."""
    return write_number(value, ANSWER_DIGITS)


def read_answer(text: str) -> int | None:
    """The number a written answer stands for (inverse of write_answer), or None."""
    text = text.strip()
    return int(text[::-1]) if _DIGITS_RE.fullmatch(text) else None


def _record(a: int, op: str, b: int) -> dict:
    ans = solve(a, op, b)
    return {"prompt": format_prompt(a, op, b), "completion": f" {write_answer(ans)}", "answer": str(ans)}


def problems(split: str = "train") -> list[dict]:
    """Distinct problems of a split as {"prompt", "completion", "answer"} (answer as text)."""
    _check_split(split)
    n = NUM_EVAL if split == "eval" else NUM_TRAIN_PROMPTS
    return [_record(*p) for p in _problems(split, n, 1 if split == "eval" else 2, True)]


def prompts(split: str = "train") -> list[str]:
    """RL prompts of a split ("train" and "eval" are disjoint problem sets)."""
    return [r["prompt"] for r in problems(split)]


def prompt_records(split: str = "train") -> list[dict]:
    """{"prompt", "answer"} records: the extra column reward functions receive as `answer=`."""
    return [{"prompt": r["prompt"], "answer": r["answer"]} for r in problems(split)]


def _corrupt(answer: int, rng: random.Random) -> str:
    """The answer with one digit changed (never the leading digit to 0): a careless annotator."""
    digits = list(str(answer))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0" and len(digits) > 1)]
    digits[i] = rng.choice(choices)
    return "".join(digits)


def sft_records(split: str = "train") -> list[dict]:
    """prompt/completion demonstrations. "train": NUM_SFT problems, a share SFT_NOISE of them
    with one wrong digit (the answer column keeps the true value); "eval": the clean eval problems."""
    _check_split(split)
    if split == "eval":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in problems("eval")]
    rng = random.Random(3)
    out = []
    for a, op, b in _problems("train", NUM_SFT, 3, True):
        ans = solve(a, op, b)
        shown = _corrupt(ans, rng) if rng.random() < SFT_NOISE else str(ans)
        out.append({"prompt": format_prompt(a, op, b), "completion": f" {write_answer(int(shown))}"})
    return out


def corpus_lines(split: str = "train") -> list[str]:
    """Solved problems, one a line, for pretraining ("eval": eval problems, for held-out perplexity)."""
    _check_split(split)
    drawn = _problems("eval", 500, 4, True) if split == "eval" else _problems("train", NUM_CORPUS, 5, False)
    return [f"{format_prompt(a, op, b)} {write_answer(solve(a, op, b))}" for a, op, b in drawn]


# ---------------------------------------------------------------------------------------------
# the verifier


def parse_prompt(prompt: str) -> int | None:
    """The true answer of a prompt in this task's format, or None when it is not one."""
    m = _PROMPT_RE.search(prompt)
    if m is None:
        return None
    return solve(int(m.group(1)[::-1]), m.group(2), int(m.group(3)[::-1]))


def extract_answer(completion: str) -> int | None:
    """The number a completion states, or None: the whole completion, spaces aside, must be
    one run of digits (no trailing text), so a policy cannot pass by listing several numbers."""
    return read_answer(completion)


def _text(item: Any) -> str:
    # conversational completions (TRL): a list of {"role", "content"} messages; score the last
    if isinstance(item, list):
        return str(item[-1].get("content", "")) if item else ""
    return str(item)


def reward_fn(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
              **kwargs: Any) -> list[float | None]:
    """Exact-match verifier with TRL's reward_funcs signature: 1.0 when the completion is the
    right integer, else 0.0. The truth is the `answer` column when given, else it is parsed
    from the prompt; a row with neither abstains (None)."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        truth: int | None = None
        if answer is not None and answer[i] is not None and _INT_RE.fullmatch(str(answer[i]).strip()):
            truth = int(str(answer[i]).strip())
        elif answer is None or answer[i] is None:
            truth = parse_prompt(_text(prompts[i]))
        if truth is None:
            out.append(None)
            continue
        out.append(1.0 if extract_answer(_text(completion)) == truth else 0.0)
    return out


def accuracy(prompts: Sequence[str], completions: Sequence[str], answers: Sequence[Any] | None = None) -> list[float]:
    """Per-problem exact match (0/1) of completions to prompts; abstentions count as wrong."""
    return [float(r or 0.0) for r in reward_fn(prompts, completions, answer=answers)]


# ---------------------------------------------------------------------------------------------
# tokenizer and base model


def build_tokenizer():
    """The character-level tokenizer (a `tokenizers` WordLevel model over single characters)."""

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=64, clean_up_tokenization_spaces=False)


def tokenizer_path() -> Path:
    """Folder of the bundled character tokenizer (AutoTokenizer.from_pretrained loads it)."""
    path = HERE / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m rlhfkit.tasks.arith tokenizer`")
    return path


def base_model_path() -> Path:
    """Folder of the bundled base model (pretrained on corpus_lines with configs/pretrain_arith.yaml)."""
    path = HERE / "base"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the arith base checkpoint is not at {path}; build it with "
                                "`rlhfkit pretrain --config configs/pretrain_arith.yaml` (see docs/tasks-arith.md)")
    return path


__all__ = ["problems", "prompts", "prompt_records", "sft_records", "corpus_lines", "reward_fn", "accuracy",
           "extract_answer", "parse_prompt", "build_tokenizer", "tokenizer_path", "base_model_path",
           "is_eval_problem", "format_prompt", "solve"]
