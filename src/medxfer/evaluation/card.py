"""The model card: ``RUN_DIR/model_card.md``, what a reader needs before putting the model to work.

Usage::

    from medxfer.evaluation.card import write_model_card
    write_model_card(Run.load("runs/breast"))            # -> runs/breast/model_card.md
    write_model_card(run, subgroups=run_subgroups(run, table))

Sections (after Mitchell et al., "Model Cards for Model Reporting", 2019): model details, intended use,
out-of-scope use, training data, evaluation (test metrics with 95% CIs at the validation-chosen
threshold, calibration), subgroup results (when given, or when the run's metrics.json holds them), and
limitations derived from the run's own data (test-set size, class balance, rare classes, duplicates,
skipped files, input size, calibration error, flagged subgroups).

Everything comes from the run record (config.yaml, model.json, metrics.json and the tables). The card
counts samples and patients and never names them: no sample id, patient id or sample file path is
written (a last check removes any that a recorded note might hold).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
from pathlib import Path

import pandas as pd

from medxfer import files
from medxfer.errors import MedxferError
from medxfer.evaluation.subgroups import flag_text, read_subgroups
from medxfer.runs import Run
from medxfer.strategies import STRATEGIES

__all__ = ["CARD_FILE", "card_text", "write_model_card", "limitations"]

CARD_FILE = "model_card.md"
#: the limits behind the "Limitations" section
WIDE_CI = 0.1            # AUC interval wider than this: the test set is too small to pin the AUC down
HIGH_ECE = 0.1           # test ECE above this: probabilities are not risks
LOW_RESOLUTION = 64      # input side in px at or below this: fine detail is lost
IMBALANCE = 2.0          # largest / smallest class in training at or above this
RARE_TEST = 10           # a class with fewer test images than this is rare
RARE_SHARE = 0.10        # ... or under this share of the training images
SMALL_VAL_POS = 30       # the threshold was chosen on fewer positive validation images than this

DOMAINS = {"none": "nothing: random initialisation (no pretraining)", "ImageNet-1k": "natural images (ImageNet-1k)"}


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(m: dict, key: str) -> str:
    """``0.842 (95% CI 0.781–0.897)``."""
    v, ci = m.get(key), m.get(f"{key}_ci")
    return _f(v) + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if v is not None and ci else "")


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _version() -> str:
    try:
        return importlib.metadata.version("medxfer")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _name(path) -> str:
    """A file's name only (config.yaml holds the full path; the card is shared further)."""
    return Path(str(path)).name if path else ""


def _origin(origin: str | None) -> str:
    if not origin:
        return "not recorded"
    kind, _, where = str(origin).partition(":")
    kinds = {"npz": "a MedMNIST-style .npz", "folder": "a folder of class folders", "table": "a CSV/Parquet manifest",
             "dicom": "a DICOM folder with a labels file", "arrays": "in-memory arrays",
             "dataframe": "an in-memory table (DataFrame)"}
    return kinds.get(kind, kind) + (f", `{_name(where)}`" if where else "")


def _groups(dup: pd.DataFrame) -> str:
    n = dup["group"].nunique() if "group" in dup else len(dup)
    return f"{n} group{'s' if n != 1 else ''}"


def _size(meta) -> str:
    """'64×64 px', or '28×28×28 voxels' for a 3-D model (with ', inflated (i3d) from 2-D')."""
    s = meta.image_size
    if getattr(meta, "spatial_dims", 2) == 3:
        return f"{s}×{s}×{s} voxels (a 3-D model, inflated from 2-D by {meta.inflate or 'i3d'})"
    return f"{s}×{s} px"


def _labels(run: Run) -> list[str]:
    return [str(c) for c in run.model.labels]


def _pos(run: Run) -> int | None:
    labels = _labels(run)
    if len(labels) != 2:
        return None
    p = run.model.positive_index
    return 1 if p is None else p


def _threshold(run: Run):
    t = run.metrics.get("threshold", run.model.threshold)
    return 0.5 if t is None and _pos(run) is not None else t


def _counts(run: Run) -> dict:
    return (run.resolved.get("data") or {}).get("counts") or {}


