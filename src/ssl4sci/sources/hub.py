"""Biology photo data sets from the Hugging Face Hub (Imageomics): VLM4Bio, TreeOfLife-10M, Rare Species.

Each ``fetch_<name>(cfg, out_dir, downloader=None)`` writes the raw photo layout described in
:mod:`ssl4sci.sources.raw_layout` (``metadata.parquet``, ``rejects.parquet``, ``provenance.json``)
into ``out_dir`` and returns the provenance dict. Downloads land under ``out_dir/hub/``.

Downloaders are injectable and follow the huggingface_hub contracts exactly:

* VLM4Bio and Rare Species call ``downloader(repo_id, repo_type="dataset", revision=...,
  allow_patterns=[...], local_dir=..., token=None)`` like :func:`huggingface_hub.snapshot_download`;
* TreeOfLife-10M calls ``downloader(repo_id, filename, repo_type="dataset", revision=...,
  local_dir=..., token=None)`` like :func:`huggingface_hub.hf_hub_download`;

both return the local path. ``token=None`` lets huggingface_hub read ``HF_TOKEN`` itself.

With ``local_path`` set, a copy already downloaded in the Hub repository's own layout is read in
place (never copied, never modified) and no network call is made at all.

Hub layouts (see the dataset cards):

* ``imageomics/VLM4Bio``: ``datasets/<Group>/metadata/metadata_10k.csv`` (Bird also spelled
  ``bird_metadata_10k.csv``; columns ``fileNameAsDelivered``, ``scientificName``); Fish and
  Butterfly images in ``datasets/<Group>/chunk_*/`` folders (the repository's
  ``process_fish_butterfly_images.sh`` moves them to ``datasets/<Group>/images/``; chunk folders
  under ``images/`` are accepted too). Downloaded copies are flattened the same way. Bird images
  are not on the Hub: they come from the CUB-200-2011 archive (``cub_url``), as the repository's
  ``download_bird_images.sh`` does.
* ``imageomics/TreeOfLife-10M``: ``metadata/catalog.csv`` (``split, treeoflife_id,
  eol_content_id, eol_page_id, ..., kingdom..species, common``; ``species`` is the epithet) and
  ``dataset/EOL/image_set_NN.tar.gz`` (NN = 01..63) holding ``<treeoflife_id>.jpg`` members. Only
  EOL images are in those archives (iNat21 and BIOSCAN-1M rows of the catalog have no images in
  the repository), hence ``eol_only``.
* ``imageomics/rare-species``: ``metadata.csv`` at the root (``rarespecies_id, eol_content_id,
  eol_page_id, kingdom..species, sciName, common, file_name``) with images at
  ``dataset/<kingdom-...-species>/<eol_content_id>_<eol_page_id>_eol_full-size-copy.jpg``
  (``file_name`` is that path). Revisions that store the images in ``data/*.parquet`` shards
  (a struct column with ``bytes`` and ``path``) are handled by writing the images out.

Unlabelled pools. Each source takes ``n_unlabelled``: up to that many images the source
does *not* select for evaluation become the unlabelled pool (``unlabelled`` true in the metadata),
a seeded choice among them (:func:`_choose_pool`). The pool rows carry provenance only (id, path, ids
of the source), never a label, rank or common name. What "not selected" means per source:

* VLM4Bio: image files of a group that its ``metadata_10k.csv`` does not list (the 10k evaluation
  subset; e.g. the CUB-200-2011 images outside it);
* TreeOfLife-10M: catalog rows that pass ``split`` / ``eol_only`` / ``taxa`` and have a species but
  were not drawn by ``max_per_species``; like the selected ones they are extracted from the archives
  read, and those not found there are only counted (``selection.unlabelled_not_found``);
* Rare Species: image files under ``dataset/`` that ``metadata.csv`` does not list (the listed images
  are the whole evaluation set, so this pool is usually empty).
"""
from __future__ import annotations

import datetime as _dt
import filecmp
import json
import os
import re
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from ssl4sci.io import DISK_FULL_ERRNOS, atomic_path, write_json
from ssl4sci.labels import RANKS
from ssl4sci.sources.archive import SourceError, download_file, extract_flat
from ssl4sci.sources.raw_layout import IMAGE_EXTENSIONS, UNLABELLED, check_image_file, clean, reject, write_raw

__all__ = ["SourceError", "fetch_rare_species", "fetch_treeoflife", "fetch_vlm4bio"]

# Ranks that hold for a whole VLM4Bio group (the metadata only has scientificName).
_GROUP_RANKS: dict[str, dict[str, str]] = {
    "Fish": {"kingdom": "Animalia", "phylum": "Chordata"},
    "Butterfly": {"kingdom": "Animalia", "phylum": "Arthropoda", "class": "Insecta", "order": "Lepidoptera"},
    "Bird": {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves"},
}

_TOL_ARCHIVE = "dataset/EOL/image_set_{:02d}.tar.gz"
_TOL_CATALOG = "metadata/catalog.csv"
_TOL_MAX_SETS = 63
_MARKER_DIR = ".ssl4sci"


# --------------------------------------------------------------------------- settings

def _settings(section: str, cfg: dict) -> dict:
    """A copy of the validated config ``section`` with ``local_path`` made absolute. The schema checks every key
    (``repo_id`` shape, non-blank revision, non-empty paths); config.validate_config that local_path exists."""
    out = dict(cfg)
    if out["local_path"] is not None:
        out["local_path"] = str(Path(out["local_path"]).expanduser().absolute())
    return out


# --------------------------------------------------------------------------- Hub calls and errors

def _hub_errors() -> Any:
    try:
        from huggingface_hub import errors
    except ImportError:  # huggingface_hub < 0.23 kept them in utils
        from huggingface_hub import utils as errors
    return errors


def _is_network_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(exc).__mro__}
    mods = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return (bool(names & {"TransportError", "NetworkError", "ConnectError", "TimeoutException", "ConnectionError",
                          "ConnectTimeout", "ReadTimeout", "ProxyError"})
            and bool(mods & {"httpx", "httpx2", "requests", "urllib3", "httpcore"}))


