"""Compare models on one dataset under one protocol: metrics, efficiency, TPME, a plot.

    python -m recbole_iisan.compare --models IISANVersa,MMFullFT,MMLoRA,SASRec --dataset demo \\
        [--config_files "a.yaml b.yaml"] [--output_dir results/compare-demo] \\
        [--model_config MMFullFT=fft.yaml] [--timeout 3600] [--key=value ...]
    python -m recbole_iisan.compare --from_json results/compare-demo/results.json

Each model runs in a fresh ``run_recbole_iisan.py`` process (so its peak memory is its
own) and writes its result JSON; a model that fails is recorded with its error and the
others still run. The output folder then holds one ``<label>.json`` per model, the
combined ``results.json``, ``comparison.md`` (the table) and ``comparison.png`` (NDCG@10
against seconds per epoch, marker area by peak memory); ``logs/<label>.log`` keeps each
run's output. ``--from_json`` remakes the table and plot from saved results.

The protocol (what makes the numbers comparable) is passed to every model explicitly:
``max_history_len`` and ``MAX_ITEM_LIST_LENGTH`` (the paper's 13 and 10 by default) and
``train_protocol``: ``iisan`` (one sequence per user, loss at every position) for the
plugin's models and ``recbole`` (every prefix of every history, RecBole's own
augmentation) for RecBole's built-in ones, which are built for it; an ID model trained
on the last position of one sequence per user would be handicapped, not compared.
Evaluation (leave-one-out, full ranking, metrics) comes from the dataset's yaml and is
the same for all; the report checks that and lists each model's protocol and loss.

A model label may carry a tag, ``Model:tag`` (e.g. ``IISANVersa:uncached``), to run one
model under several settings; ``--model_config LABEL=file.yaml`` gives a label its own
settings. Precedence, lowest first: the protocol defaults, the shared config files, the
shared ``--key=value`` overrides, the label's own yaml.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from recbole_iisan.efficiency import tpme

# The paper's protocol: the last 13 interactions of each user, histories of 10.
PROTOCOL_DEFAULTS = {"max_history_len": 13, "MAX_ITEM_LIST_LENGTH": 10}
TRAIN_PROTOCOL_DEFAULTS = {"plugin": "iisan", "builtin": "recbole"}
# Settings that must be the same for every model, or the metrics do not compare.
SHARED_KEYS = ("max_history_len", "MAX_ITEM_LIST_LENGTH", "eval_args", "metrics", "topk",
               "valid_metric", "user_inter_num_interval", "seed")
# Settings that may differ per model; recorded so the table says what each model ran with.
PER_MODEL_KEYS = ("train_protocol", "loss_type", "train_batch_size", "epochs", "learning_rate",
                  "MODEL_TYPE", "device")
TPME_WEIGHTS = (0.45, 0.1, 0.45)  # time per epoch, trainable parameters, peak memory
RESULTS_FILE = "results.json"
TABLE_FILE = "comparison.md"
PLOT_FILE = "comparison.png"
REPO_SCRIPT = Path(__file__).resolve().parent.parent / "run_recbole_iisan.py"


@dataclass
class ModelRun:
    """One row of the comparison: a model under a label, with its own settings.

    ``overrides`` values are config values (typed, or strings as on a command line).
    """

    label: str
    model: str
    config_files: list[str] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)


def parse_models(spec: str, model_configs: dict[str, str] | None = None) -> list[ModelRun]:
    """``"A,B:tag,C"`` -> runs; ``model_configs`` maps a label (or a bare model name, for all its
    labels) to its own yaml file."""
    model_configs = dict(model_configs or {})
    runs, seen = [], set()
    for label in (part.strip() for part in spec.split(",")):
        if not label:
            continue
        if label in seen:
            raise ValueError(f"--models lists '{label}' twice; give the second a tag, e.g. {label}:b")
        seen.add(label)
        model = label.split(":", 1)[0]
        files = [model_configs[key] for key in dict.fromkeys((model, label)) if key in model_configs]
        runs.append(ModelRun(label=label, model=model, config_files=files))
    if not runs:
        raise ValueError("--models names no model")
    unknown = set(model_configs) - seen - {run.model for run in runs}
    if unknown:
        raise ValueError(f"--model_config for {', '.join(sorted(unknown))}, which --models does not list")
    return runs


# ----------------------------------------------------------------------------- running


def _cli_value(value) -> str:
    """A config value as RecBole reads it back from ``--key=value`` (a Python literal or text)."""
    return value if isinstance(value, str) else repr(value)


def _yaml_keys(files: list[str]) -> set[str]:
    keys = set()
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {file} not found")
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {file} is not a yaml mapping of settings")
        keys.update(loaded)
    return keys


def safe_label(label: str) -> str:
    """A label usable as a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def run_arguments(run: ModelRun, shared_files: list[str], shared_overrides: dict,
                  output_dir: Path, train_protocols: dict | None = None) -> dict:
    """The ``--key=value`` settings of one run (as strings), precedence applied.

    The protocol defaults, then the shared files' and overrides' settings, then the run's own
    yaml (whose keys are left off the command line so that the file decides), then the run's
    own overrides. Output locations default to folders under ``output_dir``.
    """
    from recbole_iisan.utils import is_plugin_model

    protocols = dict(TRAIN_PROTOCOL_DEFAULTS, **(train_protocols or {}))
    kind = "plugin" if is_plugin_model(run.model) else "builtin"
    shared_file_keys = _yaml_keys(shared_files)
    own_file_keys = _yaml_keys(run.config_files)
    defaults = dict(PROTOCOL_DEFAULTS, train_protocol=protocols[kind],
                    checkpoint_dir=str(output_dir / "saved" / safe_label(run.label)),
                    # Shared by every run: keyed by encoder and items, so models on the same
                    # encoders encode the items once.
                    cache_dir=str(output_dir / "layer_cache"))
    args = {k: v for k, v in defaults.items() if k not in shared_file_keys}
    args.update(shared_overrides)
    for key in own_file_keys:
        args.pop(key, None)
    args.update(run.overrides)
    args["result_file"] = str(output_dir / f"{safe_label(run.label)}.json")
    return {k: _cli_value(v) for k, v in args.items()}


