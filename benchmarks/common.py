"""Artifacts the quality benchmarks share, built once and cached under benchmarks/work/.

`sft_policy()` is policy_0 of the bundled task: the shipped base model after SFT with
configs/sft_kindly.yaml. Builders take a file lock, so benchmarks started side by side
build each artifact once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(__file__).resolve().parent / "work"
CONFIGS = ROOT / "configs"


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    WORK.mkdir(parents=True, exist_ok=True)
    with open(WORK / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def base_model() -> Path:
    from rlhfkit.tasks import kindly

    return Path(kindly.base_model_path())


def sft_policy() -> Path:
    """Path of the bundled task's SFT policy (trained on first use, about a few minutes)."""
    out = WORK / "sft"
    final = out / "final"
    with locked("sft"):
        if not (final / "model.safetensors").is_file():
            from rlhfkit.config import load_yaml_config
            from rlhfkit.recipes import sft

            cfg = load_yaml_config(sft.Config, CONFIGS / "sft_kindly.yaml")
            cfg.output_dir = str(out)
            cfg.progress = False
            sft.main(cfg)
    return final


def peer_available(name: str = "trl", attr: str | None = None) -> bool:
    """Whether the peer library (and, if given, one of its classes) can be imported here."""
    import importlib

    try:
        module = importlib.import_module(name)
    except ImportError:
        return False
    return attr is None or hasattr(module, attr)
