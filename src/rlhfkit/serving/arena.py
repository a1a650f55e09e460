"""The arena: two arms of the experiment answer the same message side by side, blind, and the
user picks the better one (the Chatbot Arena protocol: Chiang et al. 2024, "Chatbot Arena: An
Open Platform for Evaluating LLMs by Human Preference").

A battle is one message. The page (``GET /arena``) draws a random battle id and sends the
message twice to ``/v1/chat/completions`` with the experiment's name as the model and the
headers ``X-Arena-Battle: <id>`` and ``X-Arena-Side: 0`` or ``1``. The server maps the battle
id to two different arms (a hash of the experiment's salt and the id: the same battle always
gets the same pair, and every pair of live arms is equally likely), side 0 to the first, and
serves and logs each request as usual, with the user's own key. Arms at weight 0 and paused
arms take no part.

The vote is ordinary pairwise feedback (``POST /v1/feedback``, kind ``pairwise``) linking the
two responses. So the A/B analysis counts it in each arm's pairwise win rate (Bradley-Terry for
more than two arms), and ``loop --source traffic:`` turns it into a preference pair. After the
vote, ``GET /v1/arena/reveal?a=ID&b=ID`` names the arms (only for two responses a vote links).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from rlhfkit.serving.experiments import Arm, Experiment
from rlhfkit.serving.tables import ServedResponse, UseFeedback

ARENA_PAGE = Path(__file__).resolve().parent / "static" / "arena.html"
BATTLE_HEADER, SIDE_HEADER = "x-arena-battle", "x-arena-side"


def contenders(exp: Experiment, paused: set[str] | tuple[str, ...] = ()) -> list[Arm]:
    """The arms that take part in battles: weight above 0 and not paused."""
    return [a for a in exp.arms if a.weight > 0 and a.name not in paused]


def battle_pair(exp: Experiment, battle: str, paused: set[str] | tuple[str, ...] = ()) -> tuple[Arm, Arm] | None:
    """The two arms of a battle (side 0, side 1), or None with fewer than two contenders."""
    arms = contenders(exp, paused)
    if len(arms) < 2:
        return None
    h = hashlib.sha256(f"{exp.salt}:arena:{battle}".encode()).digest()
    n = len(arms)
    first = int.from_bytes(h[:8], "big") % n
    second = (first + 1 + int.from_bytes(h[8:16], "big") % (n - 1)) % n
    return arms[first], arms[second]


def battle_arm(exp: Experiment, headers: dict, paused: set[str] | tuple[str, ...]) -> Arm | None:
    """The arm a request of a battle goes to (its headers), or None when it is not a battle."""
    battle, side = headers.get(BATTLE_HEADER), headers.get(SIDE_HEADER)
    if not battle or side not in ("0", "1") or len(battle) > 128:
        return None
    pair = battle_pair(exp, battle, paused)
    return pair[int(side)] if pair else None


def reveal(db: Any, a: str, b: str) -> dict | None:
    """The arms behind responses `a` and `b`, when a vote links them; else None."""
    linked = ((UseFeedback.response_id == a) & (UseFeedback.other_response_id == b)) | (
        (UseFeedback.response_id == b) & (UseFeedback.other_response_id == a))
    with db.read_session() as s:
        vote = s.scalars(select(UseFeedback).where(UseFeedback.kind == "pairwise", linked).limit(1)).first()
        if vote is None:
            return None
        rows = {r.response_id: r for r in s.scalars(select(ServedResponse).where(
            or_(ServedResponse.response_id == a, ServedResponse.response_id == b)))}
    return {side: {"arm": rows[rid].arm, "model_version": rows[rid].model_version}
            for side, rid in (("a", a), ("b", b)) if rid in rows}


def add_arena_page(app: Any, live: Any, page_headers: Any) -> None:
    """GET /arena, GET /v1/arena/config and GET /v1/arena/reveal (module docstring)."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse, JSONResponse

    page = ARENA_PAGE.read_text()
    headers = page_headers(page)

    @app.get("/arena", include_in_schema=False)
    async def arena_page():
        return HTMLResponse(page, headers=headers)

    @app.get("/v1/arena/config", include_in_schema=False)
    async def arena_config():
        exp = live.experiment
        if exp is None:
            return {"model": None, "available": False, "reason": "the server runs no experiment"}
        n = len(contenders(exp, live.paused))
        return {"model": exp.name, "available": n >= 2,
                "reason": None if n >= 2 else f"the experiment has {n} arm(s) with traffic; a battle needs two"}

    @app.get("/v1/arena/reveal", include_in_schema=False)
    async def arena_reveal(a: str = Query(max_length=64), b: str = Query(max_length=64)):
        found = reveal(live.log.db, a, b)
        if not found:
            return JSONResponse({"error": {"message": "no vote links these two responses", "type": "not_found_error",
                                           "param": None, "code": "not_found"}}, 404)
        return found