def _hub_message(section: str, repo: str, revision: str, filename: str | None, exc: BaseException) -> str | None:
    E = _hub_errors()

    def cls(name: str) -> type:
        return getattr(E, name, type(f"_Missing{name}", (Exception,), {}))

    offline = (f"{repo}: cannot reach the Hugging Face Hub and no local copy: set {section}.local_path to a "
               f"downloaded copy, or go online")
    if isinstance(exc, cls("GatedRepoError")):
        return (f"{repo} is gated: accept its terms at https://huggingface.co/datasets/{repo} and set HF_TOKEN")
    status = _hub_status(exc)
    if isinstance(exc, (cls("LocalEntryNotFoundError"), cls("OfflineModeIsEnabled"))):
        # huggingface_hub wraps a refused request (401, 403, 429, 5xx) in "not found locally": the Hub did answer.
        return _hub_refusal(section, repo, status) or offline
    if isinstance(exc, cls("RevisionNotFoundError")):
        return (f"{repo}: revision {revision!r} not found on the Hugging Face Hub: set {section}.revision to an "
                f"existing commit, branch or tag")
    if isinstance(exc, cls("EntryNotFoundError")):
        what = f"file {filename!r}" if filename else "a requested file"
        return (f"{repo}@{revision}: {what} not found on the Hugging Face Hub: check {section}.revision "
                f"(the file may not exist at that revision)")
    if isinstance(exc, cls("DisabledRepoError")):
        return f"{repo}: the repository has been disabled by its author; use {section}.local_path with a copy"
    if isinstance(exc, cls("RepositoryNotFoundError")):
        return (f"{repo}: dataset repository not found on the Hugging Face Hub: check {section}.repo_id "
                f"(for a private repository, set HF_TOKEN)")
    if _is_network_error(exc):
        return offline
    if isinstance(exc, cls("HfHubHTTPError")):
        refusal = _hub_refusal(section, repo, status)
        if refusal:
            return refusal
        first = " ".join(str(exc).split())[:300]
        return f"{repo}@{revision}: request to the Hugging Face Hub failed ({first})"
    return None


def _hub_status(exc: BaseException | None) -> int | None:
    """The HTTP status of the Hub's answer behind ``exc`` (or an error it wraps); None when nothing answered."""
    for _ in range(8):  # a short cause chain; never loop on a cycle
        if exc is None:
            return None
        code = getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(code, int):
            return code
        exc = exc.__cause__ or exc.__context__
    return None


def _hub_refusal(section: str, repo: str, status: int | None) -> str | None:
    """One line for a Hub answer that is neither a missing repository/revision/file nor a gate."""
    local = f"or set {section}.local_path to a downloaded copy"
    if status == 401:
        return (f"{repo}: the Hugging Face Hub rejected the token in HF_TOKEN (HTTP 401): set HF_TOKEN to a valid "
                f"token from https://huggingface.co/settings/tokens, or unset it for public data")
    if status == 403:
        return (f"{repo}: the Hugging Face Hub denied access (HTTP 403): give the token in HF_TOKEN read access to "
                f"{repo} (a fine-grained token needs 'public gated repositories'), {local}")
    if status == 429:
        return (f"{repo}: the Hugging Face Hub is rate-limiting this machine (HTTP 429): wait a few minutes and run "
                f"again (HF_TOKEN raises the limit), {local}")
    if status is not None and status >= 500:
        return f"{repo}: the Hugging Face Hub failed (HTTP {status}): run again later, {local}"
    return None


