"""Class labels shared by every stage: the taxonomic ranks a label can be read at, and how a list of class names is
shown in a warning or an error."""
from __future__ import annotations

from typing import Sequence

RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
"""The taxonomic rank columns, coarse to fine; a photo source writes the ones it knows, evaluate can score each."""


def some_names(names: Sequence[str], most: int = 5) -> str:
    """``'a', 'b', 'c', ...``: the first ``most`` names quoted, and an ellipsis when there are more."""
    return ", ".join(repr(n) for n in names[:most]) + (", ..." if len(names) > most else "")
