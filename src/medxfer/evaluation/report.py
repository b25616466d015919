"""The run report: one self-contained ``report.html`` (figures as base64 PNG data URIs, no external
CSS, JS or fonts; opens offline) plus every figure as a PNG in ``RUN_DIR/plots/``.

Usage::

    from medxfer.evaluation.report import write_report
    write_report("runs/breast")               # -> runs/breast/report.html

    medxfer report runs/breast [--no-gradcam] [--data PATH]

Everything comes from the run directory (config.yaml, model.json, metrics.json, history.csv,
predictions.csv). Two things are recomputed: the uncalibrated probabilities for the "before"
reliability diagram, exactly, as softmax(T log p) of the calibrated ones (the per-row constant of
the logits cancels), and the Grad-CAM gallery, which needs the test images: rebuilt from the run's
data with the training preprocessing (or passed as ``test_images``). Patient identifiers never
appear: images are named by ``sample_id``; patients are only counted.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import os
import re
from pathlib import Path

import numpy as np

from medxfer import runs
from medxfer.errors import MedxferError
from medxfer.evaluation import plots
from medxfer.evaluation.calibration import apply_temperature, reliability_curve

__all__ = ["load_test_images", "write_report"]

GALLERY_PER_GROUP = 4
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5em 2em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #d8dee8;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1em}th,td{border:1px solid #d8dee8;padding:.25em .7em;text-align:left}
th{background:#f1f4f8}td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}figure{margin:.8em 0;display:table}
figure img{max-width:100%;border:1px solid #e4e8ee}figcaption{display:table-caption;caption-side:bottom;
font-size:.85em;color:#4a5568;padding-top:.3em}.note{background:#fff8e1;border-left:4px solid #f0b400;
padding:.5em .8em;margin:.8em 0}.muted{color:#6b7585;font-size:.9em}code{background:#f1f4f8;padding:0 .25em}
"""
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.images, bad = 0;
  for (var i = 0; i < imgs.length; i++) { if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { bad++; } }
  document.body.setAttribute('data-figures', bad ? 'broken ' + bad : 'ok ' + imgs.length);
});
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else _esc(v)


def _ci(m: dict, key: str) -> str:
    v, ci = m.get(key), m.get(f"{key}_ci")
    return _f(v) + (f" <span class='muted'>({ci[0]:.3f}–{ci[1]:.3f})</span>" if ci else "")


def _table(header: list[str] | None, rows: list[list], num_from: int = 1) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td{' class=num' if j >= num_from else ''}>{c}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


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
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        alt = re.sub(r"<[^>]+>", "", caption)
        return (f"<figure><img src=\"{uri}\" alt=\"{_esc(alt)}\">"
                f"<figcaption>{caption}</figcaption></figure>")


