"""The training recipes: LP-FT starts from the fitted head, EMA/SWA weights are what is saved, the
best epoch follows --select, test-time augmentation is in evaluation, predict and the ONNX export, and an
ensemble is a run like any other."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import medxfer
from medxfer.cli import main
from medxfer.engine import handlers as H
from medxfer.engine import trainer
from medxfer.engine.objectives import auc_score

TINY = dict(source="test_resnet", weights="none", image_size=32, bootstrap=50, report=False,
            label_names=("malignant", "benign"), positive_label="malignant")


def _train(small_npz, out, **kw):
    return medxfer.train(str(small_npz), **{**TINY, **kw}, out=str(out))


def test_lp_ft_fine_tunes_from_the_fitted_head(small_npz, tmp_path, monkeypatch):
    seen = {}
    original = trainer.fit

    def spy(model, groups, x_train, y_train, x_val, y_val, s, ctx=trainer.DistContext()):
        seen["head"] = {k: v.detach().clone() for k, v in model.head().state_dict().items()}
        seen["val_auc"] = auc_score("single", y_val.numpy(),
                                    trainer.predict_logits(model, x_val).softmax(1).numpy())
        return original(model, groups, x_train, y_train, x_val, y_val, s, ctx)

    monkeypatch.setattr("medxfer.pipeline.fit", spy)
    run = _train(small_npz, tmp_path / "lpft", strategy="lp-ft", epochs=1)
    lp = run.metrics["lp_head"]
    assert seen["head"]["weight"].abs().max() > 0.05  # not the near-zero random init of a new head (std 0.01)
    assert seen["val_auc"] == pytest.approx(lp["val_auc"], abs=1e-6)  # the whole model starts from the fitted head
    assert run.config.optim.strategy == "lp-ft"


def test_ema_weights_are_the_saved_ones(small_npz, tmp_path, monkeypatch):
    kept = {}
    original = H.BestEpoch.on_end

    def spy(self, loop):
        kept["best"] = {k: v.clone() for k, v in self.best_state.items()}
        kept["ema"] = loop.handler(H.EMA) is not None
        original(self, loop)

    monkeypatch.setattr(H.BestEpoch, "on_end", spy)
    run = _train(small_npz, tmp_path / "ema", strategy="full", epochs=3, average="ema", ema_epochs=2)
    saved = load_file(str(run.dir / "model.safetensors"))
    assert kept["ema"]
    for k, v in kept["best"].items():  # the best epoch's EMA weights, as judged on validation
        torch.testing.assert_close(saved[k], v.cpu())


def test_swa_weights_are_the_saved_ones(small_npz, tmp_path, monkeypatch):
    kept = {}
    original = H.SWA.on_end

    def spy(self, loop):
        kept["avg"] = {n: p.detach().clone() for n, p in self.avg.module.named_parameters()}
        kept["n"] = int(self.avg.n_averaged)
        original(self, loop)

    monkeypatch.setattr(H.SWA, "on_end", spy)
    run = _train(small_npz, tmp_path / "swa", strategy="full", epochs=4, average="swa")
    saved = load_file(str(run.dir / "model.safetensors"))
    assert kept["n"] == 1  # the last quarter of 4 epochs
    for k, v in kept["avg"].items():
        torch.testing.assert_close(saved[k], v.cpu())
    assert json.loads((run.dir / "metrics.json").read_text())["epochs_run"] == 4  # no early stop under SWA


def test_select_loss_keeps_the_lowest_validation_loss(small_npz, tmp_path):
    run = _train(small_npz, tmp_path / "sel", strategy="full", epochs=4, select="loss")
    hist = pd.read_csv(run.dir / "history.csv")
    assert run.metrics["best_epoch"] == int(hist.loc[hist["val_loss"].idxmin(), "epoch"])


def test_calibrated_loss_is_the_loss_at_the_best_temperature():
    from medxfer.config import OptimOptions
    from medxfer.engine.objectives import objective

    assert OptimOptions(select="calibrated-loss").select == "calibrated-loss"  # the option takes what the handler does
    with pytest.raises(medxfer.MedxferError, match="calibrated-loss"):
        OptimOptions(select="nll")
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (300,), generator=g)
    logits = torch.randn(300, 2, generator=g) + 8 * torch.nn.functional.one_hot(y, 2)  # right but over-confident
    flip = torch.rand(300, generator=g) < 0.15
    logits[flip] = logits[flip].flip(1)
    for kind, n, target in (("single", 2, y), ("multilabel", 2, torch.nn.functional.one_hot(y, 2)),
                            ("ordinal", 3, torch.randint(0, 3, (300,), generator=g))):
        obj = objective(kind, n)
        z = logits[:, : obj.outputs]
        grid = min(obj.nll(z / t, target) for t in np.exp(np.linspace(np.log(1 / 20), np.log(20), 4001)))
        got = obj.validate(z, target)
        assert got["val_loss_calibrated"] == pytest.approx(grid, abs=1e-4)
        assert got["val_loss_calibrated"] <= got["val_loss"] + 1e-12
    assert objective("single", 2).validate(logits, y)["val_loss_calibrated"] < 0.6 * objective("single", 2).validate(
        logits, y)["val_loss"]  # the over-confidence is what it removes


def test_select_calibrated_loss_keeps_a_sharp_epoch_over_a_timid_one():
    """Seen on BreastMNIST: a first epoch near the prior had a lower raw validation loss than later epochs that
    ranked far better but were over-confident, and --select loss kept the first epoch (validation AUC 0.69)."""
    net = torch.nn.Linear(1, 1)
    timid = {"epoch": 1, "val_loss": 0.53, "val_loss_calibrated": 0.52, "val_auc": 0.69}
    sharp = {"epoch": 2, "val_loss": 0.72, "val_loss_calibrated": 0.33, "val_auc": 0.89}

    class State:
        stop = False

    class FakeLoop:
        state = State()

        @staticmethod
        def handler(kind):
            return None  # no EMA: validation judges the model itself

    best = {}
    for monitor in ("loss", "calibrated-loss", "auc"):
        select = H.BestEpoch(net, monitor=monitor)
        for record in (timid, sharp):
            select.on_epoch_end(FakeLoop(), record)
        best[monitor] = select.best_epoch
    assert best == {"loss": 1, "calibrated-loss": 2, "auc": 2}
    with pytest.raises(medxfer.MedxferError, match="calibrated-loss"):
        H.BestEpoch(net, monitor="nll")
    with pytest.raises(medxfer.MedxferError, match="calibrated-loss"):
        H.EarlyStop(patience=5, monitor="nll")


def test_tta_defaults_to_4_views_for_2d_models_and_none_for_3d(tiny_run):
    """Chosen on validation: 4 views lowered the best recipe's log-loss on BreastMNIST and PneumoniaMNIST."""
    from medxfer.config import DEFAULT_TTA_2D, TrainConfig

    assert DEFAULT_TTA_2D == 4
    assert TrainConfig.create(data="x.npz").resolved_tta == 4
    assert TrainConfig.create(data="x.npz", spatial_dims=3).resolved_tta == 1  # its views are 2-D
    assert TrainConfig.create(data="x.npz", tta=1).resolved_tta == 1 and TrainConfig.create(data="x.npz", tta=2).resolved_tta == 2
    run = medxfer.load_run(tiny_run)  # trained without --tta
    assert run.model.tta == 4 and run.config.evaluation.tta == 4  # what was used is recorded, not None


