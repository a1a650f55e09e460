"""Lexicon AI labellers: sentiment word lists that are not the gold panel.

The gold panel of the bundled task is VADER's lexicon split into its ten human raters. An AI
labeller built from the same numbers would agree with it by construction; these use other
people's word lists, shipped inside their PyPI packages (no download at run time):

* ``afinn`` -- AFINN-165 (Nielsen 2011, "A new ANEW: evaluation of a word list for sentiment
  analysis in microblogs"): 3,382 words rated -5..+5 by one author; the score of a text is the
  sum of its words' valences (package ``afinn``).
* ``textblob`` -- TextBlob's PatternAnalyzer (the lexicon of De Smedt & Daelemans 2012,
  "Pattern for Python"): adjectives with a polarity in [-1, 1], intensifiers and negation; the
  score is the averaged polarity (package ``textblob``).

Both score the full continuation ``prompt + response`` like the panel, but neither penalises
repetition or empty output: a policy trained on their labels can be rewarded for degenerate
text the human panel dislikes. That gap is what `python -m benchmarks rlaif` measures.
Install them with ``pip install 'rlhfkit[judges]'``.
"""

from __future__ import annotations

from rlhfkit.errors import ConfigError
from rlhfkit.judges.judge import ScoreJudge
from rlhfkit.judges.panel import join_text


def _missing(package: str) -> ConfigError:
    return ConfigError(f"the {package!r} judge needs the {package} package: pip install 'rlhfkit[judges]'")


class AfinnJudge(ScoreJudge):
    """AFINN-165 valence sum of prompt + response (scale 2: one mild word is a confident verdict)."""

    name = "afinn"

    def __init__(self, tie_margin: float = 0.0, scale: float = 2.0):
        super().__init__()
        try:
            from afinn import Afinn
        except ImportError as e:
            raise _missing("afinn") from e
        self.afinn = Afinn(language="en")
        self.tie_margin, self.scale = float(tie_margin), float(scale)

    def _score(self, prompts, responses):
        return [float(self.afinn.score(join_text(p, r))) for p, r in zip(prompts, responses)]


class TextBlobJudge(ScoreJudge):
    """TextBlob (Pattern) polarity of prompt + response, in [-1, 1]."""

    name = "textblob"

    def __init__(self, tie_margin: float = 0.0, scale: float = 0.1):
        super().__init__()
        try:
            from textblob.en.sentiments import PatternAnalyzer
        except ImportError as e:
            raise _missing("textblob") from e
        self.analyzer = PatternAnalyzer()
        self.tie_margin, self.scale = float(tie_margin), float(scale)

    def _score(self, prompts, responses):
        return [float(self.analyzer.analyze(join_text(p, r)).polarity) for p, r in zip(prompts, responses)]
