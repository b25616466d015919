"""The run report: one self-contained ``report.html`` (figures as base64 PNG data URIs, no external
CSS, JS or fonts; opens offline) plus every figure as a PNG in ``RUN_DIR/plots/``.

Usage::

    from medxfer.evaluation.report import write_report
    write_report(Run.load("runs/breast"))               # -> runs/breast/report.html

    medxfer report runs/breast [--no-gradcam] [--data PATH]

Everything comes from the run record (config.yaml, model.json, metrics.json, history.csv,
predictions.csv). Two things are recomputed: the uncalibrated probabilities for the "before"
reliability diagram, exactly, as softmax(T log p) of the calibrated ones (the per-row constant of
the logits cancels), and the Grad-CAM gallery, which needs the test images: rebuilt from the run's
data with the training preprocessing (or passed as ``test_images``). Patient identifiers never
appear: images are named by their pseudonymous ``sample_id``; patients are only counted.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
from pathlib import Path

import numpy as np

from medxfer import files
from medxfer.data.prepare import images_of
from medxfer.errors import MedxferError
from medxfer.evaluation import html, plots
from medxfer.evaluation.calibration import apply_temperature, reliability_curve
from medxfer.evaluation.decisions import decide
from medxfer.evaluation.gradcam import default_layer, explain_images, feature_map_size, overlay
from medxfer.evaluation.metrics import confusion_rates
from medxfer.evaluation.report_tasks import findings_section, ordinal_section
from medxfer.evaluation.subgroups import read_subgroups, subgroup_section
from medxfer.evaluation.tasks import label_matrix
from medxfer.runs import Run

__all__ = ["write_report"]

GALLERY_PER_GROUP = 4
log = logging.getLogger(__name__)


class _Figures:
    """Writes each figure to plots/NAME.png and returns its <figure> element with a data URI."""

    def __init__(self, plot_dir: Path):
        self.dir = plot_dir
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, fig, caption: str) -> str:
        png = plots.to_png(fig)
        tmp = self.dir / f".{name}.png.tmp"
        tmp.write_bytes(png)
        os.replace(tmp, self.dir / f"{name}.png")
        return html.figure(png, caption)


@dataclasses.dataclass
class _Test:
    """The test split as the report needs it."""

    labels: list[str]
    y: np.ndarray
    probs: np.ndarray
    pred: np.ndarray
    ids: list[str]
    pos: int | None
    threshold: float | None
    temperature: float


def _test_split(run: Run) -> _Test:
    labels = [str(x) for x in run.model.labels]
    test = run.test_predictions
    if run.model.task == "multilabel":
        probs = test[[f"prob_{c}" for c in labels]].to_numpy(dtype=float)
        return _Test(labels, label_matrix(test["label"], labels), probs, decide(probs, run.model),
                     test["sample_id"].astype(str).tolist(), None, None, 1.0)
    index = {name: i for i, name in enumerate(labels)}
    y = np.array([index[str(v)] for v in test["label"]], dtype=int)
    probs = test[[f"prob_{c}" for c in labels]].to_numpy(dtype=float)
    pos = run.model.positive_index if len(labels) == 2 else None
    if len(labels) == 2 and pos is None:
        pos = 1
    threshold = run.metrics.get("threshold", run.model.threshold)
    if len(labels) == 2 and threshold is None:
        threshold = 0.5
    meta = run.model.replace(threshold=threshold, positive_label=labels[pos] if pos is not None else None)
    return _Test(labels, y, probs, decide(probs, meta), test["sample_id"].astype(str).tolist(), pos, threshold,
                 float(run.metrics.get("temperature") or run.model.temperature or 1.0))


def _uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z) from p = softmax(z / T): log p = z / T - c, so softmax(T log p) = softmax(z)."""
    return apply_temperature(np.log(np.clip(probs, 1e-300, None)), 1.0 / temperature)


def _confusion(y, pred, k, pos=None) -> np.ndarray:
    """Rows true, columns predicted; a binary run puts the positive class second."""
    order = list(range(k)) if pos is None or k != 2 else [1 - pos, pos]
    cm = np.zeros((k, k), int)
    for t, p in zip(y, pred):
        cm[order.index(t), order.index(p)] += 1
    return cm


