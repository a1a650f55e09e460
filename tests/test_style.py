"""The package's shape, checked: sizes a reader can hold in mind, imports at module top, the
layering contract, and one home for the concepts that used to be written several times."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "rlhfkit"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# what a user may not have installed, imported where it is used: the extras of pyproject.toml
# (the web service and policy server need the `serve` extra, so rlhfkit.feedback and
# rlhfkit.serving count as optional from the rest of the package) and peers' packages
OPTIONAL = {
    "rlhfkit.feedback", "rlhfkit.serving",  # the serve extra
    "fastapi", "uvicorn", "sqlalchemy", "alembic", "psycopg", "argon2", "confusable_homoglyphs", "jinja2", "httpx",
    "pydantic", "starlette", "scipy", "limits", "zxcvbn", "phonenumbers", "redis",
    "afinn", "textblob", "rouge_score", "sacrebleu", "openai",  # judges, metrics, redteam
    "trl", "sniffio", "bitsandbytes", "vllm", "flash_attn", "deepspeed", "wandb", "mlflow", "playwright",
}


def modules():
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" not in path.parts:
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_function_over_80_lines_and_no_module_over_500():
    long_functions, long_modules = [], []
    for path, tree in modules():
        rel = path.relative_to(SRC.parent)
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            long_modules.append(f"{rel}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
    assert not long_functions, "functions over 80 lines:\n" + "\n".join(long_functions)
    assert not long_modules, "modules over 500 lines:\n" + "\n".join(long_modules)


def test_imports_sit_at_module_top_except_optional_dependencies():
    inside = []
    for path, tree in modules():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            # an import guarded by try/except ImportError is a version or feature check: it stays
            guarded = {id(n) for t in ast.walk(fn) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
            for node in ast.walk(fn):
                if id(node) in guarded:
                    continue
                if isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    if not any(name == o or name.startswith(o + ".") for o in OPTIONAL):
                        inside.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {fn.name}: {name}")
    assert not inside, "imports inside functions (move them to the module top):\n" + "\n".join(inside)


def test_import_contracts_hold():
    root = SRC.parents[1]
    run = subprocess.run(["lint-imports", str(root / "pyproject.toml")], cwd=root, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_one_home_for_each_shared_concept():
    text = {path: path.read_text() for path, _ in modules()}
    defs = [p for p, t in text.items() if re.search(r"^def response_logprobs\(", t, re.M)]
    assert [p.relative_to(SRC) for p in defs] == [Path("logprobs.py")]
    step = SRC / "train" / "step.py"
    # the optimiser step, its accumulation and its schedule are taken in one place
    for pattern in (r"\bno_sync\(", r"\b(optimi[sz]er|opt|scheduler|sched)\w*\.step\(", r"clip_grad_norm_\("):
        users = sorted(str(p.relative_to(SRC)) for p, t in text.items() if p != step and re.search(pattern, t))
        assert users == [], f"{pattern} outside train/step.py: {users}"
