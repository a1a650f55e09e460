"""Run folders: resolved config, provenance, metrics (JSONL + TensorBoard), atomic writes.

Every recipe writes into one `output_dir`:

    config.yaml       the resolved config (re-run with `--config config.yaml`)
    meta.json         rlhfkit version, git commit, library versions, seed, command line
    metrics.jsonl     one JSON object per logged step
    tb/               TensorBoard events
    checkpoints/      resumable state (step-N folders), when save_steps > 0
    final/            the trained model in Hugging Face format
"""

from __future__ import annotations

import contextlib
import contextvars
import csv
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from rlhfkit import __version__
from rlhfkit.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# atomic writes: nothing half-written is ever left under the final name


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and folders. An existing target is replaced (a folder target is moved
    aside first and removed after the rename, so a crash never leaves neither copy).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "x"  # the caller writes here; we rename it
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {path}")
        old = None
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
            os.replace(path, old)
        os.replace(target, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


# ---------------------------------------------------------------------------------------------
# seeds and provenance


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for a reproducible run."""

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


LIBRARIES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "peft", "safetensors",
             "vaderSentiment", "numpy", "trl")


def environment_info() -> dict[str, Any]:
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "rlhfkit": __version__,
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": versions,
    }


def _describe(value: Any) -> Any:
    """A config value as YAML can hold it: in-memory data becomes a short description."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "column_names") and hasattr(value, "num_rows"):
        return f"<datasets.Dataset: {value.num_rows} rows, columns {list(value.column_names)}>"
    if hasattr(value, "save_pretrained"):  # a model or tokenizer given in Python
        name = getattr(value, "name_or_path", "")
        return f"<{type(value).__name__} given in Python{f' (from {name})' if name else ''}>"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _describe(dataclasses.asdict(value))
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"<{len(value)} records given in Python>"
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return repr(value)


def prepare_run_dir(output_dir: str | Path, config: Any, is_main: bool = True) -> Path:
    """Create the run folder and record the resolved config and provenance (main process only)."""
    out = Path(output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        # field by field, not dataclasses.asdict: that deep-copies a model given in Python
        cfg = ({f.name: getattr(config, f.name) for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config)
               else dict(config))
        cfg = {k: _describe(v) for k, v in cfg.items()}  # a Dataset, records or a model given in Python
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))
        meta = environment_info()
        meta.update(
            seed=cfg.get("seed"),
            command=" ".join(sys.argv),
            config_class=type(config).__name__,
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        atomic_write_json(out / "meta.json", meta)
    return out


RUN_MARKERS = ("config.yaml", "meta.json", "metrics.jsonl", "checkpoints", "final")
RUN_OUTPUTS = ("tb", "results.json", "final_metrics.json", "alarms.jsonl", "samples.jsonl", "memory.txt", "value",
               "member_results.json")


def is_run_folder(path: str | Path) -> bool:
    """Whether `path` already holds an rlhfkit run (its config, metrics, checkpoints or model)."""
    path = Path(path)
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def has_saved_state(path: str | Path) -> bool:
    """Whether a run folder holds something worth keeping: a checkpoint or a final model."""
    path = Path(path)
    return (path / "final").exists() or any((path / "checkpoints").glob("step-*"))


def claim_run_folder(output_dir: str | Path, resume: bool, overwrite: bool) -> bool:
    """Check `output_dir` before a command-line run; returns whether it existed before.

    An existing run is refused unless `resume` (continue it) or `overwrite` (its run files are
    removed first), so metrics of several runs never end up mixed in one metrics.jsonl.
    """

    path = Path(output_dir)
    existed = path.exists()
    if is_run_folder(path) and not resume:
        if not overwrite:
            raise ConfigError(f"config field 'output_dir': {path} already holds a run; pass --resume true to "
                              f"continue it or --overwrite true to replace it")
        # everything a run writes, so nothing of the old run (its alarms, samples, final metrics) survives
        for name in RUN_MARKERS + RUN_OUTPUTS:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return existed


def discard_unfinished_run(output_dir: str | Path, existed_before: bool) -> bool:
    """Remove a run folder this run created when it stopped before saving anything; returns whether it did."""
    path = Path(output_dir)
    if existed_before or not path.is_dir() or has_saved_state(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


_FOLDER_OWNED = contextvars.ContextVar("rlhfkit_run_folder_owned", default=False)


@contextlib.contextmanager
def run_folder_owned():
    """Mark the run folders as already checked: runs started inside (a command that claimed its
    folder itself, or the stages of `loop` / `demo`) skip :func:`one_run_per_folder`."""
    token = _FOLDER_OWNED.set(True)
    try:
        yield
    finally:
        _FOLDER_OWNED.reset(token)


def one_run_per_folder(main: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Give a recipe's Python entry point the command line's run-folder rules.

    For a config with `output_dir` and `overwrite`: an existing run is refused unless `resume`
    or `overwrite` (:func:`claim_run_folder`), and a folder this run created is removed when
    the run fails or is interrupted before its first checkpoint (:func:`discard_unfinished_run`).
    Under `accelerate launch` only the main process (RANK 0) checks and removes anything.
    """

    @functools.wraps(main)
    def entry(cfg, *args, **kwargs):
        out = getattr(cfg, "output_dir", None)
        if _FOLDER_OWNED.get() or not out or not hasattr(cfg, "overwrite"):
            with run_folder_owned():
                return main(cfg, *args, **kwargs)
        if os.environ.get("RANK", "0") != "0":  # the main process checks and cleans the folder
            with run_folder_owned():
                return main(cfg, *args, **kwargs)
        existed = claim_run_folder(out, getattr(cfg, "resume", False), cfg.overwrite)
        try:
            with run_folder_owned():
                return main(cfg, *args, **kwargs)
        except BaseException:
            discard_unfinished_run(out, existed)
            raise

    return entry


# ---------------------------------------------------------------------------------------------
# metrics


def _jsonl_tracker_cls():
    class JSONLTracker(GeneralTracker):
        """accelerate tracker appending one JSON object per logged step to metrics.jsonl."""

        name = "jsonl"
        requires_logging_directory = True

        def __init__(self, run_name: str, logging_dir: str | Path):
            super().__init__()
            self.path = Path(logging_dir) / f"{run_name}.jsonl"
            self.file = None

        @property
        def tracker(self):
            return self.file

        def start(self) -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", buffering=1)

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            self.file.write(json.dumps({"step": step, **values}, default=_json_default) + "\n")

        def finish(self) -> None:
            if self.file is not None:
                self.file.close()
                self.file = None

    return JSONLTracker


def _csv_tracker_cls():


    class CSVTracker(GeneralTracker):
        """accelerate tracker writing metrics.csv in long form (step, name, value), so metrics that
        appear later in a run (evaluations) need no change of header."""

        name = "csv"
        requires_logging_directory = True

        def __init__(self, run_name: str, logging_dir: str | Path):
            super().__init__()
            self.path = Path(logging_dir) / f"{run_name}.csv"
            self.file = self.writer = None

        @property
        def tracker(self):
            return self.writer

        def start(self) -> None:
            new = not self.path.exists()
            self.file = open(self.path, "a", newline="", buffering=1)
            self.writer = csv.writer(self.file)
            if new:
                self.writer.writerow(["step", "name", "value"])

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            for k, v in values.items():
                self.writer.writerow([step, k, v])

        def finish(self) -> None:
            if self.file is not None:
                self.file.close()
                self.file = None

    return CSVTracker


SINKS = ("jsonl", "csv", "tensorboard", "wandb", "mlflow")


def make_trackers(output_dir: str | Path, report_to: str) -> list:
    """accelerate trackers for `report_to` (comma separated names, `all`, or `none`), not yet started."""

    names = [s.strip() for s in report_to.split(",") if s.strip() and s.strip() != "none"]
    if "all" in names:
        names = ["jsonl", "csv", "tensorboard"] + [n for n in ("wandb", "mlflow") if importlib.util.find_spec(n)]
    unknown = sorted(set(names) - set(SINKS))
    if unknown:
        raise ConfigError(f"config field 'report_to': unknown sink(s) {unknown}; use {', '.join(SINKS)}, all or none")
    out, trackers = Path(output_dir), []
    for name in dict.fromkeys(names):
        if name in ("wandb", "mlflow") and importlib.util.find_spec(name) is None:
            raise ConfigError(f"config field 'report_to': {name} is not installed (pip install 'rlhfkit[trackers]')")
        if name == "jsonl":
            trackers.append(_jsonl_tracker_cls()("metrics", out))
        elif name == "csv":
            trackers.append(_csv_tracker_cls()("metrics", out))
        elif name == "tensorboard":
            trackers.append(TensorBoardTracker("tb", out))
        elif name == "wandb":
            os.environ.setdefault("WANDB_MODE", "offline")  # no network unless the user asks for it
            trackers.append(WandBTracker(out.name, dir=str(out)))
        else:
            trackers.append(MLflowTracker(experiment_name="rlhfkit", logging_dir=str(out / "mlruns"), run_name=out.name))
    return trackers


class MetricsLogger:
    """Metrics through accelerate's trackers (`report_to`); a no-op on non-main processes.

    Non-finite numbers are kept in metrics.jsonl (as NaN) but not sent to TensorBoard, W&B or
    MLflow, which reject or mis-plot them.
    """

    def __init__(self, output_dir: str | Path, report_to: str = "jsonl,tensorboard", enabled: bool = True):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.trackers = make_trackers(output_dir, report_to)  # validates report_to on every process
        if not enabled:
            self.trackers = []
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for t in self.trackers:
            t.start()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        clean = {k: _scalar(v) for k, v in metrics.items()}
        finite = {k: v for k, v in clean.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        for t in self.trackers:
            t.log(clean if t.name in ("jsonl", "csv") else finite, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for t in self.trackers if self.enabled else []:
            if t.name in ("tensorboard", "wandb", "mlflow"):
                t.log({tag: text}, step=step)

    def close(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _scalar(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return v.item()
    return v


def read_metrics(path: str | Path) -> list[dict]:
    """Read a metrics.jsonl (a run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows
