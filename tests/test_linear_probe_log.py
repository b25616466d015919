"""A linear probe's two validation AUCs are both said, each with what it was measured on: the C
search scores the unaugmented features; the run is reported on its test-time views."""

from __future__ import annotations

import logging
import re


def test_the_c_search_and_the_reported_validation_auc_name_their_views(tmp_path, small_npz, caplog):
    from medxfer.config import TrainConfig
    from medxfer.pipeline import train

    cfg = TrainConfig.create(data=str(small_npz), source="test_resnet", weights="none", strategy="linear-probe",
                             image_size=32, tta=2, bootstrap=0, report=False, out=str(tmp_path / "lp"))
    with caplog.at_level(logging.INFO, logger="medxfer"):
        run = train(cfg)
    search = run.history.iloc[0]
    chosen = re.search(r"C=\S+ chosen on validation \(AUC ([0-9.]+) on the unaugmented view; the run is evaluated "
                       r"on 2 test-time views\)", caplog.text)
    reported = re.search(r"validation AUC ([0-9.]+) on 2 test-time views \(the reported one; C was chosen at "
                         r"([0-9.]+) on the unaugmented view\)", caplog.text)
    assert chosen and reported, caplog.text
    assert float(chosen.group(1)) == float(reported.group(2)) == round(float(search["val_auc"]), 3)
    assert float(reported.group(1)) == round(run.metrics["val"]["auc"], 3)
    assert run.model.tta == 2


def test_without_test_time_views_one_number_is_said(tmp_path, small_npz, caplog):
    from medxfer.config import TrainConfig
    from medxfer.pipeline import train

    cfg = TrainConfig.create(data=str(small_npz), source="test_resnet", weights="none", strategy="linear-probe",
                             image_size=32, tta=1, bootstrap=0, report=False, out=str(tmp_path / "lp"))
    with caplog.at_level(logging.INFO, logger="medxfer"):
        run = train(cfg)
    assert "test-time views" not in caplog.text
    # one view: the C search scored the very features the run is evaluated on
    assert abs(run.metrics["val"]["auc"] - run.history.iloc[0]["val_auc"]) < 1e-9
