"""Converters from the IISAN / MicroLens / Amazon formats to RecBole atomic files."""
from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path

import lmdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from recbole_iisan.data.convert import (
    ConvertError,
    UnsafePickleError,
    convert,
    decode_lmdb_value,
    main,
    sanitize_text,
    unquote_tsv_field,
)


class LMDB_Image:  # noqa: N801  (the authors' class name, which the converter looks for)
    """The authors' LMDB record: raw uint8 pixels plus their shape."""

    def __init__(self, image: np.ndarray, item_id: str):
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.id = item_id


class Exploit:
    """Runs a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ helpers


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_inter(folder: Path) -> dict[str, list[tuple[str, float]]]:
    lines = (folder / f"{folder.name}.inter").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    result: dict[str, list[tuple[str, float]]] = {}
    for line in lines[1:]:
        user, item, time = line.split("\t")
        result.setdefault(user, []).append((item, float(time)))
    return result


def read_item(folder: Path) -> tuple[list[str], dict[str, list[str]]]:
    lines = (folder / f"{folder.name}.item").read_text(encoding="utf-8").splitlines()
    rows = [line.split("\t") for line in lines[1:]]
    return lines[0].split("\t"), {row[0]: row[1:] for row in rows}


def items_of(histories: dict[str, list[tuple[str, float]]]) -> dict[str, list[str]]:
    return {user: [item for item, _ in events] for user, events in histories.items()}


def colour_image(seed: int, size=(6, 8), channels: int = 3) -> np.ndarray:
    value = (seed * 40) % 256
    return np.full((*size, channels), value, dtype=np.uint8)


ITEMS = [f"i{n}" for n in range(1, 9)]


@pytest.fixture
def iisan_inputs(tmp_path) -> dict[str, Path]:
    """Users u1..u3 (u3 too short), items i1..i8 (i8 never used), a folder of images."""
    raw = tmp_path / "raw"
    raw.mkdir()
    users = write(raw / "users.tsv", "u1\ti1 i2 i3 i4 i5 i6\nu2\ti2 i3 i4 i5 i1\nu3\ti1 i2\n")
    items = write(raw / "items.tsv", "".join(f"{i}\ttitle of {i}\n" for i in ITEMS))
    images = raw / "images"
    images.mkdir()
    for n, item in enumerate(ITEMS[:-2]):  # i7 and i8 have no image
        Image.fromarray(colour_image(n)).save(images / f"{item}.jpg")
    return {"users": users, "items": items, "images": images}


# ------------------------------------------------------------------ text


def test_sanitize_text_unescapes_collapses_and_strips_leading_quotes():
    assert sanitize_text("Salt &amp; Pepper") == "Salt & Pepper"
    assert sanitize_text(" a\tb\r\nc   d\u00a0e ") == "a b c d e"
    assert sanitize_text('"Best" drill"') == 'Best" drill'
    assert sanitize_text('&quot;quoted&quot; name') == 'quoted" name'
    assert sanitize_text('12" ruler') == '12" ruler'  # a quote inside the text is harmless
    assert sanitize_text('""') == ""


def test_unquote_tsv_field_only_unquotes_well_formed_fields():
    assert unquote_tsv_field('" Industrial &amp; Scientific"" />"') == ' Industrial &amp; Scientific" />'
    assert unquote_tsv_field('"a" b "c"') == '"a" b "c"'
    assert unquote_tsv_field("plain") == "plain"


# ------------------------------------------------------------------ iisan


def test_iisan_converts_histories_titles_and_images(iisan_inputs, tmp_path):
    out = tmp_path / "toy"
    report = convert("iisan", iisan_inputs["users"], iisan_inputs["items"], out, images=iisan_inputs["images"])

    histories = read_inter(out)
    assert items_of(histories) == {"u1": ["i1", "i2", "i3", "i4", "i5", "i6"], "u2": ["i2", "i3", "i4", "i5", "i1"]}
    for events in histories.values():
        times = [t for _, t in events]
        assert all(a < b for a, b in zip(times, times[1:]))
    header, rows = read_item(out)
    assert header == ["item_id:token", "title:token_seq"]
    assert list(rows) == ["i1", "i2", "i3", "i4", "i5", "i6"]  # items file order, unused i7/i8 left out
    assert rows["i3"] == ["title of i3"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i}.jpg" for i in ITEMS[:6]]

    assert (report.users, report.items, report.interactions) == (2, 6, 11)
    assert report.users_too_short == 1 and report.items_unreferenced == 2
    assert report.bad_row_count == 0 and report.images == 6 and report.missing_images.count == 0
    saved = json.loads((out / "convert_report.json").read_text())
    assert saved["users"] == 2 and saved["interactions"] == 11


def test_iisan_bad_rows_are_reported_with_line_numbers(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    users = raw / "users.tsv"
    users.write_bytes(
        b"u1\ti1 i2 i3 i4 i5\n"
        b"u2\ti1 i2\tEXTRA\n"  # 2: wrong column count
        b"u3\ti1 i9 i2 i3 i4 i5\n"  # 3: i9 is not in the items file
        b"u4\ti1 \xff\xfe i2\n"  # 4: not utf-8
        b"\n"
        b"u1\ti5 i4 i3 i2 i1\n"  # 6: duplicate user
        b'"u7\ti1 i2 i3 i4 i5\n'  # 7: id starting with a quote
    )
    items = write(raw / "items.tsv", "i1\tone\ni2\ttwo\ni3\tthree\ni4\tfour\ni5\tfive\ni2\tagain\nno tab here\n")
    out = tmp_path / "bad"
    report = convert("iisan", users, items, out)

    bad = report.bad_rows
    assert bad["wrong_columns"].count == 2
    assert bad["wrong_columns"].examples[0].startswith("users.tsv:2:")
    assert bad["wrong_columns"].examples[1].startswith("items.tsv:7:")
    assert bad["unknown_item"].count == 1 and bad["unknown_item"].examples[0].startswith("users.tsv:3:")
    assert "'i9'" in bad["unknown_item"].examples[0]
    assert bad["undecodable"].count == 1 and bad["undecodable"].examples[0].startswith("users.tsv:4:")
    assert bad["duplicate_user"].count == 1 and bad["duplicate_user"].examples[0].startswith("users.tsv:6:")
    assert bad["duplicate_item"].count == 1 and bad["duplicate_item"].examples[0].startswith("items.tsv:6:")
    assert bad["bad_id"].count == 1 and bad["bad_id"].examples[0].startswith("users.tsv:7:")
    # u3 keeps its five known items (the unknown one is dropped before filtering).
    assert items_of(read_inter(out)) == {"u1": ["i1", "i2", "i3", "i4", "i5"], "u3": ["i1", "i2", "i3", "i4", "i5"]}
    assert read_item(out)[1]["i2"] == ["two"]  # the first of duplicates wins
    saved = json.loads((out / "convert_report.json").read_text())
    assert saved["bad_rows"]["unknown_item"]["count"] == 1
    assert "unknown_item: 1 (users.tsv:3" in report.summary()


@pytest.mark.parametrize(
    "min_len, max_len, expected",
    [
        (5, 13, {"a": list("123456"), "b": list("12345")}),
        (5, 3, {"a": list("456"), "b": list("345")}),
        (6, 0, {"a": list("123456")}),
        (0, 0, {"a": list("123456"), "b": list("12345"), "c": list("12")}),
    ],
)
def test_filtering_options(tmp_path, min_len, max_len, expected):
    users = write(tmp_path / "users.tsv", "a\t1 2 3 4 5 6\nb\t1 2 3 4 5\nc\t1 2\n")
    items = write(tmp_path / "items.tsv", "".join(f"{n}\tt{n}\n" for n in range(1, 7)))
    out = tmp_path / "f"
    report = convert("iisan", users, items, out, min_len=min_len, max_len=max_len)
    assert items_of(read_inter(out)) == expected
    assert report.interactions == sum(len(v) for v in expected.values())


def test_titles_are_sanitised_and_captions_merged(tmp_path):
    users = write(tmp_path / "users.tsv", "u\ta b c d e\n")
    items = write(
        tmp_path / "items.tsv",
        'a\tSalt &amp; Pepper\n'
        'b\t" Industrial &amp; Scientific"" />"\n'  # csv-quoted by the authors' writer
        'c\t"Quoted" title\n'
        'd\t  spaced    out  \n'
        'e\t\n',
    )
    captions = write(tmp_path / "captions.tsv", "a\ta red &lt;mug&gt;\nc\t\"caption\"\nzz\tunused\n")
    out = tmp_path / "text"
    report = convert("iisan", users, items, out, captions=captions)
    header, rows = read_item(out)
    assert header == ["item_id:token", "title:token_seq", "caption:token_seq"]
    assert rows == {
        "a": ["Salt & Pepper", "a red <mug>"],
        "b": ['Industrial & Scientific" />', ""],
        "c": ['Quoted" title', "caption"],
        "d": ["spaced out", ""],
        "e": ["", ""],
    }
    assert report.empty_titles.examples == ["e"]
    assert report.captions == 2 and report.missing_captions.count == 3 and report.captions_unused == 1
    # RecBole reads atomic files with pandas' csv reader: it must see the same text.
    frame = pd.read_csv(out / "text.item", delimiter="\t", dtype=str, engine="python", keep_default_na=False)
    assert {row[0]: list(row[1:]) for row in frame.itertuples(index=False)} == rows


# ------------------------------------------------------------------ output folder


def test_force_is_needed_to_replace_a_non_empty_output(iisan_inputs, tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    args = ["iisan", "--users", str(iisan_inputs["users"]), "--items", str(iisan_inputs["items"]), "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--force" in err
    assert (out / "old.txt").exists()

    assert main(args + ["--force"]) == 0
    printed = capsys.readouterr().out
    assert "users 2  items 6  interactions 11" in printed
    assert not (out / "old.txt").exists() and (out / "ds.inter").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging leftovers


def test_an_empty_output_folder_is_used_without_force(iisan_inputs, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    convert("iisan", iisan_inputs["users"], iisan_inputs["items"], out)
    assert (out / "empty.inter").exists()


def test_force_refuses_to_delete_inputs_inside_the_output(tmp_path):
    out = tmp_path / "raw"
    out.mkdir()
    users = write(out / "users.tsv", "u\ta b c d e\n")
    items = write(out / "items.tsv", "a\tA\nb\tB\nc\tC\nd\tD\ne\tE\n")
    with pytest.raises(ConvertError, match="inside the output folder"):
        convert("iisan", users, items, out, force=True)
    assert users.exists()


# ------------------------------------------------------------------ LMDB


def write_lmdb(path: Path, subdir: bool, records: dict[str, object]) -> Path:
    env = lmdb.open(str(path), subdir=subdir, map_size=1 << 22)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key.encode("utf-8"), pickle.dumps(value))
        txn.put(b"__keys__", pickle.dumps([k.encode() for k in records]))
        txn.put(b"__len__", pickle.dumps(len(records)))
    env.close()
    return path


@pytest.mark.parametrize("subdir", [False, True], ids=["single-file", "directory"])
def test_iisan_lmdb_images_are_decoded_to_jpeg(iisan_inputs, tmp_path, subdir):
    records = {item: LMDB_Image(colour_image(n), item) for n, item in enumerate(ITEMS[:5])}
    records["i4"] = LMDB_Image(colour_image(3, channels=1), "i4")  # greyscale
    broken = LMDB_Image(colour_image(0), "i5")
    broken.image = broken.image[:-1]  # one byte short
    records["i5"] = broken
    source = write_lmdb(tmp_path / ("images.lmdb" if not subdir else "lmdb_dir"), subdir, records)
    out = tmp_path / f"lmdb{int(subdir)}"
    report = convert("iisan", iisan_inputs["users"], iisan_inputs["items"], out, images=source)

    assert sorted(p.name for p in (out / "images").iterdir()) == ["i1.jpg", "i2.jpg", "i3.jpg", "i4.jpg"]
    with Image.open(out / "images" / "i3.jpg") as image:
        assert image.mode == "RGB" and image.size == (8, 6)
        assert np.abs(np.asarray(image, dtype=int) - colour_image(2)).max() <= 3
    assert report.images == 4
    assert report.missing_images.examples == ["i6"]
    assert report.bad_images.count == 1 and "'i5'" in report.bad_images.examples[0]


def test_a_malicious_pickle_is_refused_and_not_run(iisan_inputs, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match=r"key 'k1'.*system"):
        decode_lmdb_value(pickle.dumps(Exploit(marker)), "db", "k1")
    assert not marker.exists()

    records = {"i1": LMDB_Image(colour_image(1), "i1"), "i2": Exploit(marker)}
    source = write_lmdb(tmp_path / "evil.lmdb", False, records)
    out = tmp_path / "evil"
    with pytest.raises(UnsafePickleError, match="'i2'"):
        convert("iisan", iisan_inputs["users"], iisan_inputs["items"], out, images=source)
    assert not marker.exists()
    assert not out.exists()  # nothing half-written is left behind
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".evil")]


def test_images_that_are_neither_a_folder_nor_an_lmdb_are_refused(iisan_inputs, tmp_path):
    junk = write(tmp_path / "images.zip", "not an lmdb")
    with pytest.raises(ConvertError, match="nor a readable LMDB"):
        convert("iisan", iisan_inputs["users"], iisan_inputs["items"], tmp_path / "junk", images=junk)
    assert not (tmp_path / "junk").exists()


# ------------------------------------------------------------------ microlens


def test_microlens_rows_with_header_are_sorted_by_time(tmp_path):
    pairs = write(
        tmp_path / "MicroLens-100k_pairs.csv",
        "user,item,timestamp\n"
        "1,30,1000\n1,10,900\n1,20,950\n1,40,1000\n1,50,1100\n"
        "2,10,5\n2,20,6\n2,30,7\n2,40,8\n2,50,oops\n2,60,9\n",
    )
    titles = write(
        tmp_path / "MicroLens-100k_title_en.csv",
        'item,title\n10,"Cats, dogs and ""birds"""\n20,plain title\n30,\n40,forty\n50,fifty\n60,sixty\n',
    )
    out = tmp_path / "ml"
    report = convert("microlens", pairs, titles, out)
    histories = read_inter(out)
    # Ties (30 and 40 at 1000) keep file order and are nudged to stay strictly increasing.
    assert histories["1"] == [("10", 900), ("20", 950), ("30", 1000), ("40", 1001), ("50", 1100)]
    assert items_of(histories)["2"] == ["10", "20", "30", "40", "60"]
    assert report.timestamps_adjusted == 1
    assert report.bad_rows["bad_timestamp"].examples[0].startswith("MicroLens-100k_pairs.csv:11:")
    assert report.headers_skipped and report.headers_skipped[0].startswith("MicroLens-100k_pairs.csv:1:")
    rows = read_item(out)[1]
    assert rows["10"] == ['Cats, dogs and "birds"'] and rows["30"] == [""]
    assert report.empty_titles.examples == ["30"]
    assert report.multiline_records.count == 0


