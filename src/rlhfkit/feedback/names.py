"""Look-alike user names: a key that is equal for names a reader cannot tell apart.

`username_key` (NFKC + case folding) already makes 'Admin' and full-width 'ａｄｍｉｎ' one
account, but not Cyrillic 'аdam' and Latin 'adam', Greek 'Αnn' and 'Ann', dotless 'adamı' and
'adami', or 'İann' and 'iann'. `lookalike_key` adds Unicode's confusable skeleton (UTS #39,
section 4: map each character to the prototype of its confusable class, e.g. Cyrillic 'а' to
'a', '1' and 'I' to 'l', 'm' to 'rn'), with the data of Unicode's confusables.txt as shipped by
the `confusable-homoglyphs` package, after case folding, and drops combining marks:

    key = skeleton(strip_marks(casefold(NFKC(name))))

Case folding comes first so that the key agrees with `username_key` ('Iann' and 'iann' are one
account there); the price is that a capital that only looks like another lower-case letter
('I' like 'l') is folded to its own letter first. Dropping combining marks makes 'İann' (whose
case folding is 'i' + a dot above) and 'José' match 'iann' and 'Jose'. The key is only
compared, never shown.
"""

from __future__ import annotations

import functools
import unicodedata

from confusable_homoglyphs.confusables import confusables_data

_DIRECTION_MARKS = str.maketrans("", "", "\u200e\u200f")


@functools.cache
def _prototypes() -> dict[str, str]:
    """character -> its prototype (one or more characters), for every confusable character.

    The package's table lists, for a prototype, the characters confusable with it, and for
    each such character its prototype alone; characters whose prototype is several characters
    ('m' -> 'rn') are listed under the prototype's first character. So: a single multi-character
    entry is a mapping; single characters that list each other form one class, represented by
    the member that lists the most (the prototype), ties broken by the smallest code point."""
    table = {k.translate(_DIRECTION_MARKS): [e["c"].translate(_DIRECTION_MARKS) for e in v]
             for k, v in confusables_data.items()}
    table = {k: v for k, v in table.items() if len(k) == 1}
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent.get(c, c) != c:
            parent[c] = parent.get(parent[c], parent[c])
            c = parent[c]
        return c

    out: dict[str, str] = {}
    for ch, entries in table.items():
        if len(entries) == 1 and len(entries[0]) > 1:
            out[ch] = entries[0]
            continue
        for other in entries:
            back = table.get(other, [])
            if len(other) == 1 and ch in back and not (len(back) == 1 and len(back[0]) > 1):
                a, b = find(ch), find(other)
                if a != b:
                    parent[a] = b
    classes: dict[str, list[str]] = {}
    for ch in set(parent) | set(parent.values()):
        classes.setdefault(find(ch), []).append(ch)
    for members in classes.values():
        rep = min(members, key=lambda c: (-len(table.get(c, [])), ord(c)))
        out.update({c: rep for c in members if c != rep})
    return out


def skeleton(text: str) -> str:
    """UTS #39's skeleton: NFD, each character replaced by its prototype, NFD again."""
    protos = _prototypes()
    return unicodedata.normalize("NFD", "".join(protos.get(ch, ch) for ch in unicodedata.normalize("NFD", text)))


def lookalike_key(name: str) -> str:
    """Equal for user names that look alike (see the module's docstring)."""
    folded = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", name).casefold())
    bare = "".join(ch for ch in folded if unicodedata.category(ch) != "Mn")
    return unicodedata.normalize("NFC", skeleton(bare))
