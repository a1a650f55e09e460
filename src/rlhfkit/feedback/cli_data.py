"""`rlhfkit serve sample` and `rlhfkit serve export`: the subcommands that use the training
stack (a policy generating responses; files written atomically by rlhfkit.train.runs). cli.py
imports this module only when one of them runs."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from rlhfkit.feedback import export as ex
from rlhfkit.feedback.cli import named_task, open_db, task_of
from rlhfkit.feedback.sampling import sample_records
from rlhfkit.feedback.service import items
from rlhfkit.feedback.service.audit import audit
from rlhfkit.train.runs import atomic_path, atomic_write_text


def sample(args) -> int:
    records = sample_records(args.policy, args.prompts, args.num_samples, args.max_new_tokens,
                             args.temperature, args.seed)
    db = open_db(args)
    with db.session() as s:
        task = task_of(s, args)
        n = items.import_records(s, task, records, source=args.prompts, via="cli")
    print(f"sampled and imported {n} items into task {args.task!r}")
    return 0


def export(args) -> int:
    if os.path.exists(args.out) and not args.force:
        raise ValueError(f"{args.out} exists; pass --force to overwrite it")
    db = open_db(args)
    with db.session() as s:
        task = named_task(s, args.task)
        records, skipped = ex.export_records(s, task, args.kind, args.aggregate, args.include_gold, args.ties,
                                             only_accepted=args.status == "accepted")
        audit(s, None, "task.export", task.name, kind=args.kind, status=args.status, records=len(records), via="cli")
    (write_dataset if args.hf else write_jsonl)(records, args.out)
    print(f"wrote {len(records)} {args.kind} records to {args.out}" + (f"; skipped {skipped}" if skipped else ""))
    return 0


def write_jsonl(records: list[dict], path: str | Path) -> Path:
    atomic_write_text(path, "".join(ex.json_line(r) for r in records))
    return Path(path)


def write_dataset(records: list[dict], path: str | Path) -> Path:
    """Save as a Hugging Face `datasets` folder (load with datasets.load_from_disk)."""

    with atomic_path(path) as tmp:
        datasets.Dataset.from_list(records).save_to_disk(str(tmp))
    return Path(path)
