"""What the benchmark scripts share: data subsets, machine facts, BENCHMARKS.md sections,
profiles of one training epoch or evaluation."""
from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dataset" / "demo"
BENCHMARKS = REPO / "BENCHMARKS.md"
PROFILE_SCRIPT = Path(__file__).resolve().parent / "profile_run.py"

if str(REPO) not in sys.path:  # run as `python bench/x.py` from a checkout
    sys.path.insert(0, str(REPO))


def subset_dataset(source: Path, target_root: Path, n_users: int | None, name: str | None = None) -> Path:
    """Copy the first ``n_users`` users (in file order) of an atomic dataset, with only the items
    they reference and those items' images, into ``target_root/<name>``; return target_root.

    ``n_users`` None copies every user. The subset is a pure function of the source files, so
    every model of a benchmark (and every rerun) sees the same users and items.
    """
    source = Path(source)
    name = name or source.name
    out = target_root / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    inter_lines = (source / f"{source.name}.inter").read_text(encoding="utf-8").splitlines()
    header, rows = inter_lines[0], inter_lines[1:]
    columns = [c.split(":", 1)[0] for c in header.split("\t")]
    user_col, item_col = columns.index("user_id"), columns.index("item_id")
    users: dict[str, None] = {}
    kept, items = [header], set()
    for line in rows:
        fields = line.split("\t")
        user = fields[user_col]
        if user not in users:
            if n_users is not None and len(users) >= n_users:
                continue
            users[user] = None
        kept.append(line)
        items.add(fields[item_col])
    (out / f"{name}.inter").write_text("\n".join(kept) + "\n", encoding="utf-8")
    item_lines = (source / f"{source.name}.item").read_text(encoding="utf-8").splitlines()
    item_header = item_lines[0]
    id_col = [c.split(":", 1)[0] for c in item_header.split("\t")].index("item_id")
    item_rows = [line for line in item_lines[1:] if line.split("\t")[id_col] in items]
    (out / f"{name}.item").write_text("\n".join([item_header] + item_rows) + "\n", encoding="utf-8")
    images = source / "images"
    if images.is_dir():
        (out / "images").mkdir()
        for path in images.iterdir():
            if path.stem in items:
                os.symlink(path.resolve(), out / "images" / path.name)
    return target_root


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def replace_section(name: str, body: str, path: Path = BENCHMARKS) -> None:
    """Write ``body`` as the section ``name`` of BENCHMARKS.md, between its own markers;
    the rest of the file (other sections, hand-written text) is kept as it is."""
    start, end = f"<!-- section:{name}:start -->", f"<!-- section:{name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.is_file() else (
        "# Benchmarks\n\nEach section below is written by the script it names; rerun the script "
        "to refresh it. Timings are wall-clock on the machine stated in the section.\n")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def profile(model: str, dataset: str, what: str, overrides: dict, top: int = 15,
            config_files: list[str] | None = None, timeout: float = 900, env: dict | None = None) -> str:
    """cProfile top entries of one training epoch (``what='epoch'``), one full-ranking
    evaluation (``'eval'``) or the layer-cache build (``'cache'``), in a fresh process."""
    command = [sys.executable, str(PROFILE_SCRIPT), "--model", model, "--dataset", dataset,
               "--what", what, "--top", str(top)]
    if config_files:
        command += ["--config_files", " ".join(config_files)]
    command += [f"--{k}={v if isinstance(v, str) else repr(v)}" for k, v in overrides.items()]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"(profile of {model} {what} timed out after {timeout:g} s)"
    if proc.returncode != 0:
        return f"(profile of {model} {what} failed: {proc.stderr.strip().splitlines()[-1:]})"
    return proc.stdout.split("PROFILE\n", 1)[-1].rstrip()


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"
