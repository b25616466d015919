"""Supervised pretraining: train on a labelled source domain, keep the backbone as a new source.

Usage::

    from medxfer.pretrain import pretrain_supervised
    meta = pretrain_supervised("data/pneumoniamnist_28.npz", out="runs/src_pneu",
                               init="efficientnet_lite0.in1k", image_size=64, epochs=3)
    # then: medxfer train --source runs/src_pneu --data breastmnist_28.npz

The training is an ordinary ``medxfer train`` run (``full`` from ``init``, or ``scratch`` without
it), written to ``OUT/run``; its backbone becomes ``OUT/model.safetensors`` and ``OUT/source.json``.
"""

from __future__ import annotations

from pathlib import Path

from medxfer import runs
from medxfer.errors import MedxferError
from medxfer.pretrain.common import backbone_state_dict, check_out_dir, init_record, write_source_dir


def pretrain_supervised(data: str, out: str | Path, *, arch: str | None = None, init: str | None = None,
                        image_size: int = 64, epochs: int | None = None, lr: float | None = None,
                        batch_size: int = 64, seed: int = 0, label_names: tuple[str, ...] | None = None,
                        augment: str = "light", name: str | None = None, description: str | None = None,
                        num_threads: int | None = None, resume: bool = False, log=print, progress=None,
                        **train_options) -> dict:
    """Train a source model on labelled ``data`` and write the source directory ``out``; returns source.json.

    ``init``: a source to start from (a bundled name or a source directory); without it the
    architecture ``arch`` starts from random weights. The run checkpoints every epoch
    (``OUT/run.partial/checkpoint.pt``); ``resume`` continues it from there with the same settings, or, when
    ``OUT/run`` already finished, only writes the source directory from it.
    """
    from medxfer.config import TrainConfig
    from medxfer.models.catalog import resolve_source
    from medxfer.pipeline import train

    out = Path(out)
    run_dir = out / "run"
    if init is None and arch is None:
        raise MedxferError("say what to train: --arch NAME (a timm architecture, random init) and/or --init SOURCE "
                           "(a source to start from, e.g. efficientnet_lite0.in1k).")
    if init is not None:
        spec = resolve_source(init)
        if arch is not None and arch.split(".")[0] != spec.arch.split(".")[0]:
            raise MedxferError(f"--arch '{arch}' does not match the architecture of --init '{init}' "
                               f"('{spec.arch}'). Leave --arch out, or start from a source of that architecture.")
        source, weights, strategy = init, None, "full"
    else:
        spec = resolve_source(arch, "none")
        source, weights, strategy = arch, "none", "scratch"
    interrupted = runs.checkpoint_path(run_dir).exists()
    finished = runs.is_finished(run_dir) and not interrupted
    if resume and finished:
        log(f"{run_dir} is a finished run: writing the source directory from it")
    else:
        if resume and not interrupted:
            raise MedxferError(f"nothing to resume in '{out}': no checkpoint ({runs.checkpoint_path(run_dir)}) and no "
                               "finished run. Run without --resume to start.")
        if not resume:
            check_out_dir(out, resume=False)
        cfg = TrainConfig(data=str(data), out=str(run_dir), source=source, weights=weights, strategy=strategy,
                          image_size=image_size, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                          label_names=tuple(label_names) if label_names else None, augment=augment,
                          num_threads=num_threads, resume=resume, **train_options)
        train(cfg, log=log, progress=progress)
    return source_from_run(run_dir, out, method="supervised", init=init, name=name, description=description)


def source_from_run(run_dir: str | Path, out: str | Path, *, method: str = "supervised", init: str | None = None,
                    name: str | None = None, description: str | None = None) -> dict:
    """Turn a finished ``medxfer train`` run directory into a source directory (backbone only)."""
    from safetensors.torch import load_file

    run_dir, out = Path(run_dir), Path(out)
    for f in ("model.json", "model.safetensors", "metrics.json", "config.yaml"):
        if not (run_dir / f).exists():
            raise MedxferError(f"'{run_dir}' is not a finished run directory (no {f}).")
    model = runs.read_json(run_dir / "model.json", "model.json")
    metrics = runs.read_json(run_dir / "metrics.json", "metrics.json")
    config = runs.read_yaml(run_dir / "config.yaml", "config.yaml")
    state = load_file(str(run_dir / "model.safetensors"))
    net = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    backbone = backbone_state_dict(model["arch"], model["in_chans"], net)
    data = config["resolved"]["data"]
    labels = model["labels"]
    keep = ("auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy", "f1")
    summary = {s: {k: metrics[s][k] for k in keep if k in metrics.get(s, {})} for s in ("val", "test")}
    summary.update({k: metrics[k] for k in ("best_epoch", "epochs_run", "train_seconds") if k in metrics})
    origin = data.get("origin", config["data"])
    meta = {
        "name": name or out.name,
        "mean": model["mean"], "std": model["std"],
        "input_size": int(model["image_size"]), "in_chans": int(model["in_chans"]),
        "domain": f"{Path(str(config['data'])).stem} ({', '.join(labels)})",
        "description": description or (f"{model['arch']} trained {'from ' + init if init else 'from scratch'} "
                                       f"on {Path(str(config['data'])).name} ({method}, {len(labels)} classes)"),
        "method": method,
        "init": init_record(init),
        "grey_mode": model.get("grey_mode"),
        "trained_on": {"data": str(config["data"]), "origin": origin, "labels": labels, "counts": data.get("counts"),
                       "image_size": int(model["image_size"]),
                       "epochs": int(metrics.get("epochs_run") or config.get("epochs_max") or config["epochs"]),
                       "epochs_max": config.get("epochs_max"),
                       "seed": int(config["seed"]), "strategy": model.get("strategy"), "lr": config.get("lr"),
                       "metrics": summary, "run": str(run_dir)},
    }
    return write_source_dir(out, model["arch"], backbone, meta)
