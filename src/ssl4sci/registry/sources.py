"""Where raw images come from: every source, its domain and the resources of its fetch job."""
from __future__ import annotations

from dataclasses import dataclass

from ssl4sci.registry.domains import LENSING, PHOTO


@dataclass(frozen=True)
class Source:
    """Where raw images come from. ``fetch(cfg, out_dir)`` writes ``raw/``; the domain picks the prepare stage (arrays
    for lensing, image files for photos) and the default augmentation."""

    domain: str
    fetch: str
    help: str
    threads: int = 1  # >1: fetch takes ``threads=`` and its rule asks for that many CPUs (capped by slurm.max_threads)
    mem_mb: int = 4000
    runtime_min: int = 60
    extra_raw: tuple[str, ...] = ()  # raw/ files besides the domain's own (images.npy + truth.parquet, or metadata)


SOURCES: dict[str, Source] = {
    "simulate": Source(LENSING, "ssl4sci.sources.lensing_sim:simulate",
                       "simulate strong-lensing images (DeepLense Model I recipe)", threads=16, runtime_min=120,
                       extra_raw=("arc_masks.npy",)),
    "deeplense": Source(LENSING, "ssl4sci.sources.deeplense:read_folder",
                        "read a published DeepLense data set from a local folder", mem_mb=8000),
    "vlm4bio": Source(PHOTO, "ssl4sci.sources.hub:fetch_vlm4bio", "VLM4Bio species photos from the Hugging Face Hub",
                      runtime_min=1440),
    "treeoflife": Source(PHOTO, "ssl4sci.sources.hub:fetch_treeoflife",
                         "TreeOfLife-10M species photos from the Hugging Face Hub", runtime_min=1440),
    "rare_species": Source(PHOTO, "ssl4sci.sources.hub:fetch_rare_species",
                           "Rare Species photos from the Hugging Face Hub", runtime_min=1440),
    "image_folder": Source(PHOTO, "ssl4sci.sources.image_folder:read_image_folder",
                           "a local folder of photos (one sub-folder per class) or a CSV", runtime_min=1440),
}
