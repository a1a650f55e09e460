"""Rebuild the bundled base of the "say it kindly" task: tokenizer, then pretraining.

    python scripts/build_base.py              # about 5 minutes on 2 CPU cores
    python scripts/build_base.py --threads 1  # when the cores are shared

1. `scripts/train_tokenizer.py` writes the word-level tokenizer to src/rlhfkit/tasks/kindly/tokenizer/;
2. `rlhfkit pretrain --config configs/pretrain_kindly.yaml` trains the base on the corpus's
   training split and exports it (weights, tokenizer, pretrain_results.json) to
   src/rlhfkit/tasks/kindly/base/.

Both steps are seeded; the tokenizer is byte-identical on every run (tests/test_task.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "pretrain_kindly.yaml")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--output_dir", default="runs/pretrain", help="run folder of the pretraining")
    args = ap.parse_args(argv)
    if args.threads < 0:
        print(f"--threads must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    if not args.config.is_file():
        print(f"missing config {args.config}", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "scripts" / "train_tokenizer.py")
    train_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_tokenizer)
    rc = train_tokenizer.main([])
    if rc:
        return rc

    import torch

    from rlhfkit.config import load_yaml_config
    from rlhfkit.recipes import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_yaml_config(pretrain.Config, args.config)
    cfg.output_dir = args.output_dir
    if cfg.export_to and not Path(cfg.export_to).is_absolute():
        cfg.export_to = str(ROOT / cfg.export_to)
    pretrain.main(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
