"""MLflow tracking: a finished run logged to a local store and read back; live epochs; the track command."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as medxfer.tracking does: nothing leaves the machine
mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient

from medxfer import files
from medxfer.engine.loop import Handler, Loop, Step
from medxfer.errors import MedxferError
from medxfer.runs import Run, seal
from medxfer.tracking import (
    MLflowHandler,
    final_metrics,
    log_run,
    resolve_tracking_uri,
    run_params,
    tracked,
)
from tests.test_card import quick_run


@pytest.fixture(scope="module")
def run_dir(small_npz, tmp_path_factory) -> Path:
    """A finished 2-epoch run, with a report and an ONNX file standing in for what 'report'/'export' write."""
    out = quick_run(small_npz, tmp_path_factory.mktemp("track") / "run")
    (out / "report.html").write_text("<html>report</html>")
    (out / "model.onnx").write_bytes(b"onnx")
    return out


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)     # what mlflow.search_runs reads
    return uri


def only_run(experiment: str):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return runs[0]


def artifacts(uri: str, run_id: str) -> set[str]:
    return {f.path for f in MlflowClient(uri).list_artifacts(run_id)}


def test_log_run_writes_params_metrics_history_and_files(run_dir, store):
    run = Run.load(run_dir)
    run_id = log_run(run, store, experiment="breast")
    r = only_run("breast")
    assert r.info.run_id == run_id and r.info.status == "FINISHED" and r.info.run_name == run_dir.name
    params = r.data.params
    flat = files.flatten(run.config.to_dict())
    assert params["optim.strategy"] == "full" and params["model.source"] == "test_resnet"
    assert params["data.label_names"] == "malignant,benign" and params["optim.seed"] == "0"
    assert params["runtime.num_threads"] == "1" and set(flat) <= set(params)
    assert params["resolved.image_size"] == "32" and params["resolved.epochs"] == "2"
    assert params["resolved.lr"] == str(run.resolved["lr"]) and params["resolved.source"] == "test_resnet"
    m, test, val = r.data.metrics, run.metrics["test"], run.metrics["val"]
    assert m["test/auc"] == pytest.approx(test["auc"]) and m["val/auc"] == pytest.approx(val["auc"])
    assert m["test/auc_ci_low"] == pytest.approx(test["auc_ci"][0])
    assert m["test/auc_ci_high"] == pytest.approx(test["auc_ci"][1])
    for k in ("sensitivity", "specificity", "balanced_accuracy", "brier", "ece"):
        assert m[f"test/{k}"] == pytest.approx(test[k]) and m[f"val/{k}"] == pytest.approx(val[k])
    assert m["threshold"] == pytest.approx(run.metrics["threshold"])
    assert m["temperature"] == pytest.approx(run.metrics["temperature"])
    tags = r.data.tags
    assert tags["medxfer.strategy"] == "full" and tags["medxfer.source"] == "test_resnet"
    assert tags["medxfer.weights_sha256"] == run.model.weights_sha256[:16] and tags["medxfer.version"]
    client = MlflowClient(store)
    for key in ("train_loss", "val_loss", "val_auc"):
        hist = client.get_metric_history(run_id, key)
        assert [h.step for h in hist] == [1, 2]
        assert [h.value for h in hist] == pytest.approx(run.history[key].tolist())
    assert artifacts(store, run_id) == {"config.yaml", "model.json", "metrics.json", "history.csv", "report.html",
                                        "model_card.md", "model.safetensors", "model.onnx"}
    card = Path(client.download_artifacts(run_id, "model_card.md", str(Path(store[7:]).parent)))
    assert "## Evaluation" in card.read_text()
    assert card.read_text() == (run_dir / "model_card.md").read_text()    # the run's own card, as written


def test_no_artifacts_leaves_the_model_files_out_and_long_values_are_cut(run_dir, store, tmp_path):
    copy = Path(shutil.copytree(run_dir, tmp_path / "long"))
    cfg = (copy / "config.yaml").read_text().replace("  path: ", "  path: " + "d" * 600 + "/", 1)
    (copy / "config.yaml").write_text(cfg)
    seal(copy)                                   # a deliberate edit, accepted into the run's record
    run = Run.load(copy)
    assert len(run.config.data.path) > 600 and len(run_params(run)["data.path"]) == 500
    run_id = log_run(run, store, artifacts=False, run_name="slim")
    assert only_run("medxfer").info.run_name == "slim"
    names = artifacts(store, run_id)
    assert "model.safetensors" not in names and "model.onnx" not in names
    assert {"config.yaml", "metrics.json", "model_card.md"} <= names
    assert mlflow.get_run(run_id).data.params["data.path"].endswith("...")


class _Steps(Step):
    def batches(self, epoch):
        return [epoch]

    def train_batch(self, batch):
        return 1.0 / batch, 8


class _Validate(Handler):
    def on_epoch_end(self, loop, record):
        record.update(val_loss=0.5 / record["epoch"], val_auc=0.6 + 0.1 * record["epoch"], lr=0.01,
                      extra=float("nan"))


def test_handler_logs_epochs_live_and_results_join_the_same_run(run_dir, store, caplog):
    run = Run.load(run_dir)
    with tracked(store, "live", "live-run") as t:
        assert isinstance(t.handler, MLflowHandler)
        t.log_config(run.config.replace(batch_size=7))      # before training; one option changes later
        assert MlflowClient(store).get_run(t.run_id).data.params["optim.batch_size"] == "7"
        Loop(_Steps(), [_Validate(), t.handler], epochs=2).run()
        client = MlflowClient(store)
        running = client.get_run(t.run_id)
        assert running.info.status == "RUNNING"
        assert [h.value for h in client.get_metric_history(t.run_id, "val_auc")] == pytest.approx([0.7, 0.8])
        assert t.log_run(run) == t.run_id
    assert "optim.batch_size changed during the run" in caplog.text
    r = only_run("live")
    assert r.info.run_id == t.run_id and r.info.status == "FINISHED" and r.info.run_name == "live-run"
    # the live epochs are not logged twice from history.csv
    hist = client.get_metric_history(t.run_id, "train_loss")
    assert [h.step for h in hist] == [1, 2] and [h.value for h in hist] == pytest.approx([1.0, 0.5])
    assert client.get_metric_history(t.run_id, "extra") == []      # NaN is left out
    assert r.data.metrics["test/auc"] == pytest.approx(run.metrics["test"]["auc"])
    assert r.data.params["optim.batch_size"] == "7" and r.data.params["resolved.image_size"] == "32"
    assert "metrics.json" in artifacts(store, t.run_id)


def test_a_failed_training_marks_the_run_failed_and_disabled_tracking_does_nothing(store):
    with pytest.raises(RuntimeError), tracked(store, "failing"):
        raise RuntimeError("boom")
    assert only_run("failing").info.status == "FAILED"
    with tracked(store, "off", enabled=False) as t:
        Loop(_Steps(), [t.handler], epochs=1).run()
        assert t.log_run(None) is None and t.run_id is None
    assert mlflow.search_runs(experiment_names=["off"], output_format="list") == []


def test_a_broken_store_does_not_stop_training(store):
    with tracked(store, "broken") as t:
        t.handler.run_id = "no-such-run"
        Loop(_Steps(), [t.handler], epochs=2).run()     # warns once, goes on
        assert not t.handler.enabled


def test_tracking_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == (tmp_path / "mlruns").resolve().as_uri()
    assert resolve_tracking_uri("store") == (tmp_path / "store").resolve().as_uri()
    assert resolve_tracking_uri("file:rel/store") == (tmp_path / "rel" / "store").resolve().as_uri()
    assert resolve_tracking_uri("file:///abs/x") == "file:///abs/x"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
        assert resolve_tracking_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve() / 'm.db'}"
        assert resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "envstore")
    assert resolve_tracking_uri() == (tmp_path / "envstore").resolve().as_uri()


def test_without_mlflow_one_clear_line(run_dir, store, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MedxferError, match="pip install mlflow-skinny"):
        log_run(run_dir, store)


def test_final_metrics_are_finite_and_named_for_mlflow(run_dir):
    m = final_metrics(Run.load(run_dir))
    assert "test/n_per_class.malignant" in m and "seed" not in m
    assert all(isinstance(v, float) for v in m.values())


def test_track_command_end_to_end(run_dir, store, tmp_path):
    from medxfer.commands.track import register

    app = typer.Typer()
    app.callback()(lambda: None)    # a group, so that the command is called by name
    register(app)
    folder = tmp_path / "cmd-store"
    result = CliRunner().invoke(app, ["track", str(run_dir), "--tracking-uri", str(folder), "--experiment", "cli",
                                      "--no-artifacts"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(folder.as_uri())
    runs = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert len(runs) == 1 and f"MLflow run {runs[0].info.run_id}" in result.output
    assert f"store: {folder}" in result.output
    assert "model.safetensors" not in artifacts(folder.as_uri(), runs[0].info.run_id)
    bad = CliRunner().invoke(app, ["track", str(tmp_path / "nothing"), "--tracking-uri", str(folder)])
    assert bad.exit_code != 0 and "not a finished run directory" in str(bad.exception)


def test_train_with_the_handler_logs_live_and_the_results_after(small_npz, store, tmp_path):
    import inspect

    from medxfer.pipeline import train

    if "handlers" not in inspect.signature(train).parameters:
        pytest.skip("train() takes no handlers yet")
    with tracked(store, "pipeline", "live") as t:
        run = train(str(small_npz), source="test_resnet", weights="none", epochs=2, image_size=32, bootstrap=20,
                    report=False, augment="none", num_threads=1, label_names=("malignant", "benign"),
                    positive_label="malignant", out=str(tmp_path / "run"), handlers=[t.handler])
        assert t.handler.logged == {1, 2}
        assert t.log_run(run) == t.run_id
    client = MlflowClient(store)
    hist = client.get_metric_history(t.run_id, "val_auc")
    assert [h.step for h in hist] == [1, 2] and [h.value for h in hist] == pytest.approx(run.history["val_auc"].tolist())
    r = client.get_run(t.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["test/auc"] == pytest.approx(run.metrics["test"]["auc"])
