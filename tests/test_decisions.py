"""The decision rules (medxfer.evaluation.decisions): one home, used by predict, report, explain and serve."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from medxfer.evaluation import decisions


def _meta(task="binary", threshold=None, positive_index=None):
    return SimpleNamespace(task=task, threshold=threshold, positive_index=positive_index)


def test_binary_uses_the_validation_threshold_on_the_positive_class():
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    assert decisions.decide(probs, _meta(threshold=0.25, positive_index=1)).tolist() == [1, 1, 0]
    assert decisions.decide(probs, _meta(threshold=0.35, positive_index=0)).tolist() == [0, 0, 0]
    assert decisions.decide(probs, _meta(task="multiclass")).tolist() == [0, 1, 0]  # no threshold: argmax


def test_multilabel_findings_each_at_its_threshold_and_decide_the_furthest_above():
    probs = np.array([[0.3, 0.6, 0.2], [0.1, 0.1, 0.9]])
    meta = _meta(task="multilabel", threshold=[0.2, 0.5, 0.95])
    assert decisions.findings(probs, meta).tolist() == [[True, True, False], [False, False, False]]
    assert decisions.decide(probs, meta).tolist() == [0, 2]  # 0.3-0.2 > 0.6-0.5; -0.05 is the least below
    assert decisions.findings(probs, _meta(task="multilabel")).tolist() == [[False, True, False],
                                                                           [False, False, True]]  # 0.5 each


def test_ordinal_predicts_the_median_grade():
    probs = np.array([[0.4, 0.2, 0.4], [0.1, 0.3, 0.6]])
    assert decisions.decide(probs, _meta(task="ordinal")).tolist() == [1, 2]


def test_predict_serve_and_report_decide_by_the_same_rules():
    from medxfer import predict
    from medxfer.evaluation import gradcam, report
    from medxfer.serve import model

    assert predict.decide is decisions.decide and predict.findings is decisions.findings
    assert report.decide is decisions.decide and model.findings is decisions.findings
    assert not hasattr(gradcam, "findings") and "decide" not in gradcam.__all__  # Grad-CAM explains, never decides
