"""Resumable checkpoints: model, optimiser, scheduler and RNG states through accelerate, written
to a temporary folder and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from rlhfkit.train.runs import atomic_path

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step-(\d+)$")


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict | None = None,
                    keep: int = 2) -> Path | None:
    """Write model, optimiser, scheduler and RNG states plus `state` to checkpoints/step-N.

    All processes must call it (accelerate gathers sharded states); only the main process
    renames the finished folder into place and prunes all but the newest `keep`.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # accelerate warns "Removed shared tensor ..." on every checkpoint of a model with tied
    # embeddings; the tie is restored on load, so the warning is noise to a user
    quiet = logging.getLogger("accelerate.utils.other")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    finally:
        quiet.setLevel(level)
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
        with atomic_path(final) as t:
            shutil.move(str(tmp), t)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict:
    """Restore states saved by :func:`save_checkpoint`; returns its trainer_state (with `step`)."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / "trainer_state.json").read_text())
