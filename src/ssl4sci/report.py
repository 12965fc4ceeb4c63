"""Final experiment report: one self-contained HTML page, a Markdown table, a JSON summary.

The report only reads the files the Snakemake rule lists in ``inputs`` (it never
globs), embeds every figure as a base64 ``data:`` URI and escapes every piece of
text, so ``report.html`` can be mailed or archived on its own.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from .failures import job_label
from .io import atomic_path, read_json, write_json
from .registry.baselines import BASELINE, is_public_pretrained, is_untrained, own_baseline
from .registry.protocols import LABEL_EFFICIENCY_PROTOCOLS, PROTOCOLS, protocols_of

TARGET_GAIN = 0.10  # the gain over untrained weights a self-supervised method should show (k-NN and linear probe)
# A self-supervised method's embeddings should keep at least this share of its untrained baseline's effective rank
# (dimensional collapse, the spectrum protocol).
TARGET_RANK_RATIO = 0.5
SPECTRUM = "spectrum"  # the evaluation protocol that reads no labels: its own table, not an accuracy column


def baseline_of(method: str, methods: Iterable[str]) -> str | None:
    """The untrained baseline a method is compared with: its own architecture's (random_init_<method>) when that
    was embedded, else random_init. Baselines themselves have none."""
    methods = list(methods)
    if is_untrained(method) or is_public_pretrained(method):  # public references are not trained here
        return None
    own = own_baseline(method)
    return own if own in methods else (BASELINE if BASELINE in methods else None)
EVAL_PROTOCOLS = protocols_of("split")  # the fixed columns; other protocols follow in the order they appear
SINGLE_INPUTS = ("samples_png", "stats_json")
LIST_INPUTS = (
    "loss_png",
    "pretrain_metrics_csv",
    "eval_json",
    "finetune_json",
    "finetune_png",
    "label_efficiency_json",
    "attention_png",
    "attention_json",
)
LOWER_IS_BETTER = {"mae", "rmse", "mse", "loss", "final_train_loss", "wall_time_s", "pc1_share", "pc2_share",
                   "final_pc1_share"}
NOT_RANKED = {"n", "n_fit", "n_score", "last_epoch", "steps", "epochs", "embed_dim", "initial_effective_rank"}
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif", ".svg": "image/svg+xml",
         ".webp": "image/webp"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
padding:0 1rem;color:#222;line-height:1.4}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
.meta{color:#666}h2.failed{color:#a00;border-color:#e99}.notrun{color:#888;font-style:italic}
table{border-collapse:collapse;margin:.8rem 0;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.25rem .55rem;text-align:right}
th{background:#f3f3f3}td.name,th.name{text-align:left}
tr.delta td{background:#f7fbff;color:#234}tr.baseline td{background:#fafafa}
figure{display:inline-block;margin:.5rem 1rem .5rem 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8rem;color:#666;word-break:break-all}
pre{background:#f6f6f6;padding:.8rem;overflow:auto;font-size:.85rem}
"""


# --------------------------------------------------------------------------- inputs
def _as_list(value: Any) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value]


def _normalise_inputs(inputs: dict, allow_missing: bool = False) -> dict[str, Any]:
    """Paths per input kind; a missing file is an error, unless the run is known to be partial (``allow_missing``),
    when the report is built from what finished."""
    unknown = set(inputs) - set(SINGLE_INPUTS) - set(LIST_INPUTS)
    if unknown:
        raise ValueError(
            f"build_report: unknown input keys {sorted(unknown)}, expected some of {[*SINGLE_INPUTS, *LIST_INPUTS]}"
        )
    out: dict[str, Any] = {}
    for key in SINGLE_INPUTS:
        paths = _as_list(inputs.get(key))
        if len(paths) > 1:
            raise ValueError(f"build_report: input {key!r} expects one file, got {len(paths)}")
        out[key] = paths[0] if paths else None
    for key in LIST_INPUTS:
        out[key] = _as_list(inputs.get(key))
    missing = [p for p in _all_paths(out) if not p.is_file()]
    if missing and allow_missing:
        out = {k: (v if v is None or v.is_file() else None) if k in SINGLE_INPUTS else [p for p in v if p.is_file()]
               for k, v in out.items()}
    elif missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"report input not found: {missing[0]}{more}")
    return out