# ------------------------------------------------------------------------------------------ sections
def _data_section(run: Run, t: _Test) -> str:
    data = run.resolved.get("data", {})
    counts = data.get("counts", {})
    has_pat = any("patients" in v for v in counts.values())
    rows = [[html.esc(s), *(v.get("per_class", {}).get(c, 0) for c in t.labels), v.get("n", 0)]
            + ([v.get("patients", "–")] if has_pat else []) for s, v in counts.items()]
    out = html.table(["split", *t.labels, "images"] + (["patients"] if has_pat else []), rows)
    out += f"<p>Source of the images: <code>{html.esc(data.get('origin', run.config.data.path))}</code>."
    if run.skipped is not None:
        out += f" {len(run.skipped)} unreadable samples were skipped (skipped.csv)."
    dup = run.duplicates
    if dup is not None and len(dup):
        dropped = int((dup["action"] != "kept").sum())
        out += (f" {dup['group'].nunique()} groups of identical images spanned two splits: "
                + (f"{dropped} copies were dropped from train/val, val and test kept as given"
                   if dropped else "all copies were kept (--duplicates allow): test metrics may be optimistic")
                + " (duplicates.csv).")
    return out + "</p>" + "".join(f"<p class='muted'>{html.esc(n)}</p>" for n in data.get("notes", []))


def _source_section(run: Run, t: _Test) -> str:
    src, inp, meta, m, cfg = (run.resolved.get("source", {}), run.resolved.get("input", {}), run.model, run.metrics,
                              run.config)
    kv = [("source", f"{src.get('name', m.get('source'))} ({src.get('domain', '?')})"),
          ("architecture", src.get("arch", meta.arch)), ("weights", src.get("weights")),
          ("weights SHA-256", (src.get("weights_sha256") or "–")[:16]),
          ("strategy", cfg.optim.strategy), ("learning rate", run.resolved.get("lr", cfg.optim.lr)),
          ("epochs (run / best)", f"{m.get('epochs_run')} / {m.get('best_epoch')}"),
          ("batch size / augmentation", f"{cfg.optim.batch_size} / {cfg.optim.augment}"),
          ("input contract", f"{meta.image_size} px, {inp.get('data_channels', meta.data_chans)} data channel(s) "
                             f"-> {inp.get('model_channels', meta.in_chans)} model channel(s) "
                             f"({inp.get('grey_mode', meta.grey_mode)}), mean {meta.mean} std {meta.std}"),
          ("calibration", _calibration_text(run) if cfg.evaluation.calibrate != "none" else "none"),
          ("operating point", f"{cfg.evaluation.threshold} on validation -> threshold {html.num(t.threshold)} on "
                              f"P({t.labels[t.pos]})" if t.pos is not None else _decision_text(run)),
          ("train time", f"{m.get('train_seconds')} s ({m.get('train_images_per_s')} images/s)"),
          ("seed / torch", f"{cfg.optim.seed} / {run.resolved.get('torch', '?')}")]
    return html.table(None, [[f"<b>{html.esc(a)}</b>", html.esc(b)] for a, b in kv], 9)


def _calibration_text(run: Run) -> str:
    temp = run.metrics.get("temperature", run.model.temperature)
    if isinstance(temp, list):
        return f"a temperature per finding, {min(temp):.3f}–{max(temp):.3f} (fitted on validation)"
    return f"temperature {float(temp or 1.0):.3f} (fitted on validation)"


def _decision_text(run: Run) -> str:
    return {"multilabel": f"a threshold per finding ({run.config.evaluation.threshold} on validation)",
            "ordinal": "the median grade"}.get(run.model.task, "argmax")


def _curves_section(run: Run, figs: _Figures, t: _Test) -> str:
    if run.history is not None and len(run.history):
        return figs("training_curves", plots.training_figure(run.history, run.metrics.get("best_epoch"), run.config.optim.select),
                    "Training and validation loss, validation AUC per epoch; the best epoch's weights were kept.")
    return "<p>No history.csv in this run.</p>"


def _roc_section(run: Run, figs: _Figures, t: _Test) -> str:
    thr = t.threshold if len(t.labels) == 2 else None
    return ("<div class='row'>" + figs("roc", plots.roc_figure(t.y, t.probs, t.labels, t.pos, thr),
                                       "ROC on the test split" + (f"; circle: the operating point (threshold {thr:.3g}, "
                                                                  "chosen on validation), cross: argmax."
                                                                  if thr is not None else ", one-vs-rest."))
            + figs("pr", plots.pr_figure(t.y, t.probs, t.labels, t.pos, thr),
                   "Precision-recall on the test split; dotted: prevalence (a useless model's precision).") + "</div>")


