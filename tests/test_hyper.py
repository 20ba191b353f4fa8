"""Hyperparameter sweeps: RecBole's HyperTuning over the plugin's objective, the output
file, numpy 2 values, failed trials, the Ray error path and layer-cache reuse."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from recbole_iisan import hyper
from recbole_iisan.config import properties_dir
from recbole_iisan.hyper import PluginHyperTuning, parse_overrides, read_params_file, run_sweep

SASREC_TINY = ["--epochs=1", "--hidden_size=16", "--inner_size=16", "--n_layers=1", "--n_heads=1",
               "--MAX_ITEM_LIST_LENGTH=10", "--show_progress=False", "--state=WARNING"]


def write_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.hyper"
    path.write_text(text, encoding="utf-8")
    return str(path)


def fake_objective(calls: list, fail_when=None):
    """An objective that trains nothing: score = learning_rate, as RecBole's dict."""
    def objective(config_dict, config_file_list=None):
        calls.append(config_dict)
        if fail_when and fail_when(config_dict):
            raise RuntimeError("CUDA out of memory (pretend)")
        score = config_dict["learning_rate"]
        return {"model": "Fake", "best_valid_score": score, "valid_score_bigger": True,
                "best_valid_result": {"ndcg@10": score}, "test_result": {"ndcg@10": score / 2}}
    return objective


def test_cli_sasrec_sweep_writes_every_trial_and_the_best(tmp_path, small_demo_path):
    out = tmp_path / "sweep.result"
    cmd = [sys.executable, str(REPO / "run_hyper.py"), "--model", "SASRec", "--dataset", "demo",
           "--params_file", str(REPO / "properties" / "hyper" / "sasrec.hyper"), "--max_evals", "3",
           "--output_file", str(out), f"--data_path={small_demo_path}",
           f"--checkpoint_dir={tmp_path / 'saved'}", *SASREC_TINY]
    # cwd: RecBole writes log/ into the working directory
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 3 trials finished" in proc.stdout
    text = out.read_text()
    trials, best = text.split("Best:\n")
    blocks = [b for b in trials.split("\n\n") if b.strip()]
    assert len(blocks) == 3
    # exhaustive search: three different grid points, each with valid and test results
    heads = [b.splitlines()[0] for b in blocks]
    assert len(set(heads)) == 3 and all(h.count(":") == 3 for h in heads)
    assert all("Valid result:\nhit@10 : " in b and "Test result:\nhit@10 : " in b for b in blocks)
    scores = [float(b.split("ndcg@10 : ")[1].split()[0]) for b in blocks]  # NDCG@10 selects
    assert best.strip() == blocks[scores.index(max(scores))].strip()
    assert "np." not in text


def test_json_output_and_python_values_from_continuous_search(tmp_path):
    space = read_params_file(write_space(tmp_path, "learning_rate uniform 0.001,0.01\n"
                                                   "n_layers choice [1,2]\n"))
    calls = []
    tuner = PluginHyperTuning(fake_objective(calls), space, model="Fake", dataset="demo",
                              algo="random", max_evals=4, seed=1)
    tuner.run()
    assert len(calls) == 4
    # hyperopt hands out numpy scalars; numpy 2 would print them as np.float64(...)
    assert all(type(c["learning_rate"]) is float and type(c["n_layers"]) is int for c in calls)
    out = tmp_path / "sweep.json"
    hyper.write_sweep(tuner.sweep, out)
    data = json.loads(out.read_text())
    assert len(data["trials"]) == 4
    assert data["best"]["params"]["learning_rate"] == max(c["learning_rate"] for c in calls)
    assert data["best"]["test_result"]["ndcg@10"] == data["best"]["best_valid_score"] / 2


def test_seeded_search_repeats(tmp_path):
    space_file = write_space(tmp_path, "learning_rate loguniform -7,-3\n")
    runs = []
    for _ in range(2):
        calls = []
        PluginHyperTuning(fake_objective(calls), read_params_file(space_file), model="Fake",
                          dataset="demo", algo="bayes", max_evals=3, seed=7).run()
        runs.append([c["learning_rate"] for c in calls])
    assert runs[0] == runs[1]


def test_exhaustive_covers_the_grid_and_max_evals_caps_it(tmp_path):
    space = read_params_file(write_space(tmp_path, "learning_rate choice [0.1,0.2,0.3]\n"
                                                   "fusion_method choice ['gate','add']\n"))
    calls = []
    PluginHyperTuning(fake_objective(calls), space, model="Fake", dataset="demo").run()
    assert sorted((c["learning_rate"], c["fusion_method"]) for c in calls) == sorted(
        (lr, f) for lr in (0.1, 0.2, 0.3) for f in ("gate", "add"))
    calls = []
    PluginHyperTuning(fake_objective(calls), space, model="Fake", dataset="demo", max_evals=2).run()
    assert len(calls) == 2