def _all_paths(inp: dict[str, Any]) -> Iterable[Path]:
    for key in SINGLE_INPUTS:
        if inp[key] is not None:
            yield inp[key]
    for key in LIST_INPUTS:
        yield from inp[key]


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clean(v: Any) -> Any:
    """JSON-safe scalar: non-finite floats become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _load_json_dict(path: Path) -> dict:
    try:
        obj = read_json(path)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return obj


def _load_eval(path: Path) -> dict:
    obj = _load_json_dict(path)
    for key in ("protocol", "metrics"):
        if key not in obj:
            raise ValueError(f"{path}: expected an evaluation result with a {key!r} key")
    if not isinstance(obj["metrics"], dict):
        raise ValueError(f"{path}: expected 'metrics' to be an object")
    obj.setdefault("method", path.parent.name)
    if obj.get("rank") not in (None, "label"):
        # Per-rank results are their own group: "knn@genus".
        obj["protocol"] = f"{obj['protocol']}@{obj['rank']}"
    return obj


def _load_finetune(path: Path) -> dict:
    obj = _load_json_dict(path)
    if not isinstance(obj.get("metrics"), dict):
        raise ValueError(f"{path}: expected a fine-tuning result with a 'metrics' object")
    obj.setdefault("method", path.parent.parent.name)
    obj.setdefault("task", path.parent.name)
    return obj


def _load_attention(path: Path) -> dict:
    obj = _load_json_dict(path)
    metrics = obj.get("metrics")
    if not isinstance(metrics, dict):
        metrics = {k: v for k, v in obj.items() if k != "method"}
    return {"method": obj.get("method", path.parent.name), "metrics": metrics}


def _load_pretrain(path: Path) -> dict:
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    if "step" in df.columns:
        df = df.sort_values("step", kind="stable")
    out: dict[str, Any] = {}
    if "train_loss" in df.columns:
        loss = pd.to_numeric(df["train_loss"], errors="coerce").dropna()
        if len(loss):
            out["final_train_loss"] = float(loss.iloc[-1])
    if "epoch" in df.columns and len(df):
        out["last_epoch"] = int(pd.to_numeric(df["epoch"], errors="coerce").max())
    if "step" in df.columns and len(df):
        out["steps"] = int(pd.to_numeric(df["step"], errors="coerce").max())
    if "time_s" in df.columns and len(df):
        # time_s is the elapsed time since the start of training
        out["wall_time_s"] = float(pd.to_numeric(df["time_s"], errors="coerce").max())
    last_values = (("knn_val", "final_knn_val"), ("effective_rank", "final_effective_rank"),
                   ("pc1_share", "final_pc1_share"), ("teacher_kl", "final_teacher_kl"),
                   ("crop_reject_rate", "final_crop_reject_rate"))
    for column, name in last_values:
        values = pd.to_numeric(df[column], errors="coerce").dropna() if column in df.columns else pd.Series(dtype=float)
        if len(values):
            out[name] = float(values.iloc[-1])
    initial = pd.to_numeric(df["effective_rank_init"], errors="coerce").dropna() if "effective_rank_init" in df else []
    if len(initial):  # the untrained network's effective rank, measured before the first step
        out["initial_effective_rank"] = float(initial.iloc[0])
    return {"method": path.parent.name, "metrics": out, "n_rows": int(len(df))}


# --------------------------------------------------------------------------- summary
def _add(summary: dict, method: str, group: str, metrics: dict, source: Path) -> None:
    scalars = {k: _clean(v) for k, v in metrics.items() if _is_scalar(v)}
    slot = summary.setdefault(method, {})
    if group in slot:
        raise ValueError(f"{source}: duplicate result for method {method!r}, {group!r}")
    slot[group] = scalars


def _method_order(names: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return [m for m in seen if not is_untrained(m)] + [m for m in seen if is_untrained(m)]


def _group_order(groups: Iterable[str]) -> list[str]:
    fixed = [*EVAL_PROTOCOLS, "finetune_classify", "finetune_regress"]
    groups = list(dict.fromkeys(groups))
    rest = [g for g in groups if g not in fixed and g not in ("pretrain", "attention")]
    tail = [g for g in ("attention", "pretrain") if g in groups]
    return [g for g in fixed if g in groups] + rest + tail


def _columns(summary: dict, methods: list[str], groups: list[str]) -> list[tuple[str, str]]:
    cols: list[tuple[str, str]] = []
    for g in groups:
        for m in methods:
            for metric in summary.get(m, {}).get(g, {}):
                if (g, metric) not in cols:
                    cols.append((g, metric))
    return cols


# --------------------------------------------------------------------------- formatting
def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:+d}" if signed else str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:+.3f}" if signed else f"{v:.3f}"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _img(path: Path, caption: str | None = None) -> str:
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = caption if caption is not None else str(path)
    return (
        f'<figure><img src="data:{mime};base64,{data}" alt="{_e(path)}">'
        f"<figcaption>{_e(cap)}</figcaption></figure>"
    )


def _not_run(what: str) -> str:
    return f'<p class="notrun">{_e(what)}: not run.</p>'


def _best(values: list[Any], metric: str) -> Any:
    nums = [v for v in values if _is_scalar(v) and math.isfinite(v)]
    if len(nums) < 2 or metric in NOT_RANKED:
        return None
    return min(nums) if metric in LOWER_IS_BETTER else max(nums)


def _metric_table(summary: dict, methods: list[str], groups: list[str], caption: str) -> str:
    """Rows = methods (+ Δ vs random_init rows), columns = group/metric; best per column in bold."""
    cols = _columns(summary, methods, groups)
    rows = [m for m in methods if any(g in summary.get(m, {}) for g in groups)]
    if not cols or not rows:
        return ""
    cell = {(m, c): summary.get(m, {}).get(c[0], {}).get(c[1]) for m in rows for c in cols}
    best = {c: _best([cell[(m, c)] for m in rows], c[1]) for c in cols}
    multi_group = len({g for g, _ in cols}) > 1 or len(groups) > 1
    out = [f"<table><caption>{_e(caption)}</caption><thead>"]
    if multi_group:
        out.append('<tr><th class="name" rowspan="2">method</th>')
        for g in dict.fromkeys(g for g, _ in cols):
            span = sum(1 for gg, _ in cols if gg == g)
            out.append(f'<th colspan="{span}">{_e(g)}</th>')
        out.append("</tr><tr>")
        out.extend(f"<th>{_e(metric)}</th>" for _, metric in cols)
    else:
        out.append('<tr><th class="name">method</th>')
        out.extend(f"<th>{_e(metric)}</th>" for _, metric in cols)
    out.append("</tr></thead><tbody>")
    for m in rows:
        cls = ' class="baseline"' if is_untrained(m) else ""
        out.append(f'<tr{cls}><td class="name">{_e(m)}</td>')
        for c in cols:
            v = cell[(m, c)]
            text = _e(_fmt(v))
            if best[c] is not None and v == best[c]:
                text = f"<b>{text}</b>"
            out.append(f"<td>{text}</td>")
        out.append("</tr>")
    for m in rows:
        base = baseline_of(m, rows)
        if base is None:
            continue
        out.append(f'<tr class="delta"><td class="name">Δ {_e(m)} vs {_e(base)}</td>')
        for c in cols:
            a, b = cell[(m, c)], cell[(base, c)]
            d = a - b if _is_scalar(a) and _is_scalar(b) and c[1] not in NOT_RANKED else None
            out.append(f"<td>{_e(_fmt(d, signed=True))}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _dict_table(rows: list[tuple[str, dict]], caption: str, first: str = "method") -> str:
    """Rows of name -> {column: value} (e.g. per-class AUC)."""
    cols: list[str] = []
    for _, d in rows:
        cols.extend(k for k in d if k not in cols)
    if not cols:
        return ""
    out = [f'<table><caption>{_e(caption)}</caption><thead><tr><th class="name">{_e(first)}</th>']
    out.extend(f"<th>{_e(c)}</th>" for c in cols)
    out.append("</tr></thead><tbody>")
    for name, d in rows:
        out.append(f'<tr><td class="name">{_e(name)}</td>')
        out.extend(f"<td>{_e(_fmt(d.get(c)))}</td>" for c in cols)
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


# --------------------------------------------------------------------------- sections
def _section_data(inp: dict, stats: dict | None) -> str:
    parts = ["<h2>Data</h2>"]
    if inp["samples_png"] is None and stats is None:
        return parts[0] + _not_run("Data summary")
    if inp["samples_png"] is not None:
        parts.append(_img(inp["samples_png"], "Sample images per class"))
    if stats is not None:
        counts = stats.get("counts")
        if isinstance(counts, dict) and counts:
            labels: list[str] = []
            for per in counts.values():
                if isinstance(per, dict):
                    labels.extend(k for k in per if k not in labels)
            rows = []
            for split, per in counts.items():
                per = per if isinstance(per, dict) else {"n": per}
                total = sum(v for v in per.values() if _is_scalar(v))
                rows.append((split, {**{lab: per.get(lab) for lab in labels}, "total": total}))
            parts.append(_dict_table(rows, "Number of images per split and class", first="split"))
        extra = {k: v for k, v in stats.items() if k != "counts"}
        if extra:
            items = "".join(
                f"<tr><td class='name'>{_e(k)}</td><td class='name'>{_e(_fmt_any(v))}</td></tr>"
                for k, v in extra.items()
            )
            parts.append(f"<table><caption>Dataset statistics</caption><tbody>{items}</tbody></table>")
    return "".join(parts)


def _fmt_any(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(_is_scalar(x) for x in v):
        return "[" + ", ".join(f"{x:.4g}" if isinstance(x, float) else str(x) for x in v) + "]"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def _section_pretrain(inp: dict, pretrain: list[dict], summary: dict, methods: list[str]) -> str:
    parts = ["<h2>Pretraining</h2>"]
    if not inp["loss_png"] and not pretrain:
        return parts[0] + _not_run("Pretraining")
    parts.append(_metric_table(summary, methods, ["pretrain"], "Final training loss, online k-NN (val), effective rank "
                               "and PC1 variance share of the teacher backbone's features (train subset), wall time"))
    parts.extend(_img(p, f"{p.parent.name}: loss curve ({p})") for p in inp["loss_png"])
    return "".join(parts)


def _section_eval(evals: list[dict], summary: dict, methods: list[str]) -> str:
    parts = ["<h2>Frozen-embedding evaluation</h2>"]
    if not evals:
        return parts[0] + _not_run("Evaluation")
    all_groups = _group_order(e["protocol"] for e in evals)
    groups = [g for g in all_groups if "@" not in g and g != SPECTRUM]
    described = ", ".join(f"{g} = {PROTOCOLS[g].help}" for g in groups if g in PROTOCOLS)
    parts.append(f"<p>Scored on the held-out split; {described}. Best per column in bold.</p>")
    if groups:
        parts.append(_metric_table(summary, methods, groups, "Evaluation metrics (rows: methods)"))
    if SPECTRUM in all_groups:
        parts.append(_metric_table(summary, methods, [SPECTRUM],
                                   "Spectrum of the embeddings on the fit split (no labels): effective rank (RankMe) "
                                   "of the centred embeddings, its share of embed_dim, and the variance share of PC1 "
                                   "and of PC1+PC2; a collapsed model has a low rank and high shares"))
    rank_groups = [g for g in all_groups if "@" in g]
    if rank_groups:
        parts.append("<h3>Per taxonomic rank</h3>")
        for protocol in dict.fromkeys(g.split("@")[0] for g in rank_groups):
            mine = [g for g in rank_groups if g.split("@")[0] == protocol]
            parts.append(_metric_table(summary, methods, mine, f"{protocol} by rank (column: {protocol}@rank metric)"))
    auc_rows = [(e["method"], e["metrics"]["auc_per_class"]) for e in evals
                if isinstance(e["metrics"].get("auc_per_class"), dict)]
    if auc_rows:
        parts.append(_dict_table(auc_rows, "Linear probe: one-vs-rest ROC AUC per class"))
    acc_rows = [
        (f"{e['method']} / {e['protocol']}", e["per_class_accuracy"])
        for e in evals if isinstance(e.get("per_class_accuracy"), dict)
    ]
    if acc_rows:
        parts.append("<details><summary>Per-class accuracy</summary>")
        parts.append(_dict_table(acc_rows, "Per-class top-1 accuracy", first="method / protocol"))
        parts.append("</details>")
    info_rows = [
        (f"{e['method']} / {e['protocol']}",
         {k: e.get(k) for k in ("n_fit", "n_score", "n_excluded", "n_classes", "embed_dim")})
        for e in evals
    ]
    parts.append("<details><summary>Evaluation set sizes</summary>")
    parts.append(_dict_table(info_rows, "Rows used", first="method / protocol"))
    parts.append("</details>")
    return "".join(parts)


def ssl_gains(summary: dict) -> list[dict[str, Any]]:
    """For every trained method: k-NN top-1 and linear-probe accuracy next to its untrained baseline's, and the
    effective rank of its embeddings (spectrum protocol) as a share of the baseline's (``rank_ratio``)."""
    rows = []
    for m in summary:
        base = baseline_of(m, summary)
        if base is None:
            continue
        row: dict[str, Any] = {"method": m, "baseline": base}
        for group, metric in (("knn", "top1"), ("linear", "accuracy")):
            a = summary[m].get(group, {}).get(metric)
            b = summary[base].get(group, {}).get(metric)
            row[f"{group}_{metric}"], row[f"{group}_{metric}_baseline"] = a, b
            row[f"{group}_gain"] = a - b if _is_scalar(a) and _is_scalar(b) else None
        gains = [row["knn_gain"], row["linear_gain"]]
        row["meets_target"] = None if None in gains else all(g >= TARGET_GAIN - 1e-12 for g in gains)
        rank, base_rank = (summary[x].get(SPECTRUM, {}).get("effective_rank") for x in (m, base))
        row["effective_rank"], row["effective_rank_baseline"] = rank, base_rank
        measured = _is_scalar(rank) and _is_scalar(base_rank) and base_rank > 0
        row["rank_ratio"] = rank / base_rank if measured else None
        row["meets_rank_target"] = None if not measured else row["rank_ratio"] >= TARGET_RANK_RATIO - 1e-12
        rows.append(row)
    return rows


