"""Supervised pretraining: train on a labelled source domain, keep the backbone as a new source.

Usage::

    from medxfer import TrainConfig
    from medxfer.pretrain import pretrain_supervised
    meta = pretrain_supervised(TrainConfig.create(data="data/pneumoniamnist_28.npz", out="runs/src_pneu",
                                                  image_size=64, epochs=3))
    # then: medxfer train --source runs/src_pneu --data breastmnist_28.npz

The training is an ordinary ``medxfer train`` run (``full`` from ``--source``, or ``scratch`` with
``--weights none``), written to ``OUT/run``; its backbone becomes ``OUT/model.safetensors`` and
``OUT/source.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import load_file

from medxfer.config import TrainConfig
from medxfer.errors import MedxferError
from medxfer.pipeline import train
from medxfer.pretrain.common import backbone_state_dict, check_out_dir, init_record, write_source_dir
from medxfer.runs import Run, checkpoint_path, is_finished
from medxfer.strategies import DEFAULT as DEFAULT_STRATEGY, baseline, get_strategy

log = logging.getLogger(__name__)


def pretrain_supervised(cfg: TrainConfig, name: str | None = None, description: str | None = None) -> dict:
    """Train a source model on labelled data (``cfg``; its ``out`` is the source directory) and write the
    source directory; returns source.json. Random weights (``weights: none``) train ``scratch``, anything
    else ``full`` unless a strategy is given. ``resume`` continues an interrupted run, or, when ``OUT/run``
    already finished, only writes the source directory from it."""
    out = Path(cfg.runtime.out)
    run_dir = out / "run"
    init = None if cfg.model.weights == "none" else cfg.model.source
    asked = get_strategy(cfg.optim.strategy)
    if init is None:  # random weights: the strategy asked for when it starts from them, else the baseline
        strategy = asked.name if not asked.pretrained else baseline().name
    else:
        strategy = asked.name if asked.pretrained else DEFAULT_STRATEGY
    interrupted = checkpoint_path(run_dir).exists()
    if cfg.runtime.resume and is_finished(run_dir) and not interrupted:
        log.info("%s is a finished run: writing the source directory from it", run_dir)
    else:
        if cfg.runtime.resume and not interrupted:
            raise MedxferError(f"nothing to resume in '{out}': no checkpoint ({checkpoint_path(run_dir)}) and no "
                               "finished run. Run without --resume to start.")
        if not cfg.runtime.resume:
            check_out_dir(out, resume=False)
        train(cfg.replace(out=str(run_dir), strategy=strategy, overwrite=True))
    return source_from_run(run_dir, out, method="supervised", init=init, name=name, description=description)


def source_from_run(run_dir: str | Path, out: str | Path, *, method: str = "supervised", init: str | None = None,
                    name: str | None = None, description: str | None = None) -> dict:
    """Turn a finished ``medxfer train`` run directory into a source directory (backbone only)."""
    run_dir, out = Path(run_dir), Path(out)
    run = Run.load(run_dir)
    model, metrics, cfg = run.model, run.metrics, run.config
    run.verify_weights()
    state = load_file(str(run_dir / "model.safetensors"))
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    backbone = backbone_state_dict(model.arch, model.in_chans, net)
    data, labels = run.resolved.get("data", {}), model.labels
    keep = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1")
    summary = {s: {k: metrics[s][k] for k in keep if k in metrics.get(s, {})} for s in ("val", "test")}
    summary.update({k: metrics[k] for k in ("best_epoch", "epochs_run", "train_seconds") if k in metrics})
    path = Path(str(cfg.data.path))
    meta = {
        "name": name or out.name,
        "mean": model.mean, "std": model.std,
        "input_size": int(model.image_size), "in_chans": int(model.in_chans),
        "domain": f"{path.stem} ({', '.join(labels)})",
        "description": description or (f"{model.arch} trained {'from ' + init if init else 'from scratch'} "
                                       f"on {path.name} ({method}, {len(labels)} classes)"),
        "method": method,
        "init": init_record(init),
        "grey_mode": model.grey_mode,
        **({"spatial_dims": 3, "inflate": model.inflate or "i3d"} if model.spatial_dims == 3 else {}),
        "trained_on": {"data": str(path), "origin": data.get("origin", str(path)), "labels": labels,
                       "counts": data.get("counts"), "image_size": int(model.image_size),
                       "epochs": int(metrics.get("epochs_run") or run.resolved.get("epochs") or 0),
                       "epochs_max": run.resolved.get("epochs"), "seed": cfg.optim.seed, "strategy": model.strategy,
                       "lr": run.resolved.get("lr"), "metrics": summary, "run": str(run_dir)},
    }
    return write_source_dir(out, model.arch, backbone, meta)