# ------------------------------------------------------------------------------------------ sections
def _details(run: Run) -> str:
    labels, pos, m, meta = _labels(run), _pos(run), run.metrics, run.model
    src = run.resolved.get("source") or {}
    task = {"multilabel": f"multi-label classification of {len(labels)} findings (any number per image): "
                          f"{', '.join(labels)}",
            "ordinal": f"ordinal grading into {len(labels)} ordered grades: {' < '.join(labels)}"}.get(
        meta.task, f"binary classification: {labels[pos]} (positive) vs {labels[1 - pos]}" if pos is not None
        else f"{len(labels)}-class classification: {', '.join(labels)}")
    domain = src.get("domain")
    learned = DOMAINS.get(domain, domain or "not recorded")
    weights = src.get("weights")
    if weights and weights not in ("none", "hub", "timm") and domain == "local file":
        learned += f" (`{_name(weights)}`)"
    sha = src.get("weights_sha256")
    strategy = run.config.optim.strategy
    desc = STRATEGIES[strategy].description if strategy in STRATEGIES else ""
    arch = meta.arch if meta.arch != "ensemble" else f"ensemble of {len(meta.extra.get('members') or [])} models"
    trained = run.dir / "model.safetensors"
    date = _dt.datetime.fromtimestamp(trained.stat().st_mtime, _dt.timezone.utc).strftime("%Y-%m-%d") \
        if trained.exists() else "not recorded"
    rows = [("Task", task),
            ("Architecture", f"{arch}, input {_size(meta)}, {meta.in_chans} model "
                             f"channel(s)"),
            ("Source model", f"`{src.get('name', meta.source or m.get('source', '?'))}`"),
            ("What the source learned on", learned),
            ("Source weights SHA-256", f"`{sha[:16]}…`" if sha else "none recorded"),
            ("Transfer strategy", f"{strategy}" + (f": {desc}" if desc else "")),
            ("Trained weights SHA-256", f"`{meta.weights_sha256[:16]}…`" if meta.weights_sha256 else "not recorded"),
            ("Training", f"{m.get('epochs_run', '?')} epochs run, best epoch {m.get('best_epoch', '?')} kept; "
                         f"learning rate {run.resolved.get('lr', run.config.optim.lr)}; batch size "
                         f"{run.config.optim.batch_size}; augmentation `{run.config.optim.augment}`"),
            ("Seed", str(m.get("seed", run.config.optim.seed))),
            ("Trained on (date)", date),
            ("Software", f"medxfer {_version()}, torch {run.resolved.get('torch', '?')}"),
            ("Card written", _dt.datetime.now().strftime("%Y-%m-%d"))]
    return _table(["", ""], [[f"**{a}**", b] for a, b in rows])


def _intended(run: Run) -> str:
    meta, labels, pos = run.model, _labels(run), _pos(run)
    chans = {1: "grey-level (1 channel)", 3: "colour (3 channels)"}.get(meta.data_chans, f"{meta.data_chans}-channel")
    read = meta.read or {}
    reading = ", ".join(f"{k} {v}" for k, v in read.items()) if read else "as in training"
    augment = run.config.optim.augment
    modality = (f" The training used the `{augment}` augmentation preset, so the images were taken to be {augment} "
                "images." if augment not in ("none", "light", "strong", "generic") else "")
    out = {"multilabel": "a probability for each finding, each called present at its own threshold chosen on "
                         "validation",
           "ordinal": "a probability for each grade; the predicted grade is the median of that distribution"}.get(
        meta.task, f"P({labels[pos]}) with an operating point (threshold {_f(_threshold(run))}) chosen on validation"
        if pos is not None else "a probability for each class (the highest is the prediction)")
    tta = getattr(meta, "tta", 1) or 1
    return "\n".join([
        "### Intended use",
        "",
        f"- Research on {', '.join(labels)} classification, and decision support where a qualified reader sees "
        f"every image: the model gives {out}.",
        "- It is **not** a stand-alone diagnostic device, has no regulatory clearance, and its output should not "
        "decide care without a clinician.",
        f"- Input contract: {chans} images of the same modality, view and acquisition as the training data "
        f"({_origin((run.resolved.get('data') or {}).get('origin'))}), resized to {_size(meta)}; "
        f"reading: {reading}; the model normalises internally ({meta.input})."
        + (f" Test-time augmentation: {tta} views." if tta > 1 else "") + modality,
        "",
        "### Out-of-scope use",
        "",
        "- Populations, sites, scanners, protocols or image types unlike the training data (other modality or "
        "view, other age groups, other disease prevalence): performance there is unknown.",
        (f"- Findings outside {', '.join(labels)}: the model does not look for them, so no finding called present "
         "does not mean a normal image." if meta.task == "multilabel" else
         f"- Findings outside the classes {', '.join(labels)}: the model always answers one of them; it cannot say "
         "\"none of these\" or \"image unreadable\"."),
        "- Images much larger than the input size whose diagnosis depends on fine detail (they are resized to "
        f"{_size(meta)}), and screening use without a prospective evaluation at the intended prevalence.",
    ])