def _class_arrays(pred_df, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {name: i for i, name in enumerate(labels)}
    y = np.array([index[str(v)] for v in pred_df["label"]], dtype=int)
    probs = pred_df[[f"prob_{c}" for c in labels]].to_numpy(dtype=float)
    return y, probs


def _decide(probs: np.ndarray, pos: int | None, threshold: float | None) -> np.ndarray:
    if probs.shape[1] == 2 and pos is not None and threshold is not None:
        return np.where(probs[:, pos] >= threshold, pos, 1 - pos)
    return probs.argmax(1)


def _uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z) from p = softmax(z / T): log p = z / T - c, so softmax(T log p) = softmax(z)."""
    return apply_temperature(np.log(np.clip(probs, 1e-300, None)), 1.0 / temperature)


def _binary_rates(cm) -> dict:
    (tn, fp), (fn, tp) = np.asarray(cm)

    def div(a, b):
        return float(a / b) if b else None

    sens, spec = div(tp, tp + fn), div(tn, tn + fp)
    return {"sensitivity": sens, "specificity": spec, "ppv": div(tp, tp + fp), "npv": div(tn, tn + fn),
            "f1": div(2 * tp, 2 * tp + fp + fn), "accuracy": div(tp + tn, tn + fp + fn + tp),
            "balanced_accuracy": (sens + spec) / 2 if sens is not None and spec is not None else None}


def _confusion(y, pred, k, pos=None) -> np.ndarray:
    """Rows true, columns predicted; a binary run puts the positive class second."""
    order = list(range(k)) if pos is None or k != 2 else [1 - pos, pos]
    cm = np.zeros((k, k), int)
    for t, p in zip(y, pred):
        cm[order.index(t), order.index(p)] += 1
    return cm


def load_test_images(run: dict, data: str | None = None):
    """The run's test images (uint8, aligned with the test rows of predictions.csv), rebuilt from
    its data with the training preprocessing. ``data`` overrides config.yaml's data path."""
    import dataclasses

    from medxfer.config import TrainConfig, config_from_dict
    from medxfer.pipeline import prepare_data

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    d = {k: v for k, v in run["config"].items() if k in known}
    if data is not None:
        d["data"] = str(data)
    # training checked duplicates and made the split; here images are only looked up by sample_id
    d.update({k: v for k, v in (("duplicates", "allow"), ("split_file", None)) if k in known})
    if not Path(d["data"]).exists():
        raise MedxferError(f"the run's data '{d['data']}' is not there (config.yaml paths are relative to where "
                           "'medxfer train' ran). Run the report from there, pass --data PATH, or --no-gradcam.")
    cfg = config_from_dict(d)
    manifest, images, *_ = prepare_data(cfg, int(run["config"]["image_size"]), log=lambda *a, **k: None)
    row = {sid: i for i, sid in enumerate(manifest.table["sample_id"].astype(str))}
    test_ids = run["predictions"].query("split == 'test'")["sample_id"].astype(str)
    missing = [s for s in test_ids if s not in row]
    if missing:
        raise MedxferError(f"the data '{d['data']}' no longer matches the run: test sample '{missing[0]}' "
                           f"({len(missing)} in all) is not in it. Pass --data with the run's data, or --no-gradcam.")
    return images[np.array([row[s] for s in test_ids])]


def _gallery(run, figs, labels, y, probs, pred, ids, test_images) -> str:
    from medxfer.explain import default_layer, explain_images, feature_map_size, overlay
    from medxfer.models.adapt import load_run_model

    if len(test_images) != len(ids):
        raise MedxferError(f"{len(test_images)} test images were given for the {len(ids)} test rows of predictions.csv.")
    model, meta = load_run_model(run["dir"])
    layer, size = feature_map_size(model, meta)
    picks = {}
    for c, name in enumerate(labels):
        right = np.flatnonzero((y == c) & (pred == c))
        wrong = np.flatnonzero((y == c) & (pred != c))
        picks[c] = (right[np.argsort(-probs[right, c], kind="stable")][:GALLERY_PER_GROUP],
                    wrong[np.argsort(probs[wrong, c], kind="stable")][:GALLERY_PER_GROUP])
    chosen = np.unique(np.concatenate([np.concatenate(p) for p in picks.values()])).astype(int)
    maps = dict(zip(chosen.tolist(), explain_images(model, meta, test_images[chosen], layer=layer,
                                                    target_class=pred[chosen]))) if len(chosen) else {}
    imgs = np.asarray(test_images)
    px = int(meta["image_size"])
    coarse = (f"At {px} px the Grad-CAM layer <code>{_esc(layer)}</code> has a {size[0]}×{size[1]} map: one cell "
              f"covers about {px // max(size[0], 1)} px" + (", so the maps are coarse and show where, not what."
                                                             if min(size) < 8 else "."))
    last = default_layer(model.net)
    if layer != last:
        _, last_size = feature_map_size(model, meta, last)
        coarse += (f" The last stage <code>{_esc(last)}</code> gives only {last_size[0]}×{last_size[1]} at this size, "
                   "so the last stage at least 4 cells wide is used; <code>medxfer explain RUN IMAGE --layer "
                   f"{_esc(last)}</code> shows the last stage.")
    parts = [f"<p class='note'>{coarse}</p>",
             "<p>Maps explain the <em>predicted</em> class (red: strongest evidence). Per true class: the most "
             "confident correct predictions and the most confident mistakes (lowest probability of the true "
             "class), up to four each.</p>"]
    for c, name in enumerate(labels):
        rows = []
        for kind, idx in (("correct", picks[c][0]), ("wrong", picks[c][1])):
            tiles = [(overlay(imgs[i], maps[int(i)]),
                      f"{ids[i]}\npred {labels[pred[i]]} P={probs[i, pred[i]]:.2f}") for i in idx]
            rows.append((f"true {name}: {kind}", tiles))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
        parts.append(figs(f"gradcam_{safe}", plots.gallery_figure(rows, GALLERY_PER_GROUP),
                          f"Grad-CAM, true class <b>{_esc(name)}</b> (test split). Most confident correct: "
                          f"{_ids(ids, picks[c][0])}; most confident wrong: {_ids(ids, picks[c][1])}."))
    return "\n".join(parts)


