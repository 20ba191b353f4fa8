"""Hyperparameter sweeps: RecBole's HyperTuning (hyperopt) or, optionally, Ray Tune.

Each trial is one ``objective_function`` run (``recbole_iisan.quick_start``) with the
trial's parameters over the fixed model, dataset and config; plugin and built-in models
alike. Trials of a plugin model reuse the layer cache: it is keyed by encoder and items
only, so a sweep over adapter or training settings encodes the items once.

A ``.hyper`` file is RecBole's format, one parameter a line::

    learning_rate choice [0.0005,0.001]
    hidden_dropout_prob uniform 0.1,0.5
    adapter_size choice [32,64,128]

(types: choice, uniform, quniform, loguniform; no spaces inside a value).
"""
from __future__ import annotations

import json
import logging
import math
import os
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from recbole_iisan.compat import add_numpy_aliases, import_hyperopt
from recbole_iisan.quick_start import objective_function

add_numpy_aliases()
import_hyperopt()  # RecBole's HyperTuning imports it lazily, in each method
# recbole.trainer imports only the trainers and this module; unlike recbole.quick_start,
# it does not import ray.
from recbole.trainer.hyper_tuning import (  # noqa: E402
    ExhaustiveSearchError,
    HyperTuning,
    _spacesize,
    _validate_space_exhaustive_search,
)

logger = logging.getLogger(__name__)

ALGOS = ("exhaustive", "random", "bayes")
TOOLS = ("hyperopt", "ray")
RAY_HINT = (
    "--tool ray needs Ray Tune importable next to RecBole 1.2.1, which accepts ray>=1.13,<=2.6.3 "
    "(pip install 'ray[tune]>=1.13,<=2.6.3'). Those versions import only with numpy<2 and "
    "setuptools' pkg_resources, and have no wheels for Python >= 3.12. Use --tool hyperopt "
    "(the default) here"
)


@dataclass
class Trial:
    """One trial: its parameters and either its results or its error."""

    params: dict[str, Any]
    best_valid_score: float | None = None
    best_valid_result: dict[str, float] | None = None
    test_result: dict[str, float] | None = None
    efficiency: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class SweepResult:
    """Every trial in order, and the best by the validation metric."""

    model: str
    dataset: str
    valid_score_bigger: bool
    trials: list[Trial] = field(default_factory=list)

    @property
    def finished(self) -> list[Trial]:
        return [t for t in self.trials if t.error is None]

    @property
    def best(self) -> Trial | None:
        done = self.finished
        if not done:
            return None
        pick = max if self.valid_score_bigger else min
        return pick(done, key=lambda t: t.best_valid_score)

    def to_dict(self) -> dict:
        best = self.best
        return {"model": self.model, "dataset": self.dataset,
                "valid_score_bigger": self.valid_score_bigger,
                "trials": [asdict(t) for t in self.trials],
                "best": asdict(best) if best else None}


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays made Python ones (for str(), json, yaml)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


def parse_overrides(args: list[str]) -> dict:
    """``--key=value`` arguments as a config dict, values typed as on run_recbole_iisan.py's
    command line (RecBole's rule: a Python literal, true/false, else the string)."""
    from recbole.config import Config as RecBoleConfig

    settings = {}
    for arg in args:
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not sep or not name:
            raise ValueError(f"unknown argument {arg!r}: config settings are --key=value")
        settings[name] = value
    # The converter uses no instance state; RecBole offers it as a method only.
    return RecBoleConfig._convert_config_dict(None, settings)


def read_params_file(params_file: str | os.PathLike) -> dict:
    """The hyperopt search space of a ``.hyper`` file, with errors that name the file."""
    path = Path(params_file)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found (see properties/hyper/ for examples)")
    try:
        space = HyperTuning._build_space_from_file(str(path))
    except Exception as err:
        raise ValueError(f"{path}: cannot read the search space: {err}") from err
    if not space:
        raise ValueError(f"{path}: no parameters (lines are `name type values`, e.g. "
                         "`learning_rate choice [0.001,0.0005]`)")
    return space