_MET = {True: "met", False: "not met", None: "n/a (no spectrum result)"}


def rank_target_line(row: dict[str, Any]) -> str:
    """One line: a method's effective rank against its untrained baseline's and whether the target is met."""
    if row["rank_ratio"] is None:
        return f"{row['method']}: effective rank vs {row['baseline']}: {_MET[None]}"
    return (f"{row['method']}: effective rank {row['effective_rank']:.1f} vs {row['effective_rank_baseline']:.1f} "
            f"for {row['baseline']} (ratio {row['rank_ratio']:.2f}; target ≥ {TARGET_RANK_RATIO:g}): "
            f"{_MET[row['meets_rank_target']]}")


def _section_gains(summary: dict) -> str:
    rows = ssl_gains(summary)
    if not rows:
        return ""
    parts = ["<h2>Self-supervised vs untrained weights</h2>",
             f"<p>Each trained method against random weights of its own architecture, on the held-out split; "
             f"the target is a gain of at least {TARGET_GAIN * 100:.0f} points in both k-NN and linear-probe "
             "accuracy.</p>"]
    verdict = {True: "yes", False: "no", None: "n/a"}
    table = [(r["method"], {"baseline": r["baseline"], "k-NN top-1": r["knn_top1"],
                            "baseline k-NN": r["knn_top1_baseline"], "k-NN gain": r["knn_gain"],
                            "linear acc.": r["linear_accuracy"], "baseline linear": r["linear_accuracy_baseline"],
                            "linear gain": r["linear_gain"],
                            f"both ≥ +{TARGET_GAIN * 100:.0f} pts": verdict[r["meets_target"]]})
             for r in rows]
    parts.append(_dict_table(table, "k-NN and linear-probe accuracy gain over the untrained baseline"))
    parts.append(f"<p>Dimensional collapse: the effective rank (RankMe) of each method's embeddings on the train "
                 f"split should be at least {TARGET_RANK_RATIO:g} × its untrained baseline's (the spectrum protocol; "
                 "a collapsed backbone's features vary along a few directions, which the head's statistics do not "
                 "show).</p>")
    ranks = [(r["method"], {"baseline": r["baseline"], "effective rank": r["effective_rank"],
                            "baseline eff. rank": r["effective_rank_baseline"], "ratio": r["rank_ratio"],
                            f"≥ {TARGET_RANK_RATIO:g} × baseline": _MET[r["meets_rank_target"]]}) for r in rows]
    parts.append(_dict_table(ranks, "Effective rank of the embeddings against the untrained baseline's"))
    parts.append("<ul>" + "".join(f"<li>{_e(rank_target_line(r))}</li>" for r in rows) + "</ul>")
    return "".join(parts)


