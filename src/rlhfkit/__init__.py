"""rlhfkit: the whole RLHF loop, from human feedback to an honestly evaluated policy."""

__version__ = "0.1.0"
