"""Source models: bundled ImageNet weights, local weight files, grey stems, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from medxfer.errors import MedxferError
from medxfer.models import build_model, resolve_source
from medxfer.models.weights import read_state_dict


def test_bundled_lite0_is_really_imagenet():
    """scikit-image's chelsea photo is a cat: ImageNet classes 281-285."""
    skimage_data = pytest.importorskip("skimage.data")
    model, info = build_model(resolve_source("efficientnet_lite0.in1k"), num_classes=1000, data_chans=3)
    assert info["weights_sha256"] and len(info["weights_sha256"]) == 64
    img = torch.tensor(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model.eval()(img).softmax(1).argmax(1).item()
    assert 281 <= top <= 285


@pytest.mark.parametrize("i", [1, 2])
def test_bundled_lite1_lite2_load_every_backbone_key(i):
    model, info = build_model(resolve_source(f"efficientnet_lite{i}.in1k"), num_classes=2, data_chans=1)
    assert info["unexpected_keys"] == [] and info["loaded_keys"] > 200


def test_grey_stem_sums_rgb_weights():
    spec = resolve_source("efficientnet_lite0.in1k")
    rgb, _ = build_model(spec, 2, data_chans=3)
    grey, info = build_model(spec, 2, data_chans=1, grey_mode="sum")
    rep, info_rep = build_model(spec, 2, data_chans=1, grey_mode="replicate")
    assert info["in_chans"] == 1 and info_rep["in_chans"] == 3
    torch.testing.assert_close(grey.net.conv_stem.weight, rgb.net.conv_stem.weight.sum(1, keepdim=True))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():  # mean = std = 0.5 on every channel: summing the stem == replicating grey
        torch.testing.assert_close(grey.eval().features(x), rep.eval().features(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_local_file(tmp_path, suffix):
    src = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":  # a wrapped checkpoint as trainers write them
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file(src.state_dict(), str(path))
    model, info = build_model(resolve_source("test_resnet", str(path)), 3, data_chans=3)
    torch.testing.assert_close(model.net.layer1[0].conv1.weight, src.layer1[0].conv1.weight)
    assert model.net.fc.out_features == 3  # a new head for the target labels


def test_mismatched_weights_are_refused(tmp_path):
    path = tmp_path / "effnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(MedxferError, match="do not match architecture 'test_resnet'.*backbone keys missing"):
        build_model(resolve_source("test_resnet", str(path)), 2, data_chans=3)


def test_pickled_code_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": np.dtype("float32")}, path)  # not a plain tensor dict
    with pytest.raises(MedxferError, match="weights_only|state dict"):
        read_state_dict(path)


def test_unknown_source_suggests_a_name():
    with pytest.raises(MedxferError, match="Did you mean 'efficientnet_lite0.in1k'"):
        resolve_source("efficientnet_lite0.in1")


def test_timm_arch_without_weights_says_what_to_do():
    with pytest.raises(MedxferError, match="--weights FILE"):
        resolve_source("resnet18")


def test_hub_offline_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    spec = resolve_source("resnet18", "hub")
    from medxfer.models.weights import source_state_dict

    with pytest.raises(MedxferError, match="--weights FILE"):
        source_state_dict(spec, None)