def test_failed_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    space = read_params_file(write_space(tmp_path, "learning_rate choice [0.1,0.2,0.3]\n"))
    calls = []
    tuner = PluginHyperTuning(fake_objective(calls, fail_when=lambda c: c["learning_rate"] == 0.3),
                              space, model="Fake", dataset="demo")
    tuner.run()
    assert len(calls) == 3
    failed = [t for t in tuner.sweep.trials if t.error]
    assert [t.params for t in failed] == [{"learning_rate": 0.3}]
    assert "CUDA out of memory" in failed[0].error
    assert tuner.sweep.best.params == {"learning_rate": 0.2}
    out = tmp_path / "sweep.result"
    hyper.write_sweep(tuner.sweep, out)
    assert "learning_rate:0.3\nFailed: RuntimeError: CUDA out of memory" in out.read_text()


def test_every_trial_failing_is_an_error(tmp_path, monkeypatch):
    space_file = write_space(tmp_path, "learning_rate choice [0.1,0.2]\n")
    monkeypatch.setattr(hyper, "objective_function", lambda **kw: 1 / 0)
    with pytest.raises(RuntimeError, match="all 2 trials failed; the first error: ZeroDivisionError"):
        hyper.tune_hyperopt("SASRec", "demo", space_file, output_file=str(tmp_path / "o.result"))
    assert (tmp_path / "o.result").read_text().count("Failed: ZeroDivisionError") == 2


def test_clear_errors_for_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.hyper not found"):
        read_params_file(tmp_path / "nope.hyper")
    (tmp_path / "bad.hyper").write_text("learning_rate normal 0,1\n")
    with pytest.raises(ValueError, match="bad.hyper: cannot read the search space: Illegal param type"):
        read_params_file(tmp_path / "bad.hyper")
    space = read_params_file(write_space(tmp_path, "learning_rate uniform 0.001,0.01\n"))
    with pytest.raises(ValueError, match="use --algo random or --algo bayes"):
        PluginHyperTuning(fake_objective([]), space, model="Fake", dataset="demo", algo="exhaustive")
    with pytest.raises(ValueError, match="--algo random needs --max_evals"):
        PluginHyperTuning(fake_objective([]), space, model="Fake", dataset="demo", algo="random")
    with pytest.raises(ValueError, match="unknown argument 'epochs=1'"):
        parse_overrides(["epochs=1"])


def test_overrides_are_typed_like_the_command_line():
    assert parse_overrides(["--epochs=2", "--learning_rate=1e-3", "--gpu_id=", "--show_progress=false",
                            "--topk=[5,10]", "--data_path=/tmp/x"]) == {
        "epochs": 2, "learning_rate": 0.001, "gpu_id": "", "show_progress": False,
        "topk": [5, 10], "data_path": "/tmp/x"}


@pytest.mark.parametrize("name,grid,keys", [
    ("iisan_versa", 4 * 3 * 3 * 2, {"learning_rate", "adapter_size", "hidden_dropout_prob",
                                    "fusion_method"}),
    ("sasrec", 3 * 2 * 2, {"learning_rate", "hidden_dropout_prob", "n_layers"}),
])
def test_shipped_param_files(name, grid, keys):
    path = properties_dir() / "hyper" / f"{name}.hyper"
    space = read_params_file(path)
    assert set(space) == keys
    assert int(hyper._spacesize(space)) == grid
    if name == "iisan_versa":  # every swept key is a real IISANVersa setting
        import yaml
        assert keys <= set(yaml.safe_load((properties_dir() / "model" / "IISANVersa.yaml").read_text()))


def test_ray_tool_says_clearly_why_it_cannot_run(tmp_path):
    try:
        hyper.import_ray_tune()
    except ImportError:
        pass
    else:
        pytest.skip("Ray Tune imports here; the error path cannot be exercised")
    with pytest.raises(ImportError) as info:
        run_sweep(tool="ray", model="SASRec", dataset="demo", algo="random", max_evals=2,
                  params_file=str(properties_dir() / "hyper" / "sasrec.hyper"))
    message = str(info.value)
    assert "--tool ray needs Ray Tune" in message and "numpy<2" in message
    assert "Use --tool hyperopt" in message and "Importing ray failed:" in message


def test_ray_refuses_bayes_before_importing_ray():
    with pytest.raises(ValueError, match="--tool ray offers --algo exhaustive or random"):
        run_sweep(tool="ray", model="SASRec", dataset="demo", algo="bayes", max_evals=2,
                  params_file=str(properties_dir() / "hyper" / "sasrec.hyper"))


def test_iisan_versa_trials_reuse_the_layer_cache(tmp_path, plugin_config, monkeypatch):
    pytest.importorskip("recbole_iisan.model.iisan_versa")
    monkeypatch.chdir(tmp_path)
    space_file = write_space(tmp_path, "adapter_size choice [4,8]\n")
    sweep = hyper.tune_hyperopt("IISANVersa", "demo", space_file, config_dict=plugin_config)
    first, second = sweep.trials
    assert first.error is None and second.error is None, (first.error, second.error)
    assert {first.params["adapter_size"], second.params["adapter_size"]} == {4, 8}
    # the first trial encodes both modalities; the second memory-maps what it left
    assert first.efficiency.get("cache_build_seconds")
    assert "cache_build_seconds" not in second.efficiency
    assert len([p for p in Path(plugin_config["cache_dir"]).iterdir()
                if not p.name.startswith(".")]) == 2