def resolve_settings(run: ModelRun, dataset: str, config_files: list[str], args: dict) -> dict:
    """What the run will use for the protocol and per-model keys, read from the same Config
    the run builds (without loading any data)."""
    from recbole_iisan.config import Config

    config = Config(model=run.model, dataset=dataset, config_file_list=config_files or None,
                    cmd_args=[f"--{k}={v}" for k, v in args.items()])
    settings = {}
    for key in SHARED_KEYS + PER_MODEL_KEYS:
        value = config[key]
        settings[key] = value if isinstance(value, (str, int, float, bool, list, dict, type(None))) \
            else str(value)
    return settings


def worker_command(run: ModelRun, dataset: str, config_files: list[str], args: dict) -> list[str]:
    """The command that trains one model: ``run_recbole_iisan.py`` in a fresh interpreter."""
    if REPO_SCRIPT.is_file():
        command = [sys.executable, str(REPO_SCRIPT)]
    else:  # an installed package has no checkout script: the same command line, from here
        command = [sys.executable, "-c",
                   "import sys; from recbole_iisan.compare import worker_main; worker_main(sys.argv[1:])"]
    command += ["-m", run.model, "-d", dataset]
    if config_files:
        bad = [f for f in config_files if any(c.isspace() for c in f)]
        if bad:
            raise ValueError(f"config file paths with spaces cannot be passed on: {bad}")
        command += ["--config_files", " ".join(config_files)]
    command += [f"--{k}={v}" for k, v in args.items()]
    return command


def worker_main(argv: list[str]) -> None:
    """``run_recbole_iisan.py``'s command line, for an installed package without that script."""
    from recbole_iisan.quick_start import run_recbole_iisan

    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--dataset", "-d", required=True)
    parser.add_argument("--config_files", default=None)
    args, overrides = parser.parse_known_args(argv)
    run_recbole_iisan(model=args.model, dataset=args.dataset,
                      config_file_list=args.config_files.split() if args.config_files else None,
                      cmd_args=overrides)