def _data(run: Run) -> str:
    data, labels = run.resolved.get("data") or {}, _labels(run)
    counts = _counts(run)
    has_pat = any("patients" in v for v in counts.values())
    rows = [[s, *(v.get("per_class", {}).get(c, 0) for c in labels), v.get("n", 0)]
            + ([v.get("patients", "–")] if has_pat else []) for s, v in counts.items()]
    parts = [f"Source of the images: {_origin(data.get('origin'))}.", ""]
    if rows:
        parts += [_table(["split", *labels, "images"] + (["patients"] if has_pat else []), rows), ""]
    notes = [str(n) for n in data.get("notes") or []]
    how = [n for n in notes if "split" in n]
    if data.get("splits"):
        how.append(str(data["splits"]))
    if not how:
        how = ["the splits given with the data"]
    split_by = run.config.data.split_by
    if split_by not in ("auto", "patient_id", "none"):
        grouping = f" Images were grouped by the column `{split_by}`: each group stays in one split."
    elif has_pat and split_by != "none":
        grouping = " Patients are known: each patient's images stay in one split (checked)."
    elif has_pat:
        grouping = " Patients are known but the split ignored them (--split-by none): one patient may be in two splits."
    else:
        grouping = " Patient identifiers were not available: images are treated as independent."
    facts = ["How the split was made: " + "; ".join(how) + "." + grouping]
    others = [n for n in notes if "split" not in n]
    if others:
        facts.append("Notes recorded while reading the data: " + "; ".join(others) + ".")
    dup, skipped = run.duplicates, run.skipped
    if dup is not None and len(dup):
        dropped = int((dup["action"] != "kept").sum()) if "action" in dup else 0
        facts.append(f"Duplicates: {_groups(dup)} of identical images spanned more than one split; "
                     + (f"{dropped} copies were dropped from train/val (val and test kept as given)." if dropped
                        else "all copies were kept, so test results may be optimistic."))
    else:
        facts.append("Duplicates: no identical images were found across splits.")
    facts.append(f"Skipped samples: {len(skipped)} unreadable samples were left out." if skipped is not None
                 and len(skipped) else "Skipped samples: none.")
    parts += [f"- {f}" for f in facts]
    return "\n".join(parts)


def _evaluation(run: Run) -> str:
    test, val, labels, pos = run.metrics.get("test") or {}, run.metrics.get("val") or {}, _labels(run), _pos(run)
    n, per = test.get("n", "?"), test.get("n_per_class") or {}
    pats = (_counts(run).get("test") or {}).get("patients")
    head = (f"Test split: {n} images ({', '.join(f'{c}: {per[c]}' for c in labels if c in per)})"
            + (f" of {pats} patients" if pats else "") + ", never used for training or choosing settings.")
    if run.model.task == "multilabel":
        return _evaluation_multilabel(run, head)
    if run.model.task == "ordinal":
        names = [("qwk", "quadratic weighted kappa"), ("mae", "mean absolute error (grades)"),
                 ("accuracy", "exact-grade accuracy (median grade)"), ("auc", "mean AUC of the grade >= k cuts")]
    elif pos is not None:
        head += (f" Operating point: the threshold rule `{run.config.evaluation.threshold}` applied on the validation "
                 f"split gives threshold **{_f(_threshold(run))}** on P({labels[pos]}); an image at or above it is "
                 f"called {labels[pos]}.")
        names = [("auc", "AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"),
                 ("npv", "NPV"), ("balanced_accuracy", "balanced accuracy")]
    if pos is None and run.model.task != "ordinal":
        names = [("auc", "macro AUC (one-vs-rest)"), ("accuracy", "accuracy"),
                 ("balanced_accuracy", "balanced accuracy"), ("f1", "macro F1")]
    rows = [[name, _ci(test, key), _f(val.get(key))] for key, name in names]
    parts = [head, "", _table(["metric", "test (95% CI)", "validation"], rows)]
    per_class = test.get("per_class_auc")
    if per_class:
        parts += ["", _table(["class", "test AUC (one-vs-rest)"], [[c, _f(per_class.get(c))] for c in labels])]
    temp = run.metrics.get("temperature", run.model.temperature)
    cal = run.config.evaluation.calibrate
    parts.append("\nCalibration: " + (f"temperature scaling fitted on validation, T = {_f(temp)}" if cal != "none"
                                    else "none (raw softmax)")
                 + f"; test ECE {_f(test.get('ece'))} (15 bins; validation {_f(val.get('ece'))}); "
                   f"test Brier score {_ci(test, 'brier')}.")
    if test.get("n_bootstrap"):
        unit = "patient" if test.get("bootstrap_unit") == "group" else "image"
        parts.append(f"\nIntervals: 95% percentile bootstrap, {test['n_bootstrap']} resamples by {unit}.")
    else:
        parts.append("\nIntervals: none (the run was made with --bootstrap 0).")
    return "\n".join(parts)


