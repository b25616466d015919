"""medxfer auto: a search within a time budget that ends in a normal run directory; several processes share one
study through Optuna's database storage (SQLite here, PostgreSQL when a server can be started)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from medxfer.auto import AutoConfig, auto, parse_budget
from medxfer.cli import main
from medxfer.errors import MedxferError

pytestmark = pytest.mark.slow
TINY = ["--source", "test_resnet", "--weights", "none", "--image-sizes", "32", "--augments", "light", "--max-epochs",
        "1", "--bootstrap", "20", "--num-threads", "1"]


def test_budget_parsing():
    assert parse_budget("15m") == 900 and parse_budget("90s") == 90 and parse_budget("1.5h") == 5400
    assert parse_budget("30") == 30
    with pytest.raises(MedxferError, match="time-budget"):
        parse_budget("soon")


def test_feature_cached_strategies_draw_no_learning_rate_or_augmentation(small_npz, tmp_path):
    """A linear probe ignores both: drawing them made identical trials that filled the ensemble's top k."""
    import optuna

    from medxfer.auto import _Search

    cfg = AutoConfig.create(data=str(small_npz), out=str(tmp_path / "a"), source="test_resnet",
                            image_sizes="32,64", augments="light,strong")
    search = _Search(cfg, deadline=time.monotonic() + 60, out=tmp_path / "a")
    lp = search.params(optuna.trial.FixedTrial({"strategy": "linear-probe", "source": "test_resnet", "image_size": 32}))
    assert lp["lr_factor"] == 1.0 and lp["augment"] == cfg.optim.augment
    full = {"strategy": "full", "source": "test_resnet", "image_size": 64, "augment": "strong", "lr_factor": 2.0}
    assert search.params(optuna.trial.FixedTrial(full)) == full
    with pytest.raises(ValueError):  # full draws them: a trial without them cannot be built
        search.params(optuna.trial.FixedTrial({"strategy": "full", "source": "test_resnet", "image_size": 64}))


def test_the_first_trial_is_the_default_recipe_within_the_space(small_npz, tmp_path):
    from medxfer.auto import default_trial

    base = dict(data=str(small_npz), out=str(tmp_path / "a"), source="test_resnet")
    cfg = AutoConfig.create(**base, image_sizes="96,64", augments="strong,auto", lr_range="0.3,3")
    assert cfg.auto.max_epochs is None  # trials train as long as 'medxfer train' would, unless told
    assert default_trial(cfg) == {"strategy": "full", "source": "test_resnet", "image_size": 96, "augment": "auto",
                                  "lr_factor": 1.0}                # train's --augment auto, resolved by the run
    assert default_trial(AutoConfig.create(**base, lr_range="2,3"))["lr_factor"] == 2.0  # clipped into the range
    assert default_trial(AutoConfig.create(**base, strategies="linear-probe,scratch")) is None
    lp = default_trial(AutoConfig.create(**base, strategy="linear-probe", strategies="linear-probe"))
    assert lp == {"strategy": "linear-probe", "source": "test_resnet", "image_size": 64}


def test_the_leaderboard_gives_image_sizes_in_whole_pixels_beside_a_trial_with_no_settings():
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    from medxfer.auto import _leaderboard_html, leaderboard

    study = optuna.create_study()
    dist = {"image_size": CategoricalDistribution([64, 96])}
    study.add_trial(create_trial(params={"image_size": 96}, distributions=dist, value=0.2))
    study.add_trial(create_trial(state=TrialState.PRUNED))  # stopped by the budget before drawing anything
    board = leaderboard(study)
    assert board["image_size"].tolist()[0] == 96 and board["image_size"].isna().tolist() == [False, True]
    assert "96.0" not in board.to_csv(index=False)
    page = _leaderboard_html(board, [])
    assert "<td>96</td>" in page and "&lt;NA&gt;" not in page and ">nan<" not in page


def test_the_ensemble_is_chosen_among_distinct_trials():
    from medxfer.auto import distinct

    nan = float("nan")
    board = pd.DataFrame([  # sorted by validation log-loss, as leaderboard() gives it
        {"trial": 6, "strategy": "linear-probe", "image_size": 96, "augment": nan, "lr_factor": nan, "val_log_loss": .33},
        {"trial": 5, "strategy": "linear-probe", "image_size": 96, "augment": nan, "lr_factor": nan, "val_log_loss": .33},
        {"trial": 2, "strategy": "full", "image_size": 96, "augment": "strong", "lr_factor": 0.4, "val_log_loss": .34},
        {"trial": 3, "strategy": "full", "image_size": 96, "augment": "strong", "lr_factor": 0.5, "val_log_loss": .35},
        {"trial": 4, "strategy": "linear-probe", "image_size": 64, "augment": nan, "lr_factor": nan, "val_log_loss": .4},
    ])
    assert distinct(board)["trial"].tolist() == [6, 2, 3, 4]