def _confusion_section(run: Run, figs: _Figures, t: _Test) -> str:
    k = len(t.labels)
    if k == 2:
        mats = [(f"threshold {t.threshold:.3g}", _confusion(t.y, t.pred, k, t.pos)),
                ("argmax", _confusion(t.y, t.probs.argmax(1), k, t.pos))]
        names = [t.labels[1 - t.pos], t.labels[t.pos]]
    else:
        mats, names = [("argmax", _confusion(t.y, t.pred, k))], t.labels
    return figs("confusion_matrix", plots.confusion_figure(mats, names),
                "Test split; rows: true class, columns: predicted; counts and fraction of the row.")


def _calibration(t: _Test) -> tuple[dict, dict]:
    return reliability_curve(t.y, _uncalibrated(t.probs, t.temperature)), reliability_curve(t.y, t.probs)


def _calibration_section(run: Run, figs: _Figures, t: _Test) -> str:
    before, after = _calibration(t)
    return figs("reliability", plots.reliability_figure([("before temperature scaling", before),
                                                         (f"after (T = {t.temperature:.3f})", after)]),
                "Reliability on the test split before temperature scaling (softmax of the raw logits) and after "
                f"(T = {t.temperature:.3f}, fitted on validation): accuracy of the predicted class per confidence bin "
                "(15 bins); bars below the diagonal are over-confident.")


