"""Models on real item text: Amazon Scientific (the paper's) or RecBole's ml-100k, text only.

    python bench/bench_real_text.py scientific [--data_dir /tmp/recbole_iisan_data] \\
        [--budget_minutes 40] [--sample_users 128] [--smoke] [--threads 1] [--output BENCHMARKS.md]
    python bench/bench_real_text.py ml-100k ...

1. Prepares the data outside the repository, in ``--data_dir``: Scientific is converted from
   ../shared/data/amazon-scientific with ``python -m recbole_iisan.data.convert iisan`` (titles
   HTML-unescaped, users with < 5 interactions dropped, histories cut to their last 13);
   ml-100k is copied from RecBole's wheel as dataset ``ml100k`` (the movie title is the item
   text; RecBole would read a dataset named ``ml-100k`` from its wheel whatever data_path says).
2. Calibrates: every model trains one epoch (and evaluates) on the first ``--sample_users``
   users, through ``recbole_iisan.compare``. From that it estimates each model's time on the
   whole dataset per epoch and in all, and plans epochs (at most ``--max_epochs``) so the
   whole comparison fits ``--budget_minutes``; a model of which not even one epoch fits is
   skipped, with its estimate recorded.
3. Unless ``--smoke``, runs the planned comparison on the whole dataset.
4. Writes its section of BENCHMARKS.md: command, date, machine, data, the calibration, the
   plan (epochs and estimated minutes per model) and, after a full run, the results table.

Models: IISANVersa (text SAN over MiniLM), SASRec (IDs), MMFrozen (text, frozen MiniLM
from the layer cache) and MMLoRA (text, LoRA r=8 on MiniLM's query/value); the paper's
protocol (history 13 / sequence 10, leave-one-out, full ranking, HR/NDCG@10), with the
plugin models on the iisan train protocol and SASRec on RecBole's (see recbole_iisan.compare).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository on sys.path)
from benchlib import REPO, load_average, now, replace_section, subset_dataset

from recbole_iisan.compare import PROTOCOL_DEFAULTS, ModelRun, describe_machine, machine_info, run_comparison

SHARED_DATA = REPO.parent / "shared" / "data"
COMPARE_PROPS = REPO / "properties" / "compare"
MODELS = ("IISANVersa", "SASRec", "MMFrozen", "MMLoRA")
DEFAULT_MAX_EPOCHS = {"IISANVersa": 30, "SASRec": 50, "MMFrozen": 30, "MMLoRA": 5}
DATASETS = {
    "scientific": {"title": "Amazon Scientific",
                   "config_files": ["leave_one_out.yaml", "text_only.yaml"]},
    "ml-100k": {"title": "MovieLens-100k (RecBole's bundled copy)",
                "config_files": ["leave_one_out.yaml", "text_only.yaml", "ml-100k.yaml"]},
}


# ----------------------------------------------------------------------------- data


def prepare_scientific(data_dir: Path) -> Path:
    folder = data_dir / "scientific"
    if (folder / "scientific.inter").is_file():
        return folder
    source = SHARED_DATA / "amazon-scientific"
    command = [sys.executable, "-m", "recbole_iisan.data.convert", "iisan",
               "--users", str(source / "am_Industrial_and_Scientific_users.tsv"),
               "--items", str(source / "Industrial_and_Scientific_items.tsv"),
               "--output", str(folder), "--min_len", "5", "--max_len", "13", "--force"]
    print(" ".join(command))
    subprocess.run(command, check=True)
    return folder


# RecBole reads any dataset named "ml-100k" from its own bundled copy, whatever data_path
# says (Config._set_default_parameters): the copy, and its samples, need another name.
ML100K_NAME = "ml100k"


def prepare_ml100k(data_dir: Path) -> Path:
    import recbole

    source = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
    folder = data_dir / ML100K_NAME
    if (folder / f"{ML100K_NAME}.inter").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("inter", "item"):
        shutil.copy(source / f"ml-100k.{suffix}", folder / f"{ML100K_NAME}.{suffix}")
    return folder


def dataset_stats(folder: Path, keep_last: int = PROTOCOL_DEFAULTS["max_history_len"]) -> dict:
    """Users, items and interactions of an atomic dataset folder as the models see it: each
    user's last ``keep_last`` interactions by timestamp (and ``stored_interactions``)."""
    lines = (folder / f"{folder.name}.inter").read_text(encoding="utf-8").splitlines()
    columns = [c.split(":", 1)[0] for c in lines[0].split("\t")]
    user_col, item_col, time_col = (columns.index(c) for c in ("user_id", "item_id", "timestamp"))
    histories: dict[str, list[tuple[float, int, str]]] = {}
    for order, line in enumerate(lines[1:]):
        fields = line.split("\t")
        histories.setdefault(fields[user_col], []).append((float(fields[time_col]), order, fields[item_col]))
    kept = [sorted(events)[-keep_last:] for events in histories.values()]
    return {"users": len(histories), "items": len({item for events in kept for *_, item in events}),
            "interactions": sum(map(len, kept)), "stored_interactions": len(lines) - 1}