def test_tiny_search_writes_a_run_that_predict_uses(small_npz, tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["auto", "--data", str(small_npz), *TINY, "--strategies", "linear-probe,full", "--n-trials", "2",
                 "--time-budget", "5m", "--out", str(out)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert len(board) == 2 and set(board["state"]) <= {"COMPLETE", "PRUNED"}
    first = board[board["trial"] == 0].iloc[0]  # the search starts from 'medxfer train's recipe
    assert (first["strategy"], first["image_size"], first["augment"], first["lr_factor"]) == ("full", 32, "light", 1.0)
    assert board["val_log_loss"].is_monotonic_increasing or board["state"].iloc[-1] == "PRUNED"
    model = out / "model"
    assert (model / "model.safetensors").is_file() and "Leaderboard" in (model / "report.html").read_text()
    assert (out / "study.db").is_file()
    test = json.loads((model / "metrics.json").read_text())["test"]  # trials skip the bootstrap; the model has it
    assert len(test["auc_ci"]) == 2 and test["auc_ci"][0] <= test["auc"] <= test["auc_ci"][1]
    assert main(["predict", str(model), str(small_npz), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "p.csv")) == 200
    assert "test AUC" in capsys.readouterr().out
    # a second search into the same folder must say what to do
    assert main(["auto", "--data", str(small_npz), *TINY, "--n-trials", "1", "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["auto", "--data", str(small_npz), *TINY, "--strategies", "linear-probe", "--n-trials", "1",
                 "--resume", "--out", str(out)]) == 2  # another search space: said, not mixed in
    assert "same search options" in capsys.readouterr().err
    assert main(["auto", "--data", str(small_npz), *TINY, "--strategies", "linear-probe,full", "--n-trials", "1",
                 "--resume", "--out", str(out)]) == 0  # --resume continues the study: one more trial
    assert len(pd.read_csv(out / "leaderboard.csv")) == 3


def test_a_multilabel_search_scores_its_trials_and_ensembles_them(tmp_path, capsys):
    """Trials of a multi-label task are scored by the mean binary log-loss over findings (the class-index
    log-loss read 'A|B' labels as garbage indices), and the best of them are averaged per finding."""
    from medxfer.ensemble import labels_of, log_loss
    from medxfer.runs import Run

    cxr = Path(__file__).resolve().parents[1] / "data" / "cxr14_nih1000_64.npz"
    out = tmp_path / "auto"
    assert main(["auto", "--data", str(cxr), *TINY, "--strategies", "linear-probe,full", "--n-trials", "2",
                 "--time-budget", "5m", "--out", str(out)]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    done = board[board["state"] == "COMPLETE"]
    for _, row in done.iterrows():
        run = Run.load(row["run_dir"])
        val = run.predictions[run.predictions["split"] == "val"]
        y = labels_of(val["label"], run.model.labels, "multilabel")
        assert y.shape[1] == 14 and row["val_log_loss"] == pytest.approx(
            log_loss(y, val[[f"prob_{c}" for c in run.model.labels]].to_numpy(float)))
    model = Run.load(out / "model")
    assert model.model.task == "multilabel" and len(model.model.threshold) == 14
    assert model.model.is_ensemble == (len(done) >= 2)
    assert f"test macro AUC {model.metrics['test']['auc']:.3f} (95% CI" in capsys.readouterr().out


def test_a_single_best_trial_gets_its_test_intervals(small_npz, tmp_path):
    out = tmp_path / "auto"
    assert main(["auto", "--data", str(small_npz), *TINY, "--strategies", "linear-probe", "--n-trials", "1",
                 "--out", str(out)]) == 0
    trial = json.loads(next((out / "trials").glob("trial_*/metrics.json")).read_text())["test"]
    model = json.loads((out / "model" / "metrics.json").read_text())["test"]
    assert trial.get("auc_ci") is None and model["auc"] == trial["auc"]
    assert model["auc_ci"][0] <= model["auc"] <= model["auc_ci"][1] and model["n_bootstrap"] == 20
    assert "95% CI" in (out / "model" / "model_card.md").read_text()


def test_the_budget_is_respected(small_npz, tmp_path):
    """With many trials allowed, the search stops on time: the whole call within the budget + 10%."""
    cfg = AutoConfig.create(data=str(small_npz), source="test_resnet", weights="none", image_sizes="32",
                            strategies="full,scratch", augments="light", max_epochs=30, bootstrap=20, num_threads=1,
                            time_budget="40s", out=str(tmp_path / "auto"))
    t0 = time.monotonic()
    run = auto(cfg)
    assert time.monotonic() - t0 <= 40 * 1.1
    assert run.dir == tmp_path / "auto" / "model"


def test_a_trial_failed_by_another_process_is_logged_and_the_search_goes_on(tiny_run, small_npz, tmp_path,
                                                                          monkeypatch, caplog):
    """Another process marks this process's running trial FAIL (its heartbeat looked stale): Optuna then refuses to
    tell it ('Cannot tell a FAIL trial'). The search logs that and goes on; the trial's result is not used."""
    import logging

    from optuna.trial import TrialState

    import medxfer.auto as auto_module
    from medxfer.runs import Run

    calls = []

    def train(cfg, handlers):
        trial = handlers[0].trial
        calls.append(trial.number)
        if len(calls) == 1:  # what optuna.storages.fail_stale_trials does in the other process
            trial.study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return Run.load(tiny_run)

    monkeypatch.setattr(auto_module, "train", train)
    logging.getLogger("medxfer").addHandler(caplog.handler)
    try:
        cfg = AutoConfig.create(data=str(small_npz), out=str(tmp_path / "a"), source="test_resnet", image_sizes="32",
                                augments="light", n_trials=2, bootstrap=0, time_budget="10m")
        run = auto(cfg)
    finally:
        logging.getLogger("medxfer").removeHandler(caplog.handler)
    assert calls == [0, 1]
    board = pd.read_csv(tmp_path / "a" / "leaderboard.csv")
    assert sorted(board["state"]) == ["COMPLETE", "FAIL"]
    assert "another process" in caplog.text and "trial 0" in caplog.text
    assert (run.dir / "files.sha256").is_file()  # the best trial copied as the model, with its hash record


def _search(data, out, storage, n, env):
    cmd = [sys.executable, "-m", "medxfer", "auto", "--data", str(data), *TINY, "--strategies", "linear-probe,full",
           "--n-trials", str(n), "--time-budget", "10m", "--storage", storage, "--study", "shared", "--out", str(out),
           "-q"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_processes(small_npz, tmp_path, storage) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDXFER_CACHE_DIR": str(tmp_path / "cache")}
    procs = [_search(small_npz, tmp_path / "auto", storage, 2, env) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    import optuna

    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(4))  # four trials, each run once
    dirs = [t.user_attrs.get("run_dir") for t in study.trials if t.user_attrs.get("run_dir")]
    assert len(dirs) == len(set(dirs)) and all(Path(d).is_dir() for d in dirs)


def test_two_processes_share_one_sqlite_study(small_npz, tmp_path):
    _two_processes(small_npz, tmp_path, f"sqlite:///{tmp_path / 'shared.db'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres(tmp_path):
    """A throw-away PostgreSQL server (Debian's package), or a skip saying why not."""
    initdb = shutil.which("initdb") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg (3) is not installed")
    bindir = Path(initdb).resolve().parent
    home = Path(tempfile.mkdtemp(prefix="medxfer-pg-"))  # outside pytest's private tmp: the server's user reads it
    data, port = home / "pg", _free_port()
    run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]  # the server refuses to run as root
    if run_as:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL")
        os.chmod(home, 0o755)
        data.mkdir()
        shutil.chown(data, "postgres")
    try:
        subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "medxfer", "--auth=trust"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {data}", "-l",
                        str(data / "log"), "-w", "start"], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, KeyError, OSError) as e:
        pytest.skip(f"could not start PostgreSQL ({type(e).__name__})")
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="medxfer", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE studies")
        yield f"postgresql://medxfer@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def test_two_processes_share_one_postgresql_study(small_npz, tmp_path, postgres):
    _two_processes(small_npz, tmp_path, postgres)
    leaderboard = pd.read_csv(tmp_path / "auto" / "leaderboard.csv")
    assert len(leaderboard) == 4
    meta = json.loads((tmp_path / "auto" / "model" / "model.json").read_text())
    assert meta["labels"]
