"""Profile where one model's time goes: one training epoch, one evaluation, or the cache build.

    python bench/profile_run.py --model IISANVersa --dataset demo --what epoch [--top 15] [--key=value ...]

Builds config, dataset, model and trainer the way ``run_recbole_iisan`` does, then runs the
chosen step under cProfile and prints the top entries by total (own) time and by cumulative
time after a line ``PROFILE``. ``--what cache`` profiles the model's construction with a
forced cache rebuild (the layer cache is built there).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recbole.utils import init_seed  # noqa: E402

from recbole_iisan.config import Config  # noqa: E402
from recbole_iisan.utils import create_dataset, data_preparation, get_model, get_trainer  # noqa: E402


def top_entries(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        stats = pstats.Stats(profiler, stream=out)
        stats.strip_dirs().sort_stats(key)
        out.write(f"--- top {top} by {key} ---\n")
        stats.print_stats(top)
    # pstats adds blank lines and a preamble per table; keep the headings, column names and rows
    noise = ("Ordered by", "List reduced", "function calls")
    lines = [line for line in out.getvalue().splitlines()
             if line.strip() and not any(n in line for n in noise)]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--what", choices=("epoch", "eval", "cache"), default="epoch")
    parser.add_argument("--config_files", default=None)
    parser.add_argument("--top", type=int, default=15)
    args, overrides = parser.parse_known_args(argv)
    if args.what == "cache":
        overrides = overrides + ["--rebuild_cache=True"]
    config = Config(args.model, args.dataset,
                    config_file_list=args.config_files.split() if args.config_files else None,
                    cmd_args=overrides + ["--show_progress=False"])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    if args.what == "cache":
        profiler.enable()
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    profiler.disable()
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    if args.what == "epoch":
        start = time.perf_counter()
        profiler.enable()
        trainer._train_epoch(train_data, 0)
        profiler.disable()
    elif args.what == "eval":
        trainer._train_epoch(train_data, 0)
        start = time.perf_counter()
        profiler.enable()
        trainer.evaluate(valid_data, load_best_model=False)
        profiler.disable()
    seconds = time.perf_counter() - start
    print("PROFILE")
    print(f"{args.model} {args.what}: {seconds:.2f} s wall (profiled)")
    print(top_entries(profiler, args.top))


if __name__ == "__main__":
    main()
