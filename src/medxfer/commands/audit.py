"""``medxfer audit --data D --out DIR``: the samples most likely mislabelled, and identical images with
different labels.

Writes ``DIR/label_issues.csv`` (``rank, sample_id, split, given_label, suspected_label, self_confidence,
suspected_probability``: the suspects, most likely mislabelled first), ``DIR/duplicate_conflicts.csv``
(``group, sample_id, split, label``) and ``DIR/audit.json`` (counts, settings, per-class thresholds), and
prints a summary. Samples are named by their pseudonymous sample id, never by file name.

How: pooled features of a frozen source model (the same features and cache as ``medxfer features`` and
``train --strategy linear-probe``), out-of-fold probabilities of a k-fold logistic regression on them,
confident learning on those (:mod:`medxfer.trust.audit`); and a pixel hash of every decoded image, in
all splits, for copies whose labels differ. All samples are kept for the audit (duplicates too: the
copies are what it looks for).
"""

from __future__ import annotations

from pathlib import Path

import typer

from medxfer.commands.base import Given, command, option_fields, out

FIELDS = option_fields(("data", "model", "optim", "runtime"), only=("data", "labels", "label_names", "split_by",
                                                         "split_seed", "on_bad_file", "window", "frame", "slice",
                                                         "intensity", "cache_dir", "no_cache", "source", "weights",
                                                         "image_size", "grey_mode", "seed", "num_threads"))
SPLITS = ("train", "val", "test")
ISSUE_COLUMNS = ["rank", "sample_id", "split", "given_label", "suspected_label", "self_confidence",
                 "suspected_probability"]
DUPLICATE_COLUMNS = ["group", "sample_id", "split", "label"]


def register(app: typer.Typer) -> None:
    @command(app, "audit", FIELDS)
    def audit(
        given: Given,
        out_dir: Path = typer.Option(Path("audit"), "--out", help="Folder for label_issues.csv, "
                                     "duplicate_conflicts.csv and audit.json."),
        splits: str = typer.Option("train", help="Splits whose labels are audited, comma-separated (train, val, "
                                   "test) or 'all'. Duplicates are always checked across all splits."),
        folds: int = typer.Option(5, help="Folds of the out-of-fold logistic regression."),
        show: int = typer.Option(10, help="Suspects listed on screen (all are in label_issues.csv)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace audit files in --out that medxfer did "
                                       "not write (never an input or a file inside a run)."),
    ):
        """Rank the training samples most likely mislabelled (confident learning on out-of-fold probabilities)
        and list identical images with different labels."""
        r = run_audit(given, out_dir, _splits(splits), folds, overwrite)
        _summary(r, show)


def _splits(text: str) -> tuple[str, ...]:
    from medxfer.errors import MedxferError, did_you_mean

    if text.strip() == "all":
        return SPLITS
    parts = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [s for s in parts if s not in SPLITS]
    if bad or not parts:
        raise MedxferError(f"--splits takes train, val, test (comma-separated) or all; got '{text}'."
                           + (did_you_mean(bad[0], SPLITS) if bad else ""))
    return parts


def _ours(columns: list[str]):
    def check(path: Path) -> bool:
        from medxfer.files import first_line

        return (first_line(path) or "").strip() == ",".join(columns)
    return check


