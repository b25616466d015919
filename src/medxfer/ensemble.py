"""Ensembles as first-class runs: several runs' calibrated probabilities averaged into one run directory
that predict, report, explain, export (one ONNX graph) and serve treat like any run.

Usage::

    run = build_ensemble(["runs/a", "runs/b", "runs/c"], out="runs/ens")            # members chosen on validation
    run = build_ensemble(runs, out="runs/ens", method="uniform")                     # every run, equal weights
    medxfer ensemble runs/a runs/b runs/c --out runs/ens [--method auto|greedy|uniform]

Members must share task, labels, data channels, reader options, 2-D or 3-D input and their validation and
test samples (one split). Every task averages: binary and multi-class (class probabilities), multi-label
(the probability of each finding) and ordinal (grade probabilities); see :mod:`medxfer.models.ensemble`.
Their weights are chosen on validation: ``greedy`` is Caruana et al.'s forward selection with
replacement (2004) minimising the validation log-loss of the averaged probabilities (multi-label: the
mean binary log-loss over findings); ``uniform`` weighs every run equally; ``auto`` keeps whichever has
the lower validation log-loss. The ensemble's own
temperature and threshold are then fitted on validation, and it is evaluated on test once, like a single
run; its val/test probabilities come from running the ensemble network itself on the images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medxfer import run_writer
from medxfer.data.augment import TTA
from medxfer.data.prepare import images_of
from medxfer.data.transforms import match_channels_uint8
from medxfer.engine.trainer import predict_logits
from medxfer.errors import MedxferError
from medxfer.evaluation.tasks import label_matrix
from medxfer.runs import ModelMeta, Run, RunDirectory, ensemble_net

METHODS = ("auto", "greedy", "uniform")
log = logging.getLogger(__name__)


def _check_members(runs: list[Run]) -> None:
    if len(runs) < 2:
        raise MedxferError(f"an ensemble needs at least 2 runs. Got {len(runs)}.")
    first = runs[0]
    for r in runs[1:]:
        for what, a, b in (("task", first.model.task, r.model.task), ("labels", first.model.labels, r.model.labels),
                           ("spatial dimensions", first.model.spatial_dims, r.model.spatial_dims),
                           ("data channels", first.model.data_chans, r.model.data_chans),
                           ("reader options", first.model.read, r.model.read),
                           ("input type", first.model.input_dtype, r.model.input_dtype)):
            if a != b:
                raise MedxferError(f"runs '{first.dir}' and '{r.dir}' differ in {what} ({a} vs {b}): an ensemble "
                                   "averages runs of one task on one kind of input.")
        if r.model.is_ensemble:
            raise MedxferError(f"'{r.dir}' is an ensemble itself: give its member runs instead.")
        for split in ("val", "test"):
            ids = lambda run: sorted(run.predictions.loc[run.predictions["split"] == split, "sample_id"])  # noqa: E731
            if ids(r) != ids(first):
                raise MedxferError(f"runs '{first.dir}' and '{r.dir}' were validated or tested on different samples "
                                   "(predictions.csv): an ensemble needs one split. Train the runs with the same "
                                   "data and split seed.")


def labels_of(values, labels: list[str], task: str) -> np.ndarray:
    """predictions.csv's label texts as the task's targets: class indices, or a multi-label 0/1 matrix."""
    if task == "multilabel":
        return label_matrix(list(values), labels)
    index = {c: i for i, c in enumerate(labels)}
    return np.asarray([index[str(v)] for v in values], dtype=int)


def val_probabilities(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """(targets, calibrated probabilities) of the run's validation rows, in sample_id order."""
    p = run.predictions[run.predictions["split"] == "val"].sort_values("sample_id")
    labels = [str(c) for c in run.model.labels]
    return labels_of(p["label"], labels, run.model.task), p[[f"prob_{c}" for c in labels]].to_numpy(float)


