"""Captions and seeds for composition: what the diffusion model is told, and the noise it starts from.

Both are pure functions of their inputs, the same on every machine: a frame's caption comes from its
transmitted labels (SLIM's ROI-focused caption), a stream's seed from a hash of its id.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["caption_for", "seed_for"]

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "persons", "mouse": "mice",
              "goose": "geese", "foot": "feet", "tooth": "teeth", "knife": "knives", "leaf": "leaves",
              "shelf": "shelves", "wife": "wives", "life": "lives", "wolf": "wolves", "sheep": "sheep",
              "deer": "deer", "fish": "fish", "aircraft": "aircraft", "people": "people", "glasses": "glasses",
              "scissors": "scissors", "skis": "skis"}


def _plural(noun: str) -> str:
    """Simple English plural of the last word of ``noun`` ("traffic light" -> "traffic lights")."""
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        p = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        p = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        p = last[:-1] + "ies"
    else:
        p = last + "s"
    return f"{head} {p}" if head else p


def _count_phrase(label: str, n: int) -> str:
    if n == 1:
        return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"
    count = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
    return f"{count} {_plural(label)}"


def caption_for(labels: Sequence[str], *, prefix: str = "a photo of", empty: str = "a photo") -> str:
    """The ROI-focused caption of a frame from its transmitted labels (one entry per ROI).

    Labels are normalised (lower case, ``_`` to space, blanks dropped), counted, and listed in
    alphabetical order, so the caption does not change when the ROI order does:
    ``["person", "car", "person"]`` -> ``"a photo of a car, two persons"``. No labels -> ``empty``.
    """
    norm = [re.sub(r"\s+", " ", str(x).replace("_", " ")).strip().lower() for x in labels]
    counts = Counter(x for x in norm if x)
    if not counts:
        return empty
    return f"{prefix} " + ", ".join(_count_phrase(lab, counts[lab]) for lab in sorted(counts))


def seed_for(stream_id: str, base: int = 0) -> int:
    """A stable 63-bit seed for a stream (SHA-256 of ``base`` and the id): the same on every machine
    and run, so every frame of a stream starts from the same noise."""
    digest = hashlib.sha256(f"latentcast-composer\0{int(base)}\0{stream_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
