"""Hyperparameter sweeps: RecBole's HyperTuning (hyperopt) or, optionally, Ray Tune.

Each trial is one ``objective_function`` run (``recbole_iisan.quick_start``) with the
trial's parameters over the fixed model, dataset and config; plugin and built-in models
alike. Trials of a plugin model reuse the layer cache: it is keyed by encoder and items
only, so a sweep over adapter or training settings encodes the items once.

A ``.hyper`` file is RecBole's format, one parameter a line::

    adapter_size choice [32,64,128]
    hidden_dropout_prob uniform 0.1,0.5
    learning_rate loguniform -9.2,-6.9      # bounds are natural logs: e^-9.2 .. e^-6.9
    weight_decay quniform 0,0.001,0.0001    # low, high, step (floats)

plus ``#`` comments and blank lines (RecBole's own reader takes neither).
"""
from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import sys
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
PARAM_KINDS = {"choice": None, "uniform": 2, "loguniform": 2, "quniform": 3}  # kind -> bounds
RAY_SPEC = "ray[tune]>=1.13,<=2.6.3"  # what RecBole 1.2.1 accepts
# A comment starts at a '#' that begins the line or follows a space ('a#b' stays a value).
_COMMENT = re.compile(r"(^|\s)#.*$")


# -- the search space ---------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One line of a ``.hyper`` file: the choices, or the bounds (and step) of a range."""

    name: str
    kind: str
    values: tuple
    line: int


def parse_params_file(params_file: str | os.PathLike) -> list[ParamSpec]:
    """The parameters of a ``.hyper`` file, with errors that name the file and line."""
    path = Path(params_file)
    if not path.is_file():
        raise FileNotFoundError(f"params file {path} not found (see properties/hyper/ for examples)")
    specs: dict[str, ParamSpec] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        parts = line.split()
        where = f"{path}:{number}"
        if len(parts) < 3:
            raise ValueError(f"{where}: expected `name type values` (e.g. "
                             f"`learning_rate choice [0.001,0.0005]`), got {raw.strip()!r}")
        name, kind, text = parts[0], parts[1], "".join(parts[2:])
        if kind not in PARAM_KINDS:
            raise ValueError(f"{where}: unknown parameter type {kind!r} for {name} "
                             f"(one of {', '.join(PARAM_KINDS)})")
        if name in specs:
            raise ValueError(f"{where}: {name} is already defined on line {specs[name].line}")
        specs[name] = ParamSpec(name, kind, _parse_values(kind, text, where, name), number)
    if not specs:
        raise ValueError(f"{path}: no parameters (lines are `name type values`, e.g. "
                         "`learning_rate choice [0.001,0.0005]`)")
    return list(specs.values())


def _parse_values(kind: str, text: str, where: str, name: str) -> tuple:
    if kind == "choice":
        try:
            values = ast.literal_eval(text)
        except (ValueError, SyntaxError) as err:
            raise ValueError(f"{where}: cannot read the choices of {name}, {text!r}: {err}") from None
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"{where}: the choices of {name} must be a non-empty list, got {text!r}")
        return tuple(values)
    try:
        bounds = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"{where}: {kind} takes numbers separated by commas, got {text!r}") from None
    if len(bounds) != PARAM_KINDS[kind]:
        shape = "low,high,step" if kind == "quniform" else "low,high"
        raise ValueError(f"{where}: {kind} takes {shape} for {name}, got {text!r}")
    if bounds[0] > bounds[1]:
        raise ValueError(f"{where}: the low bound of {name} exceeds the high one ({text})")
    return bounds


def hyperopt_space(specs: list[ParamSpec]) -> dict:
    """The hyperopt space, built by RecBole's own builder (the same ``hp`` calls as for a file)."""
    by_kind: dict[str, dict] = {}
    for spec in specs:
        by_kind.setdefault(spec.kind, {})[spec.name] = list(spec.values)
    return HyperTuning._build_space_from_dict(by_kind)


def read_params_file(params_file: str | os.PathLike) -> dict:
    """The hyperopt search space of a ``.hyper`` file."""
    return hyperopt_space(parse_params_file(params_file))


