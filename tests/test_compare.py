"""The comparison command: per-model runs in subprocesses, JSON, table, plot, TPME, protocol."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import QUICK, REPO
from recbole_iisan.compare import (ModelRun, comparison_table, load_results, main, parse_models,
                                   run_arguments, tpme_scores)
from recbole_iisan.efficiency import tpme

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry(label, seconds, params, memory, ndcg=0.1, status="ok"):
    return {"label": label, "model": label, "status": status,
            "settings": {"train_protocol": "iisan"},
            "test_result": {"hit@10": 2 * ndcg, "ndcg@10": ndcg},
            "efficiency": {"train_seconds_per_epoch": seconds, "trainable_params": params,
                           "total_params": 10 * params, "peak_memory_mb": memory,
                           "eval_seconds": 1.0}}


def test_tpme_on_hand_numbers():
    rows = [
        {"train_seconds_per_epoch": 10.0, "trainable_params": 1_000, "peak_memory_mb": 100.0},
        {"train_seconds_per_epoch": 30.0, "trainable_params": 11_000, "peak_memory_mb": 300.0},
        {"train_seconds_per_epoch": 20.0, "trainable_params": 1_000, "peak_memory_mb": 500.0},
    ]
    # normalised: time 0, 1, .5 ; params 0, 1, 0 ; memory 0, .5, 1
    assert tpme(rows) == pytest.approx([0.0, 0.45 + 0.1 + 0.225, 0.225 + 0.45])
    # a failed run takes no part in the normalisation and gets no score
    entries = [_entry("a", 10.0, 1_000, 100.0), _entry("x", 1.0, 1, 1.0, status="failed"),
               _entry("b", 30.0, 11_000, 300.0), _entry("c", 20.0, 1_000, 500.0)]
    assert tpme_scores(entries) == pytest.approx([0.0, None, 0.775, 0.675])


def test_table_rows_and_failures():
    entries = [_entry("IISANVersa", 2.0, 1_000, 100.0, ndcg=0.25),
               dict(_entry("MMLoRA", 0, 0, 0), status="failed", error="exit code 1: RuntimeError: a | b")]
    lines = comparison_table(entries).splitlines()
    assert lines[0].startswith("| Model | Protocol | HR@10 | NDCG@10 |")
    assert lines[2] == ("| IISANVersa | iisan | 0.5000 | 0.2500 | 1,000 | 10,000 | 100 | 2.00 | 1.00 "
                        "| 0.000 | ok |")
    assert lines[3].startswith("| MMLoRA | iisan | failed | failed |")
    assert lines[3].endswith("| failed: exit code 1: RuntimeError: a \\| b |")


def test_model_labels_and_config_files(tmp_path):
    fft = tmp_path / "fft.yaml"
    fft.write_text("train_batch_size: 32\n")
    runs = parse_models("IISANVersa, MMFullFT ,IISANVersa:uncached,SASRec", {"MMFullFT": str(fft)})
    assert [(r.label, r.model) for r in runs] == [("IISANVersa", "IISANVersa"), ("MMFullFT", "MMFullFT"),
                                                   ("IISANVersa:uncached", "IISANVersa"), ("SASRec", "SASRec")]
    assert runs[1].config_files == [str(fft)] and runs[0].config_files == []
    with pytest.raises(ValueError, match="twice"):
        parse_models("SASRec,SASRec")
    with pytest.raises(ValueError, match="GRU4Rec"):
        parse_models("SASRec", {"GRU4Rec": str(fft)})


def test_protocol_reaches_every_model_with_the_right_precedence(tmp_path):
    shared = tmp_path / "shared.yaml"
    shared.write_text("MAX_ITEM_LIST_LENGTH: 20\n")
    own = tmp_path / "own.yaml"
    own.write_text("epochs: 3\ntrain_protocol: recbole\n")
    out = tmp_path / "out"
    plugin = run_arguments(ModelRun("IISANVersa", "IISANVersa"), [], {"epochs": 1}, out)
    builtin = run_arguments(ModelRun("SASRec", "SASRec"), [], {"epochs": 1}, out)
    assert (plugin["train_protocol"], builtin["train_protocol"]) == ("iisan", "recbole")
    for args in (plugin, builtin):
        assert (args["max_history_len"], args["MAX_ITEM_LIST_LENGTH"], args["epochs"]) == ("13", "10", "1")
        assert args["cache_dir"] == str(out / "layer_cache")
    assert plugin["result_file"] == str(out / "IISANVersa.json")
    # a shared file beats the protocol default; a label's own file beats the shared overrides
    tagged = run_arguments(ModelRun("IISANVersa:b", "IISANVersa", [str(own)]), [str(shared)],
                           {"epochs": 1, "train_protocol": "iisan"}, out, {"plugin": "recbole"})
    assert "MAX_ITEM_LIST_LENGTH" not in tagged and "epochs" not in tagged
    assert "train_protocol" not in tagged
    assert tagged["checkpoint_dir"] == str(out / "saved" / "IISANVersa_b")
    assert run_arguments(ModelRun("S", "SASRec"), [], {}, out, {"builtin": "iisan"})["train_protocol"] == "iisan"


def test_compare_cli_runs_models_reports_failures_and_remakes_from_json(tmp_path, small_demo_path,
                                                                       tiny_models):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "text_encoder": tiny_models["bert32"], "image_encoder": tiny_models["vit32"],
        "encode_batch_size": 128, "text_max_length": 16, "embedding_size": 16, "adapter_size": 8,
        "inner_size": 32}))
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"text_encoder: {tiny_models['bert32']}\nmodality: bogus\n")
    out = tmp_path / "cmp"
    overrides = [f"--{k}={v}" for k, v in QUICK.items()] + [f"--data_path={small_demo_path}",
                                                           "--hidden_size=16", "--n_layers=1"]
    cmd = [sys.executable, "-m", "recbole_iisan.compare", "--models",
           "IISANVersa,SASRec,IISANVersa:broken,NoSuchModel", "--dataset", "demo",
           "--output_dir", str(out), "--model_config", f"IISANVersa={tiny}",
           "--model_config", f"IISANVersa:broken={broken}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: some models failed
    assert "failed: IISANVersa:broken, NoSuchModel" in proc.stderr

    results = json.loads((out / "results.json").read_text())
    runs = {e["label"]: e for e in results["runs"]}
    assert list(runs) == ["IISANVersa", "SASRec", "IISANVersa:broken", "NoSuchModel"]
    for label in ("IISANVersa", "SASRec"):
        entry = runs[label]
        assert entry["status"] == "ok", entry.get("error")
        assert json.loads((out / f"{label}.json").read_text()) == entry
        assert 0 <= entry["test_result"]["ndcg@10"] <= entry["test_result"]["hit@10"] <= 1
        eff = entry["efficiency"]
        assert eff["train_seconds_per_epoch"] > 0 and eff["eval_seconds"] > 0 and eff["peak_memory_mb"] > 0
        assert entry["settings"]["max_history_len"] == 13 and entry["settings"]["MAX_ITEM_LIST_LENGTH"] == 10
        assert entry["settings"]["epochs"] == 1
    assert runs["IISANVersa"]["settings"]["train_protocol"] == "iisan"
    assert runs["IISANVersa"]["settings"]["loss_type"] == "inbatch"
    assert runs["SASRec"]["settings"]["train_protocol"] == "recbole"
    assert runs["SASRec"]["settings"]["loss_type"] == "CE"
    # the plugin model's frozen encoders count in total, not in trainable parameters
    assert runs["IISANVersa"]["efficiency"]["total_params"] > runs["IISANVersa"]["efficiency"]["trainable_params"]
    assert runs["IISANVersa:broken"]["status"] == "failed"
    assert "modality 'bogus'" in runs["IISANVersa:broken"]["error"]
    assert (out / "logs" / "IISANVersa_broken.log").is_file()
    assert "unknown model 'NoSuchModel'" in runs["NoSuchModel"]["error"]

    table = (out / "comparison.md").read_text()
    main_table = table.split("\n\n")[2]  # title, run line, then the table
    assert main_table.startswith("| Model | Protocol |")
    rows = {line.split(" | ")[0][2:]: line for line in main_table.splitlines()}
    scores = tpme_scores(results["runs"])
    for label in ("IISANVersa", "SASRec"):
        test = runs[label]["test_result"]
        assert f"| {test['hit@10']:.4f} | {test['ndcg@10']:.4f} |" in rows[label]
        assert f"| {scores[list(runs).index(label)]:.3f} | ok |" in rows[label]
    assert "| recbole |" in rows["SASRec"] and "| iisan |" in rows["IISANVersa"]
    assert "failed: exit code 1: ValueError: modality 'bogus'" in rows["IISANVersa:broken"]
    assert "failed: ValueError: unknown model 'NoSuchModel'" in rows["NoSuchModel"]
    assert "- `max_history_len`: `13`" in table and "Warning" not in table
    png = (out / "comparison.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 5_000

    # --from_json remakes the same table and a plot, without training
    (out / "comparison.md").unlink()
    (out / "comparison.png").unlink()
    assert main(["--from_json", str(out / "results.json")]) == 0
    assert (out / "comparison.md").read_text() == table
    assert (out / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)
    # ... or from per-model files, into another folder
    again = tmp_path / "again"
    assert main(["--from_json", str(out / "SASRec.json"), str(out / "IISANVersa.json"),
                 "--output_dir", str(again)]) == 0
    assert [e["label"] for e in load_results(again / "results.json")["runs"]] == ["SASRec", "IISANVersa"]
    assert "| SASRec | recbole |" in (again / "comparison.md").read_text()


def test_from_json_rejects_what_is_not_a_result(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="neither a comparison"):
        load_results(bad)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_results(tmp_path / "nothere.json")


def test_compare_script_needs_models():
    proc = subprocess.run([sys.executable, "-m", "recbole_iisan.compare"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "--models is required" in proc.stderr


# -- the benchmark scripts' pure parts (bench/) ----------------------------------------------------
def _bench_module(name):
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_bench_subset_keeps_first_users_and_their_items(tmp_path):
    benchlib = _bench_module("benchlib")
    root = benchlib.subset_dataset(benchlib.DEMO, tmp_path, 3)
    inter = (root / "demo" / "demo.inter").read_text().splitlines()
    users = list(dict.fromkeys(line.split("\t")[0] for line in inter[1:]))
    source = (benchlib.DEMO / "demo.inter").read_text().splitlines()[1:]
    assert users == list(dict.fromkeys(line.split("\t")[0] for line in source))[:3]
    assert len(inter) - 1 == sum(line.split("\t")[0] in users for line in source)
    items = {line.split("\t")[1] for line in inter[1:]}
    item_rows = (root / "demo" / "demo.item").read_text().splitlines()[1:]
    assert {row.split("\t")[0] for row in item_rows} == items
    assert {p.stem for p in (root / "demo" / "images").iterdir()} == items


def test_bench_sections_replace_only_their_own_text(tmp_path):
    benchlib = _bench_module("benchlib")
    path = tmp_path / "BENCHMARKS.md"
    benchlib.replace_section("a", "first A", path)
    benchlib.replace_section("b", "first B", path)
    path.write_text(path.read_text() + "\nHand-written note.\n")
    benchlib.replace_section("a", "second A", path)
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "first B" in text
    assert text.index("second A") < text.index("first B") and "Hand-written note." in text


def test_bench_plan_shares_the_budget():
    real_text = _bench_module("bench_real_text")
    costs = {"cheap": {"fixed_s": 10, "epoch_s": 5, "eval_s": 5},       # 10 s an epoch
             "mid": {"fixed_s": 60, "epoch_s": 50, "eval_s": 10},       # 60 s an epoch
             "heavy": {"fixed_s": 100, "epoch_s": 2000, "eval_s": 500},  # cannot fit one epoch
             "failed": None}
    plan = real_text.plan_epochs(costs, {"cheap": 3, "mid": 100, "heavy": 5, "failed": 1}, budget_s=1000)
    assert plan["cheap"] == 3 and plan["heavy"] == 0 and "failed" not in plan
    # cheap takes 40 s, heavy is dropped: mid gets the remaining 960 s -> (960 - 60) // 60 epochs
    assert plan["mid"] == 15
    used = sum(real_text.total_seconds(costs[m], n) for m, n in plan.items() if n)
    assert used <= 1000
