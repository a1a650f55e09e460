"""`python -m rlhfkit.tasks.calc build` rebuilds the bundled tokenizer and base; `export DIR` writes the data.

build: the arith tokenizer plus the chat template's tokens (tasks/calc/tokenizer), and the arith
base with its embedding grown to the new vocabulary, the new rows drawn around the mean of the
old ones by transformers' resize_token_embeddings under seed 0 (tasks/calc/base).
export writes DIR/sft_{train,eval}.jsonl (messages + tools) and DIR/prompts_{train,eval}.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlhfkit.tasks import arith, calc


def _write(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def build(tokenizer_dir: Path, base_dir: Path) -> None:
    tok = calc.build_tokenizer()
    tok.save_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(arith.base_model_path())
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)


def export(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for split in calc.SPLITS:
        _write(out / f"sft_{split}.jsonl", calc.sft_records(split))
        _write(out / f"prompts_{split}.jsonl", calc.prompt_records(split))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhfkit.tasks.calc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="rebuild the bundled tokenizer and base model")
    b.add_argument("--tokenizer", default=str(calc.HERE / "tokenizer"))
    b.add_argument("--base", default=str(calc.HERE / "base"))
    ex = sub.add_parser("export", help="write the data files into a folder")
    ex.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(Path(args.tokenizer), Path(args.base))
        print(f"saved the tokenizer to {args.tokenizer} and the base to {args.base}")
    else:
        print(f"wrote {export(Path(args.out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
