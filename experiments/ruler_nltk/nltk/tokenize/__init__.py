"""sent_tokenize: a rule-based English sentence splitter standing in for nltk's punkt.

A sentence ends at '.', '!' or '?' (plus any closing quotes or brackets) followed by whitespace
and then an upper-case letter, a digit, or an opening quote or bracket; not after a known
abbreviation ("Mr.", "e.g.") or a single-letter initial ("J. Smith"). RULER only uses the
sentences as the places a needle may be inserted, so the exact boundaries matter little; what
matters is that they are deterministic and never split inside a word or number.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e inc ltd co corp no fig al approx dept est "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k".split()
)
_END = re.compile(r"""[.!?]+["')\]]*(?=\s+["'(\[]?[A-Z0-9])""")


def sent_tokenize(text: str, language: str = "english") -> list[str]:
    del language
    sentences, start = [], 0
    for m in _END.finditer(text):
        if text[m.start()] == ".":
            word = text[: m.start()].rsplit(None, 1)[-1] if text[: m.start()].strip() else ""
            word = word.lstrip("\"'([").lower()
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        sentences.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]
