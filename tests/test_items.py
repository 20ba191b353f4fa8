"""Raw item text and images: reading, finding, and the missing/empty policies."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from recbole_iisan.data.items import (
    IMAGE_SUFFIXES,
    ItemDataError,
    blank_image,
    describe_items,
    find_item_images,
    load_image,
    read_item_text,
    resolve_item_images,
    resolve_item_text,
)

HEADER = "item_id:token\ttitle:token_seq\tcaption:token_seq\n"


def write_item_file(tmp_path: Path, body: str, header: str = HEADER, name: str = "toy.item") -> Path:
    path = tmp_path / name
    path.write_text(header + body, encoding="utf-8")
    return path


def write_image(path: Path, color=(200, 10, 10), fmt: str | None = None) -> Path:
    Image.new("RGB", (8, 6), color).save(path, format=fmt)
    return path


# --- reading the .item file ---------------------------------------------------------------


def test_reads_and_joins_non_empty_fields(tmp_path):
    path = write_item_file(tmp_path, "a1\t  Red Kettle \t steel, 1.5 l\na2\tBlue Bowl\t\na3\t\tonly caption\n")
    texts = read_item_text(path, ["title", "caption"])
    assert texts == {"a1": "Red Kettle | steel, 1.5 l", "a2": "Blue Bowl", "a3": "only caption"}
    assert read_item_text(path, ["caption"], separator=". ") == {"a1": "steel, 1.5 l", "a2": "", "a3": "only caption"}


def test_field_order_follows_request_and_item_field_may_be_anywhere(tmp_path):
    header = "title:token_seq\tid:token\tcaption:token_seq\n"
    path = write_item_file(tmp_path, "Kettle\tk9\tsteel\n", header=header)
    assert read_item_text(path, ["caption", "title"], item_field="id") == {"k9": "steel | Kettle"}


def test_quotes_in_titles_are_kept_verbatim(tmp_path):
    path = write_item_file(tmp_path, 'q1\t"Blade Runner" (1982)\t12" vinyl\nq2\tit\'s "ok\t\n')
    texts = read_item_text(path, ["title", "caption"])
    assert texts["q1"] == '"Blade Runner" (1982) | 12" vinyl'
    assert texts["q2"] == 'it\'s "ok'


def test_crlf_line_endings_bom_and_blank_lines(tmp_path):
    path = tmp_path / "win.item"
    path.write_bytes(b"\xef\xbb\xbfitem_id:token\ttitle:token_seq\r\nw1\tCaf\xc3\xa9 mug\r\n\r\nw2\tTea\r\n")
    assert read_item_text(path, ["title"]) == {"w1": "Café mug", "w2": "Tea"}


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.item"
    with pytest.raises(ItemDataError, match="nope.item"):
        read_item_text(missing, ["title"])


def test_unknown_field_lists_header(tmp_path):
    path = write_item_file(tmp_path, "a1\tx\ty\n")
    with pytest.raises(ItemDataError) as err:
        read_item_text(path, ["title", "description"])
    message = str(err.value)
    assert "description" in message and "item_id, title, caption" in message and "toy.item" in message
    with pytest.raises(ItemDataError, match="asin"):
        read_item_text(path, ["title"], item_field="asin")


def test_wrong_column_count_names_line(tmp_path):
    path = write_item_file(tmp_path, "a1\tx\ty\na2\tonly title\n")
    with pytest.raises(ItemDataError, match=r"toy\.item: line 3: 2 tab-separated columns, the header has 3"):
        read_item_text(path, ["title"])


def test_duplicate_item_names_both_lines(tmp_path):
    path = write_item_file(tmp_path, "a1\tx\ty\na2\tx\ty\na1\tz\tz\n")
    with pytest.raises(ItemDataError, match=r"line 4: duplicate item id 'a1' \(first on line 2\)"):
        read_item_text(path, ["title"])


def test_undecodable_bytes_name_line(tmp_path):
    path = tmp_path / "bad.item"
    path.write_bytes(b"item_id:token\ttitle:token_seq\nb1\tfine\nb2\tbad \xff byte\n")
    with pytest.raises(ItemDataError, match=r"bad\.item: line 3: not valid utf-8"):
        read_item_text(path, ["title"])


def test_reads_the_bundled_demo_file():
    demo = Path(__file__).resolve().parents[1] / "dataset" / "demo" / "demo.item"
    texts = read_item_text(demo, ["title"])
    assert texts["i0001"] and all(isinstance(t, str) for t in texts.values())


# --- describing item lists ---------------------------------------------------------------


def test_describe_items_is_bounded():
    assert describe_items(["i1"]) == "1 item (i1)"
    assert describe_items(["i1", "i2", "i3"]) == "3 items (i1, i2, i3)"
    many = [f"i{k}" for k in range(1, 121)]
    assert describe_items(many) == "120 items (i1, i2, i3, i4, i5, ...)"
    assert describe_items(many, limit=2) == "120 items (i1, i2, ...)"


# --- images --------------------------------------------------------------------------------


def test_find_images_mixed_suffixes_and_preference(tmp_path):
    write_image(tmp_path / "a.jpg")
    write_image(tmp_path / "b.PNG", fmt="PNG")
    write_image(tmp_path / "c.webp")
    write_image(tmp_path / "d.jpeg")
    write_image(tmp_path / "e.png")
    write_image(tmp_path / "e.jpg")  # .jpg comes first in IMAGE_SUFFIXES
    (tmp_path / "f.txt").write_text("not an image")
    (tmp_path / "g.jpg").mkdir()  # a folder is not an image
    found = find_item_images(tmp_path, ["a", "b", "c", "d", "e", "f", "g", "zz"])
    assert found["a"].name == "a.jpg"
    assert found["b"].name == "b.PNG"
    assert found["c"].name == "c.webp"
    assert found["d"].name == "d.jpeg"
    assert found["e"].name == "e.jpg"
    assert found["f"] is None and found["g"] is None and found["zz"] is None
    assert IMAGE_SUFFIXES == (".jpg", ".jpeg", ".png", ".webp")


def test_find_images_handles_dotted_item_ids(tmp_path):
    write_image(tmp_path / "B00.1.jpg")
    assert find_item_images(tmp_path, ["B00.1", "B00"]) == {"B00.1": tmp_path / "B00.1.jpg", "B00": None}


def test_missing_image_dir_is_named(tmp_path):
    with pytest.raises(ItemDataError, match="covers"):
        find_item_images(tmp_path / "covers", ["a"])


def test_load_image_is_rgb(tmp_path):
    gray = tmp_path / "g.png"
    Image.new("L", (5, 4), 128).save(gray)
    image = load_image(gray)
    assert image.mode == "RGB" and image.size == (5, 4)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"definitely not a jpeg")
    with pytest.raises(ItemDataError, match="junk.jpg"):
        load_image(junk)
    whole = write_image(tmp_path / "whole.png", fmt="PNG").read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ItemDataError, match="cut.png"):
        load_image(cut)


def test_blank_image():
    image = blank_image(16)
    assert image.mode == "RGB" and image.size == (16, 16) and image.getextrema() == ((0, 0), (0, 0), (0, 0))


# --- policies -------------------------------------------------------------------------------


def test_missing_images_error_policy_names_items_and_folder(tmp_path):
    write_image(tmp_path / "i0.jpg")
    tokens = ["i0"] + [f"m{k}" for k in range(7)]
    with pytest.raises(ItemDataError) as err:
        resolve_item_images(tokens, tmp_path, "error")
    message = str(err.value)
    assert "7 items (m0, m1, m2, m3, m4, ...)" in message and str(tmp_path) in message and "m6" not in message


def test_missing_images_blank_policy_warns_with_count(tmp_path, caplog):
    write_image(tmp_path / "i0.jpg")
    with caplog.at_level(logging.WARNING):
        paths = resolve_item_images(["i0", "m1", "m2"], tmp_path, "blank")
    assert paths == [tmp_path / "i0.jpg", None, None]
    assert "2 item(s) without an image" in caplog.text and "m1, m2" in caplog.text


def test_empty_text_policies(caplog):
    texts = {"a": "Kettle", "b": "   ", "c": "", "d": "Bowl"}
    with pytest.raises(ItemDataError, match=r"empty text in toy\.item for 2 items \(b, c\)"):
        resolve_item_text(["a", "b", "c", "d"], texts, "error", "toy.item")
    with caplog.at_level(logging.WARNING):
        resolved = resolve_item_text(["d", "b", "a", "c"], texts, "blank", "toy.item")
    assert resolved == ["Bowl", "", "Kettle", ""]
    assert "2 item(s) with empty text" in caplog.text


def test_items_absent_from_item_file_always_error():
    texts = {"a": "Kettle"}
    tokens = ["a"] + [f"x{k}" for k in range(6)]
    for policy in ("error", "blank"):
        with pytest.raises(ItemDataError) as err:
            resolve_item_text(tokens, texts, policy, "data/toy.item")
        message = str(err.value)
        assert "absent from .item" in message and "data/toy.item" in message
        assert "6 items (x0, x1, x2, x3, x4, ...)" in message


def test_unknown_policy_names_the_key(tmp_path):
    with pytest.raises(ItemDataError, match="empty_text='skip'"):
        resolve_item_text(["a"], {"a": "x"}, "skip", "toy.item")
    with pytest.raises(ItemDataError, match="missing_image='ignore'"):
        resolve_item_images(["a"], tmp_path, "ignore")
