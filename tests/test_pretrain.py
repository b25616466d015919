"""Stage 1: make your own source (supervised or self-supervised) and use it like a bundled one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import BREAST, subset_npz
from safetensors.torch import load_file

from medxfer import files, runs
from medxfer.cli import main as cli_main_
from medxfer.errors import MedxferError
from medxfer.files import sha256_file
from medxfer.models.adapt import build_model
from medxfer.models.catalog import list_sources, read_source_dir, resolve_source
from medxfer.pretrain import SSLAugment, SSLConfig, pretrain_ssl
from medxfer.pretrain.common import write_source_dir
from tests.test_resume import stop_after

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each

SOURCE_KEYS = {"name", "arch", "mean", "std", "input_size", "in_chans", "domain", "description", "method",
               "trained_on", "created"}
TRAINED_ON_KEYS = {"data", "labels", "counts", "image_size", "epochs", "seed", "metrics"}


@pytest.fixture(scope="module")
def cli_main():
    return cli_main_


@pytest.fixture(scope="module")
def sup_source(tmp_path_factory, small_npz, cli_main):
    """A supervised source from random init (test_resnet, grey, 32 px, 1 epoch), made through the CLI."""
    out = tmp_path_factory.mktemp("sources") / "sup_resnet"
    code = cli_main(["pretrain", "supervised", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
                     "--out", str(out), "--image-size", "32", "--epochs", "1", "--label-names", "malignant,benign"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def ssl_npz(tmp_path_factory):
    """64 train+val images (and 16 test) keep the SSL epochs to a few steps."""
    return subset_npz(BREAST, tmp_path_factory.mktemp("data") / "ssl_small.npz", n=(48, 16, 16))


@pytest.fixture(scope="module")
def eff_source(tmp_path_factory):
    """A hand-made source directory (random test_efficientnet backbone, grey stem) to start SSL from."""
    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", num_classes=0, in_chans=1)
    out = tmp_path_factory.mktemp("sources") / "eff_init"
    write_source_dir(out, "test_efficientnet", net.state_dict(),
                     {"mean": [0.5], "std": [0.5], "input_size": 32, "in_chans": 1, "domain": "random",
                      "description": "test", "method": "none", "trained_on": {}})
    return out


def _changed(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_supervised_source_dir_has_the_catalogue_fields(sup_source):
    meta = json.loads((sup_source / "source.json").read_text())
    assert SOURCE_KEYS <= set(meta) and TRAINED_ON_KEYS <= set(meta["trained_on"])
    assert meta["method"] == "supervised" and meta["arch"] == "test_resnet" and meta["in_chans"] == 1
    assert meta["trained_on"]["labels"] == ["malignant", "benign"] and meta["input_size"] == 32
    assert 0 <= meta["trained_on"]["metrics"]["val"]["auc"] <= 1
    sd = load_file(str(sup_source / "model.safetensors"))
    assert "conv1.0.weight" in sd and not any(k.startswith("fc.") for k in sd)  # timm keys, head dropped
    assert sd["conv1.0.weight"].shape[1] == 1  # trained on grey with the summed stem
    spec = read_source_dir(sup_source)
    assert spec.arch == "test_resnet" and spec.in_chans == 1 and spec.mean == tuple(meta["mean"])
    assert spec.available()[0]
    assert sup_source.name in [s.name for s in list_sources([sup_source])]
    assert sup_source.name in [s.name for s in list_sources([sup_source.parent])]  # a folder of sources


def test_train_from_own_source_loads_its_backbone(sup_source, small_npz, tmp_path, cli_main, capsys):
    assert cli_main(["sources", "--dir", str(sup_source)]) == 0
    assert sup_source.name in capsys.readouterr().out
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(small_npz), "--source", str(sup_source), "--strategy", "linear-probe",
                     "--image-size", "32", "--bootstrap", "0", "--no-cache", "--out", str(run)]) == 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["resolved"]["source"]["weights_sha256"] == sha256_file(sup_source / "model.safetensors")
    model, info = build_model(resolve_source(str(sup_source)), num_classes=2, data_chans=1)
    src = load_file(str(sup_source / "model.safetensors"))
    own = model.net.state_dict()
    assert info["loaded_keys"] == len(src)
    for k, v in src.items():
        torch.testing.assert_close(own[k], v)
    trained = load_file(str(run / "model.safetensors"))  # linear probe: the backbone is the source's, untouched
    torch.testing.assert_close(trained["net.conv1.0.weight"], src["conv1.0.weight"])


def test_supervised_from_another_source_and_arch_mismatch(sup_source, small_npz, tmp_path, cli_main, capsys):
    out = tmp_path / "chained"
    assert cli_main(["pretrain", "supervised", "--data", str(small_npz), "--source", str(sup_source), "--out", str(out),
                     "--image-size", "32", "--epochs", "1"]) == 0
    meta = json.loads((out / "source.json").read_text())
    assert meta["init"]["weights_sha256"] == sha256_file(sup_source / "model.safetensors")
    assert meta["trained_on"]["strategy"] == "full"
    assert _changed(load_file(str(sup_source / "model.safetensors")), load_file(str(out / "model.safetensors")))
    code = cli_main(["pretrain", "supervised", "--data", str(small_npz), "--init", str(sup_source),
                     "--out", str(tmp_path / "x")])
    assert code == 2 and "--init was renamed: start from a source with --source" in capsys.readouterr().err
    code = cli_main(["pretrain", "supervised", "--data", str(small_npz), "--arch", "test_resnet", "--out", str(out)])
    assert code == 2 and "--source test_resnet --weights none" in capsys.readouterr().err
    code = cli_main(["pretrain", "supervised", "--data", str(small_npz), "--source", "test_resnet", "--weights", "none",
                     "--out", str(out)])
    assert code == 2 and "already a source directory" in capsys.readouterr().err


def test_grey_source_into_rgb_target(sup_source):
    model, info = build_model(resolve_source(str(sup_source)), num_classes=2, data_chans=3)
    x = torch.rand(2, 1, 32, 32)
    grey, _ = build_model(resolve_source(str(sup_source)), num_classes=2, data_chans=1)
    with torch.no_grad():  # an RGB image of grey pixels gives what the grey source saw
        torch.testing.assert_close(model.eval().features(x.expand(-1, 3, -1, -1)), grey.eval().features(x),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_ssl_methods_train_and_make_a_source(method, eff_source, ssl_npz, tmp_path):
    out = tmp_path / method
    meta = pretrain_ssl(SSLConfig.create(data=str(ssl_npz), out=str(out), method=method, source=str(eff_source),
                                         image_size=32, epochs=1, batch_size=16, seed=0))
    assert SOURCE_KEYS <= set(meta) and TRAINED_ON_KEYS <= set(meta["trained_on"])
    t = meta["trained_on"]
    assert math.isfinite(t["metrics"]["loss_first_epoch"])
    assert t["labels"] == "ignored" and t["test_excluded"] and t["counts"] == {"train": 48, "val": 16}
    assert meta["in_chans"] == 1 and meta["mean"] == [0.5]
    assert _changed(load_file(str(eff_source / "model.safetensors")), load_file(str(out / "model.safetensors")))
    model, info = build_model(read_source_dir(out), num_classes=2, data_chans=1)  # usable as a source
    assert info["weights_sha256"] == meta["weights_sha256"]


def test_ssl_needs_no_labels(tmp_path, cli_main, capsys):
    x = np.load(BREAST)
    np.savez(tmp_path / "unlabelled.npz", images=x["train_images"][:64])
    out = tmp_path / "src"
    assert cli_main(["pretrain", "ssl", "--data", str(tmp_path / "unlabelled.npz"), "--source", "test_resnet",
                     "--weights", "none", "--method", "simclr", "--out", str(out), "--image-size", "32", "--epochs", "1",
                     "--batch-size", "32"]) == 0
    meta = json.loads((out / "source.json").read_text())
    assert meta["trained_on"]["labels"] == "none" and meta["trained_on"]["counts"] == {"images": 64}
    assert meta["init"] is None and "random init" in meta["description"]
    capsys.readouterr()
    assert cli_main(["sources", "--dir", str(out)]) == 0 and "simclr" in capsys.readouterr().out


def test_resume_continues_from_the_last_epoch(eff_source, ssl_npz, tmp_path):
    base = dict(data=str(ssl_npz), method="simclr", source=str(eff_source), image_size=32, epochs=2, batch_size=16)
    pretrain_ssl(SSLConfig.create(out=str(tmp_path / "straight"), **base))
    cut = tmp_path / "cut"
    with stop_after(1):  # the process dies after epoch 1 was checkpointed
        pretrain_ssl(SSLConfig.create(out=str(cut), **base))
    ckpt = torch.load(runs.checkpoint_path(cut), map_location="cpu", weights_only=True)  # plain tensors/numbers only
    assert ckpt["loop"]["epoch"] == 1 and len(ckpt["loop"]["history"]) == 1 and not (cut / "source.json").exists()
    with pytest.raises(MedxferError, match="--resume"):
        pretrain_ssl(SSLConfig.create(out=str(cut), **base))
    with pytest.raises(MedxferError, match="'batch_size' was 16"):
        pretrain_ssl(SSLConfig.create(out=str(cut), **{**base, "batch_size": 8}, resume=True))
    with stop_after(2):  # keep the epoch-2 checkpoint to grow the run from
        pretrain_ssl(SSLConfig.create(out=str(cut), resume=True, **base))
    at_2 = torch.load(runs.checkpoint_path(cut), map_location="cpu", weights_only=True)["loop"]
    assert [r["epoch"] for r in at_2["history"]] == [1, 2]  # epoch 2 ran once, after the resume
    meta = pretrain_ssl(SSLConfig.create(out=str(cut), resume=True, **base))
    assert meta["trained_on"]["epochs"] == 2
    after = load_file(str(cut / "model.safetensors"))
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    for k in after:  # the resumed run ends where the uninterrupted one ends
        torch.testing.assert_close(after[k], straight[k], atol=1e-4, rtol=1e-4)
    assert not runs.staging_dir(cut).exists()  # a finished source keeps no checkpoint
    # --epochs may grow: from the epoch-2 checkpoint, epoch 3 trains on
    files.write_checkpoint(runs.checkpoint_path(cut), {"signature": SSLConfig.create(**base).signature(),
                                                       "loop": at_2}, "medxfer-loop-checkpoint/2")
    (cut / "source.json").unlink()
    meta = pretrain_ssl(SSLConfig.create(out=str(cut), resume=True, **{**base, "epochs": 3}))
    assert meta["trained_on"]["epochs"] == 3 and len(meta["trained_on"]["metrics"]["history"]) == 3
    at_3 = load_file(str(cut / "model.safetensors"))
    assert _changed({k: at_2["step_state"]["model"]["backbone.net." + k] for k in at_3}, at_3)
    torch.testing.assert_close(at_2["step_state"]["model"]["backbone.net.conv_stem.weight"], after["conv_stem.weight"])


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path, fmt = tmp_path / "checkpoint.pt", "test/1"
    files.write_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(3)}}, fmt)

    def dies_half_way(obj, f, *a, **k):
        f.write(b"\x80\x02 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        files.write_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(3)}}, fmt)
    monkeypatch.undo()
    ckpt = files.read_checkpoint(path, fmt, "test")
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no half-written file left behind
    path.write_bytes(b"garbage")
    with pytest.raises(MedxferError, match="cannot read checkpoint"):
        files.read_checkpoint(path, fmt, "test")


def test_two_views_are_grey_safe_and_seeded():
    x = torch.rand(8, 1, 32, 32)
    aug = SSLAugment(hflip=True)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    rgb = aug(x.expand(-1, 3, -1, -1).contiguous(), torch.Generator().manual_seed(0))
    torch.testing.assert_close(rgb[:, 0], rgb[:, 2])  # no colour jitter: grey stays grey


def test_ssl_refuses_bad_settings(tmp_path):
    with pytest.raises(MedxferError, match="'method' parameter"):
        SSLConfig.create(data="x", out="y", method="mae")
    with pytest.raises(MedxferError, match="test split"):
        SSLConfig.create(data="x", out="y", splits="train,test")
    with pytest.raises(MedxferError, match="'splits' parameter"):
        SSLConfig.create(data="x", out="y", splits="train,tset")
    with pytest.raises(MedxferError, match="nothing to resume"):
        pretrain_ssl(SSLConfig.create(data="x", out=str(tmp_path), source="test_resnet", weights="none", resume=True))


def test_ssl_on_the_train_split_only(ssl_npz, tmp_path, cli_main):
    out = tmp_path / "train_only"
    assert cli_main(["pretrain", "ssl", "--data", str(ssl_npz), "--source", "test_resnet", "--weights", "none",
                     "--out", str(out), "--image-size", "32", "--epochs", "1", "--batch-size", "16", "--splits",
                     "train"]) == 0
    t = json.loads((out / "source.json").read_text())["trained_on"]
    assert t["splits_used"] == ["train"] and t["counts"] == {"train": 48}


def test_unlabelled_folder_leaves_out_hidden_system_and_run_folders(tmp_path):
    """Self-supervised data from a folder: notebook checkpoints, macOS copies and a run written into the
    folder are not images to learn from."""
    from PIL import Image

    from medxfer.errors import MedxferError
    from medxfer.pretrain.common import _unlabelled_folder

    for rel in ("a/0.png", "a/1.png", "b/2.png", ".ipynb_checkpoints/0.png", "__MACOSX/a/._0.png",
                "runs/r/plots/roc.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8)).save(tmp_path / rel, format="PNG")
    for name in ("model.json", "model.safetensors"):
        (tmp_path / "runs/r" / name).write_text("{}")
    m = _unlabelled_folder(tmp_path, MedxferError("unlabelled"))
    assert len(m.table) == 3