def _error_of(log: str) -> str:
    """The most telling line of a failed run's output: the last exception line, else the last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt|Exit)\b.*", line):
            return line
    return lines[-1] if lines else "no output"


def run_one(run: ModelRun, dataset: str, shared_files: list[str], shared_overrides: dict,
            output_dir: Path, train_protocols: dict | None = None,
            timeout: float | None = None, env: dict | None = None) -> dict:
    """Train and test one model in its own process; its result entry, ``status`` ok or failed."""
    entry = {"label": run.label, "model": run.model, "dataset": dataset, "status": "failed"}
    log_file = output_dir / "logs" / f"{safe_label(run.label)}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    config_files = [str(Path(f).resolve()) for f in list(shared_files) + list(run.config_files)]
    try:
        args = run_arguments(run, shared_files, shared_overrides, output_dir, train_protocols)
        entry["settings"] = resolve_settings(run, dataset, config_files, args)
        command = worker_command(run, dataset, config_files, args)
    except Exception as exc:  # a bad name or file: recorded, the other models still run
        entry["error"] = f"{type(exc).__name__}: {exc}"
        return _save_entry(entry, output_dir)
    entry["command"] = command
    result_file = Path(args["result_file"])
    result_file.unlink(missing_ok=True)  # a stale result must never pass for this run's
    start = time.perf_counter()
    try:
        with log_file.open("w", encoding="utf-8") as log:
            proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    entry["wall_seconds"] = round(time.perf_counter() - start, 3)
    entry["log_file"] = str(log_file)
    if returncode is None:
        entry["error"] = f"timed out after {timeout:g} s"
    elif returncode != 0:
        entry["error"] = f"exit code {returncode}: " + _error_of(log_file.read_text(encoding="utf-8",
                                                                                     errors="replace"))
    elif not result_file.is_file():
        entry["error"] = f"the run ended without writing {result_file}"
    else:
        entry.update(json.loads(result_file.read_text(encoding="utf-8")))
        entry["status"] = "ok"
    return _save_entry(entry, output_dir)


def _save_entry(entry: dict, output_dir: Path) -> dict:
    from recbole_iisan.quick_start import write_result

    write_result(entry, str(output_dir / f"{safe_label(entry['label'])}.json"))
    return entry


def run_comparison(runs: list[ModelRun], dataset: str, output_dir, config_files=None,
                   overrides: dict | None = None, train_protocols: dict | None = None,
                   timeout: float | None = None, command: list[str] | None = None,
                   env: dict | None = None, log=print) -> dict:
    """Run every model in turn, then write the per-model JSON, results.json, table and plot.

    ``env``: the environment of the model processes (default this one's), e.g. to pin
    OMP_NUM_THREADS. Returns the combined results (``runs``: one entry per model, in order).
    """
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    labels = [run.label for run in runs]
    if len(set(map(safe_label, labels))) != len(labels):
        raise ValueError(f"model labels must differ as file names: {labels}")
    entries = []
    for i, run in enumerate(runs, 1):
        log(f"[{i}/{len(runs)}] {run.label} on {dataset} ...")
        entry = run_one(run, dataset, list(config_files or []), dict(overrides or {}), output_dir,
                        train_protocols, timeout, env)
        if entry["status"] == "ok":
            test = entry.get("test_result") or {}
            log(f"    ok in {entry['wall_seconds']:.0f} s: ndcg@10={test.get('ndcg@10')}, "
                f"s/epoch={entry['efficiency'].get('train_seconds_per_epoch')}")
        else:
            log(f"    FAILED: {entry['error']}")
        entries.append(entry)
    results = {
        "dataset": dataset,
        "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(env),
        "runs": entries,
    }
    write_report(results, output_dir)
    return results


# ----------------------------------------------------------------------------- reporting


def machine_info(env: dict | None = None) -> dict:
    """CPU model, cores, memory, torch version and threads, GPU: what a timing depends on.

    ``torch_threads`` is what a model process started with ``env`` uses (OMP_NUM_THREADS).
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    threads = (env if env is not None else os.environ).get("OMP_NUM_THREADS")
    info = {"cpu": cpu, "cores": usable,
            "torch_threads": int(threads) if threads and threads.isdigit() else torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: dict) -> str:
    parts = [f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores "
             f"({info.get('torch_threads', '?')} torch threads)"]
    if info.get("memory_gb"):
        parts.append(f"{info['memory_gb']} GB RAM")
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    parts.append(f"torch {info.get('torch', '?')}")
    return ", ".join(parts)


def load_results(paths) -> dict:
    """Saved results: a combined results.json, or per-model JSON files (merged in order)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    combined = None
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"results file {path} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if isinstance(data, dict) and isinstance(data.get("runs"), list):
            entries, meta = data["runs"], data
        elif isinstance(data, dict) and "model" in data:  # one model's result
            entries = [dict(data, label=data.get("label", data["model"]),
                            status=data.get("status", "ok"))]
            meta = {"dataset": data.get("dataset")}
        else:
            raise ValueError(f"{path} holds neither a comparison (runs) nor a model result (model)")
        if combined is None:
            combined = {k: v for k, v in meta.items() if k != "runs"}
            combined["runs"] = []
        combined["runs"].extend(entries)
    if combined is None:
        raise ValueError("no results files given")
    return combined


def _figures(entry: dict) -> dict:
    """The numbers of one row (None where absent)."""
    eff = entry.get("efficiency") or {}
    test = entry.get("test_result") or {}
    return {
        "hit": test.get("hit@10"), "ndcg": test.get("ndcg@10"),
        "trainable_params": eff.get("trainable_params"), "total_params": eff.get("total_params"),
        "peak_memory_mb": eff.get("peak_memory_mb"),
        "train_seconds_per_epoch": eff.get("train_seconds_per_epoch"),
        "eval_seconds": eff.get("eval_seconds"),
    }


def _usable(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def tpme_scores(entries: list[dict], weights=TPME_WEIGHTS) -> list[float | None]:
    """TPME per entry over the runs that succeeded with all three figures (else None)."""
    keys = ("train_seconds_per_epoch", "trainable_params", "peak_memory_mb")
    rows, where = [], []
    for i, entry in enumerate(entries):
        figures = _figures(entry)
        if entry.get("status", "ok") == "ok" and all(_usable(figures[k]) for k in keys):
            rows.append({k: figures[k] for k in keys})
            where.append(i)
    scores: list[float | None] = [None] * len(entries)
    for i, score in zip(where, tpme(rows, weights) if rows else []):
        scores[i] = score
    return scores


def _fmt(value, digits=4) -> str:
    if not _usable(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[:limit - 1] + "…"


TABLE_HEADER = ("Model", "Protocol", "HR@10", "NDCG@10", "Trainable params", "Total params",
                "Peak memory (MB)", "s/epoch", "Eval s", "TPME", "Status")


def comparison_table(entries: list[dict]) -> str:
    """The Markdown table, one row per model in run order."""
    scores = tpme_scores(entries)
    lines = ["| " + " | ".join(TABLE_HEADER) + " |",
             "|" + "|".join("---" if i < 2 or i == len(TABLE_HEADER) - 1 else "---:"
                            for i in range(len(TABLE_HEADER))) + "|"]
    for entry, score in zip(entries, scores):
        protocol = (entry.get("settings") or {}).get("train_protocol", "–")
        if entry.get("status", "ok") != "ok":
            cells = [entry["label"], protocol] + ["failed"] * 8 + \
                    [f"failed: {_one_line(entry.get('error', 'unknown error'))}"]
        else:
            f = _figures(entry)
            cells = [entry.get("label", entry.get("model")), protocol, _fmt(f["hit"]), _fmt(f["ndcg"]),
                     _fmt(f["trainable_params"]), _fmt(f["total_params"]),
                     _fmt(f["peak_memory_mb"], 0), _fmt(f["train_seconds_per_epoch"], 2),
                     _fmt(f["eval_seconds"], 2), _fmt(score, 3), "ok"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def protocol_report(entries: list[dict]) -> list[str]:
    """Markdown lines: the shared settings, or which differ, and each model's own."""
    with_settings = [e for e in entries if e.get("settings")]
    if not with_settings:
        return ["No settings were recorded."]
    lines = []
    differing = []
    for key in SHARED_KEYS:
        values = {json.dumps(e["settings"].get(key), sort_keys=True) for e in with_settings}
        if len(values) == 1:
            lines.append(f"- `{key}`: `{values.pop()}`")
        else:
            differing.append(key)
    if differing:
        lines.insert(0, f"**Warning: the models do not share {', '.join(differing)}; "
                        "their metrics are not directly comparable.**")
    not_sequential = [e["label"] for e in with_settings
                      if "SEQUENTIAL" not in str(e["settings"].get("MODEL_TYPE", "SEQUENTIAL"))]
    if not_sequential:
        lines.append(f"- Not sequential models (no history cut, no train protocol): "
                     f"{', '.join(not_sequential)}")
    lines += ["", "| Model | train_protocol | loss_type | train_batch_size | epochs | learning_rate |",
              "|---|---|---|---:|---:|---:|"]
    for e in with_settings:
        s = e["settings"]
        lines.append(f"| {e['label']} | {s.get('train_protocol')} | {s.get('loss_type')} | "
                     f"{s.get('train_batch_size')} | {s.get('epochs')} | {s.get('learning_rate')} |")
    return lines


def comparison_markdown(results: dict) -> str:
    entries = results["runs"]
    kinds = {(e.get("efficiency") or {}).get("peak_memory_kind") for e in entries if e.get("status") == "ok"}
    kinds.discard(None)
    memory = {"process_rss": "peak resident memory (RSS high-water mark) of the run's process during "
                             "training", "cuda_allocated": "peak CUDA memory allocated during training"}
    lines = [f"# Comparison on {results.get('dataset')}", ""]
    if results.get("created") or results.get("machine"):
        lines.append(f"Run {results.get('created', '?')} on {describe_machine(results.get('machine') or {})}.")
    if results.get("command"):
        lines.append(f"Command: `{' '.join(results['command'])}`")
    lines += ["", comparison_table(entries), "",
              "HR@10 / NDCG@10 on the test split (full ranking over all items). "
              "s/epoch: mean wall seconds per training epoch; Eval s: mean seconds per evaluation "
              "pass. Peak memory: " + ("; ".join(memory.get(k, k) for k in sorted(kinds)) or "–") + ". "
              f"TPME = {TPME_WEIGHTS[0]}·time + {TPME_WEIGHTS[1]}·params + {TPME_WEIGHTS[2]}·memory over "
              "s/epoch, trainable params and peak memory, each min-max normalised across the models "
              "that ran (lower is better).", ""]
    if len(kinds) > 1:
        lines += ["**Warning: peak memory was measured in different ways across models.**", ""]
    lines += ["## Protocol", ""] + protocol_report(entries)
    failed = [e for e in entries if e.get("status", "ok") != "ok"]
    if failed:
        lines += ["", "## Failures", ""]
        for e in failed:
            where = f" (log: {e['log_file']})" if e.get("log_file") else ""
            lines.append(f"- {e['label']}: {_one_line(e.get('error', 'unknown error'), 1000)}{where}")
    return "\n".join(lines) + "\n"


def plot_comparison(entries: list[dict], path) -> None:
    """NDCG@10 against seconds per epoch, marker area by peak memory, each point labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []
    for entry in entries:
        f = _figures(entry)
        if entry.get("status", "ok") == "ok" and _usable(f["ndcg"]) and _usable(f["train_seconds_per_epoch"]):
            points.append((entry.get("label", entry.get("model")), f["train_seconds_per_epoch"], f["ndcg"],
                           f["peak_memory_mb"] if _usable(f["peak_memory_mb"]) else None))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if points:
        memories = [m for *_, m in points if m is not None]
        top = max(memories) if memories else 1.0
        for label, x, y, memory in points:
            size = 40 + 960 * (memory / top if memory else 0)  # area grows with peak memory
            ax.scatter(x, y, s=size, alpha=0.55, edgecolors="black", linewidths=0.6)
            text = label if memory is None else f"{label}\n{memory:,.0f} MB"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        xs = [x for _, x, _, _ in points]
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ys = [y for _, _, y, _ in points]
        pad = max(0.01, 0.15 * (max(ys) - min(ys)))
        ax.set_ylim(max(0.0, min(ys) - pad), max(ys) + pad)
    else:
        ax.text(0.5, 0.5, "no model finished", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training seconds per epoch" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("NDCG@10 (test)")
    ax.set_title("NDCG@10 vs training time (marker area: peak memory)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, output_dir) -> dict:
    """Write results.json, comparison.md and comparison.png into ``output_dir``; their paths."""
    from recbole_iisan.quick_start import write_result

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": output_dir / RESULTS_FILE, "table": output_dir / TABLE_FILE,
             "plot": output_dir / PLOT_FILE}
    write_result(results, str(paths["results"]))
    paths["table"].write_text(comparison_markdown(results), encoding="utf-8")
    plot_comparison(results["runs"], paths["plot"])
    return paths


# ----------------------------------------------------------------------------- command line


def _parse_overrides(args: list[str]) -> dict:
    from recbole_iisan.utils import split_overrides

    try:
        return split_overrides(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _parse_model_configs(items: list[str]) -> dict:
    configs = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"error: --model_config {item!r} is not LABEL=path.yaml")
        if not Path(path).is_file():
            raise SystemExit(f"error: --model_config {label}: file {path} not found")
        configs[label] = path
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_iisan.compare",
        description="Run several models on one dataset under one protocol and compare them.",
        allow_abbrev=False)
    parser.add_argument("--models", help="comma-separated labels: Model or Model:tag, e.g. IISANVersa,SASRec")
    parser.add_argument("--dataset", "-d", default="demo", help="dataset folder name under data_path")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files shared by every model")
    parser.add_argument("--output_dir", default=None, help="default results/compare-<dataset>")
    parser.add_argument("--model_config", action="append", default=[], metavar="LABEL=FILE",
                        help="a yaml with one model's (or label's) own settings, e.g. MMFullFT=fft.yaml")
    parser.add_argument("--plugin_protocol", default=TRAIN_PROTOCOL_DEFAULTS["plugin"],
                        choices=("iisan", "recbole"), help="train_protocol of the plugin's models")
    parser.add_argument("--builtin_protocol", default=TRAIN_PROTOCOL_DEFAULTS["builtin"],
                        choices=("iisan", "recbole"), help="train_protocol of RecBole's built-in models")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one model may run")
    parser.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                        help="remake the table and plot from saved results (no training)")
    args, rest = parser.parse_known_args(argv)

    if args.from_json:
        if args.models or rest:
            parser.error("--from_json remakes a report; it takes no --models or settings")
        results = load_results(args.from_json)
        output_dir = Path(args.output_dir or Path(args.from_json[0]).parent)
        paths = write_report(results, output_dir)
        print(f"wrote {paths['table']} and {paths['plot']}")
        return 0
    if not args.models:
        parser.error("--models is required (or --from_json)")
    runs = parse_models(args.models, _parse_model_configs(args.model_config))
    output_dir = Path(args.output_dir or Path("results") / f"compare-{args.dataset}")
    command = ["python", "-m", "recbole_iisan.compare"] + list(sys.argv[1:] if argv is None else argv)
    results = run_comparison(
        runs, args.dataset, output_dir, config_files=args.config_files.split() if args.config_files else [],
        overrides=_parse_overrides(rest),
        train_protocols={"plugin": args.plugin_protocol, "builtin": args.builtin_protocol},
        timeout=args.timeout, command=command)
    print((output_dir / TABLE_FILE).read_text(encoding="utf-8"))
    failed = [e["label"] for e in results["runs"] if e["status"] != "ok"]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