def conformal_text(run: Run) -> str:
    """What the conformal sets promise, when the promise fails, and test's coverage per class (Mondrian and
    marginal), from model.json's record and metrics.json."""
    record = run.model.conformal
    a = record["alpha"]
    parts = [f"Every prediction comes with a set of classes (`conformal_set` in `medxfer predict`), calibrated per "
             f"class on the validation split (alpha = {_f(a, 2)}): for an image of any class, the set holds its true "
             f"class with probability at least {_f(1 - a, 2)}, as long as new images of that class are exchangeable "
             "with the validation images of that class (a change in the class mix alone does not break it). It does "
             "not hold when the images within a class change (another scanner, site, population or disease stage): "
             "the sets then cover less than promised, with no warning from the sets themselves (measured: a "
             "linear probe on PneumoniaMNIST covered its normal test images 0.675 of the time at alpha 0.1)."]
    if record.get("include_always"):
        parts.append(f"\nToo few validation images for the level: {', '.join(record['include_always'])} (always in "
                     "the set).")
    c = (run.metrics.get("test") or {}).get("conformal")
    if c:
        marginal = {r["class"]: r for r in c.get("marginal", [])}
        rows = [[r["class"], r["n"], f"{_f(r['coverage'])} ({_f(r['ci'][0])}–{_f(r['ci'][1])})",
                 _f(r["mean_set_size"], 2), _f((marginal.get(r["class"]) or {}).get("coverage"))]
                for r in c["by_class"]]
        parts += ["", f"Test split, target coverage {_f(1 - a, 2)}:", "",
                  _table(["class", "images", "coverage (95% CI)", "mean set size", "coverage, one pooled threshold"],
                         rows)]
    return "\n".join(parts)


def _subgroups(subgroups: dict) -> str:
    parts = ["Test split, per group, at the same threshold; 95% bootstrap intervals. **Flagged** (⚠): the group's "
             "interval lies entirely above or below the overall test value. Too small: fewer images than the minimum "
             "or one class absent (no metrics)."]
    for column, groups in subgroups.items():
        rows = []
        for value, g in groups.items():
            mark = "⚠ " if g.get("flag") else ""
            note = flag_text(g)
            rows.append([f"{mark}{value}", g.get("n"), f"{g.get('n_pos')} / {g.get('n_neg')}", _ci(g, "auc"),
                         _ci(g, "sensitivity"), _ci(g, "specificity"), f"**{note}**" if g.get("flag") else note])
        parts += ["", f"### {column}", "", _table(["group", "images", "positive / negative", "AUC", "sensitivity",
                                                   "specificity", "note"], rows)]
    return "\n".join(parts)


