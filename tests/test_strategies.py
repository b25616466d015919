"""Strategies: what trains, at which learning rate; frozen parts stay exactly as loaded."""

from __future__ import annotations

import pytest
import torch

from medxfer.config import OptimOptions
from medxfer.engine.optim import build_optimizer, layer_groups, param_groups
from medxfer.engine.trainer import fit
from medxfer.errors import MedxferError
from medxfer.models import build_model, resolve_source


@pytest.fixture
def model():
    return build_model(resolve_source("test_resnet", "none"), 2, data_chans=1)[0]


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_linear_probe_trains_the_head_only_and_keeps_batchnorm_fixed(model):
    groups = param_groups(model, "linear-probe", lr=1e-2)
    assert trainable(model) == {"net.fc.weight", "net.fc.bias"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 255, (32, 1, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 2, (32,))
    fit(model, groups, x, y, x[:8], y[:8], OptimOptions().fit_settings(2, batch_size=8, channels_last=False))
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("net.fc.") for k in changed)  # BN running stats untouched too


def test_partial_unfreezes_the_last_stages(model):
    param_groups(model, "partial", lr=1e-3, unfreeze=1)
    names = trainable(model)
    assert any(n.startswith("net.layer4.") for n in names)
    assert not any(n.startswith(("net.layer3.", "net.conv1.")) for n in names)
    with pytest.raises(MedxferError, match="unfreeze"):
        param_groups(model, "partial", lr=1e-3, unfreeze=99)


def test_full_puts_the_backbone_at_a_lower_rate(model):
    groups = param_groups(model, "full", lr=1e-3, backbone_lr_mult=0.1)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"backbone": pytest.approx(1e-4), "head": 1e-3}
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_layer_decay_grows_with_depth(model):
    groups = param_groups(model, "full", lr=1e-3, layer_decay=0.5)
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs) and lrs[-1] == 1e-3 and lrs[0] < lrs[-2]
    assert len(groups) == len(layer_groups(model))


def test_scratch_differs_from_the_pretrained_init(tmp_path):
    import timm

    path = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    spec = resolve_source("test_resnet", str(path))
    pre, _ = build_model(spec, 2, data_chans=3)
    scratch, info = build_model(spec, 2, data_chans=3, pretrained=False)
    assert info["weights_sha256"] is None
    assert not torch.equal(pre.net.layer1[0].conv1.weight, scratch.net.layer1[0].conv1.weight)


def test_ema_changes_the_kept_weights():
    """Same init, same data, same seed: only the EMA differs, so the kept weights must differ."""
    x = torch.randint(0, 255, (32, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(32) % 2
    kept = []
    for average in ("none", "ema"):
        torch.manual_seed(0)
        m = build_model(resolve_source("test_resnet", "none"), 2, data_chans=1)[0]
        result = fit(m, param_groups(m, "full", lr=1e-2), x, y, x[:8], y[:8],
                     OptimOptions().fit_settings(3, batch_size=8, channels_last=False, average=average,
                                                 ema_epochs=1.0, patience=99))
        assert len(result.history) == 3
        kept.append(m.net.fc.weight.detach().clone())
    assert not torch.allclose(kept[0], kept[1])


def test_default_epochs_and_patience_scale_with_the_train_set():
    from medxfer.config import TrainConfig
    from medxfer.strategies import MAX_AUTO_EPOCHS, MIN_PATIENCE_STEPS, STRATEGIES

    cfg = TrainConfig.create(data="x", strategy="full", batch_size=64)
    assert cfg.epochs_for(64 * 100) == 10                     # large data: the default
    assert cfg.epochs_for(64 * 10) == STRATEGIES["full"].min_steps // 10  # small data: enough optimiser steps
    assert cfg.epochs_for(47) == MAX_AUTO_EPOCHS              # one step per epoch: capped
    assert cfg.replace(epochs=3).epochs_for(47) == 3          # given epochs are kept
    assert cfg.patience_for(64 * 100) == 10
    assert cfg.patience_for(47) == MIN_PATIENCE_STEPS         # one step per epoch: wait that many steps
    assert cfg.patience_for(64 * 2, world=2) == MIN_PATIENCE_STEPS
    with pytest.raises(MedxferError, match="patience"):
        TrainConfig.create(data="x", patience=0)


def test_no_weight_decay_on_biases_and_norm_weights(model):
    """timm's rule: 1-D parameters (biases, norm weights) are not decayed; kernels are."""
    groups = param_groups(model, "full", 1e-2)
    opt = build_optimizer(model, groups, weight_decay=0.05)
    by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_id[id(named["net.fc.bias"])] == 0.0 and by_id[id(named["net.fc.weight"])] == 0.05
    norms = [p for n, p in named.items() if p.ndim == 1]
    assert norms and all(by_id[id(p)] == 0.0 for p in norms)
    lrs = {g["lr"] for g in opt.param_groups}
    assert lrs == {1e-2, 1e-3}  # the head at lr, the backbone at lr x 0.1: kept through the split


# --------------------------------------------------------------------- a strategy is one registry entry
@pytest.fixture
def dummy_strategy():
    """A strategy nothing else in medxfer names: the last stage and the head, everything at one rate, the head
    fitted on frozen features first. Registered through the registry alone, removed afterwards."""
    from medxfer.strategies import Strategy, register, unregister

    s = register(Strategy("last-stage-hf", True, "last stages", False, 1e-3, 1, 0,
                          "test only: the last stage and the head, head fitted first", head_first=True,
                          scaled_backbone=False))
    yield s
    unregister(s.name)


def test_a_registered_strategy_freezes_and_sets_rates_by_its_fields(model, dummy_strategy):
    groups = param_groups(model, dummy_strategy.name, lr=1e-3, unfreeze=1)
    assert {g["lr"] for g in groups} == {1e-3}  # scaled_backbone=False: one rate
    names = trainable(model)
    assert any(n.startswith("net.layer4.") for n in names) and not any(n.startswith("net.layer3.") for n in names)


def test_a_registered_strategy_trains_end_to_end(tmp_path, small_npz, dummy_strategy, caplog):
    import logging

    from medxfer.config import TrainConfig
    from medxfer.pipeline import train
    from medxfer.runs import check_record

    cfg = TrainConfig.create(data=str(small_npz), source="test_resnet", weights="none", strategy=dummy_strategy.name,
                             epochs=1, image_size=32, bootstrap=0, report=False, out=str(tmp_path / "run"))
    with caplog.at_level(logging.INFO, logger="medxfer"):
        run = train(cfg)
    assert run.config.optim.strategy == run.model.strategy == dummy_strategy.name
    assert 0.0 <= run.metrics["test"]["auc"] <= 1.0 and run.metrics["epochs_run"] == 1
    assert f"{dummy_strategy.name}: head fitted on frozen features" in caplog.text  # head_first, from the strategy
    assert "lp_head" in run.metrics
    check_record(run.dir, everything=True)


def test_a_strategy_name_is_registered_once(dummy_strategy):
    from medxfer.strategies import NAMES, register

    assert dummy_strategy.name in NAMES and dummy_strategy.name in list(NAMES)  # the options read the live list
    with pytest.raises(MedxferError, match="already registered"):
        register(dummy_strategy)