def run_audit(given: Given, out_dir: Path, splits: tuple[str, ...], folds: int, overwrite: bool) -> dict:
    """The audit itself (see the module docstring); returns what the summary prints."""
    import dataclasses
    import json

    import numpy as np
    import pandas as pd
    import torch

    from medxfer import files
    from medxfer.data.prepare import prepare_data
    from medxfer.engine.features import extract_features, feature_cache_dir, source_key_parts
    from medxfer.engine.trainer import resolve_precision, seed_everything
    from medxfer.errors import MedxferError
    from medxfer.models.adapt import build_model
    from medxfer.models.catalog import resolve_source
    from medxfer.runs import check_out, check_out_dir
    from medxfer.trust.audit import conflicting_duplicates, find_label_issues, out_of_fold_probs

    cfg = given.config()
    if not cfg.data.path:
        raise MedxferError("audit needs --data PATH (an .npz, a folder, a CSV/Parquet manifest).")
    check_out_dir(out_dir)
    paths = {n: out_dir / n for n in ("label_issues.csv", "duplicate_conflicts.csv", "audit.json")}
    inputs = [cfg.data.path]
    check_out(paths["label_issues.csv"], inputs=inputs, overwrite=overwrite, ours=_ours(ISSUE_COLUMNS))
    check_out(paths["duplicate_conflicts.csv"], inputs=inputs, overwrite=overwrite, ours=_ours(DUPLICATE_COLUMNS))
    check_out(paths["audit.json"], inputs=inputs, overwrite=overwrite,
              ours=lambda p: str(files.read_json(p).get("kind", "")) == "medxfer label audit")
    seed = cfg.optim.seed
    spec = resolve_source(cfg.model.source, cfg.model.weights)
    # every sample kept: the cross-split copies are part of what is audited
    opts = dataclasses.replace(cfg.data, label_fraction=1.0, duplicates="allow")
    prep = prepare_data(opts, cfg.model.image_size, seed, source_size=spec.input_size)
    t, labels = prep.table, prep.labels
    y_all = prep.manifest.targets()
    if np.asarray(y_all).ndim != 1:
        raise MedxferError("audit ranks single-label tasks (binary, multi-class, ordinal); this data is multi-label.")
    y_all = np.asarray(y_all).astype(int)
    split = t["split"].astype(str).to_numpy()
    ids = t["sample_id"].astype(str).to_numpy()

    groups = conflicting_duplicates(prep.images, y_all)
    dup_rows = [{"group": g + 1, "sample_id": ids[i], "split": split[i], "label": labels[y_all[i]]}
                for g, members in enumerate(groups) for i in members]

    seed_everything(seed)
    model, info = build_model(spec, len(labels), prep.images.shape[1], grey_mode=cfg.model.grey_mode)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    feats, hit = extract_features(model, prep.images, source_key_parts(spec, info, prep.size, prep.read, seed),
                                  cache_dir=feature_cache_dir(cfg.data.cache_dir, cfg.data.no_cache), device=device,
                                  precision=resolve_precision("auto", device))
    mask = np.isin(split, splits)
    if not mask.any():
        raise MedxferError(f"no samples in the split(s) {', '.join(splits)}: choose others with --splits.")
    x, y = feats.float().numpy()[mask], y_all[mask]
    probs, fit = out_of_fold_probs(x, y, folds=folds, seed=seed)
    probs = np.pad(probs, ((0, 0), (0, len(labels) - probs.shape[1])))   # classes absent from the audited splits
    r = find_label_issues(probs, y)
    sel = np.flatnonzero(mask)
    order = np.flatnonzero(r["is_issue"])[np.argsort(r["rank"][r["is_issue"]])]
    issues = pd.DataFrame({
        "rank": r["rank"][order], "sample_id": ids[sel[order]], "split": split[sel[order]],
        "given_label": [labels[c] for c in y[order]], "suspected_label": [labels[c] for c in r["suspected"][order]],
        "self_confidence": np.round(r["self_confidence"][order], 4),
        "suspected_probability": np.round(probs[order, r["suspected"][order]], 4)}, columns=ISSUE_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    files.write_csv(paths["label_issues.csv"], issues)
    files.write_csv(paths["duplicate_conflicts.csv"], pd.DataFrame(dup_rows, columns=DUPLICATE_COLUMNS))
    record = {"kind": "medxfer label audit", "source": spec.name, "image_size": prep.size, "seed": seed,
              "splits": list(splits), "n_audited": int(mask.sum()), "labels": list(labels),
              "per_split": {s: int((split[mask] == s).sum()) for s in splits},
              "out_of_fold": fit, "method": "confident learning (Northcutt et al. 2021), filter_by="
              "confident_learning, ranked by self-confidence; numpy (medxfer.trust.audit)",
              "thresholds": dict(zip(labels, r["thresholds"])), "confident_joint": r["confident_joint"],
              "suspected": int(len(order)), "estimated_issues": r["estimated_issues"],
              "duplicate_conflicts": [{"sample_ids": [ids[i] for i in g], "splits": [split[i] for i in g],
                                       "labels": [labels[y_all[i]] for i in g]} for g in groups],
              "feature_cache": "hit" if hit else "miss"}
    files.write_json(paths["audit.json"], record)
    return {"record": record, "issues": issues, "paths": {k: str(v) for k, v in paths.items()}}


def _summary(r: dict, show: int) -> None:
    from rich.table import Table

    rec, issues = r["record"], r["issues"]
    per = ", ".join(f"{k} {v}" for k, v in rec["per_split"].items())
    out.print(f"label audit of {rec['n_audited']} samples ({per}) on {rec['source']} features at {rec['image_size']} px, "
              f"{rec['out_of_fold']['folds']}-fold out-of-fold logistic regression (C {rec['out_of_fold']['C']:g}): "
              f"{rec['suspected']} suspected label issues (confident learning estimates {rec['estimated_issues']} "
              "wrong labels)", highlight=False, markup=False)
    if len(issues) and show > 0:
        table = Table(title=f"most likely mislabelled (first {min(show, len(issues))} of {len(issues)})")
        for col in ("rank", "sample id", "split", "given", "suspected", "p(given)"):
            table.add_column(col)
        for row in issues.head(show).itertuples():
            table.add_row(str(row.rank), row.sample_id, row.split, row.given_label, row.suspected_label,
                          f"{row.self_confidence:.3f}")
        out.print(table)
    conflicts = rec["duplicate_conflicts"]
    if conflicts:
        out.print(f"{len(conflicts)} groups of identical images with different labels:", highlight=False)
        for g in conflicts:
            out.print("  " + " = ".join(f"{i} ({s}, {lab})" for i, s, lab in zip(g["sample_ids"], g["splits"],
                                                                                g["labels"])), highlight=False,
                      markup=False)
    else:
        out.print("no identical images with different labels", highlight=False)
    out.print(f"-> {r['paths']['label_issues.csv']}, {r['paths']['duplicate_conflicts.csv']}, "
              f"{r['paths']['audit.json']}", highlight=False, markup=False)
