"""`python -m benchmarks NAME [--quick]`: run one benchmark, print its JSON last, save it.

A benchmark is a module `benchmarks/NAME.py` with `run(quick: bool = False) -> dict`.
Speed benchmarks report `ours`, `peer` (None when the peer library is not installed) and
`ratio` (ours / peer, higher is better); quality benchmarks use the names their issue uses.
`python -m benchmarks readme` rewrites README.md's benchmark table from the results files.
Results go to benchmarks/results/NAME.json (written atomically). A benchmark that cannot run
here (the gpu_* ones without CUDA) prints one line saying why, returns None and writes nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path

from rlhfkit.train.runs import atomic_write_json, environment_info

RESULTS = Path(__file__).resolve().parent / "results"


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_") and m.name != "common")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="benchmark to run: " + ", ".join(available()) + "; or `readme` to regenerate README.md's table")
    parser.add_argument("--quick", action="store_true", help="a smaller workload to check the benchmark runs (results not saved)")
    parser.add_argument("--check", action="store_true", help="with `readme`: exit 1 when README.md's table differs from the results")
    args = parser.parse_args(argv)
    if args.name == "readme":  # not a benchmark: the README's table, regenerated from benchmarks/results
        from benchmarks import _readme

        return _readme.main(check=args.check)
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; choose from {', '.join(available())}")
    module = importlib.import_module(f"benchmarks.{args.name}")
    t0 = time.perf_counter()
    result = module.run(quick=args.quick)
    if result is None:  # nothing measured on this machine (a GPU benchmark without CUDA): no file, exit 0
        return 0
    result = {"benchmark": args.name, **result, "wall_seconds": round(time.perf_counter() - t0, 2),
              "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
              "env": environment_info(), "quick": args.quick}
    if not args.quick:
        atomic_write_json(RESULTS / f"{args.name}.json", result)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
