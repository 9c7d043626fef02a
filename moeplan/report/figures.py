"""The report's figures (matplotlib, drawn off-screen): each function returns PNG bytes, or None
when the sweep holds nothing to draw."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from moeplan.report.analysis import Measured, Sensitivity, Variant  # noqa: E402
from moeplan.spec.sweep import SweepFile, SweepRow  # noqa: E402

GiB = 2.0 ** 30
A2A_COLOURS = {"flat": "#4C72B0", "hierarchical": "#DD8452"}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(doc: SweepFile, mode: str):
    """(label, rows sorted by GPUs) per model, cluster and per-GPU batch that ran in `mode`."""
    keys = dict.fromkeys((r.model, r.cluster, r.per_gpu_batch) for r in doc.rows
                         if r.mode == mode)
    many_clusters = len(doc.clusters) > 1
    for model, cluster, batch in keys:
        rows = sorted((r for r in doc.rows if (r.model, r.cluster, r.per_gpu_batch, r.mode)
                       == (model, cluster, batch, mode) and r.feasible), key=lambda r: r.gpus)
        if rows:
            label = model + (f" / {cluster}" if many_clusters else "") + (
                f" x{batch}" if batch is not None else "")
            yield label, rows


def _gpu_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.grid(True, alpha=0.3)


def scaling(doc: SweepFile) -> bytes | None:
    """Per-token latency and per-GPU throughput against GPUs, per model (DeepSpeed-MoE Figures
    10 and 11)."""
    infer, train = list(_series(doc, "infer")), list(_series(doc, "train"))
    if not infer and not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in infer:
        left.plot([r.gpus for r in rows], [r.latency_s * 1e3 for r in rows], "o-", label=label)
    left.set_title("inference: latency per token")
    left.set_ylabel("ms per token")
    _gpu_axis(left)
    for label, rows in train:
        right.plot([r.gpus for r in rows], [r.tokens_per_s_per_gpu for r in rows], "o-",
                   label=f"{label} train")
    for label, rows in infer:
        right.plot([r.gpus for r in rows], [r.tokens_per_s_per_gpu for r in rows], "s--",
                   label=f"{label} infer")
    right.set_title("throughput per GPU")
    right.set_ylabel("tokens/s per GPU")
    right.set_yscale("log")
    _gpu_axis(right)
    for ax in (left, right):
        if ax.has_data():
            ax.legend(fontsize=7)
    return _png(fig)


def cost(doc: SweepFile) -> bytes | None:
    """Dollars (or GPU-hours, where no price is known) per million tokens against GPUs."""
    series = [(f"{label} {mode}", rows, style)
              for mode, style in (("train", "o-"), ("infer", "s--"))
              for label, rows in _series(doc, mode)]
    if not series:
        return None
    priced = all(r.usd_per_m_tokens is not None for _, rows, _ in series for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows, style in series:
        y = [r.usd_per_m_tokens if priced else r.gpu_hours_per_m_tokens for r in rows]
        ax.plot([r.gpus for r in rows], y, style, label=label)
    ax.set_ylabel("$ per million tokens" if priced else "GPU-hours per million tokens")
    ax.set_yscale("log")
    ax.set_title("cost per million tokens (trained or generated)")
    _gpu_axis(ax)
    ax.legend(fontsize=7)
    return _png(fig)


def _name(r: SweepRow) -> str:
    return f"{r.model} {r.mode} {r.gpus} GPUs"


def memory(rows: list[SweepRow], usable: dict[str, float]) -> bytes | None:
    """Each recommended plan's memory per GPU by term, against the GPU's usable memory."""
    rows = [r for r in rows if r.plan is not None]
    if not rows:
        return None
    terms = sorted({k for r in rows for k in r.plan.predicted.memory_breakdown_bytes})
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    cmap = plt.get_cmap("tab20")
    for j, term in enumerate(terms):
        vals = [r.plan.predicted.memory_breakdown_bytes.get(term, 0.0) / GiB for r in rows]
        ax.barh(range(len(rows)), vals, left=left, label=term.replace("_", " "), color=cmap(j))
        left = [a + b for a, b in zip(left, vals)]
    for i, r in enumerate(rows):
        ax.plot([usable[r.cluster] / GiB] * 2, [i - 0.4, i + 0.4], "k-", lw=2)
    ax.set_yticks(range(len(rows)), [_name(r) for r in rows], fontsize=8)
    ax.set_xlabel("GiB per GPU (black: usable memory)")
    ax.set_title("memory per GPU of the recommended plans")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def layers(rows: list[SweepRow]) -> bytes | None:
    """Each recommended MoE plan's expert degrees per layer, coloured by all-to-all algorithm."""
    rows = [r for r in rows if r.plan is not None and any(l.kind == "moe" for l in r.plan.layers)]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), squeeze=False)
    for ax, r in zip(axes[:, 0], rows):
        moe = [l for l in r.plan.layers if l.kind == "moe"]
        ax.bar([l.index for l in moe], [l.ep for l in moe],
               color=[A2A_COLOURS[l.a2a] for l in moe])
        for l in moe:
            ax.annotate(f"es{l.es}\nedp{l.edp}", (l.index, l.ep), ha="center", va="bottom",
                        fontsize=6)
        ax.set_ylabel("ep")
        ax.set_title(f"{_name(r)}: tp={r.plan.parallel.tp} (orange: hierarchical all-to-all, "
                     "blue: flat)", fontsize=8)
        ax.set_xlim(0, len(r.plan.layers) + 1)
        ax.set_ylim(0, max(l.ep for l in moe) * 1.5)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    return _png(fig)


