"""Augmentation presets (determinism, resume, range, flips, corruptions) and ONNX-exportable TTA."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, asdict, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BREAST

from medxfer.data.augment import CORRUPTIONS, PRESETS, TTA, Augment, corrupt, tta_views
from medxfer.errors import MedxferError


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Eight real BreastMNIST images, float (8, 1, 32, 32) in [0, 1]."""
    x = torch.from_numpy(np.load(BREAST)["test_images"][:8]).float().div(255)[:, None]
    return F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def test_presets_are_frozen_dataclasses_and_light_is_default():
    assert {"none", "light", "strong", "generic", "xray", "ultrasound", "ct", "mri", "dermoscopy",
            "fundus"} <= set(PRESETS)
    assert asdict(PRESETS["xray"])["rotate"] == 10.0
    with pytest.raises(FrozenInstanceError):
        PRESETS["xray"].rotate = 3.0
    assert Augment().preset.name == "light"
    for name in ("none", "light", "strong", "generic", "xray", "ultrasound", "ct", "mri"):
        assert not PRESETS[name].hflip and not PRESETS[name].vflip, name


def test_same_seed_same_output_different_seeds_differ(images):
    for name in ("light", "xray", "strong"):
        a, b = Augment(name, seed=1)(images), Augment(name, seed=1)(images)
        assert torch.equal(a, b)
        assert not torch.allclose(a, Augment(name, seed=2)(images))