def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Validation log-loss: of the true class (y: indices), or the mean binary one over findings (y: 0/1 matrix)."""
    if y.ndim == 2:
        p = np.clip(probs, 1e-12, 1 - 1e-12)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))


def greedy_weights(y: np.ndarray, member_probs: list[np.ndarray], rounds: int = 20) -> list[int]:
    """Caruana's forward selection with replacement: start from the best member, then repeatedly add the
    member that lowers the validation log-loss of the average most; stop when none does. -> counts."""
    counts = [0] * len(member_probs)
    best = int(np.argmin([log_loss(y, p) for p in member_probs]))
    counts[best], total, current = 1, member_probs[best].copy(), log_loss(y, member_probs[best])
    for k in range(2, rounds + 1):
        losses = [log_loss(y, (total + p) / k) for p in member_probs]
        i = int(np.argmin(losses))
        if losses[i] >= current - 1e-6:
            break
        counts[i], total, current = counts[i] + 1, total + member_probs[i], losses[i]
    return counts


def choose_weights(runs: list[Run], method: str) -> tuple[list[float], dict]:
    """Member weights chosen on validation, and a record of the choice."""
    if method not in METHODS:
        raise MedxferError(f"The 'method' parameter must be one of {list(METHODS)}. Got '{method}' instead.")
    y, _ = val_probabilities(runs[0])
    probs = [val_probabilities(r)[1] for r in runs]
    uniform = [1.0] * len(runs)
    greedy = [float(c) for c in greedy_weights(y, probs)]
    loss = {name: log_loss(y, sum(w * p for w, p in zip(ws, probs)) / sum(ws))
            for name, ws in (("uniform", uniform), ("greedy", greedy))}
    chosen = method if method != "auto" else min(loss, key=loss.get)
    return (greedy if chosen == "greedy" else uniform), {"method": chosen, "asked": method,
                                                         "val_log_loss": loss}


def _meta(runs: list[Run], weights: list[float], size: int) -> ModelMeta:
    """The ensemble's build record (model.json before calibration): the first member's input contract and
    positive class, the members with their weights."""
    first = runs[0].model
    pos = first.positive_index
    members = [{"run": str(r.dir), "arch": r.model.arch, "source": r.model.source, "strategy": r.model.strategy,
                "in_chans": r.model.in_chans, "data_chans": r.model.data_chans, "image_size": r.model.image_size,
                "mean": r.model.mean, "std": r.model.std, "temperature": r.model.temperature, "tta": r.model.tta,
                "tta_hflip": r.model.tta_hflip, "inflate": r.model.inflate, "weight": w,
                "weights_sha256": r.weights_digest()}
               for r, w in zip(runs, weights) if w > 0]
    return ModelMeta.from_dict(
        {"arch": "ensemble", "source": "+".join(sorted({m["source"] for m in members})), "labels": first.labels,
         "in_chans": first.in_chans, "data_chans": first.data_chans, "image_size": size, "mean": first.mean,
         "std": first.std, "grey_mode": first.grey_mode, "read": first.read, "strategy": "ensemble",
         "input": first.input, "input_dtype": first.input_dtype, "task": first.task,
         "positive_label": first.labels[pos] if pos is not None else None,
         "spatial_dims": first.spatial_dims, "members": members})


def build_ensemble(run_dirs: list[str | Path], out: str | Path, method: str = "auto", overwrite: bool = False,
                   bootstrap: int | None = None, report: bool = True, wait: float = 0,
                   report_extra: list | None = None, extra: dict | None = None) -> Run:
    """Average ``run_dirs`` into the ensemble run ``out`` (see the module docstring). ``report_extra``: more
    sections of its report; ``extra``: tables written beside the run's files (auto's leaderboard)."""
    runs = [Run.load(d) for d in run_dirs]
    _check_members(runs)
    weights, choice = choose_weights(runs, method)
    kept = [(r, w) for r, w in zip(runs, weights) if w > 0]
    log.info("ensemble of %d runs (%s on validation; weights %s)", len(kept), choice["method"],
             [w for _, w in kept])
    size = max(r.image_size for r, _ in kept)
    meta = _meta([r for r, _ in kept], [w for _, w in kept], size)
    net = ensemble_net(meta)
    for i, (r, _) in enumerate(kept):  # the members' trained weights, bare (their TTA is recorded in model.json)
        net.members[i].load_state_dict(r.load_model(tta=False).state_dict())
    with RunDirectory(out, overwrite=overwrite, wait=wait) as rd:
        _finish(rd, net, meta, kept, choice, runs[0], bootstrap, str(out),
                dict(report=report, report_extra=report_extra), extra or {})
        rd.commit()
    return Run.load(out)


def _finish(rd: RunDirectory, net, meta: ModelMeta, kept, choice: dict, first: Run, bootstrap, out: str,
            documents: dict, extra: dict) -> None:
    """Evaluate the ensemble network on the val/test images, fit temperature and threshold on val, write the
    run (run_writer)."""
    cfg, preds = first.config, first.predictions
    rows = {s: preds[preds["split"] == s] for s in run_writer.SPLITS}
    ids = {s: rows[s]["sample_id"].astype(str).tolist() for s in rows}
    images = {s: match_channels_uint8(images_of(cfg.data, meta.image_size, cfg.optim.seed, ids[s]), meta.data_chans)
              for s in ids}
    state = net.state_dict()  # bare members, before their TTA is put around them
    runtime = with_members_tta(net, kept)
    logits = {s: predict_logits(runtime, images[s]).numpy() for s in ids}
    labels = [str(c) for c in meta.labels]
    ys = {s: labels_of(rows[s]["label"], labels, meta.task) for s in ids}
    groups = {s: rows[s]["patient_id"].astype(str).to_numpy() for s in ids} if "patient_id" in preds else {}
    ev = run_writer.evaluate(meta.task, labels, first.model.positive_index, logits, ys, groups,
                             calibrate=cfg.evaluation.calibrate, threshold=cfg.evaluation.threshold,
                             n_bootstrap=cfg.evaluation.bootstrap if bootstrap is None else bootstrap,
                             seed=cfg.optim.seed, conformal=cfg.evaluation.conformal)
    metrics = {**ev.metrics, "temperature": ev.temperature, "threshold": ev.threshold, "seed": cfg.optim.seed,
               "strategy": "ensemble", "source": meta.source, "ensemble": choice, "members": len(kept),
               "train_seconds": round(sum(r.metrics.get("train_seconds") or 0 for r, _ in kept), 3)}
    resolved = {**first.resolved, "image_size": meta.image_size, "ensemble": {**choice, "members": meta.members}}
    no_probs = {s: rows[s][[c for c in preds.columns if not c.startswith("prob_")]] for s in rows}
    run_files = run_writer.RunFiles(config={**cfg.to_dict(), "resolved": resolved}, metrics=metrics,
                                    predictions=run_writer.predictions(no_probs, ev.probs, labels),
                                    split=first.split, extra=extra, test_images=images["test"])
    meta = meta.replace(temperature=ev.temperature, threshold=ev.threshold, conformal=ev.conformal, prior=ev.prior)
    run_writer.finish(rd, meta, state, run_files,
                      test_images=images["test"], title=out, **documents)


def with_members_tta(net, kept):
    """The ensemble with each member's test-time augmentation, as the members' predictions used it."""
    for i, (r, _) in enumerate(kept):
        if r.model.tta > 1:
            net.members[i] = TTA(net.members[i], r.model.tta, hflip=r.model.tta_hflip)
    return net.eval()
