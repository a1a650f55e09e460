"""The bundled agentic task "calc": add three numbers with a calculator tool.

A problem reads ``Q: 57+86+21= A:`` (numbers written as in the arith task: two digits,
least-significant first, so this is 75 + 68 + 12 = 155, answered `` 551``). The bundled
arithmetic model was pretrained on sums of TWO numbers and cannot add three in its head; the
policy is given one tool, ``calculator(expression)``, which takes and answers in the task's
notation. An episode that solves a problem:

    [user]      Q: 57+86+21= A:
    [assistant] <tool_call>{"name": "calculator", "arguments": {"expression": "57+86+21"}}</tool_call>
    [tool]      551
    [assistant]  551

so the policy must write a well-formed call, copy the operands into it, read the result and
copy it into its answer. The verifier (``reward_fn``) checks the final answer exactly.

* ``prompt_records(split)`` -- ``{"prompt", "answer"}``; "eval" holds NUM_EVAL problems, "train"
  NUM_TRAIN_PROMPTS; a problem's split is fixed by a hash of its sorted operands, so no eval
  problem, in any order of its operands, is trained on;
* ``sft_records(split)`` -- tool-call traces (``messages`` + ``tools``) written by a careless
  annotator: a share SFT_NOISE of them has one digit wrong, in the copied operands (then the tool
  answers the wrong sum) or in the copied result;
* ``tools`` -- ``[calculator]``: ``--environment calc`` gives the policy exactly these;
* tokenizer and base: the arith task's character tokenizer plus the chat template's pieces as
  whole tokens (``CHAT_TOKENS``), and the arith base with its embedding grown to match
  (``python -m rlhfkit.tasks.calc build``; shipped in ``tokenizer/`` and ``base/``).
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.utils import get_json_schema

from rlhfkit.tasks import arith

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "eval")
NUM_OPERANDS = 3
EVAL_SHARE = 0.15
NUM_EVAL = 400
NUM_TRAIN_PROMPTS = 4000
NUM_SFT = 1000
SFT_NOISE = 0.25
CALL_HEAD = '{"name": "calculator", "arguments": {"expression": "'
CALL_TAIL = '"}}'
# the template's pieces as single tokens: a character model then writes a tool call in a few steps
CHAT_TOKENS = ("<|im_start|>", "system", "user", "assistant", "\n", "<tools>", "</tools>", "calculator",
               "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", CALL_HEAD, CALL_TAIL)
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n<tools>' }}{% for t in tools %}{{ t['function']['name'] }}{% endfor %}"
    "{{ '</tools><eos>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><eos>\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + (m['content'] or '') }}"
    "{% for c in m.get('tool_calls') or [] %}{{ '<tool_call>\n' + ({'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson) + '\n</tool_call>' }}{% endfor %}{{ '<eos>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<eos>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_EXPR_RE = re.compile(r"\s*(\d{2})\s*\+\s*(\d{2})\s*\+\s*(\d{2})\s*")
_PROMPT_RE = re.compile(r"Q:\s*(\d{2})\+(\d{2})\+(\d{2})=\s*A:\s*$")


def calculator(expression: str) -> str:
    """Add the numbers of an expression written as the task writes numbers.

    Args:
        expression: three two-digit numbers, least-significant digit first, joined by '+', e.g. "57+86+21"
    """
    m = _EXPR_RE.fullmatch(expression)
    if m is None:
        raise ValueError(f"cannot read {expression!r}: write three two-digit numbers joined by '+'")
    return arith.write_answer(sum(int(x[::-1]) for x in m.groups()))


tools = [calculator]


def format_prompt(numbers: Sequence[int]) -> str:
    return "Q: " + "+".join(arith.write_number(n, 2) for n in numbers) + "= A:"


def is_eval_problem(numbers: Sequence[int]) -> bool:
    return arith._stable_unit("calc-split:" + ",".join(map(str, sorted(numbers)))) < EVAL_SHARE


@functools.lru_cache(maxsize=4)
def _problems(side: str, n: int, seed: int) -> tuple[tuple[int, ...], ...]:
    rng, out, seen = random.Random(seed), [], set()
    while len(out) < n:
        numbers = tuple(rng.randint(0, 99) for _ in range(NUM_OPERANDS))
        if is_eval_problem(numbers) != (side == "eval") or numbers in seen:
            continue
        seen.add(numbers)
        out.append(numbers)
    return tuple(out)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def prompt_records(split: str = "train") -> list[dict]:
    """{"prompt", "answer"} records (the answer as plain decimal text)."""
    _check_split(split)
    n = NUM_EVAL if split == "eval" else NUM_TRAIN_PROMPTS
    return [{"prompt": format_prompt(p), "answer": str(sum(p))} for p in _problems(split, n, 11 if split == "eval" else 12)]


def _trace(numbers: Sequence[int], rng: random.Random | None = None) -> list[dict]:
    """The messages of a solved episode; with `rng`, one digit miscopied (operands or result)."""
    expression = "+".join(arith.write_number(n, 2) for n in numbers)
    slip = rng is not None and rng.random() < SFT_NOISE
    if slip and rng.random() < 0.5:
        i = rng.randrange(len(expression))
        while expression[i] == "+":
            i = rng.randrange(len(expression))
        expression = expression[:i] + rng.choice([d for d in "0123456789" if d != expression[i]]) + expression[i + 1:]
        slip = False
    result = calculator(expression)
    answer = result
    if slip:
        i = rng.randrange(len(answer))
        answer = answer[:i] + rng.choice([d for d in "0123456789" if d != answer[i]]) + answer[i + 1:]
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
    return [{"role": "user", "content": format_prompt(numbers)}, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "calculator", "content": result}, {"role": "assistant", "content": " " + answer}]


def sft_records(split: str = "train") -> list[dict]:
    """Tool-call traces {"messages", "tools"}: "train" NUM_SFT with SFT_NOISE miscopied; "eval" clean."""
    _check_split(split)
    schema = [tool_schema()]
    if split == "eval":
        return [{"messages": _trace(p), "tools": schema} for p in _problems("eval", 200, 11)]
    rng = random.Random(13)
    return [{"messages": _trace(p, rng), "tools": schema} for p in _problems("train", NUM_SFT, 13)]


def tool_schema() -> dict:
    """The calculator's JSON schema (what transformers' get_json_schema makes of it)."""
    return get_json_schema(calculator)


def _text(item: Any) -> str:
    if isinstance(item, list):  # an episode's messages: its final answer is the last assistant message
        last = [m for m in item if isinstance(m, dict) and m.get("role") == "assistant"]
        return str(last[-1].get("content") or "") if last else ""
    return str(item)


def reward_fn(prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[Any] | None = None,
              **kwargs: Any) -> list[float | None]:
    """Exact match of the final answer (TRL's reward_funcs signature): 1.0 when the last assistant
    message, spaces aside, is the sum written as the task writes numbers; else 0.0. The truth is
    the `answer` column, else parsed from the prompt; a row with neither abstains (None)."""
    out: list[float | None] = []
    for i, completion in enumerate(completions):
        truth = None
        if answer is not None and answer[i] is not None and str(answer[i]).strip().isdigit():
            truth = int(str(answer[i]).strip())
        else:
            prompt = prompts[i][-1]["content"] if isinstance(prompts[i], list) else str(prompts[i])
            m = _PROMPT_RE.search(prompt)
            truth = sum(int(x[::-1]) for x in m.groups()) if m else None
        out.append(None if truth is None else float(arith.read_answer(_text(completion)) == truth))
    return out


def build_tokenizer():
    """The arith tokenizer with CHAT_TOKENS added and CHAT_TEMPLATE as its chat template."""
    tok = arith.build_tokenizer()
    tok.add_tokens(list(CHAT_TOKENS))
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 256
    return tok


def tokenizer_path() -> Path:
    path = HERE / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m rlhfkit.tasks.calc build`")
    return path


def base_model_path() -> Path:
    path = HERE / "base"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m rlhfkit.tasks.calc build`")
    return path


__all__ = ["calculator", "tools", "prompt_records", "sft_records", "reward_fn", "format_prompt", "build_tokenizer",
           "tokenizer_path", "base_model_path", "is_eval_problem", "CHAT_TEMPLATE"]