def test_state_dict_resumes_the_stream_exactly(images):
    a = Augment("strong", seed=3)
    a(images)
    state = a.state_dict()
    expected = [a(images), a(images)]
    b = Augment("strong", seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(b(images), e) for e in expected)
    c = Augment("strong", seed=5)
    c.load_state_dict(state["gen"])             # the trainer keeps only the generator's state
    assert torch.equal(c(images), expected[0])
    with pytest.raises(MedxferError, match="resume with the same --augment"):
        Augment("xray").load_state_dict(state)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_range_shape_dtype_kept(images, name):
    for x in (images, images.double(), images.expand(-1, 3, -1, -1).contiguous()):
        y = Augment(name, seed=0)(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert float(y.min()) >= 0 and float(y.max()) <= 1
    volume = images[:2, :, None].expand(-1, -1, 8, -1, -1).contiguous()    # (2, 1, 8, 32, 32)
    y = Augment(name, seed=0)(volume)
    assert y.shape == volume.shape and float(y.min()) >= 0 and float(y.max()) <= 1


def test_channels_last_layout_is_kept(images):
    x = images.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
    assert Augment("fundus")(x).is_contiguous(memory_format=torch.channels_last)


def _mirrored(y: torch.Tensor, ramp: torch.Tensor) -> torch.Tensor:
    """Per image: closer to the mirrored ramp than to the ramp itself."""
    d = lambda a, b: (a - b).flatten(1).pow(2).mean(1)  # noqa: E731
    return d(y, ramp.flip(-1)) < d(y, ramp)


def test_hflip_false_never_mirrors():
    ramp = torch.linspace(0.1, 0.9, 32).view(1, 1, 1, 32).expand(64, 3, 32, 32).contiguous()
    flat = replace(PRESETS["dermoscopy"], scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate=0.0, shift=0.0,
                   vflip=False, corruptions=())
    assert PRESETS["dermoscopy"].hflip                  # the preset allows flips ...
    for seed in range(3):
        assert not _mirrored(Augment(flat, seed=seed, hflip=False)(ramp), ramp).any()   # ... the override not
    flipped = _mirrored(Augment(flat, seed=0)(ramp), ramp)
    assert 10 < int(flipped.sum()) < 54                 # the check does see flips when they are allowed
    for name in ("xray", "light", "strong"):            # modality presets with geometry turned down
        p = replace(PRESETS[name], scale=(1.0, 1.0), ratio=(1.0, 1.0), rotate=0.0, shift=0.0, corruptions=())
        assert not _mirrored(Augment(p, seed=0)(ramp[:, :1]), ramp[:, :1]).any()
    assert _mirrored(Augment(replace(PRESETS["xray"], rotate=0.0), hflip=True, seed=0)(ramp[:, :1]),
                     ramp[:, :1]).any()


def test_none_is_identity(images):
    aug = Augment("none")
    assert not aug and (aug or None) is None
    assert aug(images) is images
    assert bool(Augment("light")) and isinstance(Augment("light").gen, torch.Generator)


def test_unknown_preset_is_one_clear_line():
    with pytest.raises(MedxferError) as e:
        Augment("xrya")
    msg = str(e.value)
    assert msg.startswith("The 'augment' parameter must be one of ['none', 'light', 'strong'")
    assert "Got 'xrya' instead. Did you mean 'xray'?" in msg and "\n" not in msg


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_each_corruption_changes_the_image_and_keeps_range(images, name):
    x = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False).clamp(0, 1)
    level = {"gaussian_noise": 0.05, "speckle_noise": 0.2, "shot_noise": 60, "gaussian_blur": 0.02,
             "jpeg": 30, "pixelate": 0.5}[name]
    y = corrupt(x, name, level, gen=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().flatten(1).mean(1).min() > 1e-3           # every image changed
    if name != "jpeg":                                              # volumes too (JPEG: images only)
        v = x[:2, :, None].expand(-1, -1, 8, -1, -1).contiguous()
        w = corrupt(v, name, level, gen=torch.Generator().manual_seed(0))
        assert w.shape == v.shape and float(w.min()) >= 0 and float(w.max()) <= 1 and not torch.equal(w, v)
    with pytest.raises(MedxferError, match="Did you mean 'jpeg'"):
        corrupt(x, "jpg", 50)


def test_tta_views_are_deterministic_and_flip_only_when_allowed():
    assert tta_views(1) == tta_views(1, hflip=True)
    assert tta_views(6) == tta_views(6)
    v = tta_views(6)
    assert v[0].zoom == 1 and v[0].dx == v[0].dy == 0 and not v[0].hflip
    assert not any(view.hflip for view in v)
    assert tta_views(2, hflip=True)[1].hflip and len(tta_views(12, hflip=True)) == 12
    with pytest.raises(MedxferError, match="between 1 and 6 \\(12 with --hflip\\). Got 7"):
        tta_views(7)


@pytest.fixture(scope="module")
def tiny_model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_resnet", pretrained=False, in_chans=1, num_classes=2).eval()


def test_tta_n1_is_the_model_and_n_views_average(images, tiny_model):
    with torch.no_grad():
        assert torch.equal(TTA(tiny_model, n=1)(images), tiny_model(images))
        tta = TTA(tiny_model, n=3, hflip=True)
        manual = (tiny_model(images) + tiny_model(images.flip(-1)) + tiny_model(tta.view(images, 2))) / 3
        assert tta.view(images, 2).shape == images.shape and not torch.equal(tta.view(images, 2), images)
        torch.testing.assert_close(tta(images), manual, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tta_exports_to_onnx_and_matches(images, tiny_model, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = TTA(tiny_model, n=3, hflip=True).eval()    # identity, mirror, zoom (grid_sample)
    path = tmp_path / "tta.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (images[:2],), str(path), dynamo=True, dynamic_shapes={"x": {0: batch}},
                      external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x in (images, images[:3]):
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_the_options_list_exactly_the_presets_augment_applies():
    """One list: --augment takes what medxfer.data.presets defines, no copy to keep in step."""
    from medxfer.config import AUGMENT_PRESETS, OptimOptions, TrainConfig

    assert AUGMENT_PRESETS == tuple(PRESETS)
    for name in PRESETS:
        assert TrainConfig.create(data="x.npz", augment=name).optim.augment == name
    with pytest.raises(MedxferError, match="augment"):
        OptimOptions(augment="heavy")


def test_transforms_keeps_no_second_augmentation():
    """data.transforms is preprocessing only; its old Augment and PRESETS shadowed these."""
    from medxfer.data import transforms

    assert not hasattr(transforms, "Augment") and not hasattr(transforms, "PRESETS")
    assert "Augment(" not in (transforms.__doc__ or "")  # its docstring no longer advertises one
