"""`python -m rlhfkit.tasks.arith export DIR` writes the task's data files; `tokenizer` rebuilds
the bundled tokenizer.

export writes, each atomically:
  DIR/corpus_train.txt, DIR/corpus_eval.txt   plain equations, one a line (rlhfkit pretrain --corpus)
  DIR/sft_train.jsonl, DIR/sft_eval.jsonl     prompt/completion (rlhfkit sft --dataset)
  DIR/prompts_train.jsonl, DIR/prompts_eval.jsonl   prompt/answer (RL prompts; `answer` goes to reward functions)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rlhfkit.tasks import arith


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def export(out: str | Path) -> Path:
    """Write the task's data files into `out` (see the module docstring); returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for split in arith.SPLITS:
        _write(out / f"corpus_{split}.txt", arith.corpus_lines(split))
        _write(out / f"sft_{split}.jsonl", [json.dumps(r) for r in arith.sft_records(split)])
        _write(out / f"prompts_{split}.jsonl", [json.dumps(r) for r in arith.prompt_records(split)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhfkit.tasks.arith", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the data files into a folder")
    ex.add_argument("out", help="folder to write (created if missing)")
    tk = sub.add_parser("tokenizer", help="rebuild the bundled character tokenizer")
    tk.add_argument("--out", default=str(arith.HERE / "tokenizer"), help="folder to save it to")
    args = parser.parse_args(argv)
    if args.command == "export":
        print(f"wrote {export(args.out)}")
    else:
        arith.build_tokenizer().save_pretrained(args.out)
        print(f"saved the tokenizer to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