def _metrics_section(run: Run, t: _Test) -> str:
    test, val = run.metrics.get("test", {}), run.metrics.get("val", {})
    before, after = _calibration(t)
    ece = ["ECE (test, 15 bins)", f"{html.num(before['ece'])} before, {html.num(after['ece'])} after",
           html.num(val.get("ece"))]
    if len(t.labels) == 2:
        arg = confusion_rates(_confusion(t.y, t.probs.argmax(1), 2, t.pos))
        names = [("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"),
                 ("f1", "F1"), ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy")]
        op = html.table(["metric", f"test at threshold {t.threshold:.3g} (95% CI)", "test argmax",
                         "validation at threshold"],
                        [[n, html.with_ci(test, key), html.num(arg[key]), html.num(val.get(key))] for key, n in names])
        rank = html.table(["metric", "test (95% CI)", "validation"],
                          [[n, html.with_ci(test, key), html.num(val.get(key))] for key, n in
                           (("auc", "AUC"), ("average_precision", "average precision"), ("brier", "Brier score"))]
                          + [ece])
        body = (f"<p>Positive class: <b>{html.esc(t.labels[t.pos])}</b>. Threshold rule "
                f"<code>{html.esc(run.config.evaluation.threshold)}</code> applied on validation; the argmax column is "
                "the 0.5 rule for comparison.</p>" + op + rank)
    else:
        body = html.table(["metric", "test (95% CI)", "validation"],
                          [[n, html.with_ci(test, key), html.num(val.get(key))] for key, n in
                           (("auc", "macro AUC (one-vs-rest)"), ("accuracy", "accuracy"),
                            ("balanced_accuracy", "balanced accuracy"), ("f1", "macro F1"), ("brier", "Brier score"))]
                          + [ece])
        per_t, per_v = test.get("per_class_auc", {}), val.get("per_class_auc", {})
        body += "<h3>Per class (one-vs-rest)</h3>" + html.table(
            ["class", "test AUC", "validation AUC", "test images"],
            [[html.esc(c), html.num(per_t.get(c)), html.num(per_v.get(c)), test.get("n_per_class", {}).get(c, "–")]
             for c in t.labels])
    if test.get("n_bootstrap"):
        body += (f"<p class='muted'>95% percentile bootstrap intervals, {test['n_bootstrap']} resamples by "
                 f"{html.esc(test.get('bootstrap_unit', 'image'))}; the ECE and the argmax metrics have none.</p>")
    return body


def trust_section(run: Run) -> str | None:
    """Test's coverage per class of the conformal sets (Mondrian, and one pooled threshold for comparison) and
    the selective-prediction rows, from metrics.json; None when the run has neither."""
    test = run.metrics.get("test", {})
    c, sel = test.get("conformal"), test.get("selective")
    if not c and not sel:
        return None
    body = ""
    if c:
        marginal = {r["class"]: r for r in c.get("marginal", [])}
        body += (f"<p>Conformal prediction sets calibrated per class on validation at alpha {html.num(c['alpha'], 2)}: "
                 f"a set should hold the true class of at least {html.num(1 - c['alpha'], 2)} of each class's images, "
                 "if they are exchangeable with that class's validation images. The last column pools all classes "
                 "into one threshold (guaranteed only on average over the validation class mix).</p>")
        body += html.table(["class", "test images", "coverage (95% CI)", "mean set size", "pooled threshold: coverage"],
                           [[html.esc(r["class"]), r["n"], f"{html.num(r['coverage'])} ({html.num(r['ci'][0])}–"
                             f"{html.num(r['ci'][1])})", html.num(r["mean_set_size"], 2),
                             html.num((marginal.get(r["class"]) or {}).get("coverage"))] for r in c["by_class"]])
    if sel:
        body += (f"<h3>Referring the least certain cases</h3><p>Decision: {html.esc(sel['decision'])}. AURC "
                 f"{html.num(sel['aurc'])} (a confidence unrelated to correctness: {html.num(sel['aurc_random'])}).</p>")
        body += html.table(["kept", "images kept", "accuracy", "sensitivity"],
                           [[html.num(r["coverage"], 2), r["n_kept"], html.num(r["accuracy"]), html.num(r["sensitivity"])]
                            for r in sel["at_coverage"]])
    return body


def _gallery_section(run: Run, figs: _Figures, t: _Test, test_images) -> str:
    if len(test_images) != len(t.ids):
        raise MedxferError(f"{len(test_images)} test images were given for the {len(t.ids)} test rows of "
                           "predictions.csv.")
    model, meta = run.load_model(tta=False), run.model  # Grad-CAM explains the network itself
    layer, size = feature_map_size(model, meta)
    picks = {}
    for c in range(len(t.labels)):
        right = np.flatnonzero((t.y == c) & (t.pred == c))
        wrong = np.flatnonzero((t.y == c) & (t.pred != c))
        picks[c] = (right[np.argsort(-t.probs[right, c], kind="stable")][:GALLERY_PER_GROUP],
                    wrong[np.argsort(t.probs[wrong, c], kind="stable")][:GALLERY_PER_GROUP])
    chosen = np.unique(np.concatenate([np.concatenate(p) for p in picks.values()])).astype(int)
    maps = dict(zip(chosen.tolist(), explain_images(model, meta, test_images[chosen], layer=layer,
                                                    target_class=t.pred[chosen]))) if len(chosen) else {}
    imgs = np.asarray(test_images)
    parts = [f"<p class='note'>{_coarse_note(model, meta, layer, size)}</p>",
             "<p>Maps explain the <em>predicted</em> class (red: strongest evidence). Per true class: the most "
             "confident correct predictions and the most confident mistakes (lowest probability of the true "
             "class), up to four each.</p>"]
    for c, name in enumerate(t.labels):
        rows = []
        for kind, idx in (("correct", picks[c][0]), ("wrong", picks[c][1])):
            tiles = [(overlay(imgs[i], maps[int(i)]),
                      f"{t.ids[i]}\npred {t.labels[t.pred[i]]} P={t.probs[i, t.pred[i]]:.2f}") for i in idx]
            rows.append((f"true {name}: {kind}", tiles))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        parts.append(figs(f"gradcam_{safe}", plots.gallery_figure(rows, GALLERY_PER_GROUP),
                          f"Grad-CAM, true class <b>{html.esc(name)}</b> (test split). Most confident correct: "
                          f"{_ids(t.ids, picks[c][0])}; most confident wrong: {_ids(t.ids, picks[c][1])}."))
    return "\n".join(parts)


def _coarse_note(model, meta, layer: str, size) -> str:
    px = int(meta.image_size)
    note = (f"At {px} px the Grad-CAM layer <code>{html.esc(layer)}</code> has a {size[0]}×{size[1]} map: one cell "
            f"covers about {px // max(size[0], 1)} px" + (", so the maps are coarse and show where, not what."
                                                          if min(size) < 8 else "."))
    last = default_layer(model.net)
    if layer != last:
        _, last_size = feature_map_size(model, meta, last)
        note += (f" The last stage <code>{html.esc(last)}</code> gives only {last_size[0]}×{last_size[1]} at this "
                 "size, so the last stage at least 4 cells wide is used; <code>medxfer explain RUN IMAGE --layer "
                 f"{html.esc(last)}</code> shows the last stage.")
    return note


def _ids(ids, idx) -> str:
    return ", ".join(f"<code>{html.esc(ids[i])}</code>" for i in idx) or "none"


def _gallery_or_note(run: Run, figs: _Figures, t: _Test, gradcam: bool, test_images, data: str | None) -> str:
    if not gradcam:
        return "<p class='muted'>Grad-CAM gallery not requested (--no-gradcam).</p>"
    try:
        if test_images is None and data is None:  # the run's own test images, when it kept them all
            kept = run.check_images()
            test_images = kept if kept is not None and len(kept) == len(t.ids) else None
        if test_images is None:
            opts = run.config.data if data is None else dataclasses.replace(run.config.data, path=str(data))
            if not opts.path or not Path(opts.path).exists():
                raise MedxferError(f"the run's data '{opts.path}' is not there (config.yaml paths are relative to "
                                   "where 'medxfer train' ran). Run the report from there, pass --data PATH, or "
                                   "--no-gradcam.")
            test_images = images_of(opts, run.image_size, run.config.optim.seed, t.ids)
        return _gallery_section(run, figs, t, test_images)
    except MedxferError as e:
        log.warning("report: no Grad-CAM gallery (%s)", e)
        return f"<p class='note'>No Grad-CAM gallery: {html.esc(e)}</p>"


def write_report(run: Run | str | Path, *, gradcam: bool = True, test_images=None, data: str | None = None,
                 title: str | None = None, extra: list[tuple[str, str, str]] | None = None) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the report's path.

    ``test_images``: uint8 (N_test, C, S, S) aligned with the test rows of predictions.csv (what
    ``train`` holds at its end); without it the gallery rebuilds them from the run's data (``data``
    overrides its path). When the images cannot be had, the report says why in place of the gallery.
    ``title``: the run's name (default: its folder's); ``extra``: more sections (id, heading, HTML).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    figs, t = _Figures(run.dir / "plots"), _test_split(run)
    if run.model.task == "multilabel":
        return _write(run, title, [("data", "Data (images with each finding)", _data_section(run, t)),
                                   ("source", "Source and strategy", _source_section(run, t)),
                                   ("training", "Training curves", _curves_section(run, figs, t)),
                                   ("findings", "Per finding", findings_section(run, figs, t.y, t.probs)),
                                   ("gradcam", "Grad-CAM", "<p>Grad-CAM explains one finding at a time: <code>"
                                    "medxfer explain RUN IMAGES --class FINDING</code>.</p>")] + list(extra or []))
    sections = [("data", "Data", _data_section(run, t)),
                ("source", "Source and strategy", _source_section(run, t)),
                ("training", "Training curves", _curves_section(run, figs, t)),
                ("roc", "ROC and precision-recall", _roc_section(run, figs, t)),
                ("confusion", "Confusion matrix", _confusion_section(run, figs, t)),
                ("calibration", "Calibration", _calibration_section(run, figs, t)),
                ("metrics", "Metrics", _metrics_section(run, t)),
                ("gradcam", "Grad-CAM gallery", _gallery_or_note(run, figs, t, gradcam, test_images, data))]
    if subgroups := read_subgroups(run):
        sections.insert(7, ("subgroups", "Subgroups", subgroup_section(subgroups)))
    if run.model.task == "ordinal":
        sections.insert(7, ("ordinal", "Ordinal metrics", ordinal_section(run)))
    if trust := trust_section(run):
        sections.insert(-1, ("trust", "When not to trust a prediction", trust))
    return _write(run, title, sections + list(extra or []))


def _write(run: Run, title: str | None, sections: list) -> Path:
    test = run.metrics.get("test", {})
    headline = f"test AUC {html.num(test.get('auc'))}" + (
        f" (95% CI {test['auc_ci'][0]:.3f}–{test['auc_ci'][1]:.3f})" if test.get("auc_ci") else "")
    what = {"multilabel": "findings", "ordinal": "grades"}.get(run.model.task, "classes")
    if run.model.task == "multilabel":
        headline = headline.replace("test AUC", "test macro AUC")
    intro = (f"<p>{html.esc(run.config.optim.strategy)} from <b>{html.esc(run.metrics.get('source'))}</b>, {what} "
             f"{html.esc(', '.join(str(c) for c in run.model.labels))}: <b>{headline}</b>. "
             f"<span class='muted'>Written {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.</span></p>")
    if (run.dir / "model_card.md").is_file():
        intro += ("<p>Model card (intended use, data, metrics, limitations): "
                  "<a href='model_card.md'>model_card.md</a>.</p>")
    out = run.dir / "report.html"
    files.write_text(out, html.page(f"medxfer report: {Path(title).name if title else run.dir.name}", intro, sections))
    return out
