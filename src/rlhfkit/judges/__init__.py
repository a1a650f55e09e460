"""Judges: the Judge protocol, the gold human panel and simulated annotators."""

from rlhfkit.judges.annotators import SimulatedAnnotators
from rlhfkit.judges.base import Judge, RaterPanel
from rlhfkit.judges.judge import AIJudge, Preference
from rlhfkit.judges.load import JUDGE_KINDS, load_judge
from rlhfkit.judges.panel import GoldPanel

__all__ = ["Judge", "RaterPanel", "GoldPanel", "SimulatedAnnotators", "AIJudge", "Preference", "load_judge",
           "JUDGE_KINDS"]