def check_fixed_settings(specs: list[ParamSpec], config_dict: dict | None, params_file) -> None:
    """Refuse a setting given both in the params file and as a shared ``--key=value``.

    A trial's parameters override the shared settings, so the command-line value would
    be silently ignored.
    """
    clash = [s for s in specs if s.name in (config_dict or {})]
    if clash:
        spec = clash[0]
        raise ValueError(
            f"{spec.name} is set both by {params_file} (line {spec.line}: {spec.kind} "
            f"{list(spec.values)}) and by --{spec.name}={config_dict[spec.name]}; the params file "
            f"would win. Edit that line (e.g. `{spec.name} choice [{config_dict[spec.name]!r}]`) "
            "or drop the option")


# -- results -------------------------------------------------------------------------------
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

    def add_result(self, params: dict, result: dict) -> Trial:
        """Record a finished trial from the objective's result dict."""
        self.valid_score_bigger = bool(result["valid_score_bigger"])
        trial = Trial(params=plain(params), best_valid_score=float(result["best_valid_score"]),
                      best_valid_result=plain(result["best_valid_result"]),
                      test_result=plain(result["test_result"]),
                      efficiency=plain(result.get("efficiency")))
        self.trials.append(trial)
        return trial

    def check_some_finished(self) -> None:
        if not self.finished:
            raise RuntimeError(f"all {len(self.trials)} trials failed; the first error: "
                               f"{self.trials[0].error if self.trials else 'no trial ran'}")


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


def parse_overrides(args: list[str]) -> dict:
    """``--key=value`` arguments as a config dict, values typed as on run_recbole_iisan.py's
    command line (RecBole's rule: a Python literal, true/false, else the string)."""
    from recbole.config import Config as RecBoleConfig

    from recbole_iisan.utils import split_overrides

    settings = split_overrides(args)
    # The converter uses no instance state; RecBole offers it as a method only.
    return RecBoleConfig._convert_config_dict(None, settings)


