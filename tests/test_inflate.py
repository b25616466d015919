"""2-D -> 3-D inflation (I3D, ACS): transfer of ImageNet weights to volumes (N, C, D, H, W)."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

from medxfer.errors import MedxferError
from medxfer.models import build_model, resolve_source
from medxfer.models.inflate import (
    ACSConv,
    InflatedConv3d,
    expand_norm_buffers,
    inflate_to_3d,
)

pytestmark = pytest.mark.slow  # end to end: a few seconds to a minute each


def _random_bn_stats(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that a BatchNorm that is dropped or mis-copied shows."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


def _pooled(net, x):
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _depth_constant(img: torch.Tensor, depth: int) -> torch.Tensor:
    return img.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()


@pytest.fixture(scope="module")
def lite0():
    """The real ImageNet EfficientNet-Lite0 (grey stem), as the project builds it."""
    model, info = build_model(resolve_source("efficientnet_lite0.in1k"), 2, 1)
    assert info["loaded_keys"] > 200
    return model.eval()


def test_i3d_lite0_imagenet_depth_constant_volume_gives_2d_features(lite0):
    model = copy.deepcopy(lite0)
    net2 = lite0.net
    inflate_to_3d(model.net, "i3d")
    model.mean, model.std = expand_norm_buffers(model.mean, model.std, spatial_dims=3)
    assert isinstance(model.net.conv_stem, InflatedConv3d) and model.net.conv_stem.pads is None  # TF 'same' kept
    torch.testing.assert_close(model.net.conv_stem.weight.sum(2), net2.conv_stem.weight)  # repeated / k
    img = torch.rand(2, 1, 33, 40)  # odd/even sizes: TF 'same' pads asymmetrically
    with torch.no_grad():
        f2 = lite0.features(img)
        assert f2.shape == (2, 1280) and f2.std() > 0.1
        for depth in (1, 6):  # one slice, and a volume whose borders matter at every stage
            torch.testing.assert_close(model.features(_depth_constant(img, depth)), f2, atol=1e-4, rtol=1e-4)


def test_i3d_zero_depth_padding_breaks_the_property_at_borders(lite0):
    """Why replicate is the default: zero depth padding dims the border slices (1/k per layer)."""
    net = inflate_to_3d(copy.deepcopy(lite0.net), "i3d", depth_padding="zeros")
    img = torch.rand(2, 1, 33, 40)
    with torch.no_grad():
        gap = (_pooled(net, _depth_constant(img, 6)) - _pooled(lite0.net, img)).abs().max()
    assert gap > 1e-2


def test_i3d_zero_depth_padding_is_exact_away_from_borders():
    conv = nn.Conv2d(3, 4, 5, padding=2)
    conv3 = inflate_to_3d(nn.Sequential(copy.deepcopy(conv)), "i3d", depth_padding="zeros")[0]
    img = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        out = conv3(_depth_constant(img, 7))
        ref = conv(img)
    torch.testing.assert_close(out[:, :, 2:5], ref.unsqueeze(2).expand(-1, -1, 3, -1, -1))
    assert (out[:, :, 0] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("arch,train", [("test_efficientnet", False), ("test_resnet", False), ("test_resnet", True)])
def test_i3d_tiny_models_depth_constant_volume_gives_2d_features(arch, train):
    net2 = _random_bn_stats(timm.create_model(arch, num_classes=3)).train(train)
    net3 = inflate_to_3d(copy.deepcopy(net2), "i3d")
    img = torch.randn(2, 3, 33, 40)
    with torch.no_grad():  # in training mode too: batch statistics over (N, D, H, W) == over (N, H, W)
        torch.testing.assert_close(_pooled(net3, _depth_constant(img, 4)), _pooled(net2, img), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("hw", [(7, 8), (8, 7)])
def test_i3d_padding_layers_keep_the_property(hw):
    """TF 'same' (dynamic), torch 'same' with an even kernel, pad modules, strided pools."""
    layers = nn.Sequential(
        Conv2dSame(2, 4, 3, stride=2),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.Conv2d(4, 4, 4, padding="same"),
        nn.ReflectionPad2d(1),
        nn.Conv2d(4, 4, 3, groups=4),
        nn.AvgPool2d(3, stride=1, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    net3 = inflate_to_3d(copy.deepcopy(layers), "i3d")
    img = torch.randn(1, 2, *hw)
    with torch.no_grad():
        ref = layers(img)
        for depth in (3, 4, 9):  # a pad layer pads depth like height, so the unpadded conv needs depth >= 2
            out = net3(_depth_constant(img, depth))
            torch.testing.assert_close(out, ref.unsqueeze(2).expand_as(out))


@pytest.mark.parametrize("ceil_mode,count_include_pad", [(True, False), (False, True), (True, True)])
def test_avg_pools_match_torch_and_accept_thin_volumes(ceil_mode, count_include_pad):
    pool = inflate_to_3d(nn.Sequential(nn.AvgPool2d(3, 2, 1, ceil_mode, count_include_pad)), "i3d",
                         depth_padding="zeros")[0]
    x = torch.randn(2, 3, 7, 9, 8)
    torch.testing.assert_close(pool(x), F.avg_pool3d(x, 3, 2, 1, ceil_mode, count_include_pad))
    down = inflate_to_3d(nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)))[0]
    assert down(torch.rand(1, 2, 1, 5, 5)).shape == (1, 2, 1, 3, 3)  # ResNet-D shortcut on a 1-slice map


def _acs_dense_reference(conv: nn.Conv2d, x, pads, depth_mode="constant"):
    """ACS as a plain Conv3d: each third's 2-D kernel sits in the centre plane of the axis it skips."""
    w = conv.weight.detach()
    o, _, k, _ = w.shape
    a, b = (o + 2) // 3, (o + 1) // 3
    c = (k - 1) // 2
    dense = torch.zeros(*w.shape[:2], k, k, k)
    dense[:a, :, c] = w[:a]
    dense[a:a + b, :, :, c] = w[a:a + b]
    dense[a + b:, :, :, :, c] = w[a + b:]
    (d0, d1), (h0, h1), (w0, w1) = pads
    x = F.pad(x, (0, 0, 0, 0, d0, d1), mode=depth_mode)
    x = F.pad(x, (w0, w1, h0, h1, 0, 0))
    s = conv.stride[0]
    return F.conv3d(x, dense, conv.bias, (s, s, s), 0, 1, conv.groups)