class PluginHyperTuning(HyperTuning):
    """RecBole's HyperTuning, recording every trial and surviving a failed one.

    Over RecBole's: parameters reach the objective as Python values (hyperopt hands out
    numpy scalars, which numpy 2 prints as ``np.float64(...)``); a trial that raises is
    logged and recorded as failed instead of ending the sweep; ``max_evals`` caps an
    exhaustive search too; sampling is seeded; ``early_stop`` (stop after that many
    trials without improvement) is off unless asked for.
    """

    def __init__(self, objective: Callable[[dict, list | None], dict], space: dict,
                 model: str, dataset: str, fixed_config_file_list=None, algo: str = "exhaustive",
                 max_evals: int | None = None, early_stop: int | None = None, seed: int = 2020,
                 display_file: str | None = None):
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, not {algo!r}")
        if algo == "exhaustive":
            try:
                _validate_space_exhaustive_search(space)
            except ExhaustiveSearchError as err:
                raise ValueError(f"{err}; use --algo random or --algo bayes for continuous "
                                 "parameters") from None
        elif max_evals is None:
            raise ValueError(f"--algo {algo} needs --max_evals")
        super().__init__(objective, space=space, fixed_config_file_list=fixed_config_file_list,
                         display_file=display_file, algo=algo, max_evals=max_evals or 1,
                         early_stop=early_stop or 1)
        if early_stop is None:
            self.early_stop_fn = None
        if algo == "exhaustive":
            grid = int(_spacesize(space))
            self.max_evals = grid if max_evals is None else min(grid, max_evals)
        self.seed = seed
        self.model = model
        self.sweep = SweepResult(model=model, dataset=dataset, valid_score_bigger=True)

    def trial(self, params):
        import hyperopt

        params = plain(dict(params))
        logger.info("trial %d: %s", len(self.sweep.trials) + 1, self.params2str(params))
        try:
            result = self.objective_function(dict(params), self.fixed_config_file_list)
        except Exception:
            error = traceback.format_exc()
            logger.error("trial with %s failed:\n%s", self.params2str(params), error)
            self.sweep.trials.append(Trial(params=params, error=error.strip().splitlines()[-1]))
            # inf, not None: hyperopt's early-stop rule compares every trial's loss.
            return {"loss": math.inf, "status": hyperopt.STATUS_FAIL}

        score = float(result["best_valid_score"])
        bigger = bool(result["valid_score_bigger"])
        self.sweep.valid_score_bigger = bigger
        self.sweep.trials.append(Trial(
            params=params, best_valid_score=score,
            best_valid_result=plain(result["best_valid_result"]),
            test_result=plain(result["test_result"]), efficiency=plain(result.get("efficiency"))))
        # What RecBole's own export_result and plot_hyper read.
        self.params_list.append(self.params2str(params))
        self.score_list.append(score)
        self.params2result[self.params2str(params)] = result
        best = self.sweep.best
        self.best_score, self.best_params = best.best_valid_score, best.params
        self.best_test_result = best.test_result
        logger.info("trial score %.4f (best so far %.4f)", score, self.best_score)
        return {"loss": -score if bigger else score, "status": hyperopt.STATUS_OK}

    def run(self):
        from hyperopt import fmin
        from hyperopt.exceptions import AllTrialsFailed

        try:
            fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals,
                 early_stop_fn=self.early_stop_fn, rstate=np.random.RandomState(self.seed),
                 show_progressbar=False, return_argmin=False)
        except AllTrialsFailed:
            pass  # every failure is in self.sweep, with its error, for the caller to report
        if self.display_file is not None and self.score_list:
            self.plot_hyper()


def _trial_objective(fixed: dict) -> Callable[[dict, list | None], dict]:
    def objective(params: dict, config_file_list=None) -> dict:
        return objective_function(config_dict={**fixed, **params}, config_file_list=config_file_list)

    return objective