# -- hyperopt, through RecBole's HyperTuning ------------------------------------------------
class PluginHyperTuning(HyperTuning):
    """RecBole's HyperTuning, recording every trial and surviving a failed one.

    Over RecBole's: parameters reach the objective as Python values (hyperopt hands out
    numpy scalars, which numpy 2 prints as ``np.float64(...)``); a trial that raises is
    logged and recorded as failed instead of ending the sweep; ``max_evals`` caps an
    exhaustive search too; sampling is seeded; ``early_stop`` (stop after that many
    trials without improvement) is off unless asked for; with ``output_file`` the results
    so far are rewritten after every trial, so an interrupted sweep keeps them.
    """

    def __init__(self, objective: Callable[[dict, list | None], dict], space: dict,
                 model: str, dataset: str, fixed_config_file_list=None, algo: str = "exhaustive",
                 max_evals: int | None = None, early_stop: int | None = None, seed: int = 2020,
                 display_file: str | None = None, output_file: str | None = None):
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
        self.output_file = output_file
        self.sweep = SweepResult(model=model, dataset=dataset, valid_score_bigger=True)

    def trial(self, params):
        import hyperopt

        params = plain(dict(params))
        # Printed, as RecBole's HyperTuning does: each trial's run reconfigures logging.
        label = f"trial {len(self.sweep.trials) + 1}/{self.max_evals}"
        print(f"{label}: {self.params2str(params)}", flush=True)
        try:
            result = self.objective_function(dict(params), self.fixed_config_file_list)
        except Exception:
            error = traceback.format_exc()
            logger.error("trial with %s failed:\n%s", self.params2str(params), error)
            print(f"{label} failed: {error.strip().splitlines()[-1]}", flush=True)
            self.sweep.trials.append(Trial(params=params, error=error.strip().splitlines()[-1]))
            self._save()
            # inf, not None: hyperopt's early-stop rule compares every trial's loss.
            return {"loss": math.inf, "status": hyperopt.STATUS_FAIL}

        trial = self.sweep.add_result(params, result)
        score, bigger = trial.best_valid_score, self.sweep.valid_score_bigger
        # What RecBole's own export_result and plot_hyper read.
        self.params_list.append(self.params2str(params))
        self.score_list.append(score)
        self.params2result[self.params2str(params)] = result
        best = self.sweep.best
        self.best_score, self.best_params = best.best_valid_score, best.params
        self.best_test_result = best.test_result
        self._save()
        print(f"{label}: valid score {score:.4f} (best so far {self.best_score:.4f})", flush=True)
        return {"loss": -score if bigger else score, "status": hyperopt.STATUS_OK}

    def _save(self) -> None:
        if self.output_file:
            write_sweep(self.sweep, self.output_file)

    def run(self):
        """Run the trials; the plot (``display_file``) is :meth:`plot`'s, after the results."""
        from hyperopt import fmin
        from hyperopt.exceptions import AllTrialsFailed

        try:
            fmin(self.trial, self.space, algo=self.algo, max_evals=self.max_evals,
                 early_stop_fn=self.early_stop_fn, rstate=np.random.RandomState(self.seed),
                 show_progressbar=False, return_argmin=False)
        except AllTrialsFailed:
            pass  # every failure is in self.sweep, with its error, for the caller to report

    def plot(self) -> None:
        """RecBole's HTML plot of the trial scores, when ``display_file`` is set."""
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

    ``config_dict`` and ``config_file_list`` hold what every trial shares (e.g. the
    data path); a trial's own parameters override the config files, and may not also be
    in ``config_dict``. ``max_evals`` caps the number of trials (for ``exhaustive`` it
    defaults to the whole grid).
    """
    specs = parse_params_file(params_file)
    check_fixed_settings(specs, config_dict, params_file)
    if display_file is not None:
        _require_plotly()
    fixed = {**(config_dict or {}), "model": model, "dataset": dataset}
    tuner = PluginHyperTuning(_trial_objective(fixed), hyperopt_space(specs), model=model,
                              dataset=dataset, fixed_config_file_list=config_file_list, algo=algo,
                              max_evals=max_evals, early_stop=early_stop, seed=seed,
                              display_file=display_file, output_file=output_file)
    tuner.run()
    sweep = tuner.sweep
    if output_file:
        write_sweep(sweep, output_file)  # also when no trial ran at all
    sweep.check_some_finished()
    tuner.plot()
    return sweep


def _require_plotly() -> None:
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise ImportError("--display_file needs plotly (RecBole plots with it): pip install plotly") from None


# -- Ray Tune ---------------------------------------------------------------------------
def ray_unavailable_hint(version_info=None) -> str:
    """Why --tool ray cannot run, and what to do, for this Python."""
    major, minor = tuple(version_info or sys.version_info)[:2]
    if (major, minor) >= (3, 12):
        return (f"--tool ray is not available on Python {major}.{minor}: RecBole 1.2.1 accepts "
                f"only {RAY_SPEC}, and those Ray versions have no wheels for Python 3.12 or later, "
                "so Ray cannot be installed here. Use --tool hyperopt (the default), or Python "
                "3.10/3.11 for Ray")
    return (f"--tool ray needs Ray Tune as RecBole 1.2.1 accepts it ({RAY_SPEC}): pip install "
            "'recbole_iisan[tune]'. Those Ray versions import only with numpy<2 and setuptools<81 "
            "(they need pkg_resources). Otherwise use --tool hyperopt (the default)")


def import_ray_tune():
    """Ray Tune, or an ImportError saying why it cannot be used here and what to do."""
    try:
        from ray import tune
    except Exception as err:  # ray 2.6 on numpy 2 / new setuptools fails with assorted errors
        raise ImportError(f"{ray_unavailable_hint()}. Importing ray failed: "
                          f"{type(err).__name__}: {err}") from err
    return tune


def _check_grid(specs: list[ParamSpec]) -> None:
    ranged = [spec for spec in specs if spec.kind != "choice"]
    if ranged:
        spec = ranged[0]
        raise ValueError(f"line {spec.line}: exhaustive search takes choice parameters only, "
                         f"{spec.name} is {spec.kind}; use --algo random")


def ray_search_space(specs: list[ParamSpec], tune, grid: bool = False) -> dict:
    """The parameters as a Ray Tune search space (the same distributions as hyperopt's).

    ``grid``: choices become ``tune.grid_search`` (every combination, as hyperopt's
    exhaustive search); continuous parameters are then refused.
    """
    if grid:
        _check_grid(specs)
    space = {}
    for spec in specs:
        if spec.kind == "choice":
            choices = list(spec.values)
            space[spec.name] = tune.grid_search(choices) if grid else tune.choice(choices)
        elif spec.kind == "uniform":
            space[spec.name] = tune.uniform(*spec.values)
        elif spec.kind == "loguniform":  # hyperopt's bounds are natural logs
            space[spec.name] = tune.loguniform(math.exp(spec.values[0]), math.exp(spec.values[1]))
        else:
            space[spec.name] = tune.quniform(*spec.values)
    return space


def _ray_trial(params: dict, fixed: dict, config_file_list, workdir: str) -> None:
    from ray.air import session

    # Ray starts each trial in its own folder; relative paths (data_path, saved/, the
    # config files) mean what they meant where the sweep was started.
    os.chdir(workdir)
    result = objective_function(config_dict={**fixed, **params}, config_file_list=config_file_list)
    session.report({"best_valid_score": float(result["best_valid_score"]),
                    "valid_score_bigger": bool(result["valid_score_bigger"]),
                    **{f"valid/{k}": v for k, v in result["best_valid_result"].items()},
                    **{f"test/{k}": v for k, v in result["test_result"].items()}})


def build_layer_caches(model: str, dataset: str, config_file_list=None,
                       config_dict: dict | None = None) -> list[str]:
    """Encode a plugin model's items into the layer cache now, if not cached yet.

    Parallel trials (Ray) would otherwise each find no cache and encode the same items at
    once. Returns the modalities whose cache was built; nothing for built-in models or
    ``use_cache: False``.
    """
    from recbole_iisan.config import Config
    from recbole_iisan.utils import create_dataset, is_plugin_model

    if not is_plugin_model(model):
        return []
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict=dict(config_dict or {}), cmd_args=[])
    if not config["use_cache"]:
        return []
    item_side = create_dataset(config).item_side
    for modality in item_side.modalities:
        item_side.layer_states(modality)
    return sorted(item_side.cache_build_seconds)


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
    specs = parse_params_file(params_file)
    check_fixed_settings(specs, config_dict, params_file)
    grid = algo == "exhaustive"
    if grid:
        _check_grid(specs)  # before Ray starts
    tune = import_ray_tune()
    from functools import partial

    fixed = {**(config_dict or {}), "model": model, "dataset": dataset}
    built = build_layer_caches(model, dataset, config_file_list, config_dict)
    if built:
        logger.info("built the %s layer cache before starting the trials", ", ".join(built))
    trainable = tune.with_resources(
        partial(_ray_trial, fixed=fixed, config_file_list=config_file_list, workdir=os.getcwd()),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    tuner = tune.Tuner(trainable, param_space=ray_search_space(specs, tune, grid=grid),
                       tune_config=tune.TuneConfig(num_samples=1 if grid else max_evals))
    names = [spec.name for spec in specs]
    sweep = SweepResult(model=model, dataset=dataset, valid_score_bigger=True)
    for result in tuner.fit():
        params = {name: (result.config or {}).get(name) for name in names}
        if result.error is not None:
            sweep.trials.append(Trial(params=plain(params),
                                      error=f"{type(result.error).__name__}: {result.error}"))
            continue
        metrics = result.metrics
        sweep.add_result(params, {
            "best_valid_score": metrics["best_valid_score"],
            "valid_score_bigger": metrics["valid_score_bigger"],
            "best_valid_result": _unprefix(metrics, "valid/"),
            "test_result": _unprefix(metrics, "test/")})
    if output_file:
        write_sweep(sweep, output_file)
    sweep.check_some_finished()
    return sweep


def _unprefix(metrics: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}


# -- entry point ---------------------------------------------------------------------------
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
