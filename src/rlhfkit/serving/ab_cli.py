"""`rlhfkit ab`: read, act on and export an experiment on live traffic.

    rlhfkit ab report EXPERIMENT.yaml [--db URL] [--json] [--html OUT.html]
    rlhfkit ab promote EXPERIMENT.yaml [--db URL] [--arm ARM] [--force] [--reason TEXT]
    rlhfkit ab rollback EXPERIMENT.yaml [--db URL] [--reason TEXT]
    rlhfkit ab export EXPERIMENT.yaml --kind preferences|kto|sft|ratings|comments --output FILE.jsonl
    rlhfkit ab traffic EXPERIMENT.yaml --output FILE.jsonl       (the request log, redacted)
    rlhfkit ab flagged EXPERIMENT.yaml --output FILE.jsonl [--arm ARM]   (for review)
    rlhfkit ab purge --older_than_days N [--db URL]

`promote` moves the registry's promoted model (the experiment's `registry` folder) to the arm
the analysis promotes, and only then; `rollback` returns it to the model promoted before. Both
record an audit event (action ab_promote / ab_rollback) in the feedback database and the
registry's own history. Exports redact e-mail addresses and phone numbers unless --no_redact.
`flagged` writes the responses the safety monitor flagged as items for the feedback app
(``rlhfkit serve import --db URL --task safety-review --type thumbs FILE.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback.db import DEFAULT_URL, Database, upgrade
from rlhfkit.feedback.models import AuditEvent
from rlhfkit.models.registry import Registry, RegistryError
from rlhfkit.serving import ab, ab_report, monitor, traffic, use_feedback
from rlhfkit.serving.experiments import Experiment, load_experiment
from rlhfkit.train.runs import atomic_write_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)

    def add(name: str, help: str, experiment: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        if experiment:
            p.add_argument("experiment", help="the experiment file (YAML)")
        p.add_argument("--db", default=DEFAULT_URL, help=f"feedback database URL or SQLite path (default {DEFAULT_URL})")
        return p

    p = add("report", "per-arm metrics, the sequential test, guardrails and the decision")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--html", default=None, help="also write an HTML page with plots to this file")
    p = add("promote", "promote the winning arm's model in the registry (only when the analysis says so)")
    p.add_argument("--arm", default=None, help="the arm to promote (default: the one the analysis promotes)")
    p.add_argument("--force", action="store_true", help="promote although the analysis does not (recorded as forced)")
    p.add_argument("--reason", default="")
    p.add_argument("--registry", default=None, help="registry folder (default: the experiment's `registry`)")
    p = add("rollback", "return the registry to the model promoted before")
    p.add_argument("--reason", default="")
    p.add_argument("--registry", default=None, help="registry folder (default: the experiment's `registry`)")
    p = add("export", "feedback as training records (TRL columns, with arm and model version)")
    p.add_argument("--kind", choices=use_feedback.EXPORT_KINDS, default="preferences")
    p.add_argument("--output", required=True)
    p.add_argument("--no_redact", action="store_true", help="keep e-mail addresses and phone numbers")
    p.add_argument("--region", default="US", help="region for phone numbers written without a country code")
    p = add("traffic", "the experiment's request log as JSONL")
    p.add_argument("--output", required=True)
    p.add_argument("--no_redact", action="store_true", help="keep e-mail addresses and phone numbers")
    p.add_argument("--region", default="US", help="region for phone numbers written without a country code")
    p = add("flagged", "responses the safety monitor flagged, as feedback-app items for review")
    p.add_argument("--output", required=True)
    p.add_argument("--arm", default=None)
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--no_redact", action="store_true", help="keep e-mail addresses and phone numbers")
    p.add_argument("--region", default="US", help="region for phone numbers written without a country code")
    p = add("purge", "delete served traffic (and its feedback) older than a number of days", experiment=False)
    p.add_argument("--older_than_days", type=float, required=True)
    return parser


def cli(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        exp = load_experiment(args.experiment) if hasattr(args, "experiment") else None
        upgrade(args.db)
        db = Database(args.db, pool_size=2)
        try:
            return ACTIONS[args.action](exp, db, args)
        finally:
            db.dispose()
    except RlhfkitError as e:
        print(f"rlhfkit ab {args.action}: {e}", file=sys.stderr)
        return 2


def _report(exp: Experiment, db: Database, args) -> int:
    r = ab.analyse(exp, db)
    if args.html:
        atomic_write_text(args.html, ab_report.render_html(r))
    print(json.dumps(r, indent=2) if args.json else ab_report.render_text(r))
    if args.html and not args.json:
        print(f"\nwrote {args.html}")
    return 0


def _audit(db: Database, action: str, exp: Experiment, detail: dict) -> None:
    with db.session() as s:
        s.add(AuditEvent(action=action, target=exp.name[:128], detail=detail))


def _promote(exp: Experiment, db: Database, args) -> int:
    r = ab.analyse(exp, db)
    arm = args.arm or r["arm"]
    if arm is None or arm == exp.control:
        raise RegistryError(f"experiment {exp.name}: the analysis says '{r['decision']}', not promote "
                            f"({'; '.join(r['reasons'])}); name --arm and pass --force to promote anyway")
    exp.arm(arm)  # a clear error for an unknown --arm
    if not args.force and (r["decision"] != "promote" or r["arm"] != arm):
        raise RegistryError(f"experiment {exp.name}: the analysis says '{r['decision']}'"
                            f"{' ' + r['arm'] if r['arm'] else ''}, not promote {arm} "
                            f"({'; '.join(r['reasons'])}); pass --force to promote anyway")
    reg = Registry(args.registry or exp.registry)
    comp = r["comparisons"][arm]
    fmt = ab_report._fmt
    why = (f"ab {exp.name}: {r['metric']} {fmt(comp['estimate'])} [{fmt(comp['low'])}, {fmt(comp['high'])}] vs "
           f"{exp.control}, p={fmt(comp['p_value'])}, {r['users']} users" + (f"; {args.reason}" if args.reason else ""))
    previous = (reg.promoted() or {}).get("id")
    reg.promote(exp.arm(arm).model, force=args.force, reason=why)
    _audit(db, "ab_promote", exp, {"arm": arm, "model": exp.arm(arm).model, "previous": previous,
                                   "forced": bool(args.force), "decision": r["decision"], "reason": why})
    print(f"promoted {exp.arm(arm).model} (arm {arm}) in {reg.root}; was {previous or 'none'}")
    return 0


def _rollback(exp: Experiment, db: Database, args) -> int:
    reg = Registry(args.registry or exp.registry)
    left = (reg.promoted() or {}).get("id")
    entry = reg.rollback(reason=f"ab {exp.name}" + (f": {args.reason}" if args.reason else ""))
    _audit(db, "ab_rollback", exp, {"from": left, "to": entry["id"], "reason": args.reason})
    print(f"rolled back {left} -> {entry['id']} in {reg.root}")
    if entry["id"] != exp.arm(exp.control).model:
        print(f"note: the promoted model is now {entry['id']}, not the control arm's {exp.arm(exp.control).model}")
    return 0


def _write_jsonl(rows, output: str) -> int:
    n = 0
    lines = []
    for row in rows:
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    atomic_write_text(output, "".join(lines))
    return n


def _export(exp: Experiment, db: Database, args) -> int:
    rows = use_feedback.export_feedback(db, args.kind, exp.name, redacted=not args.no_redact, region=args.region)
    n = _write_jsonl(rows, args.output)
    print(f"wrote {n} {args.kind} records to {Path(args.output)}")
    return 0


def _traffic(exp: Experiment, db: Database, args) -> int:
    n = _write_jsonl(traffic.export_traffic(db, exp.name, redacted=not args.no_redact, region=args.region), args.output)
    print(f"wrote {n} served responses to {Path(args.output)}")
    return 0


def _flagged(exp: Experiment, db: Database, args) -> int:
    rows = monitor.flagged_responses(db, exp.name, args.arm, args.limit)
    clean = (lambda v: v) if args.no_redact else (lambda v: traffic.redact_value(v, args.region))  # noqa: E731
    items = [{"id": r["response_id"], "prompt": clean(_prompt_text(r["request"])), "responses": clean(r["response"]),
              "meta": {"arm": r["arm"], "model_version": r["model_version"], "safety_score": r["safety_score"],
                       "safety_judge": r["safety_judge"], "experiment": exp.name}} for r in rows if r["response"]]
    n = _write_jsonl(items, args.output)
    print(f"wrote {n} flagged responses to {Path(args.output)}")
    return 0


def _prompt_text(request) -> str:
    """A chat request's messages as text for a reviewer ('role: content' lines)."""
    if isinstance(request, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in request if isinstance(m, dict))
    return str(request)


def _purge(exp: Experiment | None, db: Database, args) -> int:
    n = traffic.purge(db, args.older_than_days)
    print(f"deleted {n} served responses older than {args.older_than_days} days")
    return 0


ACTIONS = {"report": _report, "promote": _promote, "rollback": _rollback, "export": _export, "traffic": _traffic,
           "flagged": _flagged, "purge": _purge}
