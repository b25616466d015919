"""Ensembles of every task: multi-label findings, ordinal grades and 3-D volumes average like class probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ordinal_npz
from medxfer.cli import main
from medxfer.evaluation.tasks import label_matrix, probabilities
from medxfer.models.ensemble import EnsembleNet
from medxfer.models.ordinal import corn_logits_from_probabilities, corn_probabilities
from medxfer.predict import Predictor
from medxfer.runs import Run

ROOT = Path(__file__).resolve().parents[1]
CXR = ROOT / "data" / "cxr14_nih1000_64.npz"
TINY = ["--source", "test_resnet", "--weights", "none", "--split-seed", "0", "--bootstrap", "50", "--no-report",
        "--num-threads", "1", "--augment", "none", "-q"]


def test_corn_logits_give_the_grade_probabilities_back():
    p = torch.distributions.Dirichlet(torch.ones(5)).sample((64,)).double()
    p = p / p.sum(1, keepdim=True)  # rows that sum to 1 in float64
    p[0] = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # certainty survives too (to 1e-9)
    back = corn_probabilities(corn_logits_from_probabilities(p))
    assert back.shape == (64, 5) and torch.allclose(back, p, atol=1e-9)


class _Fixed(nn.Module):
    """A 'member' whose logits are a fixed linear map of the image mean (enough to tell members apart)."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float32)

    def forward(self, x):
        return x.flatten(1).mean(1, keepdim=True) * self.w + self.w.flip(0)


@pytest.mark.parametrize("task,k", [("binary", 2), ("multiclass", 3), ("multilabel", 3), ("ordinal", 3)])
def test_ensemble_net_averages_each_tasks_probabilities(task, k):
    rng = np.random.default_rng(0)
    ws = [rng.normal(size=k).tolist() for _ in range(2)]
    temps = [[0.5, 2.0, 1.0][:k], [1.5, 1.0, 0.7][:k]] if task == "multilabel" else [0.8, 1.7]
    net = EnsembleNet([_Fixed(w) for w in ws], [3, 1], temps, [8, 8], 8, 1, task=task).eval()
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        out = net(x).double().numpy()
        zs = [m(x).double().numpy() for m in net.members]
    want = 0.75 * probabilities(task, zs[0], temps[0]) + 0.25 * probabilities(task, zs[1], temps[1])
    np.testing.assert_allclose(probabilities(task, out, 1.0), want, atol=1e-5)


def _train(data: Path, out: Path, seed: int, *extra: str) -> Run:
    assert main(["train", "--data", str(data), "--seed", str(seed), "--out", str(out), *TINY, *extra]) == 0
    return Run.load(out)


def _check_ensemble(runs: list[Run], ens: Path, x: np.ndarray) -> Run:
    """The ensemble's test predictions are the weighted average of the members' (through its own temperature),
    and predict and its ONNX graph give the same probabilities."""
    assert main(["ensemble", *[str(r.dir) for r in runs], "--out", str(ens), "--method", "uniform",
                 "--no-report"]) == 0
    run = Run.load(ens)
    assert run.model.is_ensemble and run.model.task == runs[0].model.task == run.metrics["task"]
    assert run.model.spatial_dims == runs[0].model.spatial_dims
    assert main(["export", str(ens)]) == 0
    torch_p = Predictor(ens).probabilities(x)
    onnx_p = Predictor(ens, engine="onnx").probabilities(x)
    assert np.abs(onnx_p - torch_p).max() < 1e-4
    return run


def test_a_multilabel_ensemble_averages_each_findings_probability(tmp_path):
    runs = [_train(CXR, tmp_path / f"m{s}", s, "--epochs", "1", "--image-size", "32") for s in (0, 1)]
    ens = _check_ensemble(runs, tmp_path / "ens", np.load(CXR)["images"][:8])
    labels = ens.model.labels
    assert len(ens.model.temperature) == len(ens.model.threshold) == len(labels) == 14
    cols = [f"prob_{c}" for c in labels]
    test = ens.predictions[ens.predictions["split"] == "test"].set_index("sample_id")
    members = np.mean([r.predictions[r.predictions["split"] == "test"].set_index("sample_id").loc[test.index, cols]
                       .to_numpy() for r in runs], axis=0)
    t = np.asarray(ens.model.temperature)
    logit = np.log(members) - np.log1p(-members)
    np.testing.assert_allclose(test[cols].to_numpy(), 1 / (1 + np.exp(-logit / t)), atol=1e-5)
    y = label_matrix(test["label"].tolist(), labels)
    assert ens.metrics["test"]["macro_auc"] is not None and y.shape == (len(test), 14)
    assert "per_label" in ens.metrics["test"]


def test_an_ordinal_ensemble_averages_grade_probabilities(tmp_path):
    data = ordinal_npz(tmp_path / "grades.npz", grades=3, size=16, n=(120, 60, 60))
    args = ("--task", "ordinal", "--label-names", "low,mid,high", "--epochs", "2", "--image-size", "16")
    runs = [_train(data, tmp_path / f"o{s}", s, *args) for s in (0, 1)]
    assert main(["export", str(runs[0].dir)]) == 0  # one ordinal run too: K-1 outputs, not one per grade
    ens = _check_ensemble(runs, tmp_path / "ens", np.load(data)["test_images"][:8])
    cols = ["prob_low", "prob_mid", "prob_high"]
    test = ens.predictions[ens.predictions["split"] == "test"].set_index("sample_id")
    members = np.mean([r.predictions[r.predictions["split"] == "test"].set_index("sample_id").loc[test.index, cols]
                       .to_numpy() for r in runs], axis=0)
    z = corn_logits_from_probabilities(torch.from_numpy(members)).numpy()
    np.testing.assert_allclose(test[cols].to_numpy(), probabilities("ordinal", z, ens.model.temperature), atol=1e-5)
    assert "qwk" in ens.metrics["test"] and ens.model.threshold is None
    plain = _train(data, tmp_path / "mc", 0, *[a if a != "ordinal" else "multiclass" for a in args])
    assert main(["ensemble", str(runs[0].dir), str(plain.dir), "--out", str(tmp_path / "e")]) == 2


def test_a_3d_ensemble_runs_volumes_through_3d_members(small_adrenal, tmp_path):
    vol = ["--spatial-dims", "3", "--epochs", "1"]
    runs = [_train(small_adrenal, tmp_path / "v0", 0, *vol, "--image-size", "16"),
            _train(small_adrenal, tmp_path / "v1", 1, *vol, "--image-size", "12", "--inflate", "acs")]
    x = np.load(small_adrenal)["test_images"][:6]
    ens = _check_ensemble(runs, tmp_path / "ens", x)
    assert [m["inflate"] for m in ens.model.members] == ["i3d", "acs"] and ens.model.image_size == 16
    test = ens.predictions[ens.predictions["split"] == "test"]
    got = Predictor(ens.dir).probabilities(np.load(small_adrenal)["test_images"])
    np.testing.assert_allclose(got, test[["prob_0", "prob_1"]].to_numpy(), atol=1e-5)


def test_2d_and_3d_runs_are_not_averaged(small_adrenal, tmp_path, capsys):
    common = ("--epochs", "1", "--image-size", "16", "--strategy", "linear-probe")
    flat = _train(small_adrenal, tmp_path / "flat", 0, *common)
    vol = _train(small_adrenal, tmp_path / "vol", 0, *common, "--spatial-dims", "3")
    assert main(["ensemble", str(flat.dir), str(vol.dir), "--out", str(tmp_path / "e")]) == 2
    assert "differ in spatial dimensions (2 vs 3)" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
