"""The evaluation protocols: frozen-embedding ones (evaluate) and the label-efficiency study's."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Protocol:
    """A frozen-embedding evaluation. ``kind``: ``split`` fits on the manifest's splits and scores the score split;
    ``fewshot`` draws its own seeded, stratified split from the labelled rows; ``label_free`` reads no labels, so it
    runs once per method (never per taxonomic rank) and the report gives it its own table."""

    kind: str
    help: str


PROTOCOLS: dict[str, Protocol] = {
    "prototype": Protocol("split", "cosine to class means"),
    "knn": Protocol("split", "DINO's weighted k-NN"),
    "linear": Protocol("split", "logistic regression on standardised features"),
    "prototype_seed": Protocol("fewshot", "cosine to class means on a fixed seeded split (VLM4Bio's protocol)"),
    "simpleshot": Protocol("fewshot", "few-shot nearest centroid on centred, L2-normalised features"),
    "spectrum": Protocol("label_free", "effective rank and spectrum of the embeddings"),
}


def protocols_of(kind: str) -> tuple[str, ...]:
    return tuple(name for name, protocol in PROTOCOLS.items() if protocol.kind == kind)


LABEL_EFFICIENCY_PROTOCOLS: tuple[str, ...] = ("linear", "finetune", "regress")
"""How label efficiency uses the labels of each fraction: a linear probe on frozen embeddings, fine-tuning the
backbone, regression of ``finetune.regress_target``."""