def _evaluation_multilabel(run: Run, head: str) -> str:
    test, val, labels = run.metrics.get("test") or {}, run.metrics.get("val") or {}, _labels(run)
    pats = (_counts(run).get("test") or {}).get("patients")
    head = (f"Test split: {test.get('n', '?')} images" + (f" of {pats} patients" if pats else "")
            + ", never used for training or choosing settings.")
    rows = [[name, _ci(test, key), _f(val.get(key))] for key, name in
            (("macro_auc", "macro AUC"), ("micro_auc", "micro AUC"), ("macro_average_precision", "macro average "
             "precision"), ("macro_f1", "macro F1"), ("subset_accuracy", "subset accuracy"))]
    per = test.get("per_label") or {}
    label_rows = [[c, (per.get(c) or {}).get("n_pos", "?"), _ci(per.get(c) or {}, "auc"),
                   _ci(per.get(c) or {}, "sensitivity"), _ci(per.get(c) or {}, "specificity"),
                   _f((per.get(c) or {}).get("threshold")),
                   "" if (per.get(c) or {}).get("evaluable", True) else "too rare to evaluate"] for c in labels]
    temp = run.metrics.get("temperature", run.model.temperature)
    cal = (f"a temperature per finding fitted on validation ({_f(min(temp))}–{_f(max(temp))})"
           if isinstance(temp, list) else f"temperature {_f(temp)}")
    parts = [head + " Each finding is called present at its own threshold, chosen on validation by the rule "
             f"`{run.config.evaluation.threshold}`.", "",
             _table(["metric", "test (95% CI)", "validation"], rows), "",
             _table(["finding", "test positives", "AUC (95% CI)", "sensitivity", "specificity", "threshold", "note"],
                    label_rows),
             f"\nCalibration: {cal if run.config.evaluation.calibrate != 'none' else 'none (raw sigmoid)'}."]
    if test.get("n_bootstrap"):
        unit = "patient" if test.get("bootstrap_unit") == "group" else "image"
        parts.append(f"\nIntervals: 95% percentile bootstrap, {test['n_bootstrap']} resamples by {unit}.")
    return "\n".join(parts)


# long (64 lines): one sentence per kind of limitation, in the card's order; split up, the list would scatter
def limitations(run: Run, subgroups: dict | None = None) -> list[str]:
    """The known limitations of this run, derived from its data and results (one sentence each)."""
    test, val, labels = run.metrics.get("test") or {}, run.metrics.get("val") or {}, _labels(run)
    counts, out = _counts(run), []
    ci = test.get("auc_ci")
    if ci and ci[1] - ci[0] > WIDE_CI:
        out.append(f"Small test set: {test.get('n', '?')} images give a wide AUC interval ({ci[0]:.3f}–{ci[1]:.3f}, "
                   f"width {ci[1] - ci[0]:.3f} > {WIDE_CI}); every test figure here is uncertain to that degree.")
    elif not ci:
        out.append("No confidence intervals were computed: the test figures have no stated uncertainty.")
    train = (counts.get("train") or {}).get("per_class") or {}
    sizes = {c: train.get(c, 0) for c in labels}
    if run.model.task == "multilabel":
        rare = [c for c, r in (test.get("per_label") or {}).items() if not r.get("evaluable", True)]
        if rare:
            out.append(f"Rare findings: {', '.join(rare)} have fewer than 10 positive (or negative) test images; "
                       "their results are not evaluable and rest on few cases.")
        sizes = {}
    if sizes and min(sizes.values()) > 0 and max(sizes.values()) / min(sizes.values()) >= IMBALANCE:
        big, small = max(sizes, key=sizes.get), min(sizes, key=sizes.get)
        out.append(f"Class imbalance: {big} outnumbers {small} {sizes[big] / sizes[small]:.1f} to 1 in training; the "
                   "PPV and NPV hold only at the test set's prevalence and change at another.")
    total = sum(sizes.values())
    per_test = test.get("n_per_class") or {}
    for c in (labels if sizes else []):
        t_n = per_test.get(c)
        share = sizes.get(c, 0) / total if total else None
        if (t_n is not None and t_n < RARE_TEST) or (share is not None and share < RARE_SHARE):
            out.append(f"Rare class {c}: {sizes.get(c, '?')} training and {t_n if t_n is not None else '?'} test "
                       f"images; its results rest on few cases.")
    pos = _pos(run)
    if pos is not None:
        val_pos = (val.get("n_per_class") or {}).get(labels[pos])
        if val_pos is not None and val_pos < SMALL_VAL_POS:
            out.append(f"The threshold was chosen on {val_pos} positive validation images: the sensitivity and "
                       "specificity at it may shift on new data.")
    if not any("patients" in v for v in counts.values()):
        out.append("Patients unknown: without patient identifiers, images of one patient may sit in both training "
                   "and test, which makes test results optimistic, and the intervals treat images as independent.")
    dup = run.duplicates
    if dup is not None and len(dup):
        kept = "action" in dup and not (dup["action"] != "kept").any()
        out.append(f"Duplicates: {_groups(dup)} of identical images found across splits"
                   + (" and kept: the test results are optimistic." if kept else
                      "; copies were dropped from train/val, but near-duplicates (other crops or exposures of one "
                      "image) are not detected."))
    if run.skipped is not None and len(run.skipped):
        out.append(f"Skipped files: {len(run.skipped)} samples could not be read and were left out; if unreadable "
                   "files are not random (one scanner, one site), the data is biased.")
    size = run.model.image_size
    if size and size <= LOW_RESOLUTION:
        out.append(f"Low resolution: images were resized to {_size(run.model)}; findings that need fine detail "
                   "(microcalcifications, small nodules, subtle fractures) may be invisible to the model.")
    ece = test.get("ece")
    if ece is not None and ece > HIGH_ECE:
        out.append(f"Calibration error: test ECE {ece:.3f} > {HIGH_ECE}: the probabilities are not reliable risks; "
                   "use the operating point, not P, for decisions.")
    for column, groups in (subgroups or {}).items():
        for value, g in groups.items():
            if g.get("flag"):
                out.append(f"Subgroup {column} = {value}: {flag_text(g)} ({g.get('n')} test images).")
    out.append("Internal validation only: the test split comes from the same source as the training data; expect "
               "lower performance at other sites, on other devices and over time.")
    return out


