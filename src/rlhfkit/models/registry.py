"""The model registry: every trained model with its lineage, and which one is promoted.

`rlhfkit models list|show|promote|rollback|register` (`--registry DIR`, default runs/registry).

Layout (all JSON, each written atomically):

    registry/
      models/<id>.json   one entry per model: path, parent, round, resolved config, metrics,
                         data fingerprints (sha256), rlhfkit version, git commit, library
                         versions, seed, created time
      promoted.json      {"current": id | null, "stack": [ids promoted, oldest first],
                          "history": [{"action", "id", "time", "forced", "reason"}]}

Promotion is guarded: a model whose gold metric (``metrics[gold_key]``, a number or a
``{"mean": ...}`` interval) is worse than the current promoted model's is refused unless
forced. `rollback` pops the current model off the stack and promotes the one before it.
Entries point at model folders; the registry does not copy weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rlhfkit.errors import RlhfkitError
from rlhfkit.train.runs import atomic_write_json, environment_info

DEFAULT_ROOT = "runs/registry"


class RegistryError(RlhfkitError):
    """A registry operation cannot be done (unknown model, refused promotion, nothing to roll back)."""


# names of the promoted model; other aliases (candidate, staging, ...) are set with set_alias
PROMOTED_NAMES = ("production", "promoted", "current")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (relative path and bytes, in sorted order)."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        files = [(path.name, path)]
    elif path.is_dir():
        files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    else:
        raise RegistryError(f"cannot fingerprint {path}: no such file or folder")
    for rel, p in files:
        if path.is_dir():
            h.update(rel.encode() + b"\0")
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def metric_value(metrics: dict, key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, dict):
        v = v.get("mean")
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class Registry:
    """A folder of model entries plus the promoted pointer. See the module docstring."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, gold_key: str = "gold"):
        self.root = Path(root)
        self.gold_key = gold_key

    # -- storage ---------------------------------------------------------------------------

    def _entry_path(self, model_id: str) -> Path:
        return self.root / "models" / f"{model_id}.json"

    def _state(self) -> dict:
        p = self.root / "promoted.json"
        if not p.is_file():
            return {"current": None, "stack": [], "history": []}
        return json.loads(p.read_text())

    def _save_state(self, state: dict) -> None:
        atomic_write_json(self.root / "promoted.json", state)

    # -- queries ---------------------------------------------------------------------------

    def list(self) -> list[dict]:
        folder = self.root / "models"
        if not folder.is_dir():
            return []
        entries = [json.loads(p.read_text()) for p in folder.glob("*.json")]
        return sorted(entries, key=lambda e: (e.get("created", ""), e["id"]))

    def get(self, model_id: str) -> dict:
        p = self._entry_path(model_id)
        if not p.is_file():
            known = ", ".join(e["id"] for e in self.list()) or "none"
            raise RegistryError(f"no model {model_id!r} in registry {self.root} (known: {known})")
        return json.loads(p.read_text())

    def promoted(self) -> dict | None:
        current = self._state()["current"]
        return self.get(current) if current else None

    def history(self) -> list[dict]:
        return self._state()["history"]

    def aliases(self) -> dict[str, str]:
        """Named pointers besides the promoted model, e.g. {"candidate": "round-3"}."""
        return dict(self._state().get("aliases", {}))

    def resolve(self, name: str) -> dict:
        """The entry an alias points to (`production` and `promoted`: the promoted model), else the
        model with that id."""
        if name in PROMOTED_NAMES:
            entry = self.promoted()
            if entry is None:
                raise RegistryError(f"no model is promoted in registry {self.root}")
            return entry
        target = self.aliases().get(name)
        return self.get(target if target is not None else name)

    # -- changes ---------------------------------------------------------------------------

    def register(self, path: str | Path, model_id: str | None = None, parent: str | None = None,
                 round: int | None = None, config: dict | None = None, metrics: dict | None = None,
                 data_files: Iterable[str | Path] = (), seed: int | None = None, kind: str = "policy",
                 extra: dict | None = None) -> dict:
        """Add a model entry and return it. `model_id` defaults to a slug of the path."""
        if model_id is None:
            model_id = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(path).as_posix()).strip("-.") or "model"
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", model_id):
            raise RegistryError(f"model id {model_id!r}: use letters, digits, '_', '-', '.'")
        if self._entry_path(model_id).exists():
            raise RegistryError(f"model {model_id!r} is already registered in {self.root}")
        if parent is not None:
            self.get(parent)  # lineage must point at a known model
        env = environment_info()
        entry = {
            "id": model_id, "path": str(path), "kind": kind, "parent": parent, "round": round,
            "config": config or {}, "metrics": metrics or {},
            "data": {str(p): fingerprint(p) for p in data_files},
            "seed": seed, "rlhfkit": env["rlhfkit"], "git_commit": env["git_commit"],
            "libraries": env["libraries"], "python": env["python"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S") + f".{time.time_ns() % 10**9:09d}",
        }
        if extra:
            entry.update(extra)
        atomic_write_json(self._entry_path(model_id), entry)
        return entry

    def promote(self, model_id: str, force: bool = False, reason: str = "") -> dict:
        """Make `model_id` the promoted model; refuse a worse gold metric unless `force`."""
        entry = self.get(model_id)
        state = self._state()
        current = state["current"]
        if current == model_id:
            raise RegistryError(f"{model_id!r} is already the promoted model")
        if current and not force:
            new, old = metric_value(entry["metrics"], self.gold_key), metric_value(self.get(current)["metrics"], self.gold_key)
            if new is None:
                raise RegistryError(f"{model_id!r} has no '{self.gold_key}' metric to compare with {current!r}; "
                                    "evaluate it first or pass --force")
            if old is not None and new < old:
                raise RegistryError(f"refusing to promote {model_id!r}: {self.gold_key} {new:.4g} is worse than the "
                                    f"promoted {current!r} ({old:.4g}); pass --force to override")
        state["current"] = model_id
        state["stack"].append(model_id)
        state["history"].append({"action": "promote", "id": model_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "forced": bool(force), "reason": reason, "previous": current})
        self._save_state(state)
        return entry

    def record(self, action: str, model_id: str, reason: str = "", evidence: dict | None = None) -> None:
        """Add an event about `model_id` to the history without moving the promoted model (a canary
        that grew, was held or was rolled back before promotion), with the evidence behind it."""
        self.get(model_id)
        state = self._state()
        state["history"].append({"action": action, "id": model_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "forced": False, "reason": reason, "previous": state["current"],
                                 "evidence": evidence or {}})
        self._save_state(state)

    def set_alias(self, name: str, model_id: str | None, reason: str = "") -> None:
        """Point alias `name` at `model_id` (None removes it); written to the history. `production`
        is the promoted model and moves only by promote and rollback."""
        if name in PROMOTED_NAMES:
            raise RegistryError(f"alias {name!r} is the promoted model: use promote or rollback to move it")
        if not _ALIAS.fullmatch(name):
            raise RegistryError(f"alias {name!r}: use letters, digits, '.', '_' or '-', starting with a letter")
        if model_id is not None:
            self.get(model_id)
        state = self._state()
        aliases = state.setdefault("aliases", {})
        previous = aliases.pop(name, None)
        if model_id is not None:
            aliases[name] = model_id
        state["history"].append({"action": "alias" if model_id else "unalias", "alias": name, "id": model_id or previous,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "forced": False, "reason": reason,
                                 "previous": previous})
        self._save_state(state)

    def rollback(self, reason: str = "") -> dict | None:
        """Return to the previously promoted model; returns its entry (None if the stack empties)."""
        state = self._state()
        if not state["stack"]:
            raise RegistryError(f"nothing to roll back in {self.root}: no model has been promoted")
        if len(state["stack"]) < 2:
            raise RegistryError(f"cannot roll back {state['current']!r}: it is the first promoted model")
        left = state["stack"].pop()
        state["current"] = state["stack"][-1]
        state["history"].append({"action": "rollback", "id": state["current"], "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                 "forced": False, "reason": reason, "previous": left})
        self._save_state(state)
        return self.get(state["current"])


# ---------------------------------------------------------------------------------------------
# CLI


def _table(entries: list[dict], current: str | None, gold_key: str) -> str:
    rows = [("", "id", "round", "parent", gold_key, "win_rate", "kl", "path")]
    for e in entries:
        def f(k: str, m: dict = e.get("metrics", {})) -> str:
            v = metric_value(m, k)
            return f"{v:.4g}" if v is not None else "-"

        rows.append(("*" if e["id"] == current else "", e["id"], str(e.get("round") if e.get("round") is not None else "-"),
                     e.get("parent") or "-", f(gold_key), f("win_rate"), f("kl"), e["path"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def lineage_text(reg: Registry, model_id: str) -> str:
    """`model_id`, its parent, its parent's parent ...: each with its round, how it was trained, on
    what data (files and, for rounds from live traffic, the feedback counts), its gold metric, and
    the registry's history about it (promotions, canary steps and rollbacks with their reasons)."""
    lines, seen = [], set()
    history = reg.history()
    while model_id and model_id not in seen:
        seen.add(model_id)
        e = reg.get(model_id)
        gold = metric_value(e.get("metrics", {}), reg.gold_key)
        lines.append(f"{e['id']}  round {e.get('round', '-')}  parent {e.get('parent') or '-'}  "
                     f"algorithm {e.get('algorithm', '-')}  {reg.gold_key} {'-' if gold is None else f'{gold:.4g}'}")
        td = e.get("training_data")
        if td:
            lines.append("    data: " + ", ".join(f"{k} {v}" for k, v in td.items()))
        for path in e.get("data", {}):
            lines.append(f"    file: {path}")
        for h in history:
            if h["id"] == model_id or (h["action"] == "rollback" and h.get("previous") == model_id):
                lines.append(f"    {h['time']}  {h['action']}: {h.get('reason') or ''}".rstrip())
        model_id = e.get("parent")
    return "\n".join(lines)


def cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default=DEFAULT_ROOT, help="registry folder (default runs/registry)")
    parser.add_argument("--gold_key", default="gold", help="metric that guards promotion (higher is better)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="all models; * marks the promoted one")
    p = sub.add_parser("show", help="one model's full entry (JSON)")
    p.add_argument("id", nargs="?", help="model id (default: the promoted model)")
    p = sub.add_parser("lineage", help="a model and its ancestors: round, data, parent and every decision about each")
    p.add_argument("id", nargs="?", help="model id (default: the promoted model)")
    p = sub.add_parser("promote", help="make a model the promoted one")
    p.add_argument("id")
    p.add_argument("--force", action="store_true", help="promote even if its gold metric is worse")
    p.add_argument("--reason", default="")
    p = sub.add_parser("rollback", help="return to the previously promoted model")
    p.add_argument("--reason", default="")
    p = sub.add_parser("alias", help="point a name (e.g. candidate) at a model, or remove it with --remove")
    p.add_argument("name")
    p.add_argument("id", nargs="?", default=None)
    p.add_argument("--remove", action="store_true")
    p.add_argument("--reason", default="")
    p = sub.add_parser("register", help="add a model folder (metrics from rlhfkit eval's results.json)")
    p.add_argument("path")
    p.add_argument("--id", default=None)
    p.add_argument("--parent", default=None)
    p.add_argument("--round", type=int, default=None)
    p.add_argument("--eval_json", default=None, help="results.json of rlhfkit eval (or a former eval.json) whose metrics to record")
    p.add_argument("--data", nargs="*", default=[], help="data files to fingerprint")
    args = parser.parse_args(argv)
    reg = Registry(args.registry, args.gold_key)
    try:
        return _run(reg, args)
    except RlhfkitError as e:
        print(f"rlhfkit models: {e}", file=sys.stderr)
        return 2


def _run(reg: Registry, args: Any) -> int:
    if args.action == "list":
        state = reg._state()
        print(_table(reg.list(), state["current"], reg.gold_key))
    elif args.action == "show":
        entry = reg.get(args.id) if args.id else reg.promoted()
        if entry is None:
            raise RegistryError("no model is promoted; name one: rlhfkit models show ID")
        print(json.dumps(entry, indent=2, sort_keys=True))
    elif args.action == "lineage":
        entry = reg.get(args.id) if args.id else reg.promoted()
        if entry is None:
            raise RegistryError("no model is promoted; name one: rlhfkit models lineage ID")
        print(lineage_text(reg, entry["id"]))
    elif args.action == "promote":
        reg.promote(args.id, force=args.force, reason=args.reason)
        print(f"promoted {args.id}")
    elif args.action == "rollback":
        entry = reg.rollback(reason=args.reason)
        print(f"rolled back; promoted model is now {entry['id']}")
    elif args.action == "alias":
        if not args.remove and args.id is None:
            raise RegistryError("rlhfkit models alias NAME ID (or NAME --remove)")
        reg.set_alias(args.name, None if args.remove else args.id, reason=args.reason)
        print(f"{args.name} -> {'(removed)' if args.remove else args.id}")
    elif args.action == "register":
        metrics = json.loads(Path(args.eval_json).read_text()) if args.eval_json else {}
        entry = reg.register(args.path, args.id, args.parent, args.round, metrics=metrics, data_files=args.data)
        print(f"registered {entry['id']}")
    return 0
