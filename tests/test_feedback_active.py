"""Active learning: disagreement scores by hand, uncertainty serving, the hashed ensemble."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlhfkit.feedback import active
from rlhfkit.feedback.db import Database, upgrade
from rlhfkit.feedback.security import use_test_hasher
from rlhfkit.feedback.service.accounts import create_user
from rlhfkit.feedback.service.assign import next_assignment
from rlhfkit.feedback.service.items import import_records
from rlhfkit.feedback.service.labels import submit_label
from rlhfkit.feedback.service.tasks import create_task

use_test_hasher()  # accounts are created per test; real Argon2 costs ~1 s each here


class Members:
    """Fake ensemble: fixed member rewards per response text."""

    def __init__(self, table):
        self.table = table

    def member_scores(self, prompts, responses):
        return np.array([self.table[r] for r in responses]).T

    def score_with_uncertainty(self, prompts, responses):
        s = self.member_scores(prompts, responses)
        return s.mean(0), s.std(0)


class MeanStd:
    def __init__(self, table):
        self.table = table

    def score_with_uncertainty(self, prompts, responses):
        return np.array([self.table[r][0] for r in responses]), np.array([self.table[r][1] for r in responses])


def test_pair_z_hand_worked():
    # members' rewards a = (1, 2, 3), b = (0, 0, 0): d = (1, 2, 3), mean 2, std sqrt(2/3)
    z = active.pair_z(Members({"a": [1, 2, 3], "b": [0, 0, 0]}), ["p"], ["a"], ["b"])
    assert z[0] == pytest.approx(2 / (math.sqrt(2 / 3) + active.EPS), rel=1e-12)
    # with means and stds only: |0.5 - 0.2| / sqrt(0.3^2 + 0.4^2) = 0.3 / 0.5
    z = active.pair_z(MeanStd({"a": (0.5, 0.3), "b": (0.2, 0.4)}), ["p"], ["a"], ["b"])
    assert z[0] == pytest.approx(0.3 / (0.5 + active.EPS), rel=1e-12)
    assert isinstance(MeanStd({}), active.Scorer)


def test_most_uncertain_and_ranking_items():
    s = Members({"x": [1, 1, 1], "y": [0, 0, 0], "u": [1, -1, 0], "v": [0, 0, 0], "w": [2, 2, 2]})
    items = [("p", ["x", "y"]), ("p", ["u", "v"]), ("p", ["x", "y", "w"])]
    z = active.item_uncertainty(s, items)
    assert z[1] == pytest.approx(0.0) and np.isfinite(z).all()
    assert active.most_uncertain(s, items) == 1


def test_uncertainty_selection_in_service(tmp_path):
    url = f"sqlite:///{tmp_path}/a.db"
    upgrade(url)
    db = Database(url)
    scorer = Members({"sure+": [3, 3.1, 2.9], "sure-": [-3, -3, -3], "hmm1": [1, -1, 0.5], "hmm2": [-1, 1, 0]})
    with db.session() as s:
        user = create_user(s, "ann", "correct horse battery")
        task = create_task(s, "al", "pairwise", selection="uncertainty", gold_rate=0.0)
        import_records(s, task, [{"prompt": "p", "responses": ["sure+", "sure-"]}] * 5 +
                       [{"prompt": "q", "responses": ["hmm1", "hmm2"]}] + [{"prompt": "p", "responses": ["sure+", "sure-"]}] * 5)
        item, _ = next_assignment(s, task, user, random.Random(0), scorer)
        assert item.prompt == "q"
    db.dispose()


def test_hashed_ensemble_learns_and_online_scorer(tmp_path):
    kind = ["thank you so much", "that is lovely", "what a kind friend", "great work, well done"]
    rude = ["go away", "that is awful", "you are a fool", "terrible work, badly done"]
    ens = active.HashedEnsemble(members=4, dim=1024, seed=0).fit(kind * 3, rude * 3)
    mean, std = ens.score_with_uncertainty(["p"] * 2, ["lovely work, thank you", "awful work, go away"])
    assert mean[0] > mean[1] and (std > 0).all()  # bootstrap members disagree somewhat
    x = active.hashed_features(["a b", ""], 64)
    assert x.shape == (2, 64) and x[1].nnz == 1  # an empty text still has its length bin

    from rlhfkit.feedback.online import OnlineScorer

    url = f"sqlite:///{tmp_path}/o.db"
    upgrade(url)
    db = Database(url)
    online = OnlineScorer(min_pairs=4, members=2)
    with db.session() as s:
        user = create_user(s, "ann", "correct horse battery")
        task = create_task(s, "al", "pairwise", selection="uncertainty", gold_rate=0.0)
        import_records(s, task, [{"prompt": "p", "responses": [k, r]} for k, r in zip(kind * 2, rude * 2)])
        assert online.for_task(s, task) is None  # too few labels yet: served at random
        for n in range(5):
            item, a = next_assignment(s, task, user, random.Random(n), online)
            submit_label(s, task, user, item.id, {"choice": "left" if a.display_order[0] == 0 else "right"},
                         f"key-{n}-xxxxx")
        model = online.for_task(s, task)
        assert model is not None and online.for_task(s, task) is model  # cached until labels grow
    db.dispose()
