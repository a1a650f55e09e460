"""A per-task uncertainty scorer for the running service.

For tasks with ``selection=uncertainty`` and no reward-model ensemble plugged in, the server
refits a `HashedEnsemble` on the task's own preference labels whenever they have grown by a
fifth since the last fit; until a task has `min_pairs` pairs it is served at random.
"""

from __future__ import annotations

import threading

from sqlalchemy import func, select

from rlhfkit.feedback import export as ex
from rlhfkit.feedback.active import HashedEnsemble
from rlhfkit.feedback.models import Label


class OnlineScorer:
    def __init__(self, min_pairs: int = 10, members: int = 5, growth: float = 1.2):
        self.min_pairs, self.members, self.growth = min_pairs, members, growth
        self._fits: dict[int, tuple[int, HashedEnsemble]] = {}
        self._lock = threading.Lock()

    def for_task(self, s, task) -> HashedEnsemble | None:
        """The ensemble for `task`, read through the caller's session `s` (no second connection,
        which SQLite's single writer would make wait on the caller)."""
        with self._lock:
            n = s.scalar(select(func.count()).select_from(Label).where(Label.task_id == task.id)) or 0
            seen, model = self._fits.get(task.id, (0, None))
            if model is not None and n < seen * self.growth:
                return model
            records, _ = ex.export_records(s, task, "preferences", "none", include_gold=True)
            if len(records) < self.min_pairs:
                return None
            model = HashedEnsemble(members=self.members).fit([r["chosen"] for r in records],
                                                             [r["rejected"] for r in records])
            self._fits[task.id] = (n, model)
            return model