def _ids(ids, idx) -> str:
    return ", ".join(f"<code>{_esc(ids[i])}</code>" for i in idx) or "none"


def write_report(run_dir: str | Path, *, gradcam: bool = True, test_images=None, data: str | None = None,
                 log=None) -> Path:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/plots/*.png``; returns the report's path.

    ``test_images``: uint8 (N_test, C, S, S) aligned with the test rows of predictions.csv (what
    ``train`` holds at its end); without it the gallery rebuilds them from the run's data (``data``
    overrides its path). When the images cannot be had, the report says why in place of the gallery.
    """
    run = runs.read_run(run_dir)
    if run["predictions"] is None:
        raise MedxferError(f"'{run_dir}' has no predictions.csv; re-run 'medxfer train' to make a full run.")
    log = log or (lambda *a, **k: None)
    run_dir = Path(run_dir)
    cfg, meta, metrics = run["config"], run["model"], run["metrics"]
    labels = [str(x) for x in meta["labels"]]
    k = len(labels)
    pos = labels.index(meta["positive_label"]) if k == 2 and meta.get("positive_label") in labels else (1 if k == 2 else None)
    threshold = metrics.get("threshold", meta.get("threshold"))
    if k == 2 and threshold is None:
        threshold = 0.5
    temperature = float(metrics.get("temperature") or meta.get("temperature") or 1.0)
    figs = _Figures(run_dir / "plots")
    pred_df = run["predictions"]
    test = pred_df[pred_df["split"] == "test"].reset_index(drop=True)
    y, probs = _class_arrays(test, labels)
    pred = _decide(probs, pos, threshold)
    sections = []

    # data
    res = cfg.get("resolved", {})
    counts = res.get("data", {}).get("counts", {})
    has_pat = any("patients" in v for v in counts.values())
    rows = [[_esc(s), *(v.get("per_class", {}).get(c, 0) for c in labels), v.get("n", 0)]
            + ([v.get("patients", "–")] if has_pat else []) for s, v in counts.items()]
    data_html = _table(["split", *labels, "images"] + (["patients"] if has_pat else []), rows)
    data_html += f"<p>Source of the images: <code>{_esc(res.get('data', {}).get('origin', cfg.get('data')))}</code>."
    if run["skipped"] is not None:
        data_html += f" {len(run['skipped'])} unreadable samples were skipped (skipped.csv)."
    dup = run.get("duplicates")
    if dup is not None and len(dup):
        dropped = int((dup["action"] != "kept").sum())
        data_html += (f" {dup['group'].nunique()} groups of identical images spanned two splits: "
                      + (f"{dropped} copies were dropped from train/val, val and test kept as given"
                         if dropped else "all copies were kept (--duplicates allow): test metrics may be optimistic")
                      + " (duplicates.csv).")
    data_html += "</p>" + "".join(f"<p class='muted'>{_esc(n)}</p>" for n in res.get("data", {}).get("notes", []))
    sections.append(("data", "Data", data_html))

    # source and strategy
    src, inp = res.get("source", {}), res.get("input", {})
    kv = [("source", f"{src.get('name', metrics.get('source'))} ({src.get('domain', '?')})"),
          ("architecture", src.get("arch", meta.get("arch"))), ("weights", src.get("weights")),
          ("weights SHA-256", (src.get("weights_sha256") or "–")[:16]),
          ("strategy", cfg.get("strategy")), ("learning rate", cfg.get("lr")),
          ("epochs (run / best)", f"{metrics.get('epochs_run', cfg.get('epochs'))} / {metrics.get('best_epoch')}"),
          ("batch size / augmentation", f"{cfg.get('batch_size')} / {cfg.get('augment')}"),
          ("input contract", f"{meta['image_size']} px, {inp.get('data_channels', meta.get('data_chans'))} data channel(s) "
                             f"-> {inp.get('model_channels', meta.get('in_chans'))} model channel(s) "
                             f"({inp.get('grey_mode', meta.get('grey_mode'))}), mean {meta.get('mean')} std {meta.get('std')}"),
          ("calibration", f"temperature {temperature:.3f} (fitted on validation)" if cfg.get("calibrate") != "none"
           else "none"),
          ("operating point", f"{cfg.get('threshold')} on validation -> threshold {_f(threshold)} on "
                              f"P({labels[pos]})" if pos is not None else "argmax"),
          ("train time", f"{metrics.get('train_seconds')} s ({metrics.get('train_images_per_s')} images/s)"),
          ("seed / torch", f"{cfg.get('seed')} / {res.get('torch', '?')}")]
    sections.append(("source", "Source and strategy", _table(None, [[f"<b>{_esc(a)}</b>", _esc(b)] for a, b in kv], 9)))

    # training curves
    hist = run["history"]
    if hist is not None and len(hist):
        body = figs("training_curves", plots.training_figure(hist),
                    "Training and validation loss, validation AUC per epoch; the best epoch's weights were kept.")
    else:
        body = "<p>No history.csv in this run.</p>"
    sections.append(("training", "Training curves", body))

    # ROC / PR
    thr = threshold if k == 2 else None
    body = "<div class='row'>" + figs("roc", plots.roc_figure(y, probs, labels, pos, thr),
                "ROC on the test split" + (f"; circle: the operating point (threshold {threshold:.3g}, chosen on "
                                            "validation), cross: argmax." if thr is not None else ", one-vs-rest."))
    body += figs("pr", plots.pr_figure(y, probs, labels, pos, thr),
                 "Precision-recall on the test split; dotted: prevalence (a useless model's precision).") + "</div>"
    sections.append(("roc", "ROC and precision-recall", body))

    # confusion
    if k == 2:
        mats = [(f"threshold {threshold:.3g}", _confusion(y, pred, k, pos)),
                ("argmax", _confusion(y, probs.argmax(1), k, pos))]
        cm_labels = [labels[1 - pos], labels[pos]]
    else:
        mats, cm_labels = [("argmax", _confusion(y, pred, k))], labels
    sections.append(("confusion", "Confusion matrix", figs(
        "confusion_matrix", plots.confusion_figure(mats, cm_labels),
        "Test split; rows: true class, columns: predicted; counts and fraction of the row.")))

    # calibration
    before = reliability_curve(y, _uncalibrated(probs, temperature))
    after = reliability_curve(y, probs)
    body = figs("reliability", plots.reliability_figure([("before temperature scaling", before),
                                                         (f"after (T = {temperature:.3f})", after)]),
                "Reliability on the test split before temperature scaling (softmax of the raw logits) and after "
                f"(T = {temperature:.3f}, fitted on validation): accuracy of the predicted class per confidence bin "
                "(15 bins); bars below the diagonal are over-confident.")
    sections.append(("calibration", "Calibration", body))

    # metrics
    t, v = metrics.get("test", {}), metrics.get("val", {})
    ece = {"ece": f"{_f(before['ece'])} before, {_f(after['ece'])} after"}
    if k == 2:
        arg = _binary_rates(_confusion(y, probs.argmax(1), k, pos))
        names = [("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"),
                 ("f1", "F1"), ("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy")]
        op = _table(["metric", f"test at threshold {threshold:.3g} (95% CI)", "test argmax", "validation at threshold"],
                    [[n, _ci(t, key), _f(arg[key]), _f(v.get(key))] for key, n in names])
        rank = _table(["metric", "test (95% CI)", "validation"],
                      [[n, _ci(t, key), _f(v.get(key))] for key, n in
                       (("auc", "AUC"), ("average_precision", "average precision"), ("brier", "Brier score"))]
                      + [["ECE (test, 15 bins)", ece["ece"], _f(v.get("ece"))]])
        body = (f"<p>Positive class: <b>{_esc(labels[pos])}</b>. Threshold rule <code>{_esc(cfg.get('threshold'))}"
                "</code> applied on validation; the argmax column is the 0.5 rule for comparison.</p>" + op + rank)
    else:
        body = _table(["metric", "test (95% CI)", "validation"],
                      [[n, _ci(t, key), _f(v.get(key))] for key, n in
                       (("auc", "macro AUC (one-vs-rest)"), ("accuracy", "accuracy"),
                        ("balanced_accuracy", "balanced accuracy"), ("f1", "macro F1"), ("brier", "Brier score"))]
                      + [["ECE (test, 15 bins)", ece["ece"], _f(v.get("ece"))]])
        per_t, per_v = t.get("per_class_auc", {}), v.get("per_class_auc", {})
        body += "<h3>Per class (one-vs-rest)</h3>" + _table(
            ["class", "test AUC", "validation AUC", "test images"],
            [[_esc(c), _f(per_t.get(c)), _f(per_v.get(c)), t.get("n_per_class", {}).get(c, "–")] for c in labels])
    if t.get("n_bootstrap"):
        body += (f"<p class='muted'>95% percentile bootstrap intervals, {t['n_bootstrap']} resamples by "
                 f"{_esc(t.get('bootstrap_unit', 'image'))}; the ECE and the argmax metrics have none.</p>")
    sections.append(("metrics", "Metrics", body))

    # Grad-CAM
    if gradcam:
        try:
            if test_images is None:
                test_images = load_test_images(run, data)
            body = _gallery(run, figs, labels, y, probs, pred, test["sample_id"].astype(str).tolist(),
                            test_images)
        except MedxferError as e:
            log(f"report: no Grad-CAM gallery ({e})")
            body = f"<p class='note'>No Grad-CAM gallery: {_esc(e)}</p>"
    else:
        body = "<p class='muted'>Grad-CAM gallery not requested (--no-gradcam).</p>"
    sections.append(("gradcam", "Grad-CAM gallery", body))

    out = run_dir / "report.html"
    runs.write_text(out, _page(run_dir.name, cfg, metrics, labels, sections))
    return out


def _page(name, cfg, metrics, labels, sections) -> str:
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    t = metrics.get("test", {})
    headline = f"test AUC {_f(t.get('auc'))}" + (f" (95% CI {t['auc_ci'][0]:.3f}–{t['auc_ci'][1]:.3f})"
                                                 if t.get("auc_ci") else "")
    nav = " · ".join(f"<a href='#{sid}'>{_esc(title)}</a>" for sid, title, _ in sections)
    body = "\n".join(f"<section id='{sid}'><h2>{_esc(title)}</h2>\n{html_}</section>" for sid, title, html_ in sections)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>medxfer report: {_esc(name)}</title><style>{_CSS}</style></head>\n<body data-figures='pending'>\n"
            f"<h1>medxfer report: {_esc(name)}</h1>\n<p>{_esc(cfg.get('strategy'))} from "
            f"<b>{_esc(metrics.get('source'))}</b>, classes {_esc(', '.join(labels))}: <b>{headline}</b>. "
            f"<span class='muted'>Written {when}.</span></p>\n<p class='muted'>{nav}</p>\n{body}\n"
            f"<script>{_SCRIPT}</script>\n</body></html>\n")