def _ids(run: Run) -> set[str]:
    """Every sample id, patient id and sample path of the run (what the card must never contain)."""
    out: set[str] = set()
    tables = [run.predictions, run.split, run.skipped, run.duplicates]
    paths = run.dir / "paths.csv"
    if paths.is_file():
        try:
            tables.append(pd.read_csv(paths, dtype=str))
        except (ValueError, OSError):
            pass
    for t in tables:
        if t is None:
            continue
        for col in ("sample_id", "patient_id", "path"):
            if col in t:
                out.update(str(v) for v in t[col].dropna().astype(str))
    return {v for v in out if len(v) >= 6}


def _scrub(text: str, run: Run) -> str:
    for ident in sorted(_ids(run), key=len, reverse=True):
        if ident in text:
            text = text.replace(ident, "[identifier removed]")
    return text


def card_text(run: Run | str | Path, subgroups: dict | None = None) -> str:
    """The model card of ``run`` as markdown. ``subgroups``: :func:`~medxfer.evaluation.subgroups.subgroup_metrics`
    output (default: the run's, from metrics.json)."""
    run = run if isinstance(run, Run) else Run.load(run)
    if subgroups is None:
        try:
            subgroups = read_subgroups(run)
        except MedxferError:
            subgroups = None
    labels = _labels(run)
    test = run.metrics.get("test") or {}
    head = (f"{run.config.optim.strategy} transfer from `{run.metrics.get('source', run.model.source)}` to "
            f"{' / '.join(labels)}; test AUC {_ci(test, 'auc')}.")
    name = run.dir.name.removesuffix(".partial")  # written while the run is still staged as OUT.partial
    sections = [f"# Model card: {name}", "", head, "",
                "## Model details", "", _details(run), "",
                "## Intended use and out-of-scope use", "", _intended(run), "",
                "## Training data", "", _data(run), "",
                "## Evaluation", "", _evaluation(run), ""]
    if run.model.conformal is not None:
        sections += ["## Prediction sets (conformal)", "", conformal_text(run), ""]
    if subgroups:
        sections += ["## Subgroup results", "", _subgroups(subgroups), ""]
    sections += ["## Limitations and known failure cases", "",
                 *(f"- {item}" for item in limitations(run, subgroups)), "",
                 "---", "",
                 "_Written by medxfer from the run record (config.yaml, model.json, metrics.json). Samples and "
                 "patients are counted here, never named._", ""]
    return _scrub("\n".join(sections), run)


def write_model_card(run: Run | str | Path, subgroups: dict | None = None) -> Path:
    """Write ``RUN_DIR/model_card.md`` (atomic); returns its path."""
    run = run if isinstance(run, Run) else Run.load(run)
    path = run.dir / CARD_FILE
    files.write_text(path, card_text(run, subgroups))
    return path