def _tf_same(n, k, s):
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("depth_padding", ["zeros", "replicate"])
@pytest.mark.parametrize("kind", ["same_s2", "static_k5", "depthwise_s2", "torch_same_k4"])
def test_acs_equals_conv3d_with_kernels_in_the_three_planes(kind, depth_padding):
    torch.manual_seed(0)
    conv = {"same_s2": Conv2dSame(3, 7, 3, stride=2, bias=True),
            "static_k5": nn.Conv2d(3, 8, 5, padding=2),
            "depthwise_s2": Conv2dSame(6, 6, 3, stride=2, groups=6),
            "torch_same_k4": nn.Conv2d(3, 5, 4, padding="same")}[kind]
    acs = inflate_to_3d(nn.Sequential(copy.deepcopy(conv)), "acs", depth_padding=depth_padding)[0]
    assert isinstance(acs, ACSConv)
    for size in [(6, 9, 8), (7, 8, 9)]:
        x = torch.randn(2, conv.in_channels, *size)
        k, s = conv.kernel_size[0], conv.stride[0]
        if isinstance(conv, Conv2dSame):
            pads = tuple(_tf_same(n, k, s) for n in size)
        else:
            pads = (((k - 1) // 2, k // 2),) * 3
        mode = "replicate" if depth_padding == "replicate" else "constant"
        with torch.no_grad():
            torch.testing.assert_close(acs(x), _acs_dense_reference(conv, x, pads, mode), atol=1e-5, rtol=1e-5)


def test_acs_lite0_imagenet_axial_third_is_the_2d_response_and_weights_are_2d(lite0):
    net2 = lite0.net
    net3 = inflate_to_3d(copy.deepcopy(net2), "acs")
    sd2, sd3 = net2.state_dict(), net3.state_dict()
    assert sd2.keys() == sd3.keys()
    for key, v in sd2.items():  # the 2-D kernels and statistics themselves: nothing random
        assert torch.equal(sd3[key], v), key
    img = torch.rand(2, 1, 37, 40) * 2 - 1
    with torch.no_grad():
        out2 = net2.bn1(net2.conv_stem(img))
        out3 = net3.bn1(net3.conv_stem(_depth_constant(img, 5)))
    axial = net3.conv_stem.split[0]
    assert out3.shape == (2, 32, 3, 19, 20) and axial == 11
    torch.testing.assert_close(out3[:, :axial], out2[:, :axial].unsqueeze(2).expand(-1, -1, 3, -1, -1))
    assert (out3[:, axial:] - out2[:, axial:].unsqueeze(2)).abs().max() > 0.1  # the other planes differ


@pytest.mark.parametrize("mode", ["i3d", "acs"])
def test_lite0_volume_shapes_and_gradients(lite0, mode):
    net = inflate_to_3d(copy.deepcopy(lite0.net), mode).train()
    vol = torch.rand(2, 1, 4, 16, 20)
    logits = net(vol)
    assert logits.shape == (2, 2)
    assert net.forward_features(vol).shape == (2, 1280, 1, 1, 1)
    logits.logsumexp(1).sum().backward()
    convs = [m for m in net.modules() if isinstance(m, (InflatedConv3d, ACSConv))]
    assert len(convs) == 49  # 44 Conv2d + 5 Conv2dSame
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in convs)
    assert not any(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in net.modules())


@pytest.mark.parametrize("mode", ["i3d", "acs"])
def test_head_api_and_reset_classifier_stay_3d(mode):
    net = inflate_to_3d(timm.create_model("test_efficientnet", num_classes=3), mode).eval()
    vol = torch.rand(2, 3, 8, 16, 16)
    assert net.get_classifier() is net.classifier and net(vol).shape == (2, 3)
    assert net.forward_head(net.forward_features(vol), pre_logits=True).shape == (2, net.num_features)
    net.reset_classifier(5)
    assert isinstance(net.global_pool.pool, nn.AdaptiveAvgPool3d) and net(vol).shape == (2, 5)
    net.reset_classifier(0, global_pool="max")
    assert isinstance(net.global_pool.pool, nn.AdaptiveMaxPool3d) and net(vol).shape == (2, net.num_features)
    clone = copy.deepcopy(net)
    clone.reset_classifier(4)  # acts on the copy, not on the original
    assert clone(vol).shape == (2, 4) and net(vol).shape == (2, net.num_features)


@pytest.mark.parametrize("mode", ["i3d", "acs"])
def test_state_dict_reloads_into_a_fresh_inflated_net(mode):
    trained = inflate_to_3d(_random_bn_stats(timm.create_model("test_resnet", num_classes=2)), mode).eval()
    fresh = inflate_to_3d(timm.create_model("test_resnet", num_classes=2), mode).eval()
    fresh.load_state_dict(trained.state_dict(), strict=True)
    vol = torch.rand(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(vol), trained(vol))


def test_frozen_parameters_stay_frozen():
    net = timm.create_model("test_resnet", num_classes=2)
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    inflate_to_3d(net, "i3d")
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_expand_norm_buffers_broadcast_over_volumes():
    mean, std = expand_norm_buffers((0.485, 0.456, 0.406), torch.tensor([0.2, 0.3, 0.4]).view(1, -1, 1, 1))
    assert mean.shape == std.shape == (1, 3, 1, 1, 1) and mean.dtype == torch.float32
    x = torch.ones(2, 3, 4, 5, 6)
    torch.testing.assert_close(((x - mean) / std)[0, 2, 3, 4, 5], torch.tensor((1 - 0.406) / 0.4))
    with pytest.raises(MedxferError, match="'spatial_dims' parameter must be 1, 2 or 3"):
        expand_norm_buffers((0.5,), (0.5,), spatial_dims=4)


def test_unsupported_layers_and_options_are_refused_before_any_change():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
    with pytest.raises(MedxferError, match="layer '1' of type 'LayerNorm'"):
        inflate_to_3d(net)
    assert type(net[0]) is nn.Conv2d  # untouched
    with pytest.raises(MedxferError, match="type 'VisionTransformer'"):
        inflate_to_3d(timm.create_model("test_vit"))
    with pytest.raises(MedxferError, match="square kernels"):
        inflate_to_3d(nn.Sequential(nn.Conv2d(4, 4, (1, 3), padding=(0, 1))), "acs")
    with pytest.raises(MedxferError, match="groups=2"):
        inflate_to_3d(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "acs")
    with pytest.raises(MedxferError, match=r"^The 'mode' parameter must be 'i3d' or 'acs'. Got 'r2plus1d' instead.$"):
        inflate_to_3d(net, "r2plus1d")
    with pytest.raises(MedxferError, match="'depth_padding' parameter"):
        inflate_to_3d(net, depth_padding="reflect")
    done = inflate_to_3d(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(MedxferError, match="already inflated"):
        inflate_to_3d(done, "acs")


def test_onnx_export_of_inflated_model_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    net = inflate_to_3d(_random_bn_stats(timm.create_model("test_efficientnet", num_classes=2)), "i3d").eval()
    path = tmp_path / "m.onnx"
    x = torch.rand(2, 3, 16, 32, 32)
    torch.onnx.export(net, (x,), str(path), dynamo=True,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.rand(5, 3, 16, 32, 32)  # another batch size than exported with
    got = session.run(None, {session.get_inputs()[0].name: x5.numpy()})[0]
    with torch.no_grad():
        want = net(x5).numpy()
    assert got.shape == (5, 2) and abs(got - want).max() < 1e-4