def tune_hyperopt(model: str, dataset: str, params_file: str, config_file_list=None,
                  config_dict: dict | None = None, algo: str = "exhaustive",
                  max_evals: int | None = None, early_stop: int | None = None, seed: int = 2020,
                  output_file: str | None = None, display_file: str | None = None) -> SweepResult:
    """Sweep ``params_file``'s space with RecBole's HyperTuning; write ``output_file``.

    ``config_dict`` and ``config_file_list`` hold what every trial shares (e.g. epochs);
    a trial's own parameters override them. ``max_evals`` caps the number of trials
    (for ``exhaustive`` it defaults to the whole grid).
    """
    space = read_params_file(params_file)
    fixed = {**(config_dict or {}), "model": model, "dataset": dataset}
    tuner = PluginHyperTuning(_trial_objective(fixed), space, model=model, dataset=dataset,
                              fixed_config_file_list=config_file_list, algo=algo,
                              max_evals=max_evals, early_stop=early_stop, seed=seed,
                              display_file=display_file)
    tuner.run()
    sweep = tuner.sweep
    if output_file:
        write_sweep(sweep, output_file)
    if not sweep.finished:
        raise RuntimeError(f"all {len(sweep.trials)} trials failed; the first error: "
                           f"{sweep.trials[0].error if sweep.trials else 'no trial ran'}")
    return sweep


def write_sweep(sweep: SweepResult, output_file: str | os.PathLike) -> None:
    """JSON when the name ends in ``.json``; otherwise RecBole's text layout plus the best."""
    path = Path(output_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        text = json.dumps(sweep.to_dict(), indent=2)
    else:
        text = "".join(_trial_text(t) for t in sweep.trials)
        best = sweep.best
        text += "Best:\n" + (_trial_text(best) if best else "none (every trial failed)\n")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _trial_text(trial: Trial) -> str:
    head = HyperTuning.params2str(trial.params) + "\n"
    if trial.error is not None:
        return head + f"Failed: {trial.error}\n\n"
    return (head + f"Valid result:\n{_metrics_text(trial.best_valid_result)}\n"
            f"Test result:\n{_metrics_text(trial.test_result)}\n\n")


def _metrics_text(metrics: dict | None) -> str:
    return "    ".join(f"{k} : {v}" for k, v in (metrics or {}).items())


# -- Ray Tune ---------------------------------------------------------------------------
def import_ray_tune():
    """Ray Tune, or an ImportError saying why it cannot be used here and what to do."""
    try:
        from ray import tune
    except Exception as err:  # ray 2.6 on numpy 2 / new setuptools fails with assorted errors
        raise ImportError(f"{RAY_HINT}. Importing ray failed: {type(err).__name__}: {err}") from err
    return tune


def ray_search_space(params_file: str, tune, grid: bool = False) -> dict:
    """A ``.hyper`` file as a Ray Tune search space (same types as for hyperopt).

    ``grid``: choices become ``tune.grid_search`` (every combination, as hyperopt's
    exhaustive search); continuous parameters are then refused.
    """
    space = {}
    path = Path(params_file)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found (see properties/hyper/ for examples)")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.strip().split(" ")
        if len(parts) < 3:
            continue
        name, kind, value = parts[0], parts[1], "".join(parts[2:])
        if kind == "choice":
            choices = _literal(value, path, number)
            space[name] = tune.grid_search(choices) if grid else tune.choice(choices)
        elif kind in ("uniform", "loguniform", "quniform"):
            if grid:
                raise ValueError(f"{path}:{number}: exhaustive search takes choice parameters "
                                 f"only, {name} is {kind}; use --algo random")
            bounds = [float(v) for v in value.split(",")]
            if kind == "uniform":
                space[name] = tune.uniform(*bounds)
            elif kind == "loguniform":  # hyperopt's bounds are exponents of e
                space[name] = tune.loguniform(math.exp(bounds[0]), math.exp(bounds[1]))
            else:
                space[name] = tune.quniform(*bounds)
        else:
            raise ValueError(f"{path}:{number}: unknown parameter type {kind!r}")
    return space


def _literal(text: str, path: Path, number: int):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"{path}:{number}: cannot read the choices {text!r}: {err}") from None