# ----------------------------------------------------------------------------- estimate and plan


def estimate(entry: dict, user_scale: float, item_scale: float) -> dict | None:
    """Whole-dataset minutes of one model from its one-epoch calibration run.

    Training scales with users; an evaluation with the larger of users and items (it
    embeds every item once, then ranks every user); the layer-cache build with items; the
    rest of the run (start-up, data loading) is taken as it was measured.
    """
    if entry.get("status") != "ok":
        return None
    eff = entry["efficiency"]
    epoch, evaluation = eff["train_seconds_per_epoch"] or 0.0, eff["eval_seconds"] or 0.0
    cache = eff.get("cache_build_seconds") or 0.0
    overhead = max(0.0, entry["wall_seconds"] - epoch - 2 * evaluation - cache)
    return {"epoch_s": epoch * user_scale, "eval_s": evaluation * max(user_scale, item_scale),
            "fixed_s": overhead + cache * item_scale + evaluation * max(user_scale, item_scale)}


def total_seconds(cost: dict, epochs: int) -> float:
    return cost["fixed_s"] + epochs * (cost["epoch_s"] + cost["eval_s"])


def plan_epochs(costs: dict, max_epochs: dict, budget_s: float) -> dict:
    """Epochs per model within the budget: an equal share each, what a model cannot use (it
    reaches its max_epochs) going to the others. 0 means not even one epoch fits."""
    plan, left, open_models = {}, budget_s, [m for m in costs if costs[m] is not None]
    while open_models:
        share = left / len(open_models)
        fits = {m: max(0, math.floor((share - costs[m]["fixed_s"]) / (costs[m]["epoch_s"] + costs[m]["eval_s"])))
                for m in open_models}
        capped = [m for m in open_models if fits[m] >= max_epochs[m]]
        hopeless = [m for m in open_models if fits[m] == 0]
        if capped:
            for m in capped:
                plan[m] = max_epochs[m]
                left -= total_seconds(costs[m], max_epochs[m])
                open_models.remove(m)
        elif hopeless and len(hopeless) < len(open_models):
            for m in hopeless:  # its share goes to the others
                plan[m] = 0
                open_models.remove(m)
        else:
            plan.update(fits)
            break
    return plan


# ----------------------------------------------------------------------------- report


def _table(results_dir: Path) -> list[str]:
    text = (results_dir / "comparison.md").read_text(encoding="utf-8")
    return text.split("\n\n")[2].splitlines()


def section(name: str, command: str, stats: dict, sample: dict, calibration_dir: Path, costs: dict,
            plan: dict, budget_min: float, full_dir: Path | None, full_seconds: float | None,
            machine: dict, loads: tuple[str, str], config_files: list[str]) -> str:
    info = DATASETS[name]
    lines = [
        f"## {info['title']}, text only (bench/bench_real_text.py {name})", "",
        f"Command: `{command}`  ",
        f"Date: {now()}. Machine: {describe_machine(machine)}; load average at start / end: "
        f"{loads[0]} / {loads[1]}.  ",
        f"Data: {stats['users']:,} users, {stats['items']:,} items, {stats['interactions']:,} interactions "
        f"in each user's last 13 ({stats['stored_interactions']:,} stored"
        + ("; converted with the paper's 5-core filter and last-13 cut" if name == "scientific" else "")
        + ").  ",
        "Config files: " + ", ".join(f"`{Path(f).relative_to(REPO)}`" for f in config_files) +
        "; protocol: max_history_len 13, MAX_ITEM_LIST_LENGTH 10, leave-one-out, full ranking; "
        "train_protocol iisan for the plugin models, recbole for SASRec.",
        "", f"### Calibration: one epoch on the first {sample['users']} users "
            f"({sample['items']} items in their last 13)", ""]
    lines += _table(calibration_dir)
    lines += ["", f"### Plan for the whole dataset (budget {budget_min:g} min)", "",
              "| Model | est. s/epoch | est. s/evaluation | est. fixed s | planned epochs | est. minutes |",
              "|---|---:|---:|---:|---:|---:|"]
    for model, cost in costs.items():
        if cost is None:
            lines.append(f"| {model} | – | – | – | not run (calibration failed) | – |")
            continue
        epochs = plan.get(model, 0)
        minutes = total_seconds(cost, max(epochs, 1)) / 60
        shown = str(epochs) if epochs else f"skipped (1 epoch: {minutes:.0f} min)"
        lines.append(f"| {model} | {cost['epoch_s']:.0f} | {cost['eval_s']:.0f} | {cost['fixed_s']:.0f} | "
                     f"{shown} | {minutes if epochs else 0:.1f} |")
    planned_total = sum(total_seconds(c, plan[m]) for m, c in costs.items() if c and plan.get(m))
    lines.append(f"\nEstimated total: {planned_total / 60:.0f} min. Estimates scale the calibration: "
                 "training by users, evaluation by the larger of users and items, the cache build by items.")
    if full_dir is not None:
        lines += ["", f"### Results on the whole dataset ({full_seconds / 60:.0f} min)", ""]
        lines += _table(full_dir)
        lines += ["", "Epochs as planned above, early stopping after 10 evaluations without gain. "
                      "With this few epochs on 2 CPU cores, the numbers are not the paper's converged results."]
    else:
        lines += ["", "The whole-dataset run was not made (`--smoke`); run without `--smoke` "
                      "(`make bench-" + ("scientific" if name == "scientific" else "ml100k") + "`) for it."]
    return "\n".join(lines)


