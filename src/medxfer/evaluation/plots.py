"""The report's figures: training curves, ROC / PR with the operating point, confusion matrices,
reliability diagrams, Grad-CAM galleries.

Usage::

    from medxfer.evaluation import plots

    fig = plots.roc_figure(y_test, probs_test, ["malignant", "benign"], positive=0, threshold=0.31)
    png = plots.to_png(fig)                      # bytes

Every function returns a :class:`matplotlib.figure.Figure` made without pyplot (Agg canvas), so
nothing global changes and no display is needed.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

__all__ = ["confusion_figure", "gallery_figure", "learning_curve_figure", "pr_figure", "reliability_figure",
           "roc_figure", "strategies_figure", "to_png", "training_figure"]

_OP_STYLE = dict(marker="o", markersize=9, markerfacecolor="none", markeredgewidth=2, linestyle="none")


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def training_figure(history, best_epoch: int | None = None, select: str | None = None) -> Figure:
    """Train / validation loss and validation AUC per epoch (``history.csv``). ``best_epoch``: the epoch the
    run kept (``metrics.json``), chosen by ``select``; marked on both panels. Without it, nothing is marked."""
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax_loss, ax_auc = fig.subplots(1, 2)
    epochs = history["epoch"].to_numpy() if "epoch" in history else np.arange(1, len(history) + 1)
    style = dict(marker="o", markersize=3) if len(history) < 30 else {}
    for col, name in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        if col in history and history[col].notna().any():
            ax_loss.plot(epochs, history[col], label=name, **style)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no loss recorded\n(closed-form head)", ha="center", va="center",
                     transform=ax_loss.transAxes, fontsize=9)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    kept = [i for i, e in enumerate(epochs) if best_epoch is not None and int(e) == int(best_epoch)]
    label = f"kept: epoch {best_epoch}" + (f" (by {select})" if select else "")
    if kept and "val_loss" in history and history["val_loss"].notna().iloc[kept[0]]:
        ax_loss.plot([epochs[kept[0]]], [history["val_loss"].iloc[kept[0]]], color="C3", **_OP_STYLE, label=label)
        ax_loss.legend(fontsize=8)
    if "val_auc" in history and history["val_auc"].notna().any():
        ax_auc.plot(epochs, history["val_auc"], color="C2", **style)
        if kept and history["val_auc"].notna().iloc[kept[0]]:
            ax_auc.plot([epochs[kept[0]]], [history["val_auc"].iloc[kept[0]]], color="C3", **_OP_STYLE, label=label)
            ax_auc.legend(fontsize=8)
    ax_auc.set(xlabel="epoch", ylabel="AUC", title="Validation AUC")
    for ax in (ax_loss, ax_auc):
        ax.grid(alpha=0.3)
        if len(epochs) and float(np.max(epochs)) <= 20:
            ax.set_xticks(epochs)
    return fig


def _binary_point(is_pos, score, threshold):
    pred = score >= threshold
    tp, fp = int((pred & is_pos).sum()), int((pred & ~is_pos).sum())
    n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
    sens = tp / n_pos if n_pos else np.nan
    fpr = fp / n_neg if n_neg else np.nan
    ppv = tp / (tp + fp) if tp + fp else np.nan
    return sens, fpr, ppv


def _ovr(y, probs, labels, positive):
    """(name, is_pos, score) per curve: the positive class for a binary run, every class otherwise."""
    k = probs.shape[1]
    classes = [positive if positive is not None else 1] if k == 2 else range(k)
    return [(labels[c], y == c, probs[:, c]) for c in classes]


def roc_figure(y, probs, labels, positive: int | None = None, threshold: float | None = None) -> Figure:
    """ROC curve(s) with AUC; a binary run marks its operating point (threshold) and the argmax."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    fig = Figure(figsize=(4.6, 4.3), layout="constrained")
    ax = fig.subplots()
    for i, (name, is_pos, s) in enumerate(_ovr(y, probs, labels, positive)):
        if 0 < is_pos.sum() < len(y):
            fpr, tpr, _ = roc_curve(is_pos, s)
            ax.plot(fpr, tpr, color=f"C{i}", label=f"{name} (AUC {roc_auc_score(is_pos, s):.3f})")
        if probs.shape[1] == 2 and threshold is not None:
            sens, fpr_t, _ = _binary_point(is_pos, s, threshold)
            ax.plot([fpr_t], [sens], color="C3", **_OP_STYLE, label=f"threshold {threshold:.3g}")
            sens, fpr_a, _ = _binary_point(is_pos, s, 0.5)
            ax.plot([fpr_a], [sens], color="0.3", marker="x", markersize=8, linestyle="none", label="argmax (0.5)")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="ROC" + (f" (positive: {labels[positive]})" if probs.shape[1] == 2 else " (one-vs-rest)"))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def pr_figure(y, probs, labels, positive: int | None = None, threshold: float | None = None) -> Figure:
    """Precision-recall curve(s) with average precision and the prevalence baseline."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    fig = Figure(figsize=(4.6, 4.3), layout="constrained")
    ax = fig.subplots()
    for i, (name, is_pos, s) in enumerate(_ovr(y, probs, labels, positive)):
        if is_pos.any():
            prec, rec, _ = precision_recall_curve(is_pos, s)
            ax.plot(rec, prec, color=f"C{i}", label=f"{name} (AP {average_precision_score(is_pos, s):.3f})")
            ax.axhline(is_pos.mean(), color=f"C{i}", linestyle=":", linewidth=1)
        if probs.shape[1] == 2 and threshold is not None:
            sens, _, ppv = _binary_point(is_pos, s, threshold)
            ax.plot([sens], [ppv], color="C3", **_OP_STYLE, label=f"threshold {threshold:.3g}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title="Precision-recall" + ("" if probs.shape[1] == 2 else " (one-vs-rest)"))
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def _matrix(ax, cm, labels, title):
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm, dtype=float), where=rows > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=9,
                    color="white" if frac[i, j] > 0.6 else "black")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=30 if len(labels) > 2 else 0, fontsize=8)
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title)


def confusion_figure(matrices: list[tuple[str, list]], labels) -> Figure:
    """Confusion matrices (rows: true, columns: predicted; counts and row fractions), side by side."""
    n = len(matrices)
    side = 1.0 + 0.9 * len(labels)
    fig = Figure(figsize=(max(3.8, side) * n, max(3.4, side)), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, (title, cm) in zip(axes, matrices):
        _matrix(ax, cm, labels, title)
    return fig


def reliability_figure(curves: list[tuple[str, dict]]) -> Figure:
    """Reliability diagrams (accuracy of the argmax vs its confidence, per bin) from
    :func:`medxfer.evaluation.calibration.reliability_curve`, one panel per curve."""
    fig = Figure(figsize=(4.2 * len(curves), 4.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (title, c) in zip(axes, curves):
        edges = np.asarray(c["bin_edges"])
        full = [i for i, n in enumerate(c["counts"]) if n]
        left, width = edges[:-1], np.diff(edges)
        ax.bar(left[full], [c["accuracy"][i] for i in full], width=width[full], align="edge", color="C0",
               alpha=0.7, edgecolor="C0", label="accuracy")
        ax.plot([c["confidence"][i] for i in full], [c["accuracy"][i] for i in full], "o", color="C1",
                markersize=4, label="bin (confidence, accuracy)")
        ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=1, label="perfect calibration")
        ece = c.get("ece")
        ax.set(xlabel="confidence (max probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1.02),
               title=f"{title}\nECE {ece:.3f}" if ece is not None else title)
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    return fig


def gallery_figure(rows: list[tuple[str, list[tuple[np.ndarray, str]]]], columns: int = 4) -> Figure:
    """A grid of Grad-CAM overlays: one row per (row title, [(RGB image (S, S, 3), caption), ...])."""
    aspect = max([t[0].shape[1] / t[0].shape[0] for _, tiles in rows for t in tiles] or [1.0])  # volumes: 3 planes
    fig = Figure(figsize=(2.2 * columns * min(aspect, 1.6) + 0.4, (2.2 / max(aspect / 1.6, 1.0) + 0.55) * len(rows)),
                 layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(rows), columns, squeeze=False))
    for r, (title, tiles) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(tiles):
                img, caption = tiles[c]
                ax.imshow(img, interpolation="nearest")
                ax.set_title(caption, fontsize=7)
            else:
                for side in ax.spines.values():
                    side.set_visible(False)
                if c == 0:
                    ax.text(0.5, 0.5, "no such test image", ha="center", va="center", transform=ax.transAxes, color="0.5")
            if c == 0:
                ax.set_ylabel(title, fontsize=9)
    return fig


def strategies_figure(result: dict) -> Figure:
    """Test AUC per strategy of a comparison: one point per seed, mean ± sd as a bar."""
    strategies = list(result["strategies"])
    fig = Figure(figsize=(1.6 + 1.4 * len(strategies), 3.6), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for i, s in enumerate(strategies):
        summ = result["strategies"][s]["test_auc"]
        vals = [v for v in summ["values"] if v is not None]
        if summ["mean"] is not None:
            ax.bar(i, summ["mean"], width=0.6, color="#c6dbef", edgecolor="#4a7fb0", zorder=1)
            ax.errorbar(i, summ["mean"], yerr=summ["sd"] or 0, color="#08306b", capsize=6, lw=1.5, zorder=3)
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, color="#d94801", s=22, zorder=4,
                   label="one seed" if i == 0 else None)
    ax.set_xticks(range(len(strategies)), strategies)
    lows = [v for s in strategies for v in result["strategies"][s]["test_auc"]["values"] if v is not None]
    ax.set_ylim(max(0.0, min(lows + [0.5]) - 0.05), 1.0)
    ax.set_ylabel("test AUC")
    ax.set_title("Test AUC per strategy: seeds (points), mean ± sd (bar)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def learning_curve_figure(curve: dict) -> Figure:
    """Test AUC (mean ± sd over seeds) against the fraction of train labels, one line per strategy."""
    fig = Figure(figsize=(6, 3.8), layout="constrained")
    ax = fig.subplots()
    for i, (s, pts) in enumerate(curve.items()):
        shift = 1.03 ** (i - (len(curve) - 1) / 2)  # small offsets so the error bars do not overlap
        fs = [float(f) * shift for f in pts]
        means = [pts[f]["mean"] if pts[f]["mean"] is not None else np.nan for f in pts]
        ax.errorbar(fs, means, yerr=[pts[f]["sd"] or 0 for f in pts], marker="o", capsize=4, label=s)
    ax.set_xscale("log")
    ticks = sorted({float(f) for pts in curve.values() for f in pts})
    ax.set_xticks(ticks, [f"{f:g}" for f in ticks])
    ax.minorticks_off()
    ax.set_xlabel("fraction of train labels used (log scale)")
    ax.set_ylabel("test AUC (mean ± sd over seeds)")
    ax.set_title("Learning curve: labelled data needed per strategy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def roc_grid_figure(y, probs, labels, thresholds=None, columns: int = 4) -> Figure:
    """Multi-label: one small ROC per finding (test AUC in the title; dot: the validation threshold)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, probs = np.asarray(y) > 0.5, np.asarray(probs, dtype=float)
    k = probs.shape[1]
    rows = -(-k // columns)
    fig = Figure(figsize=(2.4 * columns, 2.3 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for j, ax in enumerate(axes):
        if j >= k:
            ax.axis("off")
            continue
        yj, pj = y[:, j], probs[:, j]
        ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=0.8)
        if 0 < yj.sum() < len(yj):
            fpr, tpr, _ = roc_curve(yj, pj)
            ax.plot(fpr, tpr, color="C0")
            title = f"{labels[j]}\nAUC {roc_auc_score(yj, pj):.3f} ({int(yj.sum())} pos.)"
            if thresholds is not None:
                sens, fpr_t, _ = _binary_point(yj, pj, float(thresholds[j]))
                ax.plot([fpr_t], [sens], color="C3", **_OP_STYLE)
        else:
            title = f"{labels[j]}\nno AUC ({int(yj.sum())} pos.)"
        ax.set_title(title, fontsize=8)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.tick_params(labelsize=6)
    return fig
