"""Rejected images: one table of the fetch's and the prepare stage's rejects, and the limit on their share.

A few bad files are recorded and skipped; more than ``prepare.max_reject_fraction`` of the images means the data or
the settings are wrong, so the stage stops in one line (the limit's value is validated by the config schema).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ssl4sci.io import write_parquet

REJECT_COLUMNS: tuple[str, ...] = ("id", "path", "reason", "stage")


def merge_rejects(fetch_rejects: pd.DataFrame, rejects: list[dict[str, str]]) -> pd.DataFrame:
    """The source's rejects (stage ``fetch`` unless they say) then this stage's, as id, path, reason, stage strings."""
    fetch_rejects = fetch_rejects.copy()
    if len(fetch_rejects):
        stage = (fetch_rejects["stage"] if "stage" in fetch_rejects.columns
                 else pd.Series("fetch", index=fetch_rejects.index))
        fetch_rejects["stage"] = stage.fillna("fetch")
    merged = pd.concat([fetch_rejects, pd.DataFrame(rejects, columns=list(REJECT_COLUMNS))], ignore_index=True)
    for col in REJECT_COLUMNS:
        if col not in merged.columns:
            merged[col] = pd.Series(dtype=str)
    return merged[list(REJECT_COLUMNS)].fillna("").astype(str)


def check_reject_fraction(rejects: pd.DataFrame, n_kept: int, limit: float, rejects_path: Path) -> None:
    """Stop the stage in one line when more than ``limit`` of the images were rejected (fetch and prepare): then the
    data or the settings are wrong, not a few files.

    The list goes to ``rejects.over_limit.parquet`` beside ``rejects_path``: not an output of the stage, so it
    survives Snakemake removing the failed job's outputs; a later run within the limit removes it."""
    listed = rejects_path.with_name("rejects.over_limit.parquet")
    total = len(rejects) + n_kept
    fraction = len(rejects) / total if total else 0.0
    if fraction <= limit:
        listed.unlink(missing_ok=True)
        return
    write_parquet(listed, rejects)
    # Decoders quote the file's name in their message: count "cannot identify image file '<file>'" as one reason.
    names = [Path(p).name for p in rejects["path"]]
    reasons = pd.Series([r.replace(f"'{n}'", "'<file>'") if n else r
                         for r, n in zip(rejects["reason"], names)]).value_counts()
    raise ValueError(f"prepare.max_reject_fraction: {fraction:.3g} of the images were rejected ({len(rejects)} of "
                     f"{total}), more than the allowed {limit:g}; most common reason ({reasons.iloc[0]} images): "
                     f"{reasons.index[0]}; every reject is listed in {listed}")
