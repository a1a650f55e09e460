"""Rebuild the "say it kindly" corpus from the Debian packages wordnet-base and fortunes.

    python scripts/build_corpus.py            # writes src/rlhfkit/tasks/kindly/{train,eval}.txt.xz + LICENSES

Sources (both must be installed: `apt-get install wordnet-base fortunes fortunes-min`):

* WordNet 3.0 example sentences: the double-quoted examples in the glosses of
  /usr/share/wordnet/data.{noun,verb,adj,adv} (Princeton WordNet licence).
* Short fortunes from /usr/share/games/fortunes, the non-offensive set only: the `off/`
  folder (Debian's offensive fortunes) is never read, and a few more files whose content is
  mostly not plain prose (ASCII art, IRC logs, non-English, code) are skipped (SKIP_FORTUNES).

Filters: one paragraph, at most MAX_CHARS characters, at least MIN_WORDS words, mostly letters
(ALPHA_SHARE), ASCII only, no attribution lines ("-- Author"), no layout (runs of spaces).
Lines are deduplicated case-insensitively, shuffled with a fixed seed and split into train and
eval (EVAL_SHARE held out). The output is byte-for-byte reproducible from the same inputs.
"""

from __future__ import annotations

import argparse
import lzma
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "src" / "rlhfkit" / "tasks" / "kindly"
WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
WORDNET_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
FORTUNE_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")

SEED = 1234
EVAL_SHARE = 0.10
MAX_CHARS = 200
MIN_WORDS = 3
ALPHA_SHARE = 0.75
# Not prose (art, chat logs, code, other languages) or borderline for a "kindly" task.
SKIP_FORTUNES = {"ascii-art", "debian", "linux", "linuxcookie", "perl", "translate-me",
                 "ethnic", "men-women", "knghtbrd", "zippy"}

_QUOTED = re.compile(r'"([^"]+)"')
_ATTRIBUTION = re.compile(r"^\s*(--|―|—|~~)\s*\S")
_LAYOUT = re.compile(r"\S {3,}\S|\t")
_ALLOWED = re.compile(r"^[A-Za-z0-9 .,;:!?'\"()\-&$%/]+$")


def clean(text: str) -> str | None:
    """Normalise whitespace and return the sentence if it passes every filter, else None."""
    text = " ".join(text.split())
    text = text.replace("``", '"').replace("''", '"')
    if not text or len(text) > MAX_CHARS or len(text.split()) < MIN_WORDS:
        return None
    if not _ALLOWED.match(text):  # ASCII prose only: no markup, no art, no foreign scripts
        return None
    letters = sum(c.isalpha() for c in text)
    if letters / len(text) < ALPHA_SHARE:
        return None
    if not text[0].isalpha() and text[0] not in "\"'(":
        return None
    return text


def wordnet_examples(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """Quoted example sentences from the gloss field (after ' | ') of each synset line."""
    out: list[str] = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{pos}"
        with path.open(encoding="latin-1") as f:
            for line in f:
                if line.startswith("  "):  # licence header lines
                    continue
                _, sep, gloss = line.partition(" | ")
                if not sep:
                    continue
                for ex in _QUOTED.findall(gloss):
                    # attributed quotations: '"..." - Shakespeare' leave the author after the quote
                    s = clean(ex)
                    if s:
                        out.append(s)
    return out


def _fortune_entries(path: Path) -> list[list[str]]:
    entries, cur = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() == "%":
            entries.append(cur)
            cur = []
        else:
            cur.append(line)
    if cur:
        entries.append(cur)
    return entries


def fortune_lines(fortune_dir: Path = FORTUNE_DIR) -> list[str]:
    """Short single-paragraph fortunes, attribution lines removed, from the non-offensive set."""
    out: list[str] = []
    files = sorted(p for p in fortune_dir.iterdir()
                   if p.is_file() and not p.suffix and p.name not in SKIP_FORTUNES)
    for path in files:
        for entry in _fortune_entries(path):
            body = [ln for ln in entry if not _ATTRIBUTION.match(ln)]
            while body and not body[-1].strip():
                body.pop()
            while body and not body[0].strip():
                body.pop(0)
            if not body or any(not ln.strip() for ln in body):  # more than one paragraph
                continue
            if any(_LAYOUT.search(ln.strip()) for ln in body):  # tables, verse layout, art
                continue
            if any(re.match(r"^\s*[A-Za-z][\w .]{0,20}:\s", ln) for ln in body):  # dialogues
                continue
            s = clean(" ".join(body))
            if s:
                out.append(s)
    return out


def build(seed: int = SEED, eval_share: float = EVAL_SHARE) -> tuple[list[str], list[str], dict]:
    wn = wordnet_examples()
    fo = fortune_lines()
    seen: set[str] = set()
    lines: list[str] = []
    for s in wn + fo:
        key = re.sub(r"[^a-z0-9 ]", "", s.lower())
        if key not in seen:
            seen.add(key)
            lines.append(s)
    lines.sort()  # input order must not matter, only the seed
    random.Random(seed).shuffle(lines)
    n_eval = max(1, round(len(lines) * eval_share))
    stats = {"wordnet": len(wn), "fortunes": len(fo), "unique": len(lines)}
    return lines[n_eval:], lines[:n_eval], stats


def licence_text() -> str:
    parts = [
        "The 'say it kindly' corpus bundled with rlhfkit (train.txt.xz, eval.txt.xz) is extracted\n"
        "from two Debian packages by scripts/build_corpus.py. Their notices follow.\n",
        "=" * 78 + "\nWordNet 3.0 example sentences (Debian package wordnet-base)\n" + "=" * 78 + "\n",
        WORDNET_COPYRIGHT.read_text(),
        "\n" + "=" * 78 + "\nFortunes (Debian package fortunes / fortunes-min, non-offensive set)\n" + "=" * 78 + "\n",
        FORTUNE_COPYRIGHT.read_text(),
    ]
    return "\n".join(parts)


def write_xz(path: Path, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="output folder")
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)
    for p in (WORDNET_DIR / "data.noun", FORTUNE_DIR, WORDNET_COPYRIGHT, FORTUNE_COPYRIGHT):
        if not p.exists():
            print(f"missing {p}: install the Debian packages wordnet-base, fortunes, fortunes-min",
                  file=sys.stderr)
            return 2
    train, eval_, stats = build(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_xz(args.out / "train.txt.xz", train)
    write_xz(args.out / "eval.txt.xz", eval_)
    (args.out / "LICENSES").write_text(licence_text())
    chars = sum(len(s) for s in train + eval_)
    print(f"wordnet examples {stats['wordnet']}, fortunes {stats['fortunes']}, unique {stats['unique']}")
    print(f"train {len(train)} lines, eval {len(eval_)} lines, {chars} characters -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
