"""Python objects named in specs: ``py:module:name`` or ``py:path/to/file.py:name`` (reward
functions, tools, environment factories). One loader, so every spec reads and fails alike."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from rlhfkit.errors import ConfigError


def load_object(target: str, where: str, kind: str = "object", callable_only: bool = False) -> Any:
    """The object `target` ("module:name" or "path/file.py:name", a leading "py:" allowed) names.
    Errors are one line starting with `where` (what the user wrote it in); a module given by name
    is looked up with the current folder on the path, as `python -m` would."""
    target = target[3:] if target.startswith("py:") else target
    module_part, _, name = target.rpartition(":")
    if not module_part or not name:
        raise ConfigError(f"{where}: write py:module:{kind} or py:path/to/file.py:{kind}")
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"{where}: file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"rlhfkit_user_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:  # `rlhfkit` as a console script does not put the cwd on the path
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ConfigError(f"{where}: cannot import module {module_part!r} ({e})") from e
    found = getattr(module, name, None)
    if found is None or (callable_only and not callable(found)):
        raise ConfigError(f"{where}: {module_part} has no {kind} {name!r}")
    return found