def test_microlens_csv_records_spanning_lines_are_reported(tmp_path):
    pairs = write(tmp_path / "pairs.csv", "".join(f"u,{n},{n}\n" for n in range(1, 6)))
    titles = write(tmp_path / "titles.csv", '1,"two\nlines"\n2,"stray quote\n3,three\n4,"four"\n5,five\n')
    out = tmp_path / "mlq"
    report = convert("microlens", pairs, titles, out, min_len=0)
    assert read_item(out)[1]["1"] == ["two lines"]
    # The stray quote on line 3 swallowed lines 4-5 ...
    assert report.multiline_records.examples == ["titles.csv:1-2", "titles.csv:3-5"]
    # ... so their items are unknown, and that is reported too.
    assert report.bad_rows["unknown_item"].count == 2


def test_microlens_history_tsv_and_tab_titles(tmp_path):
    pairs = write(tmp_path / "pairs.tsv", "1\t10 20 30 40 50\n2\t50 40 30 20 10 60\n")
    titles = write(tmp_path / "titles.tsv", "".join(f"{n}\ttitle {n}\n" for n in (10, 20, 30, 40, 50, 60)))
    out = tmp_path / "mlh"
    report = convert("microlens", pairs, titles, out)
    assert items_of(read_inter(out)) == {"1": ["10", "20", "30", "40", "50"], "2": ["50", "40", "30", "20", "10", "60"]}
    assert report.timestamps_adjusted == 0 and report.bad_row_count == 0