def _section_finetune(inp: dict, finetunes: list[dict], summary: dict, methods: list[str]) -> str:
    parts = ["<h2>Fine-tuning</h2>"]
    if not finetunes and not inp["finetune_png"]:
        return parts[0] + _not_run("Fine-tuning")
    groups = _group_order(f"finetune_{f['task']}" for f in finetunes)
    parts.append(_metric_table(summary, methods, groups, "Fine-tuning metrics (rows: methods)"))
    targets = sorted({str(f["metrics"]["target"]) for f in finetunes if "target" in f["metrics"]})
    if targets:
        parts.append(f"<p>Regression target: {_e(', '.join(targets))}</p>")
    auc_rows = [(f["method"], f["metrics"]["auc_per_class"]) for f in finetunes
                if isinstance(f["metrics"].get("auc_per_class"), dict)]
    if auc_rows:
        parts.append(_dict_table(auc_rows, "Fine-tuned classifier: one-vs-rest ROC AUC per class"))
    for p in inp["finetune_png"]:
        parts.append(_img(p, f"{p.parent.parent.name} / {p.parent.name}: {p.name} ({p})"))
    return "".join(parts)


def attention_not_applicable(cfg: dict | None, methods: list[str]) -> list[tuple[str, str]]:
    """(method, backbone name) of the methods whose backbone is not a ViT: CLS attention maps do not exist for them."""
    if not cfg or "model" not in cfg:  # a report built without the run's config cannot tell
        return []
    from ssl4sci.config import has_cls_attention, model_for

    names = [(m, model_for(cfg, m)["name"]) for m in methods if not is_public_pretrained(m)]
    return [(m, name) for m, name in names if not has_cls_attention(name)]