def pareto(doc: SweepFile, front: list[SweepRow]) -> bytes | None:
    """Every inference point: latency against per-GPU throughput, with the front."""
    pts = [r for r in doc.rows if r.mode == "infer" and r.feasible]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in dict.fromkeys(r.model for r in pts):
        mine = [r for r in pts if r.model == model]
        dots = ax.scatter([r.latency_s * 1e3 for r in mine],
                          [r.tokens_per_s_per_gpu for r in mine], label=model, s=18)
        edge = [r for r in front if r.model == model]
        ax.plot([r.latency_s * 1e3 for r in edge], [r.tokens_per_s_per_gpu for r in edge], "-",
                lw=1, color=dots.get_facecolor()[0])
    ax.set_xlabel("ms per token")
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title("inference: latency against throughput per GPU (lines: each model's front)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def variants(items: list[Variant], baseline: str | None) -> bytes | None:
    """GPU-hours per million tokens of each model's recommended point, by mode."""
    if not items:
        return None
    modes = [m for m in ("train", "infer") if any(v.row.mode == m for v in items)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        mine = [v for v in items if v.row.mode == mode]
        ax.bar(range(len(mine)), [v.row.gpu_hours_per_m_tokens for v in mine],
               color=["#555555" if v.row.model == baseline else "#4C72B0" for v in mine])
        ax.set_xticks(range(len(mine)), [f"{v.row.model}\n{v.row.gpus} GPUs" for v in mine],
                      fontsize=7)
        for i, v in enumerate(mine):
            if v.vs_baseline is not None and v.row.model != baseline:
                ax.annotate(f"{v.vs_baseline:.2f}x", (i, v.row.gpu_hours_per_m_tokens),
                            ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("GPU-hours per million tokens")
        ax.set_title(f"{mode}" + (f" (grey: baseline {baseline})" if baseline else ""))
    return _png(fig)


def sensitivity(items: list[Sensitivity]) -> bytes | None:
    """How far each recommended point's time moves when a constant group moves ±20%."""
    if not items:
        return None
    points = list(dict.fromkeys(id(s.row) for s in items))
    fig, axes = plt.subplots(len(points), 1, figsize=(7, 1.6 * len(points) + 0.6),
                             squeeze=False)
    for ax, pid in zip(axes[:, 0], points):
        mine = [s for s in items if id(s.row) == pid]
        knobs = list(dict.fromkeys(s.knob for s in mine))
        for y, knob in enumerate(knobs):
            for s in (x for x in mine if x.knob == knob):
                colour = "#4C72B0" if s.factor < 1 else "#DD8452"
                width = (s.change or 0.0) * 100
                ax.barh(y, width, color=colour, hatch="" if s.same_plan else "//")
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(knobs)), knobs, fontsize=7)
        ax.set_title(f"{_name(mine[0].row)}: blue -20%, orange +20%, hatched: the plan changes",
                     fontsize=8)
    axes[-1, 0].set_xlabel("change of step time / latency (%)")
    fig.tight_layout()
    return _png(fig)


def runs(items: list[Measured]) -> bytes | None:
    """Predicted against measured, for the runs passed."""
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(5, 5))
    xs = [m.measured_s * 1e3 for m in items]
    ys = [m.predicted_s * 1e3 for m in items]
    ax.scatter(xs, ys)
    lo, hi = min(xs + ys) * 0.8, max(xs + ys) * 1.25
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured (ms per step or token)")
    ax.set_ylabel("predicted (ms)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _png(fig)