def _parse_max_epochs(text: str | None) -> dict:
    out = dict(DEFAULT_MAX_EPOCHS)
    for part in filter(None, (text or "").split(",")):
        model, sep, value = part.partition("=")
        if not sep or model not in out or not value.isdigit():
            raise SystemExit(f"error: --max_epochs takes MODEL=N,... for {', '.join(MODELS)}; got {part!r}")
        out[model] = int(value)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default=os.environ.get("DATA_DIR", "/tmp/recbole_iisan_data"),
                        help="where converted data lives (outside the repository)")
    parser.add_argument("--work_dir", default="/tmp/recbole_iisan_bench")
    parser.add_argument("--sample_users", type=int, default=128, help="users of the calibration sample")
    parser.add_argument("--budget_minutes", type=float, default=40.0, help="time for the whole-dataset run")
    parser.add_argument("--max_epochs", default=None,
                        help="MODEL=N,... (defaults " + ", ".join(f"{k}={v}" for k, v in DEFAULT_MAX_EPOCHS.items()) + ")")
    parser.add_argument("--smoke", action="store_true", help="calibrate and plan only; no whole-dataset run")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every model process (0: torch's own choice; see "
                             "bench_efficiency.py on why one thread on a small shared machine)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds one model may run")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    command = " ".join(["python bench/bench_real_text.py", *(sys.argv[1:] if argv is None else argv)])
    load_start = time.perf_counter(), load_average()
    data_dir = Path(args.data_dir).resolve()
    if REPO in data_dir.parents or data_dir == REPO:
        raise SystemExit(f"error: --data_dir {data_dir} is inside the repository; keep data outside it")
    folder = (prepare_scientific if args.dataset == "scientific" else prepare_ml100k)(data_dir)
    name = folder.name
    stats = dataset_stats(folder)
    work = Path(args.work_dir).resolve() / name
    config_files = [str(COMPARE_PROPS / f) for f in DATASETS[args.dataset]["config_files"]]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    shared = {"show_progress": False, "state": "INFO"}
    max_epochs = _parse_max_epochs(args.max_epochs)

    sample_root = subset_dataset(folder, work / "sample_data", args.sample_users)
    sample_stats = dataset_stats(sample_root / name)
    calibration_dir = work / "calibration"
    shutil.rmtree(calibration_dir, ignore_errors=True)
    calibration = run_comparison([ModelRun(m, m) for m in MODELS], name, calibration_dir,
                                 config_files=config_files,
                                 overrides=dict(shared, epochs=1, data_path=str(sample_root)),
                                 timeout=args.timeout, command=command.split(), env=env)
    user_scale = stats["users"] / sample_stats["users"]
    item_scale = stats["items"] / sample_stats["items"]
    runs = {e["label"]: e for e in calibration["runs"]}
    costs = {m: estimate(runs[m], user_scale, item_scale) for m in MODELS}
    plan = plan_epochs(costs, max_epochs, args.budget_minutes * 60)

    full_dir, full_seconds = None, None
    if not args.smoke:
        chosen = [ModelRun(m, m, overrides={"epochs": plan[m]}) for m in MODELS if plan.get(m)]
        if chosen:
            full_dir = work / "full"
            shutil.rmtree(full_dir, ignore_errors=True)  # no result of an earlier plan may stay
            start = time.perf_counter()
            run_comparison(chosen, name, full_dir, config_files=config_files,
                           overrides=dict(shared, data_path=str(data_dir)), timeout=args.timeout,
                           command=command.split(), env=env)
            full_seconds = time.perf_counter() - start
    text = section(args.dataset, command, stats, {"users": sample_stats["users"], "items": sample_stats["items"]},
                   calibration_dir, costs, plan, args.budget_minutes, full_dir, full_seconds,
                   calibration.get("machine") or machine_info(env), (load_start[1], load_average()), config_files)
    replace_section(f"real_text_{name}", text, Path(args.output))
    (work / "plan.json").write_text(json.dumps({"stats": stats, "sample": sample_stats, "costs": costs,
                                                "plan": plan, "budget_minutes": args.budget_minutes,
                                                "seconds": time.perf_counter() - load_start[0]}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