def _section_attention(inp: dict, attention: list[dict], summary: dict, methods: list[str],
                       cfg: dict | None = None) -> str:
    parts = ["<h2>Attention maps</h2>"]
    skipped = attention_not_applicable(cfg, methods)
    if skipped:
        listed = ", ".join(f"{m} ({name})" for m, name in skipped)
        parts.append(f"<p>Does not apply to {_e(listed)}: the last block's CLS attention exists only in a ViT; a CNN "
                     "or Swin backbone has no CLS token, so these methods have no attention maps or arc scores.</p>")
    if not attention and not inp["attention_png"]:
        return "".join(parts) + _not_run("Attention analysis")
    if attention:
        parts.append(_metric_table(summary, methods, ["attention"], "Attention scores"))
    parts.extend(_img(p, f"{p.parent.name}: attention gallery ({p})") for p in inp["attention_png"])
    return "".join(parts)


def _generated_at() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return now.isoformat(timespec="seconds")


def _render_markdown(summary: dict, methods: list[str], experiment: str) -> str:
    groups = _group_order(g for m in methods for g in summary.get(m, {}))
    cols = _columns(summary, methods, groups)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"# {esc(experiment)}: summary", ""]
    if not cols:
        return "\n".join(lines + ["No results.", ""])
    lines.append("| method | " + " | ".join(esc(f"{g}.{m}") for g, m in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for m in methods:
        cells = [_fmt(summary.get(m, {}).get(g, {}).get(k)) for g, k in cols]
        lines.append(f"| {esc(m)} | " + " | ".join(cells) + " |")
    gains = ssl_gains(summary)
    if gains:
        lines += ["", f"Gain over the untrained baseline (target: +{TARGET_GAIN:.2f} in both):", "",
                  "| method | baseline | k-NN gain | linear gain |", "|---|---|---:|---:|"]
        lines += [f"| {esc(r['method'])} | {esc(r['baseline'])} | {_fmt(r['knn_gain'], signed=True)} | "
                  f"{_fmt(r['linear_gain'], signed=True)} |" for r in gains]
        lines += ["", f"Effective rank of the embeddings vs the untrained baseline "
                      f"(target: ≥ {TARGET_RANK_RATIO:g} ×):", ""]
        lines += [f"- {esc(rank_target_line(r))}" for r in gains]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- entry point
def build_report(inputs: dict, experiment: str, out_html, out_md, out_json, cfg: dict | None = None,
                 failures: dict | None = None) -> dict:
    """Write report.html, summary.md and summary.json from the listed inputs; return the summary.

    ``failures`` (a :mod:`ssl4sci.failures` record) marks a partly failed run: inputs its failed jobs never wrote are
    left out, and the page and the Markdown open with each failure, its reason and its log.

    The summary is ``{method: {group: {metric: value}}}`` where group is an evaluation
    protocol (``prototype``, ``knn``, ``linear``), ``finetune_<task>``, ``attention`` or
    ``pretrain``; only numeric scalar metrics are kept (per-class dicts are HTML only).
    """
    inp = _normalise_inputs(dict(inputs), allow_missing=failures is not None)
    stats = _load_json_dict(inp["stats_json"]) if inp["stats_json"] is not None else None
    evals = [_load_eval(p) for p in inp["eval_json"]]
    finetunes = [_load_finetune(p) for p in inp["finetune_json"]]
    attention = [_load_attention(p) for p in inp["attention_json"]]
    pretrain = [_load_pretrain(p) for p in inp["pretrain_metrics_csv"]]

    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for e, p in zip(evals, inp["eval_json"]):
        _add(summary, str(e["method"]), str(e["protocol"]), e["metrics"], p)
    for f, p in zip(finetunes, inp["finetune_json"]):
        _add(summary, str(f["method"]), f"finetune_{f['task']}", f["metrics"], p)
    for a, p in zip(attention, inp["attention_json"]):
        _add(summary, str(a["method"]), "attention", a["metrics"], p)
    for r, p in zip(pretrain, inp["pretrain_metrics_csv"]):
        _add(summary, r["method"], "pretrain", r["metrics"], p)
    label_efficiency = [_load_label_efficiency(p) for p in inp["label_efficiency_json"]]
    for le, p in zip(label_efficiency, inp["label_efficiency_json"]):
        for protocol, entry in le["protocols"].items():
            _add(summary, str(le["method"]), protocol, entry["metrics"], p)
    methods = _method_order(summary)
    summary = {m: {g: summary[m][g] for g in _group_order(summary[m])} for m in methods}

    title = f"ssl4sci report: {experiment}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">Experiment <b>{_e(experiment)}</b> · generated {_e(_generated_at())} · '
        f'methods: {_e(", ".join(methods) or "none")}</p>',
    ]
    if failures is not None:
        body.append(_section_failures(failures))
    if cfg is not None:
        body.append(
            "<details><summary>Configuration</summary><pre>"
            + _e(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            + "</pre></details>"
        )
    body.append(_section_data(inp, stats))
    body.append(_section_pretrain(inp, pretrain, summary, methods))
    body.append(_section_eval(evals, summary, methods))
    body.append(_section_gains(summary))
    body.append(_section_finetune(inp, finetunes, summary, methods))
    body.append(_section_label_efficiency(summary, methods))
    body.append(_section_attention(inp, attention, summary, methods, cfg))
    sources = "".join(f"<li>{_e(p)}</li>" for p in _all_paths(inp))
    body.append(f"<details><summary>Input files</summary><ul>{sources}</ul></details>")
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )

    write_json(out_json, summary)
    with atomic_path(out_md) as tmp:
        # label-efficiency protocols get a table of their own, not 30 more columns in the main one
        main = {m: {g: v for g, v in groups.items() if not is_label_efficiency_group(g)}
                for m, groups in summary.items()}
        markdown = _render_markdown(main, methods, experiment) + _markdown_label_efficiency(summary, methods)
        if failures is not None:
            markdown = markdown.replace("\n", "\n" + _markdown_failures(failures), 1)
        tmp.write_text(markdown, encoding="utf-8")
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return summary


# --------------------------------------------------------------------------- failures
def _section_failures(failures: dict) -> str:
    failed, not_run = failures["failed"], failures["not_run"]
    rows = "".join(f"<tr><td class='name'>{_e(job_label(f['rule'], f['wildcards']))}</td>"
                   f"<td class='name'>{_e(f['reason'])}</td><td class='name'>{_e(f.get('log') or '-')}</td></tr>"
                   for f in failed)
    parts = [f'<h2 class="failed">Incomplete run: {len(failed)} job(s) failed</h2>',
             "<p>Everything below comes from the jobs that finished; every job that did not need a failed one ran. "
             "Re-running the workflow re-tries the failed jobs and rebuilds this report.</p>",
             f"<table><thead><tr><th class='name'>failed job</th><th class='name'>reason</th><th class='name'>log</th>"
             f"</tr></thead><tbody>{rows}</tbody></table>"]
    if not_run:
        names = ", ".join(job_label(j["rule"], j["wildcards"]) for j in not_run)
        parts.append(f"<p class='notrun'>Not run, because they need a failed job's output: {_e(names)}</p>")
    return "".join(parts)


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _markdown_failures(failures: dict) -> str:
    lines = ["", f"**Incomplete run: {len(failures['failed'])} job(s) failed.** The tables hold what finished.", "",
             "| failed job | reason | log |", "|---|---|---|"]
    lines += [f"| {_md_cell(job_label(f['rule'], f['wildcards']))} | {_md_cell(f['reason'])} "
              f"| {_md_cell(f.get('log') or '-')} |"
              for f in failures["failed"]]
    if failures["not_run"]:
        lines += ["", "Not run, because they need a failed job's output: "
                  + ", ".join(job_label(j["rule"], j["wildcards"]) for j in failures["not_run"])]
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------- label efficiency
LE_KINDS = LABEL_EFFICIENCY_PROTOCOLS
LE_TARGET_FRACTION = 10.0  # percent of the train labels at which fine-tuning from SSL weights is judged
LE_TARGET_GAIN = 0.05  # macro AUC over fine-tuning from scratch (the untrained baseline) at that fraction
LE_COLUMNS = (("linear", "macro_auc", "linear macro AUC"), ("linear", "accuracy", "linear accuracy"),
              ("finetune", "macro_auc", "fine-tune macro AUC"), ("finetune", "accuracy", "fine-tune accuracy"),
              ("regress", "mae", "regression MAE"), ("regress", "mae_predict_train_mean", "MAE of the train mean"))


def is_label_efficiency_group(group: str) -> bool:
    """``linear@10``, ``finetune@1``, ``regress@100``: a protocol at a label fraction (ranks are never numbers)."""
    kind, sep, fraction = group.partition("@")
    if not sep or kind not in LE_KINDS:
        return False
    try:
        float(fraction)
    except ValueError:
        return False
    return True


def _load_label_efficiency(path: Path) -> dict:
    obj = _load_json_dict(path)
    protocols = obj.get("protocols")
    if not isinstance(protocols, dict) or not all(isinstance(v, dict) and isinstance(v.get("metrics"), dict)
                                                  for v in protocols.values()):
        raise ValueError(f"{path}: expected a label-efficiency result with "
                         "'protocols': {name: {'metrics': {...}}}")
    obj.setdefault("method", path.parent.name)
    return obj


def _le_fractions(summary: dict, methods: list[str]) -> list[float]:
    groups = {g for m in methods for g in summary.get(m, {}) if is_label_efficiency_group(g)}
    return sorted({float(g.partition("@")[2]) for g in groups})


def _le_cell(summary: dict, method: str, kind: str, fraction: float, metric: str) -> tuple[Any, Any]:
    values = summary.get(method, {}).get(f"{kind}@{fraction:g}", {})
    return values.get(metric), values.get(f"{metric}_std")


def _mean_std(mean: Any, std: Any) -> str:
    if not _is_scalar(mean):
        return "–"
    return _fmt(mean) + (f" ± {_fmt(std)}" if _is_scalar(std) else "")


def label_efficiency_target(summary: dict) -> dict[str, Any] | None:
    """The issue's target: at 10 % labels, fine-tuning from the best SSL method (highest finetune@10 macro AUC) at
    least +0.05 macro AUC above fine-tuning its untrained baseline (= supervised from scratch). None without results."""
    group = f"finetune@{LE_TARGET_FRACTION:g}"
    scored = [m for m in summary if baseline_of(m, summary) and _is_scalar(summary[m].get(group, {}).get("macro_auc"))]
    if not scored:
        return None
    best = max(scored, key=lambda m: summary[m][group]["macro_auc"])
    base = baseline_of(best, summary)
    auc, base_auc = summary[best][group]["macro_auc"], summary.get(base, {}).get(group, {}).get("macro_auc")
    gain = auc - base_auc if _is_scalar(base_auc) else None
    return {"method": best, "baseline": base, "macro_auc": auc, "baseline_macro_auc": base_auc, "gain": gain,
            "met": None if gain is None else gain >= LE_TARGET_GAIN - 1e-12}


def label_efficiency_target_line(target: dict[str, Any] | None) -> str:
    head = (f"At {LE_TARGET_FRACTION:g} % labels, fine-tuning from the best SSL method ≥ from scratch "
            f"+ {LE_TARGET_GAIN:g} macro AUC")
    if target is None:
        return f"{head}: n/a (no finetune@{LE_TARGET_FRACTION:g} result of a trained method)"
    if target["gain"] is None:
        return f"{head}: n/a ({target['method']} has no finetune@{LE_TARGET_FRACTION:g} result of {target['baseline']})"
    verdict = "met" if target["met"] else "not met"
    return (f"{head}: {target['method']} {target['macro_auc']:.3f} vs {target['baseline']} (from scratch) "
            f"{target['baseline_macro_auc']:.3f}, gain {target['gain']:+.3f}: {verdict}")


def _label_efficiency_plot(summary: dict, methods: list[str], fractions: list[float]) -> str:
    """Macro AUC (and regression MAE) vs label fraction, log-x; one colour per method, linear probe dashed,
    fine-tuning solid, error bars = std over seeds. Returned as an embedded <figure>."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_regress = any(_is_scalar(_le_cell(summary, m, "regress", f, "mae")[0]) for m in methods for f in fractions)
    fig, axes = plt.subplots(1, 2 if has_regress else 1, figsize=(10 if has_regress else 5.5, 4), squeeze=False)
    panels = [(axes[0, 0], (("linear", "--"), ("finetune", "-")), "macro_auc", "macro AUC (test)")]
    if has_regress:
        panels.append((axes[0, 1], (("regress", "-"),), "mae", "regression MAE (test)"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kinds, metric, ylabel in panels:
        for i, method in enumerate(methods):
            for kind, style in kinds:
                points = [(f, *_le_cell(summary, method, kind, f, metric)) for f in fractions]
                points = [(f, m, s if _is_scalar(s) else 0.0) for f, m, s in points if _is_scalar(m)]
                if points:
                    x, y, err = zip(*points)
                    ax.errorbar(x, y, yerr=err, ls=style, marker="o", ms=4, capsize=3, color=colours[i % len(colours)],
                                label=f"{method} {kind}")
        if metric == "macro_auc":
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")  # chance
        ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("labelled train images (%)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    caption = "Label efficiency: mean ± std over seeds (linear probe dashed, fine-tuning solid)"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="label efficiency">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _label_efficiency_rows(summary: dict, methods: list[str], fractions: list[float]) -> list[tuple[str, dict]]:
    rows = []
    for method in methods:
        for f in fractions:
            groups = summary.get(method, {})
            if not any(f"{k}@{f:g}" in groups for k in LE_KINDS):
                continue
            row = {"labels (%)": f"{f:g}"}
            row.update({title: _mean_std(*_le_cell(summary, method, kind, f, metric))
                        for kind, metric, title in LE_COLUMNS})
            rows.append((method, row))
    return rows


def _section_label_efficiency(summary: dict, methods: list[str]) -> str:
    fractions = _le_fractions(summary, methods)
    if not fractions:
        return ""
    le_methods = [m for m in methods if any(is_label_efficiency_group(g) for g in summary.get(m, {}))]
    parts = ["<h2>Label efficiency</h2>",
             "<p>Each method with a share of the labelled train split (stratified, seeded, nested subsets; mean ± std "
             "over seeds), scored on the test split: linear = logistic regression on the frozen embeddings "
             "(C chosen on val), fine-tune = backbone and linear head trained end to end for a fixed number of "
             "steps; fine-tuning an untrained baseline is supervised training from scratch. Regression: MAE of the "
             "regression target.</p>",
             f"<p><b>{_e(label_efficiency_target_line(label_efficiency_target(summary)))}</b></p>",
             _dict_table(_label_efficiency_rows(summary, le_methods, fractions),
                         "Label efficiency (mean ± std over seeds)"),
             _label_efficiency_plot(summary, le_methods, fractions)]
    return "".join(parts)


def _markdown_label_efficiency(summary: dict, methods: list[str]) -> str:
    fractions = _le_fractions(summary, methods)
    if not fractions:
        return ""
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    rows = _label_efficiency_rows(summary, methods, fractions)
    titles = ["labels (%)", *(title for _, _, title in LE_COLUMNS)]
    lines = ["", "Label efficiency (mean ± std over seeds, test split):", "",
             "| method | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    lines += [f"| {esc(m)} | " + " | ".join(esc(row[t]) for t in titles) + " |" for m, row in rows]
    lines += ["", esc(label_efficiency_target_line(label_efficiency_target(summary)))]
    return "\n".join(lines) + "\n"