def test_tta_in_evaluation_predict_and_onnx(small_npz, tmp_path):
    run = _train(small_npz, tmp_path / "tta", strategy="full", epochs=1, tta=3)
    assert run.model.tta == 3
    pred = medxfer.Predictor(run.dir).predict([small_npz])
    want = run.predictions[run.predictions["split"] == "test"].set_index("sample_id")
    got = pred.set_index("sample_id").loc[want.index]
    cols = ["prob_malignant", "prob_benign"]
    assert np.abs(got[cols].to_numpy() - want[cols].to_numpy()).max() < 1e-5
    assert main(["export", str(run.dir)]) == 0
    onnx = medxfer.Predictor(run.dir, engine="onnx").predict([small_npz]).set_index("sample_id").loc[want.index]
    assert np.abs(onnx[cols].to_numpy() - want[cols].to_numpy()).max() < 1e-4  # the views are in the graph
    plain = _train(small_npz, tmp_path / "plain", strategy="full", epochs=1)
    assert not np.allclose(plain.predictions[cols].to_numpy(), run.predictions[cols].to_numpy())
    # what takes the network rather than the averaged logits: features and Grad-CAM (the API loads TTA by default)
    assert main(["features", str(run.dir), "--out", str(tmp_path / "f.npz"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert np.load(tmp_path / "f.npz")["features"].shape[0] == 200
    from medxfer.evaluation.gradcam import explain_images

    images = (np.load(small_npz)["test_images"][:2]).astype(np.uint8)
    maps = explain_images(run.load_model(), run.model, images)
    bare = explain_images(run.load_model(tta=False), run.model, images)
    assert maps.shape[0] == 2 and np.allclose(maps, bare)


def test_ensemble_is_a_run_like_any_other(small_npz, tmp_path):
    runs = [_train(small_npz, tmp_path / f"m{s}", strategy="full", epochs=1, seed=s) for s in range(3)]
    assert main(["ensemble", *[str(r.dir) for r in runs], "--out", str(tmp_path / "ens"), "--method", "uniform",
                 "--no-report"]) == 0
    ens = medxfer.load_run(tmp_path / "ens")
    assert ens.model.is_ensemble and len(ens.model.members) == 3 and ens.metrics["ensemble"]["method"] == "uniform"
    cols = ["prob_malignant", "prob_benign"]
    test = ens.predictions[ens.predictions["split"] == "test"].set_index("sample_id")
    members = np.mean([r.predictions[r.predictions["split"] == "test"].set_index("sample_id").loc[test.index, cols]
                       .to_numpy() for r in runs], axis=0)
    t = ens.metrics["temperature"]  # the ensemble's own temperature on the averaged calibrated probabilities
    expected = torch.softmax(torch.log(torch.from_numpy(members)) / t, 1).numpy()
    assert np.abs(test[cols].to_numpy() - expected).max() < 1e-5
    got = medxfer.Predictor(ens.dir).predict([small_npz]).set_index("sample_id").loc[test.index]
    assert np.abs(got[cols].to_numpy() - test[cols].to_numpy()).max() < 1e-5
    assert main(["export", str(ens.dir)]) == 0  # one ONNX graph for every member
    onnx = medxfer.Predictor(ens.dir, engine="onnx").predict([small_npz]).set_index("sample_id").loc[test.index]
    assert np.abs(onnx[cols].to_numpy() - test[cols].to_numpy()).max() < 1e-4
    assert main(["report", str(ens.dir)]) == 0 and (ens.dir / "report.html").is_file()


def test_greedy_selection_picks_the_better_members():
    from medxfer.ensemble import greedy_weights, log_loss

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    good = np.stack([1 - (0.2 + 0.6 * y), 0.2 + 0.6 * y], 1)
    noisy = np.clip(good + rng.normal(0, 0.3, good.shape), 0.01, 0.99)
    noisy /= noisy.sum(1, keepdims=True)
    bad = np.full_like(good, 0.5)
    counts = greedy_weights(y, [bad, good, noisy])
    assert counts[1] >= 1 and counts[0] == 0
    mixed = sum(c * p for c, p in zip(counts, [bad, good, noisy])) / sum(counts)
    assert log_loss(y, mixed) <= log_loss(y, good) + 1e-9


def test_ensemble_refuses_runs_of_other_tasks(tiny_run, small_npz, tmp_path, capsys):
    other = _train(small_npz, tmp_path / "o", strategy="full", epochs=1, label_names=("a", "b"), positive_label="a")
    assert main(["ensemble", str(tiny_run), str(other.dir), "--out", str(tmp_path / "e")]) == 2
    assert "differ in labels" in capsys.readouterr().err