def _hub_call(section: str, repo: str, revision: str, filename: str | None, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - mapped to one-line messages below, else re-raised
        message = _hub_message(section, repo, revision, filename, exc)
        if message is None:
            raise
        raise SourceError(message) from exc


def _entry_not_found(exc: BaseException) -> bool:
    E = _hub_errors()
    local = getattr(E, "LocalEntryNotFoundError", ())
    remote = getattr(E, "EntryNotFoundError", ())
    return isinstance(exc, remote) and not isinstance(exc, local)


def _resolved_commit(hub_dir: Path, rel: str) -> str | None:
    """The commit huggingface_hub recorded for a file it downloaded into ``hub_dir`` (best effort)."""
    meta = hub_dir / ".cache" / "huggingface" / "download" / f"{rel}.metadata"
    try:
        first = meta.read_text().splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return first if re.fullmatch(r"[0-9a-f]{40}", first) else None


def _snapshot(section: str, s: dict, hub_dir: Path, patterns: list[str], downloader: Callable | None) -> Path:
    if downloader is None:
        from huggingface_hub import snapshot_download as downloader
    repo, rev = s["repo_id"], s["revision"]
    hub_dir.mkdir(parents=True, exist_ok=True)
    path = _hub_call(section, repo, rev, None, lambda: downloader(
        repo, repo_type="dataset", revision=rev, allow_patterns=list(patterns), local_dir=str(hub_dir), token=None))
    return Path(path)


def _file(section: str, s: dict, hub_dir: Path, filename: str, downloader: Callable | None) -> Path:
    if downloader is None:
        from huggingface_hub import hf_hub_download as downloader
    repo, rev = s["repo_id"], s["revision"]
    hub_dir.mkdir(parents=True, exist_ok=True)
    path = _hub_call(section, repo, rev, filename, lambda: downloader(
        repo, filename, repo_type="dataset", revision=rev, local_dir=str(hub_dir), token=None))
    return Path(path)


def _base_provenance(source: str, s: dict, t0: float) -> dict:
    try:
        from importlib.metadata import version
        hub_version = version("huggingface_hub")
    except Exception:  # noqa: BLE001 - informational only
        hub_version = None
    return {
        "source": source,
        "repo_id": s["repo_id"],
        "revision": s["revision"],
        "mode": "local_path" if s["local_path"] else "hub",
        "local_path": s["local_path"],
        "config": s,
        "huggingface_hub": hub_version,
        "started_at": _dt.datetime.fromtimestamp(t0, _dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _binomial(genus: str | None, species: str | None) -> str | None:
    """Species label: the binomial; ``species`` may already be one or be just the epithet."""
    if species is None:
        return None
    if " " in species or genus is None:
        return species
    return f"{genus} {species}"


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _choose_pool(candidates: list[dict], n: int, section: str, seed: int = 0) -> list[dict]:
    """The unlabelled pool: all ``candidates`` when there are at most ``n``, else a seeded choice of ``n``;
    in id order. Depends only on (seed, section, the candidates' ids)."""
    import numpy as np

    candidates = sorted(candidates, key=lambda r: r["id"])
    if len(candidates) <= n:
        return candidates
    rng = np.random.default_rng([seed, zlib.crc32(f"unlabelled/{section}".encode())])
    return [candidates[i] for i in np.sort(rng.choice(len(candidates), size=n, replace=False))]


def _add_pool(rows: list[dict], rejects: list[dict], pool: list[dict]) -> None:
    """Append the chosen pool rows whose image file is usable; reject the others."""
    for row in pool:
        reason = check_image_file(Path(row["path"]))
        if reason:
            reject(rejects, row["id"], row["path"], reason)
        else:
            rows.append(row)


# --------------------------------------------------------------------------- VLM4Bio

def _check_vlm4bio(cfg: dict) -> dict:
    s = _settings("vlm4bio", cfg)
    if "Bird" in s["groups"] and not s["local_path"] and s["cub_url"] is None:
        raise SourceError("vlm4bio.cub_url: Bird images are not on the Hub; set cub_url to the CUB-200-2011 "
                          "archive, or drop Bird from vlm4bio.groups")
    return s


def _vlm4bio_patterns(group: str) -> list[str]:
    base = f"datasets/{group}"
    if group == "Bird":  # images come from CUB-200-2011
        return [f"{base}/metadata/*metadata_10k.csv"]
    return [f"{base}/metadata/*metadata_10k.csv", f"{base}/images/*", f"{base}/chunk_*/*"]


def _metadata_csv(group_dir: Path, repo: str, group: str) -> Path:
    folder = group_dir / "metadata"
    found = sorted(folder.glob("*metadata_10k.csv")) if folder.is_dir() else []
    if not found:
        raise SourceError(f"{repo}: no metadata_10k.csv in {folder} (expected datasets/{group}/metadata/"
                          f"metadata_10k.csv or a *_metadata_10k.csv spelling)")
    exact = [p for p in found if p.name == "metadata_10k.csv"]
    if exact:
        return exact[0]
    if len(found) > 1:
        raise SourceError(f"{repo}: several metadata files in {folder} ({', '.join(p.name for p in found)}); "
                          f"keep one")
    return found[0]


def _chunk_dirs(group_dir: Path) -> list[Path]:
    dirs = [*group_dir.glob("chunk_*"), *(group_dir / "images").glob("chunk_*")]
    return sorted((d for d in dirs if d.is_dir()), key=lambda p: p.as_posix())


def _flatten(group_dir: Path, repo: str) -> int:
    """Move the files of chunk_* folders into ``images/`` (downloaded copies only); return how many."""
    images = group_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    chunks = _chunk_dirs(group_dir)
    # Check every name before moving anything, so a collision leaves the download as it was.
    sources: dict[str, Path] = {}
    duplicates: list[Path] = []
    for chunk in chunks:
        for path in sorted(p for p in chunk.rglob("*") if p.is_file()):
            other = sources.get(path.name)
            if other is None:
                target = images / path.name
                if target.exists() and not filecmp.cmp(path, target, shallow=False):
                    raise SourceError(f"{repo}: two different images named {path.name!r} ({path} and {target}); "
                                      f"cannot flatten the chunk folders")
                sources[path.name] = path
            elif filecmp.cmp(path, other, shallow=False):
                duplicates.append(path)
            else:
                raise SourceError(f"{repo}: two different images named {path.name!r} ({other} and {path}); "
                                  f"cannot flatten the chunk folders")
    moved = 0
    for name, path in sources.items():
        target = images / name
        if target.exists():  # identical copy moved by an earlier run
            path.unlink()
        else:
            os.replace(path, target)
            moved += 1
    for path in duplicates:
        path.unlink()
    for chunk in chunks:
        for d in sorted((p for p in chunk.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir_quiet(d)
        _rmdir_quiet(chunk)
    return moved


def _rmdir_quiet(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _image_index(group_dir: Path, repo: str) -> dict[str, Path]:
    """basename -> path over images/ (recursively) and chunk folders; read-only."""
    index: dict[str, Path] = {}
    roots = [group_dir / "images", *[d for d in group_dir.glob("chunk_*") if d.is_dir()]]
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".") or not _is_image(name):
                    continue
                path = Path(dirpath) / name
                if name in index and index[name] != path:
                    if filecmp.cmp(index[name], path, shallow=False):
                        continue  # the same image twice (a copy flattened without removing the chunks)
                    raise SourceError(f"{repo}: two images named {name!r} ({index[name]} and {path}); "
                                      f"file names must be unique within a group")
                index[name] = path
    return index


def _cub_images(s: dict, hub_dir: Path, bird_dir: Path, url_opener: Callable | None) -> dict:
    """Download (resumably) and verify CUB-200-2011, extract its images flat into Bird/images/."""
    archive = hub_dir / "downloads" / "CUB_200_2011.tgz"
    info = download_file(s["cub_url"], archive, sha256=s["cub_sha256"], url_opener=url_opener)

    def select(name: str) -> bool:
        parts = name.replace("\\", "/").split("/")
        return "images" in parts[:-1] and _is_image(parts[-1]) and not parts[-1].startswith(".")

    written = extract_flat(archive, bird_dir / "images", select, what=f"CUB-200-2011 archive ({s['cub_url']})")
    return {"url": s["cub_url"], "sha256": info["sha256"], "bytes": info["bytes"],
            "resumed_from": info["resumed_from"], "reused_download": info["reused"], "images": len(written)}


def _vlm4bio_download(s: dict, group: str, hub_dir: Path, downloader: Callable | None,
                      url_opener: Callable | None) -> dict:
    """Download one group into ``hub_dir`` and flatten its chunk folders (Bird: the CUB-200-2011 images), unless an
    earlier run did; return what was done."""
    group_dir = hub_dir / "datasets" / group
    # A finished group is not fetched again (its chunk files were moved, so a new snapshot
    # would download them all once more); the marker names what it was fetched from.
    marker = hub_dir / _MARKER_DIR / f"vlm4bio-{group}.json"
    key = {"repo_id": s["repo_id"], "revision": s["revision"],
           **({"cub_url": s["cub_url"], "cub_sha256": s["cub_sha256"]} if group == "Bird" else {})}
    done = _read_json(marker)
    if done.get("key") == key:
        return {**done.get("info", {}), "reused_download": True}
    info: dict[str, Any] = {}
    _snapshot("vlm4bio", s, hub_dir, _vlm4bio_patterns(group), downloader)
    info["flattened"] = _flatten(group_dir, s["repo_id"])
    if group == "Bird":
        info["cub"] = _cub_images(s, hub_dir, group_dir, url_opener)
    write_json(marker, {"key": key, "info": info})
    return info


def _vlm4bio_metadata(meta_path: Path, s: dict, group: str, group_dir: Path) -> Any:
    """The group's metadata_10k.csv as a string table, after checking its columns (and, for a local copy's Bird
    group, that the CUB images were put in place)."""
    import pandas as pd

    repo = s["repo_id"]
    try:
        df = pd.read_csv(meta_path, dtype=str)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{repo}: cannot read {meta_path} ({' '.join(str(exc).split())})") from exc
    missing = [c for c in ("fileNameAsDelivered", "scientificName") if c not in df.columns]
    if missing:
        raise SourceError(f"{repo}: {meta_path.name} of {group} has no column {missing[0]!r} "
                          f"(found {', '.join(map(str, df.columns))})")
    if group == "Bird" and s["local_path"] and not (group_dir / "images").is_dir():
        raise SourceError(f"vlm4bio.local_path: {group_dir / 'images'} does not exist; put the CUB-200-2011 "
                          f"images there (download_bird_images.sh does) or drop Bird from vlm4bio.groups")
    return df


def _vlm4bio_rows(df: Any, group: str, group_dir: Path, index: dict[str, Path], rows: list[dict],
                  rejects: list[dict]) -> set[str]:
    """Append a row per usable metadata record of ``group`` to ``rows`` and the others to ``rejects``; return the
    file names the metadata names, kept or not (the group's other images may go to the pool)."""
    seen: set[str] = set()
    listed: set[str] = set()
    for rec in df.to_dict("records"):
        name = clean(rec["fileNameAsDelivered"], collapse=False)
        base = os.path.basename(name) if name else None
        id_ = f"{group}/{base}" if base else None
        label = clean(rec["scientificName"])
        path = index.get(base) if base else None
        if base is None:
            reject(rejects, None, None, "no file name")
            continue
        listed.add(base)
        if label is None:
            reject(rejects, id_, path, "no species name")
            continue
        if id_ in seen:
            reject(rejects, id_, path, "duplicate file name in metadata")
            continue
        if path is None:
            reject(rejects, id_, group_dir / "images" / base, "image file not found")
            continue
        reason = check_image_file(path)
        if reason:
            reject(rejects, id_, path, reason)
            continue
        seen.add(id_)
        words = label.split(" ")
        rows.append({"id": id_, "path": str(path.absolute()), "label": label, "source": f"vlm4bio/{group}",
                     **_GROUP_RANKS[group], "genus": words[0] if len(words) > 1 else None, "species": label,
                     "group": group, "file_name": name})
    return listed


def fetch_vlm4bio(cfg: dict, out_dir: str | os.PathLike, downloader: Callable | None = None,
                  url_opener: Callable | None = None) -> dict:
    """Fetch VLM4Bio (Fish / Butterfly / Bird) into the raw photo layout; return the provenance.

    cfg: the validated ``vlm4bio`` section (repo_id, revision, groups, local_path, cub_url, cub_sha256,
    n_unlabelled). ``downloader`` is snapshot_download-like, ``url_opener`` the HTTP opener of the CUB download.
    Rows with no scientificName and rows whose image is missing are rejected; id =
    ``<Group>/<fileNameAsDelivered>``; label = scientificName (also the ``species`` column). The pool
    (``n_unlabelled``) is drawn from the group images no metadata row names; id ``<Group>/<file name>``."""
    s = _check_vlm4bio(cfg)
    t0 = time.time()
    out_dir = Path(out_dir)
    repo, local = s["repo_id"], s["local_path"]
    hub_dir = out_dir / "hub"
    root = Path(local) if local else hub_dir
    rows: list[dict] = []
    rejects: list[dict] = []
    per_group: dict[str, dict] = {}
    resolved: str | None = None
    pool_candidates: list[dict] = []

    for group in s["groups"]:
        group_dir = root / "datasets" / group
        info = {} if local else _vlm4bio_download(s, group, hub_dir, downloader, url_opener)
        meta_path = _metadata_csv(group_dir, repo, group)
        if not local and resolved is None:
            resolved = _resolved_commit(hub_dir, meta_path.relative_to(hub_dir).as_posix())
        df = _vlm4bio_metadata(meta_path, s, group, group_dir)
        index = _image_index(group_dir, repo)
        kept_before, rejected_before = len(rows), len(rejects)
        listed = _vlm4bio_rows(df, group, group_dir, index, rows, rejects)
        unlisted = [{"id": f"{group}/{name}", "path": str(path.absolute()), "label": None,
                     "source": f"vlm4bio/{group}", "group": group, "file_name": name, UNLABELLED: True}
                    for name, path in index.items() if name not in listed]
        pool_candidates.extend(unlisted)
        per_group[group] = {"metadata": meta_path.name, "rows": len(df), "kept": len(rows) - kept_before,
                            "dropped": len(rejects) - rejected_before, "unlisted_images": len(unlisted), **info}
    _add_pool(rows, rejects, _choose_pool(pool_candidates, s["n_unlabelled"], "vlm4bio"))

    provenance = _base_provenance("vlm4bio", s, t0)
    provenance.update({"resolved_commit": resolved, "groups": per_group,
                       "duration_s": round(time.time() - t0, 3)})
    return write_raw(out_dir, rows, rejects, provenance, extra_columns=("group", "file_name"),
                     what=f"vlm4bio ({repo})")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- TreeOfLife-10M

def _check_treeoflife(cfg: dict) -> dict:
    sec = "treeoflife"
    s = _settings(sec, cfg)
    # names compared after collapsing white space; the schema refuses blank ones
    s["taxa"] = {r: [" ".join(n.split()) for n in s["taxa"][r]] for r in RANKS if r in s["taxa"]}
    return s


def _read_catalog(path: Path, s: dict, repo: str) -> tuple[Any, dict]:
    import pandas as pd

    try:
        header = list(pd.read_csv(path, nrows=0).columns)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{repo}: cannot read {path} ({' '.join(str(exc).split())})") from exc
    need = ["treeoflife_id", "genus", "species", *s["taxa"]]
    if s["split"] is not None:
        need.append("split")
    missing = [c for c in dict.fromkeys(need) if c not in header]
    if missing:
        raise SourceError(f"{repo}: {path.name} has no column {missing[0]!r} (found {', '.join(header)})")
    wanted = ["split", "treeoflife_id", "eol_content_id", "eol_page_id", *RANKS, "common"]
    usecols = [c for c in wanted if c in header]
    counts = {"catalog_rows": 0, "after_split": 0, "after_eol_only": 0, "after_taxa": 0}
    eol_filter = s["eol_only"] and "eol_content_id" in header
    parts = []
    for chunk in pd.read_csv(path, usecols=usecols, dtype=str, chunksize=250_000):
        counts["catalog_rows"] += len(chunk)
        if s["split"] is not None:
            chunk = chunk[chunk["split"].str.strip() == s["split"]]
        counts["after_split"] += len(chunk)
        if eol_filter:
            chunk = chunk[chunk["eol_content_id"].notna() & (chunk["eol_content_id"].str.strip() != "")]
        counts["after_eol_only"] += len(chunk)
        for rank, names in s["taxa"].items():
            chunk = chunk[chunk[rank].str.strip().isin(names)]
        counts["after_taxa"] += len(chunk)
        if len(chunk):
            parts.append(chunk)
    counts["eol_filter_applied"] = eol_filter
    df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=usecols)
    return df, counts


def _select(records: list[dict], max_per_species: int | None, seed: int) -> list[dict]:
    """At most ``max_per_species`` per label: a seeded subset of each species' ids in id order; the
    subset of one species depends only on (seed, label, that species' ids)."""
    import numpy as np

    if max_per_species is None:
        return records
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append(r)
    keep: set[str] = set()
    for label, group in by_label.items():
        group = sorted(group, key=lambda r: r["id"])
        if len(group) > max_per_species:
            rng = np.random.default_rng([seed, zlib.crc32(label.encode("utf-8"))])
            group = [group[i] for i in np.sort(rng.choice(len(group), size=max_per_species, replace=False))]
        keep.update(r["id"] for r in group)
    return [r for r in records if r["id"] in keep]


def _archive_names(s: dict) -> tuple[list[str], bool]:
    if s["archives"] is not None:
        return [_TOL_ARCHIVE.format(n) for n in s["archives"]], True
    return [_TOL_ARCHIVE.format(n) for n in range(1, min(s["max_archives"], _TOL_MAX_SETS) + 1)], False


def _scan_archive(path: Path, remaining: dict[str, dict], dest: Path, name: str) -> dict[str, Path]:
    """Stream through one tar.gz and write only the members whose key (file name up to the first
    dot) is in ``remaining``; stop as soon as all of them are found."""
    found: dict[str, Path] = {}
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if len(found) == len(remaining):
                    break
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key = base.split(".", 1)[0]
                if key not in remaining or key in found or not _is_image(base):
                    continue
                src = tar.extractfile(member)
                if src is None:
                    continue
                target = dest / f"{key}{os.path.splitext(base)[1].lower()}"
                with atomic_path(target) as tmp, open(tmp, "wb") as fh:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        fh.write(block)
                found[key] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            raise  # writing the images failed, not reading the archive: deleting it would not help
        raise SourceError(f"treeoflife: cannot read {name} ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                          f"delete {path} and run again") from exc
    return found


def _already_extracted(dest: Path, ids: set[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not dest.is_dir():
        return found
    for entry in dest.iterdir():
        if entry.name.startswith("."):
            continue
        key = entry.name.split(".", 1)[0]
        if key in ids and _is_image(entry.name) and entry.stat().st_size > 0:
            found[key] = entry
    return found


def _treeoflife_catalog(s: dict, hub_dir: Path, downloader: Callable | None) -> Path:
    """The catalog CSV: in the local copy, else downloaded into ``hub_dir``."""
    local = s["local_path"]
    if not local:
        return _file("treeoflife", s, hub_dir, _TOL_CATALOG, downloader)
    catalog = Path(local) / _TOL_CATALOG
    if not catalog.is_file():
        raise SourceError(f"treeoflife.local_path: {local} has no {_TOL_CATALOG} (expected a copy in the layout "
                          f"of {s['repo_id']})")
    return catalog


def _treeoflife_records(df: Any, rejects: list[dict], counts: dict) -> list[dict]:
    """One record per catalog row with an id and a species name (the first row of a repeated id); rows with none
    go to ``rejects``, repeats are only counted."""
    records: list[dict] = []
    seen: set[str] = set()
    duplicates = 0
    for rec in df.to_dict("records"):
        tid = clean(rec.get("treeoflife_id"), collapse=False)
        if tid is None:
            reject(rejects, None, None, "no treeoflife_id")
            continue
        if tid in seen:
            duplicates += 1
            continue
        seen.add(tid)
        ranks = {r: clean(rec.get(r)) for r in RANKS}
        label = _binomial(ranks["genus"], ranks["species"])
        if label is None:
            reject(rejects, tid, None, "no species name")
            continue
        ranks["species"] = label
        records.append({"id": tid, "label": label, "source": "treeoflife-10m", **ranks, "treeoflife_id": tid,
                        "eol_content_id": clean(rec.get("eol_content_id")),
                        "eol_page_id": clean(rec.get("eol_page_id")), "common": clean(rec.get("common")),
                        "split": clean(rec.get("split"))})
    counts["duplicate_ids"] = duplicates
    counts["with_species"] = len(records)
    return records


def _treeoflife_wanted(records: list[dict], s: dict, counts: dict) -> tuple[dict[str, dict], dict[str, dict]]:
    """(id -> record of every image to extract, id -> record of the unlabelled pool among them): the seeded
    ``max_per_species`` selection, then up to ``n_unlabelled`` of the records it did not draw, without labels."""
    selected = _select(records, s["max_per_species"], s["seed"])
    counts["selected"] = len(selected)
    wanted = {r["id"]: r for r in selected}
    pool: dict[str, dict] = {}
    if s["n_unlabelled"]:
        provenance_only = ("id", "source", "treeoflife_id", "eol_content_id", "eol_page_id", "split")
        candidates = [{**{k: r[k] for k in provenance_only}, "label": None, UNLABELLED: True}
                      for r in records if r["id"] not in wanted]
        pool = {r["id"]: r for r in _choose_pool(candidates, s["n_unlabelled"], "treeoflife", s["seed"])}
        counts["unlabelled_candidates"], counts["unlabelled_selected"] = len(candidates), len(pool)
    wanted.update(pool)
    return wanted, pool


def _archive_path(s: dict, name: str, explicit: bool, hub_dir: Path,
                  downloader: Callable | None) -> tuple[Path | None, str | None]:
    """(the local file of archive ``name``, None), or (None, why reading stops) when the local copy or the
    repository has no such archive and the archives were not listed explicitly."""
    local = s["local_path"]
    if local:
        path = Path(local) / name
        if path.is_file():
            return path, None
        if explicit:
            raise SourceError(f"treeoflife.local_path: {local} has no {name}")
        return None, f"{name} not in the local copy"
    try:
        return _file("treeoflife", s, hub_dir, name, downloader), None
    except SourceError as exc:
        if not explicit and _entry_not_found(exc.__cause__):
            return None, f"{name} not in the repository"
        raise


def _read_archives(s: dict, wanted: dict[str, dict], found: dict[str, Path], hub_dir: Path, dest: Path,
                   downloader: Callable | None) -> tuple[list[dict], str]:
    """Extract the wanted images not ``found`` yet from image_set_01, 02, ... (or the listed archives) into
    ``dest``, adding them to ``found``, until all are found or the archives end; return what each archive gave
    and why reading stopped. Downloaded archives are deleted after reading unless keep_archives."""
    names, explicit = _archive_names(s)
    archives_read: list[dict] = []
    for name in names:
        remaining = {k: v for k, v in wanted.items() if k not in found}
        if not remaining:
            return archives_read, "all selected images found"
        path, stopped = _archive_path(s, name, explicit, hub_dir, downloader)
        if path is None:
            return archives_read, stopped
        got = _scan_archive(path, remaining, dest, name)
        found.update(got)
        archives_read.append({"archive": name, "extracted": len(got)})
        if not s["local_path"] and not s["keep_archives"]:
            path.unlink(missing_ok=True)
    if wanted and all(k in found for k in wanted):
        return archives_read, "all selected images found"
    return archives_read, "all archives read"


def _treeoflife_rows(wanted: dict[str, dict], pool: dict[str, dict], found: dict[str, Path],
                     counts: dict) -> list[dict]:
    """A row per wanted image that was found; the others are counted in ``counts``."""
    rows: list[dict] = []
    for tid, rec in wanted.items():
        path = found.get(tid)
        if path is None:
            # Not a bad file: the archives read did not hold it. Counted, not rejected, so reading 4 of the 63
            # archives does not count against prepare.max_reject_fraction.
            key = "unlabelled_not_found" if tid in pool else "not_in_archives_read"
            counts[key] = counts.get(key, 0) + 1
            continue
        rows.append({**rec, "path": str(path.absolute())})
    return rows


def fetch_treeoflife(cfg: dict, out_dir: str | os.PathLike, downloader: Callable | None = None) -> dict:
    """Fetch a subset of TreeOfLife-10M (EOL images) into the raw photo layout; return the provenance.

    cfg: the validated ``treeoflife`` section (repo_id, revision, taxa, split, eol_only, max_per_species, seed,
    archives, max_archives, keep_archives, local_path, n_unlabelled). ``downloader`` is
    hf_hub_download-like. Selection: catalog rows passing split / eol_only / taxa; rows with no
    species are rejected; then at most max_per_species per species (seeded); up to n_unlabelled of the
    rows not drawn become the unlabelled pool (seeded; those not in the archives read are dropped). Archives
    image_set_01.. are read in order (or the listed ones) and only selected members are extracted
    to ``out_dir/hub/extracted/EOL/``; reading stops once every selected image is found. Selected
    images never found are counted (provenance ``selection.not_in_archives_read``), not rejected. Downloaded
    archives are deleted after reading unless keep_archives; a local_path copy is only read."""
    s = _check_treeoflife(cfg)
    t0 = time.time()
    out_dir = Path(out_dir)
    repo, local = s["repo_id"], s["local_path"]
    hub_dir = out_dir / "hub"
    dest = hub_dir / "extracted" / "EOL"

    df, counts = _read_catalog(_treeoflife_catalog(s, hub_dir, downloader), s, repo)
    rejects: list[dict] = []
    records = _treeoflife_records(df, rejects, counts)
    wanted, pool = _treeoflife_wanted(records, s, counts)
    found = _already_extracted(dest, set(wanted))
    counts["found_from_earlier_run"] = len(found)
    archives_read, stopped = _read_archives(s, wanted, found, hub_dir, dest, downloader)
    rows = _treeoflife_rows(wanted, pool, found, counts)

    provenance = _base_provenance("treeoflife", s, t0)
    provenance.update({
        "resolved_commit": None if local else _resolved_commit(hub_dir, _TOL_CATALOG),
        "selection": counts, "archives_read": archives_read, "stopped": stopped,
        "duration_s": round(time.time() - t0, 3),
    })
    return write_raw(out_dir, rows, rejects, provenance,
                     extra_columns=("treeoflife_id", "eol_content_id", "eol_page_id", "common", "split"),
                     what=f"treeoflife ({repo})")


# --------------------------------------------------------------------------- Rare Species

_RARE_PATTERNS = ["*.csv", "dataset/*", "data/*.parquet"]


def _rare_metadata(root: Path, repo: str) -> tuple[Path, Any]:
    import pandas as pd

    candidates = []
    for path in sorted(root.glob("*.csv")):
        try:
            cols = {c.strip().lower() for c in pd.read_csv(path, nrows=0).columns}
        except (ValueError, OSError):
            continue
        if {"rarespecies_id", "file_name"} <= cols:
            candidates.append(path)
    if not candidates:
        listed = ", ".join(p.name for p in sorted(root.glob("*.csv"))) or "none"
        raise SourceError(f"{repo}: no CSV at the repository root with columns rarespecies_id and file_name "
                          f"(CSV files found: {listed})")
    chosen = next((p for p in candidates if p.name == "metadata.csv"), candidates[0])
    try:
        df = pd.read_csv(chosen, dtype=str)
    except (ValueError, OSError) as exc:
        raise SourceError(f"{repo}: cannot read {chosen} ({' '.join(str(exc).split())})") from exc
    df.columns = [c.strip().lower() for c in df.columns]
    return chosen, df


def _rare_from_parquet(root: Path, ids: dict[str, str], dest_root: Path) -> dict[str, Path]:
    """Write the images of ``ids`` (rarespecies_id -> file_name) stored in data/*.parquet shards."""
    import pyarrow.parquet as pq

    written: dict[str, Path] = {}
    for shard in sorted((root / "data").glob("*.parquet")):
        pf = pq.ParquetFile(shard)
        names = set(pf.schema_arrow.names)
        image_col = next((c for c in ("file_name", "image") if c in names), None)
        if image_col is None or "rarespecies_id" not in names:
            continue
        for batch in pf.iter_batches(columns=["rarespecies_id", image_col], batch_size=256):
            for rid, image in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                rid = clean(rid, collapse=False)
                if rid not in ids or rid in written or not isinstance(image, dict) or not image.get("bytes"):
                    continue
                target = dest_root / ids[rid]
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target) as tmp:
                    tmp.write_bytes(image["bytes"])
                written[rid] = target
    return written


def _rare_records(df: Any, root: Path, rejects: list[dict]) -> tuple[list[tuple[dict, Path]], set[str]]:
    """(row, image path) per usable metadata record (the others go to ``rejects``), and the normalised paths of
    every file the metadata names, kept or not: the rest of dataset/ may go to the pool."""
    records: list[tuple[dict, Path]] = []
    seen: set[str] = set()
    listed: set[str] = set()
    for rec in df.to_dict("records"):
        rid = clean(rec.get("rarespecies_id"), collapse=False)
        rel = clean(rec.get("file_name"), collapse=False)
        path = (root / rel) if rel else None
        if path is not None:
            listed.add(os.path.normpath(path))
        if rid is None:
            reject(rejects, None, path, "no rarespecies_id")
            continue
        if rid in seen:
            reject(rejects, rid, path, "duplicate rarespecies_id")
            continue
        ranks = {r: clean(rec.get(r)) for r in RANKS}
        label = clean(rec.get("sciname")) or _binomial(ranks["genus"], ranks["species"])
        if label is None:
            reject(rejects, rid, path, "no species name")
            continue
        if rel is None:
            reject(rejects, rid, None, "no file name")
            continue
        seen.add(rid)
        ranks["species"] = label
        row = {"id": rid, "label": label, "source": "rare-species", **ranks, "rarespecies_id": rid,
               "eol_content_id": clean(rec.get("eol_content_id")), "eol_page_id": clean(rec.get("eol_page_id")),
               "common": clean(rec.get("common")), "file_name": rel}
        records.append((row, path))
    return records, listed


def _rare_rows(records: list[tuple[dict, Path]], root: Path, hub_dir: Path,
               rejects: list[dict]) -> tuple[list[dict], dict[str, Path]]:
    """The rows whose image file is usable (written out of data/*.parquet shards when it is not a file), the
    others rejected; and the images written from the shards."""
    missing = {row["id"]: row["file_name"] for row, path in records if check_image_file(path) is not None}
    from_parquet: dict[str, Path] = {}
    if missing and (root / "data").is_dir():
        from_parquet = _rare_from_parquet(root, missing, hub_dir)
    rows: list[dict] = []
    for row, path in records:
        path = from_parquet.get(row["id"], path)
        reason = check_image_file(path)
        if reason:
            reject(rejects, row["id"], path, reason)
            continue
        rows.append({**row, "path": str(path.absolute())})
    return rows, from_parquet


def _rare_unlisted(root: Path, listed: set[str]) -> list[dict]:
    """Pool candidates: the image files under dataset/ that no metadata row names, without labels."""
    unlisted: list[dict] = []
    if not (root / "dataset").is_dir():
        return unlisted
    for path in sorted((root / "dataset").rglob("*")):
        if _is_image(path.name) and not path.name.startswith(".") and os.path.normpath(path) not in listed \
                and path.is_file():
            rel = path.relative_to(root).as_posix()
            unlisted.append({"id": f"{UNLABELLED}/{rel}", "path": str(path.absolute()), "label": None,
                             "source": "rare-species", "file_name": rel, UNLABELLED: True})
    return unlisted


def fetch_rare_species(cfg: dict, out_dir: str | os.PathLike, downloader: Callable | None = None) -> dict:
    """Fetch Rare Species (400 IUCN-listed species, 30 EOL images each) into the raw photo layout.

    cfg: the validated ``rare_species`` section (repo_id, revision, local_path, n_unlabelled). ``downloader`` is
    snapshot_download-like. id = rarespecies_id; label = sciName (else genus + species). The pool
    (``n_unlabelled``) is drawn from image files under ``dataset/`` that no metadata row names; id =
    ``unlabelled/<path in the repository>``."""
    s = _settings("rare_species", cfg)
    t0 = time.time()
    out_dir = Path(out_dir)
    repo, local = s["repo_id"], s["local_path"]
    hub_dir = out_dir / "hub"
    if local:
        root = Path(local)
    else:
        _snapshot("rare_species", s, hub_dir, _RARE_PATTERNS, downloader)
        root = hub_dir
    meta_path, df = _rare_metadata(root, repo)

    rejects: list[dict] = []
    records, listed = _rare_records(df, root, rejects)
    rows, from_parquet = _rare_rows(records, root, hub_dir, rejects)
    unlisted = _rare_unlisted(root, listed) if s["n_unlabelled"] else []
    _add_pool(rows, rejects, _choose_pool(unlisted, s["n_unlabelled"], "rare_species"))

    provenance = _base_provenance("rare_species", s, t0)
    provenance.update({
        "resolved_commit": None if local else _resolved_commit(hub_dir, meta_path.name),
        "metadata_file": meta_path.name, "images_from_parquet": len(from_parquet),
        "unlisted_images": len(unlisted), "duration_s": round(time.time() - t0, 3),
    })
    return write_raw(out_dir, rows, rejects, provenance,
                     extra_columns=("rarespecies_id", "eol_content_id", "eol_page_id", "common", "file_name"),
                     what=f"rare_species ({repo})")