def test_microlens_tab_rows_without_header(tmp_path):
    pairs = write(tmp_path / "pairs.tsv", "".join(f"7\t{n}\t{100 - n}\n" for n in range(1, 6)))
    titles = write(tmp_path / "titles.tsv", "".join(f"{n}\tt{n}\n" for n in range(1, 6)))
    out = tmp_path / "mlt"
    convert("microlens", pairs, titles, out)
    assert items_of(read_inter(out)) == {"7": ["5", "4", "3", "2", "1"]}


# ------------------------------------------------------------------ amazon


def test_amazon_reviews_and_metadata(tmp_path):
    reviews = [
        {"reviewerID": "R1", "asin": f"A{n}", "unixReviewTime": 1_500_000_000 + (5 - n) * 86400, "overall": 5.0}
        for n in range(1, 6)
    ] + [
        {"reviewerID": "R2", "asin": f"A{n}", "unixReviewTime": 1_400_000_000} for n in (3, 1, 2, 4, 5)  # one day
    ]
    lines = [json.dumps(r) for r in reviews] + ["{not json", json.dumps({"asin": "A1", "unixReviewTime": 1})]
    review_file = tmp_path / "reviews.json.gz"
    with gzip.open(review_file, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    meta = [
        json.dumps({"asin": "A1", "title": "Tape &amp; glue", "description": ["Strong.", "Sticky\ttape."],
                    "imageURL": ["http://x/1.jpg", "http://x/2.jpg"]}),
        repr({"asin": "A2", "title": "Old style", "description": "dict literal", "imUrl": "http://x/3.jpg"}),
        json.dumps({"asin": "A3", "title": '"Quoted"', "description": []}),
        json.dumps({"asin": "A4"}),
        json.dumps({"asin": "A5", "title": "Five"}),
        json.dumps({"asin": "A5", "title": "Duplicate"}),
        json.dumps({"asin": "A6", "title": "Never reviewed"}),
    ]
    meta_file = write(tmp_path / "meta.json", "\n".join(meta) + "\n")
    images = tmp_path / "covers"
    images.mkdir()
    Image.fromarray(colour_image(1)).save(images / "A1.jpg")
    Image.fromarray(colour_image(2)).save(images / "A2.png")

    out = tmp_path / "amazon"
    report = convert("amazon", review_file, meta_file, out, images=images)
    histories = read_inter(out)
    assert items_of(histories) == {"R1": ["A5", "A4", "A3", "A2", "A1"], "R2": ["A3", "A1", "A2", "A4", "A5"]}
    assert [t for _, t in histories["R2"]] == [1_400_000_000 + k for k in range(5)]
    assert report.timestamps_adjusted == 4
    header, rows = read_item(out)
    assert header == ["item_id:token", "title:token_seq", "description:token_seq", "image_url:token_seq"]
    assert rows["A1"] == ["Tape & glue", "Strong. Sticky tape.", "http://x/1.jpg http://x/2.jpg"]
    assert rows["A2"] == ["Old style", "dict literal", "http://x/3.jpg"]
    assert rows["A3"] == ["Quoted", "", ""] and rows["A4"] == ["", "", ""] and rows["A5"][0] == "Five"
    assert "A6" not in rows
    assert report.bad_rows["bad_json"].examples[0].startswith("reviews.json.gz:11:")
    assert report.bad_rows["missing_field"].examples[0].startswith("reviews.json.gz:12:")
    assert report.bad_rows["duplicate_item"].examples[0].startswith("meta.json:6:")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["A1.jpg", "A2.png"]
    assert report.missing_images.count == 3


# ------------------------------------------------------------------ RecBole


@pytest.fixture
def numpy_aliases():
    """RecBole 1.2.1's Config touches aliases that numpy 2 removed."""
    for name, target in [("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)]:
        if not hasattr(np, name):
            setattr(np, name, target)


def test_converted_output_loads_and_trains_in_recbole(tmp_path, numpy_aliases):
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer

    rng = np.random.default_rng(0)
    n_users, n_items = 12, 15
    user_lines = []
    for u in range(n_users):
        history = rng.choice(n_items, size=int(rng.integers(4, 16)), replace=True)
        user_lines.append(f"U{u}\t" + " ".join(f"I{i}" for i in history))
    users = write(tmp_path / "users.tsv", "\n".join(user_lines) + "\n")
    items = write(tmp_path / "items.tsv", "".join(f'I{i}\t"Item" {i} &amp; co\n' for i in range(n_items)))
    out = tmp_path / "data" / "tiny"
    report = convert("iisan", users, items, out)
    assert report.users >= 8

    config = Config(
        model="SASRec",
        dataset="tiny",
        config_dict={
            "data_path": str(out.parent),
            "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
            "train_neg_sample_args": None,  # SASRec's CE loss (RecBole 1.2.1 refuses the default sampling)
            "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
            "epochs": 1, "train_batch_size": 32, "eval_batch_size": 64,
            "hidden_size": 16, "inner_size": 16, "n_layers": 1, "n_heads": 1,
            "show_progress": False, "state": "WARNING", "seed": 1, "reproducibility": True,
            "checkpoint_dir": str(tmp_path / "saved"),
        },
    )
    dataset = create_dataset(config)
    assert dataset.user_num - 1 == report.users
    assert dataset.item_num - 1 == report.items
    assert dataset.inter_num == report.interactions

    train_data, valid_data, _ = data_preparation(config, dataset)
    model = SASRec(config, train_data.dataset).to(config["device"])
    best_score, _ = Trainer(config, model).fit(train_data, valid_data, saved=False)
    assert np.isfinite(best_score)


SCIENTIFIC = Path("/work/shared/data/amazon-scientific")


@pytest.mark.skipif(not SCIENTIFIC.is_dir(), reason="the authors' Amazon Scientific release is not on this machine")
def test_the_authors_scientific_release_gives_the_paper_counts(tmp_path):
    report = convert(
        "iisan",
        SCIENTIFIC / "am_Industrial_and_Scientific_users.tsv",
        SCIENTIFIC / "Industrial_and_Scientific_items.tsv",
        tmp_path / "scientific",
    )
    assert (report.users, report.items, report.interactions) == (12_076, 20_314, 81_711)
    assert report.bad_row_count == 0