def _ray_trial(params: dict, fixed: dict, config_file_list) -> None:
    from ray.air import session

    result = objective_function(config_dict={**fixed, **params}, config_file_list=config_file_list)
    session.report({"best_valid_score": float(result["best_valid_score"]),
                    "valid_score_bigger": bool(result["valid_score_bigger"]),
                    **{f"valid_{k}": v for k, v in result["best_valid_result"].items()},
                    **{f"test_{k}": v for k, v in result["test_result"].items()}})


def tune_ray(model: str, dataset: str, params_file: str, config_file_list=None,
             config_dict: dict | None = None, algo: str = "random", max_evals: int | None = None,
             output_file: str | None = None, cpus_per_trial: float = 1,
             gpus_per_trial: float = 0) -> SweepResult:
    """The sweep on Ray Tune, trials in parallel as resources allow.

    ``exhaustive`` runs the whole grid of the choices (``max_evals`` does not cap it);
    ``random`` draws ``max_evals`` samples. Bayesian search is hyperopt's only.
    """
    if algo not in ("exhaustive", "random"):
        raise ValueError(f"--tool ray offers --algo exhaustive or random, not {algo!r}")
    if algo == "random" and max_evals is None:
        raise ValueError("--algo random needs --max_evals")
    tune = import_ray_tune()
    from functools import partial

    # Ray runs trials in other processes and folders: paths must be absolute there.
    fixed = {**(config_dict or {}), "model": model, "dataset": dataset}
    for key in ("data_path", "checkpoint_dir", "cache_dir"):
        if fixed.get(key):
            fixed[key] = os.path.abspath(fixed[key])
    files = [os.path.abspath(f) for f in (config_file_list or [])] or None
    trainable = tune.with_resources(partial(_ray_trial, fixed=fixed, config_file_list=files),
                                    {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    grid = algo == "exhaustive"
    tuner = tune.Tuner(trainable, param_space=ray_search_space(params_file, tune, grid=grid),
                       tune_config=tune.TuneConfig(num_samples=1 if grid else max_evals))
    sweep = SweepResult(model=model, dataset=dataset, valid_score_bigger=True)
    for result in tuner.fit():
        if result.error is not None:
            sweep.trials.append(Trial(params=plain(result.config), error=str(result.error)))
            continue
        metrics = result.metrics
        sweep.valid_score_bigger = bool(metrics["valid_score_bigger"])
        sweep.trials.append(Trial(
            params=plain(result.config), best_valid_score=float(metrics["best_valid_score"]),
            best_valid_result={k[6:]: v for k, v in metrics.items() if k.startswith("valid_")
                               and k != "valid_score_bigger"},
            test_result={k[5:]: v for k, v in metrics.items() if k.startswith("test_")}))
    if output_file:
        write_sweep(sweep, output_file)
    return sweep


def run_sweep(tool: str = "hyperopt", **kwargs) -> SweepResult:
    """Run a sweep with ``tool`` (hyperopt | ray); the keyword arguments are
    :func:`tune_hyperopt`'s (or :func:`tune_ray`'s)."""
    if tool == "hyperopt":
        return tune_hyperopt(**kwargs)
    if tool == "ray":
        for hyperopt_only in ("early_stop", "seed", "display_file"):
            if kwargs.pop(hyperopt_only, None) is not None:
                logger.warning("--%s applies to --tool hyperopt only; ignored", hyperopt_only)
        return tune_ray(**kwargs)
    raise ValueError(f"tool must be one of {', '.join(TOOLS)}, not {tool!r}")
