"""Hyperparameter sweeps: RecBole's HyperTuning over the plugin's objective, the output
file, numpy 2 values, failed trials, the Ray error path and layer-cache reuse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from recbole_iisan import hyper
from recbole_iisan.config import properties_dir
from recbole_iisan.hyper import PluginHyperTuning, parse_overrides, read_params_file, run_sweep
from recbole_iisan.quick_start import objective_function

SASREC_TINY = ["--epochs=1", "--hidden_size=16", "--inner_size=16", "--n_heads=1",
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
    assert "trial 3/3: valid score " in proc.stdout  # progress, as RecBole's HyperTuning prints it
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


def test_params_file_comments_and_clear_errors(tmp_path):
    space_file = write_space(tmp_path, "# a comment\n\nlearning_rate choice [0.1,0.2]  # inline\n"
                                       "tag choice ['a#b','c']\n")
    specs = hyper.parse_params_file(space_file)
    assert [(s.name, s.values) for s in specs] == [("learning_rate", (0.1, 0.2)), ("tag", ("a#b", "c"))]
    assert int(hyper._spacesize(hyper.hyperopt_space(specs))) == 4

    with pytest.raises(FileNotFoundError, match="nope.hyper not found"):
        read_params_file(tmp_path / "nope.hyper")
    bad = {"learning_rate normal 0,1": r"bad.hyper:1: unknown parameter type 'normal' for learning_rate",
           "learning_rate uniform 0.1": r"bad.hyper:1: uniform takes low,high for learning_rate",
           "lr quniform 1,8": r"quniform takes low,high,step for lr",
           "lr uniform 0.5,0.1": r"low bound of lr exceeds the high one",
           "lr choice [0.1,": r"bad.hyper:1: cannot read the choices of lr",
           "lr choice []": r"the choices of lr must be a non-empty list",
           "lr choice": r"bad.hyper:1: expected `name type values`",
           "lr choice [1]\nlr choice [2]": r"bad.hyper:2: lr is already defined on line 1",
           "# only a comment": r"bad.hyper: no parameters"}
    for text, message in bad.items():
        (tmp_path / "bad.hyper").write_text(text + "\n")
        with pytest.raises(ValueError, match=message):
            read_params_file(tmp_path / "bad.hyper")

    space = read_params_file(write_space(tmp_path, "learning_rate uniform 0.001,0.01\n"))
    with pytest.raises(ValueError, match="use --algo random or --algo bayes"):
        PluginHyperTuning(fake_objective([]), space, model="Fake", dataset="demo", algo="exhaustive")
    with pytest.raises(ValueError, match="--algo random needs --max_evals"):
        PluginHyperTuning(fake_objective([]), space, model="Fake", dataset="demo", algo="random")
    with pytest.raises(ValueError, match="unknown argument 'epochs=1'"):
        parse_overrides(["epochs=1"])


def test_a_swept_setting_cannot_also_be_a_shared_one(tmp_path, monkeypatch):
    monkeypatch.setattr(hyper, "objective_function", lambda **kw: pytest.fail("no trial may run"))
    space_file = write_space(tmp_path, "learning_rate choice [0.1]\nepochs choice [10]\n")
    with pytest.raises(ValueError, match=r"epochs is set both by .*space.hyper \(line 2: choice \[10\]\) "
                                         r"and by --epochs=50; the params file would win"):
        hyper.tune_hyperopt("SASRec", "demo", space_file, config_dict={"epochs": 50})


def test_results_so_far_survive_an_interrupted_sweep(tmp_path):
    space = read_params_file(write_space(tmp_path, "learning_rate choice [0.1,0.2,0.3]\n"))
    calls = []

    def objective(config_dict, config_file_list=None):
        if calls:
            raise KeyboardInterrupt  # the user stops the sweep during the second trial
        return fake_objective(calls)(config_dict, config_file_list)

    out = tmp_path / "sweep.json"
    tuner = PluginHyperTuning(objective, space, model="Fake", dataset="demo", output_file=str(out))
    with pytest.raises(KeyboardInterrupt):
        tuner.run()
    saved = json.loads(out.read_text())
    assert [t["params"] for t in saved["trials"]] == [{"learning_rate": calls[0]["learning_rate"]}]
    assert saved["best"]["best_valid_score"] == calls[0]["learning_rate"]


def test_overrides_are_typed_like_the_command_line():
    assert parse_overrides(["--epochs=2", "--learning_rate=1e-3", "--gpu_id=", "--show_progress=false",
                            "--topk=[5,10]", "--data_path=/tmp/x"]) == {
        "epochs": 2, "learning_rate": 0.001, "gpu_id": "", "show_progress": False,
        "topk": [5, 10], "data_path": "/tmp/x"}


@pytest.mark.parametrize("name,model,grid,keys", [
    ("iisan_versa", "IISANVersa", 4 * 3 * 3 * 2,
     {"learning_rate", "adapter_size", "hidden_dropout_prob", "fusion_method", "epochs"}),
    ("sasrec", "SASRec", 3 * 2 * 2, {"learning_rate", "hidden_dropout_prob", "n_layers"}),
])
def test_shipped_param_files(name, model, grid, keys):
    space = read_params_file(properties_dir() / "hyper" / f"{name}.hyper")
    assert set(space) == keys
    assert int(hyper._spacesize(space)) == grid
    # every swept key is a real setting of the model (a typo would be silently ignored)
    from recbole_iisan.config import Config
    config = Config(model, "demo", config_dict={"data_path": str(REPO / "dataset")}, cmd_args=[])
    assert all(config[key] is not None for key in keys)


def test_ray_tool_says_clearly_why_it_cannot_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ImportError) as info:
        run_sweep(tool="ray", model="SASRec", dataset="demo", algo="random", max_evals=2,
                  params_file=str(properties_dir() / "hyper" / "sasrec.hyper"))
    message = str(info.value)
    assert message.startswith(hyper.ray_unavailable_hint())
    assert "Importing ray failed: ModuleNotFoundError" in message or "Importing ray failed: ImportError" in message

    on_311 = hyper.ray_unavailable_hint((3, 11))
    assert "pip install 'recbole_iisan[tune]'" in on_311 and "numpy<2" in on_311
    assert "Use --tool hyperopt" in on_311 or "use --tool hyperopt" in on_311
    on_312 = hyper.ray_unavailable_hint((3, 12, 1))
    assert on_312.startswith("--tool ray is not available on Python 3.12")
    assert "no wheels for Python 3.12 or later" in on_312 and "Use --tool hyperopt" in on_312


def test_ray_refuses_what_it_cannot_do_before_importing_ray(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match="--tool ray offers --algo exhaustive or random"):
        run_sweep(tool="ray", model="SASRec", dataset="demo", algo="bayes", max_evals=2,
                  params_file=str(properties_dir() / "hyper" / "sasrec.hyper"))
    with pytest.raises(ValueError, match="line 1: exhaustive search takes choice parameters only"):
        run_sweep(tool="ray", model="SASRec", dataset="demo", algo="exhaustive",
                  params_file=write_space(tmp_path, "learning_rate uniform 0.001,0.01\n"))


class FakeTune:
    """Ray Tune's API as tune_ray uses it (ray 2.6), running trials in turn in this process,
    each started, as Ray starts them, in a folder of its own."""

    def __init__(self, trial_root: Path):
        self.trial_root = trial_root

    grid_search = staticmethod(lambda values: {"grid_search": list(values)})
    choice = staticmethod(lambda values: ("choice", list(values)))
    uniform = staticmethod(lambda low, high: ("uniform", low, high))

    @staticmethod
    def with_resources(trainable, resources):
        assert resources == {"cpu": 1, "gpu": 0}
        return trainable

    @staticmethod
    def TuneConfig(num_samples):  # noqa: N802  (Ray's name)
        return {"num_samples": num_samples}

    def Tuner(self, trainable, param_space, tune_config):  # noqa: N802
        import itertools
        import random
        import types

        def fit():
            grid = {k: v["grid_search"] for k, v in param_space.items() if isinstance(v, dict)}
            rng = random.Random(0)
            configs = []
            for combo in itertools.product(*grid.values()):
                for _ in range(tune_config["num_samples"]):
                    config = dict(zip(grid, combo))
                    for k, v in param_space.items():
                        if isinstance(v, dict):
                            continue
                        if v[0] == "choice":
                            config[k] = rng.choice(v[1])
                        elif v[0] == "uniform":
                            config[k] = rng.uniform(v[1], v[2])
                    configs.append(config)
            results = []
            for i, config in enumerate(configs):
                reported = {}
                session = types.SimpleNamespace(report=reported.update)
                sys.modules["ray.air"].session = session
                folder = self.trial_root / f"trial_{i}"
                folder.mkdir(parents=True)
                os.chdir(folder)
                try:
                    trainable(config)
                    error = None
                except Exception as err:  # noqa: BLE001  (Ray records it on the result)
                    error = err
                results.append(types.SimpleNamespace(config=config, error=error,
                                                     metrics={**reported, "config": config,
                                                              "time_this_iter_s": 0.1}))
            return results

        return types.SimpleNamespace(fit=fit)


def test_tune_ray_runs_every_trial_from_the_launch_folder(tmp_path, monkeypatch):
    import types

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hyper, "import_ray_tune", lambda: FakeTune(tmp_path / "ray_results"))
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setitem(sys.modules, "ray.air", types.ModuleType("ray.air"))
    seen = []

    def objective(config_dict, config_file_list=None):
        seen.append((os.getcwd(), config_file_list))
        if config_dict["learning_rate"] == 0.3:
            raise RuntimeError("out of memory (pretend)")
        return fake_objective([])(config_dict)

    monkeypatch.setattr(hyper, "objective_function", objective)
    out = tmp_path / "sweep.result"
    sweep = run_sweep(tool="ray", model="SASRec", dataset="demo", algo="exhaustive",
                      params_file=write_space(tmp_path, "learning_rate choice [0.1,0.2,0.3]\n"),
                      config_file_list=["a.yaml"], output_file=str(out), seed=3)
    assert [t.params for t in sweep.trials] == [{"learning_rate": v} for v in (0.1, 0.2, 0.3)]
    assert seen == [(str(tmp_path), ["a.yaml"])] * 3  # relative paths mean what they meant here
    assert sweep.best.params == {"learning_rate": 0.2}
    assert sweep.best.best_valid_result == {"ndcg@10": 0.2} and sweep.best.test_result == {"ndcg@10": 0.1}
    assert sweep.trials[2].error == "RuntimeError: out of memory (pretend)"
    text = out.read_text()
    assert "learning_rate:0.3\nFailed: RuntimeError: out of memory (pretend)" in text
    assert text.split("Best:\n")[1].startswith("learning_rate:0.2\nValid result:\nndcg@10 : 0.2")


def test_iisan_versa_trials_reuse_the_layer_cache(tmp_path, plugin_config, monkeypatch):
    pytest.importorskip("recbole_iisan.model.iisan_versa")
    monkeypatch.chdir(tmp_path)
    space_file = write_space(tmp_path, "adapter_size choice [4,8]\n")
    shared = {k: v for k, v in plugin_config.items() if k != "adapter_size"}
    sweep = hyper.tune_hyperopt("IISANVersa", "demo", space_file, config_dict=shared)
    first, second = sweep.trials
    assert first.error is None and second.error is None, (first.error, second.error)
    assert {first.params["adapter_size"], second.params["adapter_size"]} == {4, 8}
    # the first trial encodes both modalities; the second memory-maps what it left
    assert first.efficiency.get("cache_build_seconds")
    assert "cache_build_seconds" not in second.efficiency
    assert len([p for p in Path(plugin_config["cache_dir"]).iterdir()
                if not p.name.startswith(".")]) == 2
    # and finding the cache changes nothing: the first trial again, now loading it, scores the same
    again = objective_function(config_dict={**shared, **first.params, "model": "IISANVersa",
                                            "dataset": "demo"})
    assert "cache_build_seconds" not in again["efficiency"]
    assert (again["best_valid_score"], again["test_result"]) == (first.best_valid_score, first.test_result)


def test_layer_caches_can_be_built_before_parallel_trials(tmp_path, plugin_config, monkeypatch):
    pytest.importorskip("recbole_iisan.model.iisan_versa")
    monkeypatch.chdir(tmp_path)
    assert hyper.build_layer_caches("IISANVersa", "demo", config_dict=plugin_config) == ["image", "text"]
    assert hyper.build_layer_caches("IISANVersa", "demo", config_dict=plugin_config) == []  # in place
    assert hyper.build_layer_caches("IISANVersa", "demo", config_dict=dict(plugin_config, use_cache=False)) == []
    assert hyper.build_layer_caches("SASRec", "demo", config_dict=plugin_config) == []
