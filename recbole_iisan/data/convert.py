"""Converters from the paper's dataset formats to RecBole atomic files.

Usage::

    python -m recbole_iisan.data.convert FORMAT --users FILE --items FILE \\
        [--images DIR_OR_LMDB] [--captions FILE] --output DIR \\
        [--min_len 5] [--max_len 13] [--force]

FORMAT is one of

* ``iisan``: the authors' release. Users file ``user<TAB>item item ...`` (chronological,
  no timestamps), items file ``item<TAB>title`` (no header). Images: a folder of
  ``<item>.jpg`` or the authors' LMDB (single file or directory) of pickled
  ``LMDB_Image`` records, decoded to JPEG.
* ``microlens``: MicroLens ``*_pairs.tsv`` either as histories (``user<TAB>item item ...``,
  the published tsv) or as rows ``user,item,timestamp`` (the published csv; tab or comma,
  optional header); titles ``item,title`` / ``item<TAB>title`` (optional header, csv
  quoting for the comma form); covers folder ``<item>.jpg``.
* ``amazon``: the Amazon 2018 review file (``--users``) and metadata file (``--items``),
  json lines, optionally gzipped; old-style metadata lines that are python dict literals
  are read too. ``title``, ``description`` and ``imageURL`` (as ``image_url``) become text
  fields. Images only from a local folder (or LMDB) given by ``--images``; nothing is
  downloaded.

The dataset's name is the output folder's name. The output holds ``NAME.inter``
(``user_id:token, item_id:token, timestamp:float``), ``NAME.item`` (``item_id:token``
and ``token_seq`` text fields), ``images/`` when ``--images`` is given, and
``convert_report.json``.

Policies (all reported in the summary and the report, never silent):

* Bad rows (wrong column count, bad id, unparsable json / timestamp, utf-8 errors,
  duplicate users or items) are skipped and listed with their line numbers; so are LMDB
  values that do not decode (by key). csv records spanning several lines are kept but
  listed, since a stray opening quote produces one.
* Interactions with an item absent from the items file are dropped (``unknown_item``)
  *before* filtering, so lengths are counted on the interactions that remain.
* Filtering as in the paper: users with fewer than ``min_len`` interactions are dropped,
  then each history is cut to its last ``max_len`` items; 0 disables either.
* Timestamps: formats without time get a global counter in file order. Real timestamps
  are sorted per user (ties keep file order) and nudged to be strictly increasing
  (``t = max(t, previous + 1)``), so RecBole's time ordering is unambiguous; the number of
  nudged rows is reported.
* Text: csv-quoted tab fields (``"a ""b"" c"``) are unquoted, HTML entities unescaped
  (``&amp;`` -> ``&``), tabs / newlines / runs of whitespace collapsed to one space, and a
  text starting with a double quote has its leading and trailing quotes stripped:
  RecBole reads atomic files with pandas, which would take such a field for a quoted one.
* Items no kept history references are left out of ``NAME.item``.
* The output is built in a temporary folder next to DIR and renamed into place, so a
  failure leaves no half dataset; a non-empty DIR is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import html
import io
import json
import os
import pickle
import re
import shutil
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from recbole_iisan.data.items import find_item_images

FORMATS = ("iisan", "microlens", "amazon")
REPORT_FILE = "convert_report.json"
EXAMPLE_LIMIT = 10  # locations kept per problem kind; the count is always complete
JPEG_QUALITY = 95
# Field names that mark a first line as a header rather than data (compared lower-cased,
# without RecBole's ":type" suffix and without non-alphanumerics).
_HEADER_WORDS = {
    "user", "userid", "users", "reviewerid", "item", "itemid", "items", "videoid",
    "video", "asin", "timestamp", "time", "title", "caption",
}
_WHITESPACE = re.compile(r"\s+")


class ConvertError(ValueError):
    """The inputs cannot be converted at all (missing file, occupied output, unsafe data)."""


class UnsafePickleError(ConvertError):
    """An LMDB value's pickle references a global other than ``LMDB_Image``."""


@dataclass
class Problem:
    """One kind of problem: the full count and the first few locations."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLE_LIMIT:
            self.examples.append(where)


@dataclass
class ConvertReport:
    """What a conversion wrote and everything it skipped."""

    format: str
    dataset: str
    output: str
    settings: dict = field(default_factory=dict)
    users: int = 0
    items: int = 0
    interactions: int = 0
    users_read: int = 0
    interactions_read: int = 0
    items_read: int = 0
    users_too_short: int = 0
    interactions_cut: int = 0
    items_unreferenced: int = 0
    timestamps_adjusted: int = 0
    headers_skipped: list[str] = field(default_factory=list)
    multiline_records: Problem = field(default_factory=Problem)
    bad_rows: dict[str, Problem] = field(default_factory=dict)
    empty_titles: Problem = field(default_factory=Problem)
    images: int = 0
    missing_images: Problem = field(default_factory=Problem)
    bad_images: Problem = field(default_factory=Problem)
    captions: int = 0
    missing_captions: Problem = field(default_factory=Problem)
    captions_unused: int = 0

    def bad(self, kind: str, where: str) -> None:
        self.bad_rows.setdefault(kind, Problem()).add(where)

    @property
    def bad_row_count(self) -> int:
        return sum(problem.count for problem in self.bad_rows.values())

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.format} -> {self.output} (dataset '{self.dataset}')",
            f"  users {self.users:,}  items {self.items:,}  interactions {self.interactions:,}",
            f"  read: users {self.users_read:,}, interactions {self.interactions_read:,}, "
            f"items {self.items_read:,}",
            f"  filtering: {self.users_too_short:,} users below min_len (or with no valid item), "
            f"{self.interactions_cut:,} interactions cut by max_len, "
            f"{self.items_unreferenced:,} items unreferenced (left out)",
        ]
        if self.timestamps_adjusted:
            lines.append(f"  timestamps nudged to be strictly increasing: {self.timestamps_adjusted:,}")
        for header in self.headers_skipped:
            lines.append(f"  header skipped: {header}")
        if self.multiline_records.count:
            lines.append(_describe("  csv records spanning lines (check for stray quotes)", self.multiline_records))
        if self.bad_rows:
            lines.append(f"  bad rows: {self.bad_row_count:,}")
            for kind, problem in sorted(self.bad_rows.items()):
                lines.append(_describe(f"    {kind}", problem))
        else:
            lines.append("  bad rows: none")
        lines.append(_describe("  empty titles", self.empty_titles))
        if self.settings.get("images"):
            lines.append(f"  images written: {self.images:,}")
            lines.append(_describe("  missing images", self.missing_images))
            if self.bad_images.count:
                lines.append(_describe("  undecodable images", self.bad_images))
        if self.settings.get("captions"):
            lines.append(f"  captions merged: {self.captions:,} ({self.captions_unused:,} for other items)")
            lines.append(_describe("  items without caption", self.missing_captions))
        return "\n".join(lines)


def _describe(label: str, problem: Problem) -> str:
    if not problem.count:
        return f"{label}: 0"
    more = ", ..." if problem.count > len(problem.examples) else ""
    return f"{label}: {problem.count:,} ({'; '.join(problem.examples)}{more})"


# ----------------------------------------------------------------------------- text


def unquote_tsv_field(text: str) -> str:
    """Undo csv quoting of a tab-separated field (``"a ""b"" c"`` -> ``a "b" c``).

    Only a well-formed quoted field is unquoted (outer quotes, inner quotes doubled); any
    other text is returned as it is, so a stray quote never swallows other fields.
    """
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        inner = text[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return text


def sanitize_text(text: str) -> str:
    """One-line text safe for a RecBole atomic file (see the module docstring)."""
    text = html.unescape(text)
    text = _WHITESPACE.sub(" ", text).strip()  # \s covers tabs, CR, LF and no-break spaces
    while text.startswith('"'):
        # pandas would read a leading quote as the start of a quoted field.
        text = text.strip('"').strip()
    return text


def _id_problem(token: str, is_item: bool) -> str | None:
    """Why `token` cannot be a user / item id, or None when it can."""
    if not token:
        return "empty id"
    if token.startswith('"'):
        return f"id {token!r} starts with a double quote"
    if is_item:
        # Item ids name image files and are space-separated in histories.
        if _WHITESPACE.search(token) or "/" in token or "\\" in token or "\0" in token or token in (".", ".."):
            return f"item id {token!r} has whitespace or is not a safe file name"
    elif "\t" in token or "\n" in token or "\r" in token:
        return f"user id {token!r} has a tab or newline"
    return None


def _looks_like_header(fields: list[str]) -> bool:
    if not fields:
        return False
    name = fields[0].split(":", 1)[0]
    return re.sub(r"[^0-9a-z]", "", name.lower()) in _HEADER_WORDS


# ----------------------------------------------------------------------------- reading


def _open_binary(path: Path) -> io.BufferedIOBase:
    with path.open("rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _text_lines(path: Path, report: ConvertReport) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line; lines that are not utf-8 are reported."""
    with _open_binary(path) as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.bad("undecodable", f"{path.name}:{line_no}: {exc.reason} at byte {exc.start}")
                continue
            if line_no == 1:
                line = line.lstrip("\ufeff")
            line = line.rstrip("\r\n")
            if line.strip():
                yield line_no, line


def _sniff_delimiter(path: Path) -> str:
    """Tab when the first non-blank line has a tab, else comma when it has a comma."""
    with _open_binary(path) as handle:
        for raw in handle:
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            if "\t" in line:
                return "\t"
            return "," if "," in line else "\t"
    return "\t"


def _records(path: Path, report: ConvertReport, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each record; the first record is skipped if it is a header.

    Tab-separated files are split per line (csv-quoted fields unquoted one by one);
    comma-separated files follow csv quoting, so a quoted title may hold commas.
    """
    first = True
    if delimiter == "\t":
        rows: Iterable[tuple[int, list[str]]] = (
            (line_no, [unquote_tsv_field(f) for f in line.split("\t")])
            for line_no, line in _text_lines(path, report)
        )
    else:
        rows = _csv_rows(path, report)
    for line_no, fields in rows:
        if first:
            first = False
            if _looks_like_header(fields):
                report.headers_skipped.append(f"{path.name}:{line_no}: {delimiter.join(fields)[:120]}")
                continue
        yield line_no, fields


def _csv_rows(path: Path, report: ConvertReport) -> Iterator[tuple[int, list[str]]]:
    """Records of a csv file, numbered by their first line.

    A quoted field may span lines; such records are listed in the report, since a stray
    opening quote also makes one (it swallows the lines up to the next quote).
    """
    consumed: list[int] = []  # lines the reader pulled for the record being read

    def lines() -> Iterator[str]:
        for line_no, line in _text_lines(path, report):
            consumed.append(line_no)
            yield line + "\n"

    reader = csv.reader(lines())
    while True:
        consumed.clear()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            report.bad("wrong_columns", f"{path.name}:{consumed[0] if consumed else '?'}: {exc}")
            continue
        if not fields or not consumed:
            continue
        if len(consumed) > 1:
            report.multiline_records.add(f"{path.name}:{consumed[0]}-{consumed[-1]}")
        yield consumed[0], fields


# ----------------------------------------------------------------------------- interactions

# A user's history: (item, timestamp, location) in the order read.
Event = tuple[str, float, str]
Histories = dict[str, list[Event]]


def _two_columns(path: Path, report: ConvertReport, delimiter: str, expected: str):
    """(where, first column stripped, second column) of rows with exactly two columns."""
    for line_no, fields in _records(path, report, delimiter):
        where = f"{path.name}:{line_no}"
        if len(fields) != 2:
            report.bad("wrong_columns", f"{where}: {len(fields)} {expected}")
            continue
        yield where, fields[0].strip(), fields[1]


def _first_valid(rows, report: ConvertReport, is_item: bool, duplicate_kind: str):
    """The (where, key, value) rows whose key is a valid id seen for the first time; the
    others are reported (``bad_id``, ``duplicate_kind``), the first of duplicates kept."""
    noun = "item" if is_item else "user"
    first: dict[str, str] = {}
    for where, key, value in rows:
        problem = _id_problem(key, is_item=is_item)
        if problem:
            report.bad("bad_id", f"{where}: {problem}")
            continue
        if key in first:
            report.bad(duplicate_kind, f"{where}: {noun} {key!r} already on {first[key]}")
            continue
        first[key] = where
        yield where, key, value


def _read_history_file(path: Path, report: ConvertReport, clock: list[int]) -> Histories:
    """``user<TAB>item item ...`` lines; the timestamp is a global counter in file order."""
    histories: Histories = {}
    rows = _two_columns(path, report, "\t", "tab-separated columns, expected 2")
    for where, user, items in _first_valid(rows, report, is_item=False, duplicate_kind="duplicate_user"):
        events: list[Event] = []
        for item in items.split():
            problem = _id_problem(item, is_item=True)
            if problem:
                report.bad("bad_id", f"{where}: {problem}")
                continue
            events.append((item, float(clock[0]), where))
            clock[0] += 1
        histories[user] = events
    return histories


def _parse_time(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return result if result == result and abs(result) != float("inf") else None


def _read_pair_rows(path: Path, report: ConvertReport, delimiter: str) -> Histories:
    """``user, item, timestamp`` rows (tab or comma), in any order."""
    histories: Histories = {}
    for line_no, fields in _records(path, report, delimiter):
        where = f"{path.name}:{line_no}"
        if len(fields) != 3:
            report.bad("wrong_columns", f"{where}: {len(fields)} columns, expected 3 (user, item, timestamp)")
            continue
        user, item, stamp = (f.strip() for f in fields)
        problem = _id_problem(user, is_item=False) or _id_problem(item, is_item=True)
        if problem:
            report.bad("bad_id", f"{where}: {problem}")
            continue
        time = _parse_time(stamp)
        if time is None:
            report.bad("bad_timestamp", f"{where}: timestamp {stamp!r} is not a number")
            continue
        histories.setdefault(user, []).append((item, time, where))
    return histories


def _read_microlens_pairs(path: Path, report: ConvertReport, clock: list[int]) -> tuple[Histories, bool]:
    """History lines (2 tab columns) or ``user,item,timestamp`` rows, told by the first row.

    Returns the histories and whether they carry real timestamps.
    """
    delimiter = _sniff_delimiter(path)
    if delimiter == "\t":
        for _, fields in _records(path, ConvertReport("", "", ""), "\t"):  # a dry look at the first row
            if len(fields) == 2:
                return _read_history_file(path, report, clock), False
            break
    return _read_pair_rows(path, report, delimiter), True


def _parse_json_line(line: str) -> object:
    """A json object, or (old Amazon files) a python dict literal."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _json_objects(path: Path, report: ConvertReport) -> Iterator[tuple[str, dict]]:
    for line_no, line in _text_lines(path, report):
        where = f"{path.name}:{line_no}"
        try:
            obj = _parse_json_line(line)
        except ValueError as exc:
            report.bad("bad_json", f"{where}: {exc}")
            continue
        if not isinstance(obj, dict):
            report.bad("bad_json", f"{where}: not a json object")
            continue
        yield where, obj


def _read_amazon_reviews(path: Path, report: ConvertReport) -> Histories:
    histories: Histories = {}
    for where, review in _json_objects(path, report):
        user, item, stamp = review.get("reviewerID"), review.get("asin"), review.get("unixReviewTime")
        if not isinstance(user, str) or not isinstance(item, str) or stamp is None:
            missing = [k for k, v in (("reviewerID", user), ("asin", item), ("unixReviewTime", stamp)) if v is None]
            report.bad("missing_field", f"{where}: {', '.join(missing) or 'reviewerID/asin not text'}")
            continue
        user, item = user.strip(), item.strip()
        problem = _id_problem(user, is_item=False) or _id_problem(item, is_item=True)
        if problem:
            report.bad("bad_id", f"{where}: {problem}")
            continue
        time = _parse_time(stamp)
        if time is None:
            report.bad("bad_timestamp", f"{where}: unixReviewTime {stamp!r} is not a number")
            continue
        histories.setdefault(user, []).append((item, time, where))
    return histories


# ----------------------------------------------------------------------------- items

# item -> {field: sanitised text}; the dict's order is the items file's order.
ItemTable = dict[str, dict[str, str]]


def _read_item_texts(path: Path, report: ConvertReport, delimiter: str, column: str, kind: str) -> ItemTable:
    """``item<sep>text`` rows into {item: {column: text}}; the first of duplicates is kept."""
    rows = _two_columns(path, report, delimiter, f"columns, expected 2 (item, {column})")
    return {item: {column: sanitize_text(text)}
            for _, item, text in _first_valid(rows, report, is_item=True, duplicate_kind=kind)}


def _join_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value if isinstance(v, (str, int, float)))
    return ""


def _read_amazon_meta(path: Path, report: ConvertReport) -> ItemTable:
    def rows():
        for where, meta in _json_objects(path, report):
            item = meta.get("asin")
            if not isinstance(item, str):
                report.bad("missing_field", f"{where}: asin")
                continue
            yield where, item.strip(), meta

    table: ItemTable = {}
    for _, item, meta in _first_valid(rows(), report, is_item=True, duplicate_kind="duplicate_item"):
        urls = meta.get("imageURL") or meta.get("imUrl")  # imUrl: the 2014 metadata
        table[item] = {
            "title": sanitize_text(_join_text(meta.get("title"))),
            "description": sanitize_text(_join_text(meta.get("description"))),
            "image_url": sanitize_text(_join_text(urls)),
        }
    return table


# ----------------------------------------------------------------------------- histories


def _finish_histories(
    histories: Histories, known_items: ItemTable, report: ConvertReport,
    min_len: int, max_len: int, timed: bool,
) -> dict[str, list[tuple[str, float]]]:
    """Order, drop unknown items, filter by length and make timestamps strictly increasing."""
    kept: dict[str, list[tuple[str, float]]] = {}
    report.users_read = len(histories)
    for user, events in histories.items():
        report.interactions_read += len(events)
        if timed:
            # sorted() is stable: equal timestamps keep file order.
            events = sorted(events, key=lambda event: event[1])
        valid = []
        for item, time, where in events:
            if item in known_items:
                valid.append((item, time))
            else:
                report.bad("unknown_item", f"{where}: item {item!r} not in the items file")
        if not valid or len(valid) < min_len:
            report.users_too_short += 1
            continue
        if max_len and len(valid) > max_len:
            report.interactions_cut += len(valid) - max_len
            valid = valid[-max_len:]
        kept[user] = _strictly_increasing(valid, report)
    return kept


def _strictly_increasing(events: list[tuple[str, float]], report: ConvertReport) -> list[tuple[str, float]]:
    result = []
    previous = None
    for item, time in events:
        if previous is not None and time <= previous:
            time = previous + 1
            report.timestamps_adjusted += 1
        result.append((item, time))
        previous = time
    return result


def _format_time(time: float) -> str:
    return str(int(time)) if float(time).is_integer() else repr(float(time))


# ----------------------------------------------------------------------------- images


class LmdbImageRecord:
    """Plain data stand-in for the authors' ``LMDB_Image`` (channels, size, image, id)."""

    channels: int
    size: tuple
    image: bytes
    id: object


class _LmdbImageUnpickler(pickle.Unpickler):
    """Unpickles only ``LMDB_Image`` records: any other global is refused, never imported.

    A pickle can call any importable function (``os.system`` via ``__reduce__``); the only
    global a real record needs is its own class, mapped here to a data-only class.
    """

    def __init__(self, data: bytes, source: str, key: str):
        super().__init__(io.BytesIO(data))
        self._source, self._key = source, key

    def find_class(self, module: str, name: str) -> type:
        if name == "LMDB_Image":
            return LmdbImageRecord
        raise UnsafePickleError(
            f"{self._source}: key {self._key!r}: the pickled value refers to {module}.{name}; "
            "only a class named LMDB_Image is accepted (refused: a pickle can run code)"
        )


def decode_lmdb_value(data: bytes, source: str, key: str):
    """The RGB PIL image of one LMDB value; ValueError when the record is malformed."""
    import numpy as np
    from PIL import Image

    try:
        record = _LmdbImageUnpickler(data, source, key).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # a truncated or foreign pickle raises many types
        raise ValueError(f"cannot unpickle: {exc}") from None
    if not isinstance(record, LmdbImageRecord):
        raise ValueError(f"value is a {type(record).__name__}, not an LMDB_Image record")
    try:
        height, width = (int(v) for v in record.size)
        channels = int(record.channels)
        if not isinstance(record.image, (bytes, bytearray)):
            raise TypeError(f"image is a {type(record.image).__name__}, not bytes")
        pixels = bytes(record.image)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ValueError(f"LMDB_Image record without usable channels/size/image: {exc}") from None
    if channels not in (1, 3, 4) or height <= 0 or width <= 0 or len(pixels) != height * width * channels:
        raise ValueError(f"{len(pixels)} bytes do not make a {height}x{width}x{channels} uint8 image")
    array = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)
    image = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    return image.convert("RGB")


def _is_lmdb(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / "data.mdb").is_file())


def _write_images(source: Path, items: list[str], target: Path, report: ConvertReport) -> None:
    target.mkdir()
    if _is_lmdb(source):
        _write_lmdb_images(source, items, target, report)
        return
    found = find_item_images(source, items)
    for item in items:
        path = found[item]
        if path is None:
            report.missing_images.add(item)
            continue
        destination = target / f"{item}{path.suffix}"
        try:
            os.link(path, destination)  # same disk: no copy needed, images are never edited
        except OSError:
            shutil.copyfile(path, destination)
        report.images += 1


def _write_lmdb_images(source: Path, items: list[str], target: Path, report: ConvertReport) -> None:
    import lmdb

    try:
        env = lmdb.open(str(source), subdir=source.is_dir(), readonly=True, lock=False, readahead=False)
    except lmdb.Error as exc:
        raise ConvertError(f"images {source}: not a folder of images nor a readable LMDB ({exc})") from None
    try:
        with env.begin(buffers=False) as txn:
            for item in items:
                # Only item keys are read, so the __keys__ / __len__ entries are never unpickled.
                data = txn.get(item.encode("utf-8"))
                if data is None:
                    report.missing_images.add(item)
                    continue
                try:
                    image = decode_lmdb_value(data, source.name, item)
                except UnsafePickleError:
                    raise
                except ValueError as exc:
                    report.bad_images.add(f"{source.name}: key {item!r}: {exc}")
                    continue
                image.save(target / f"{item}.jpg", format="JPEG", quality=JPEG_QUALITY)
                report.images += 1
    finally:
        env.close()


# ----------------------------------------------------------------------------- output


def _check_output(output: Path, force: bool, inputs: list[Path]) -> None:
    if output.exists() and not output.is_dir():
        raise ConvertError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not force:
            raise ConvertError(f"output folder {output} is not empty; pass --force to replace it")
        root = output.resolve()
        for path in inputs:
            if path.resolve() == root or root in path.resolve().parents:
                raise ConvertError(f"input {path} lies inside the output folder {output}; --force would delete it")


def _publish(staging: Path, output: Path) -> None:
    """Put the finished staging folder at `output`, replacing what is there."""
    if not output.exists():
        os.rename(staging, output)
        return
    retired = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(output, retired)
    try:
        os.rename(staging, output)
    except OSError:
        os.rename(retired, output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _write_inter(path: Path, histories: dict[str, list[tuple[str, float]]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, events in histories.items():
            for item, time in events:
                handle.write(f"{user}\t{item}\t{_format_time(time)}\n")


def _write_item(path: Path, items: list[str], table: ItemTable, columns: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(["item_id:token"] + [f"{c}:token_seq" for c in columns]) + "\n")
        for item in items:
            values = [table[item].get(c, "") for c in columns]
            handle.write("\t".join([item] + values) + "\n")


# ----------------------------------------------------------------------------- API


def convert(
    fmt: str,
    users: str | Path,
    items: str | Path,
    output: str | Path,
    images: str | Path | None = None,
    captions: str | Path | None = None,
    min_len: int = 5,
    max_len: int = 13,
    force: bool = False,
) -> ConvertReport:
    """Convert one dataset into RecBole atomic files under `output` (see the module docstring).

    For ``amazon``, `users` is the review file and `items` the metadata file.
    """
    if fmt not in FORMATS:
        raise ConvertError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if min_len < 0 or max_len < 0:
        raise ConvertError(f"min_len={min_len}, max_len={max_len}: must be >= 0 (0 disables)")
    output = Path(output)
    users_path, items_path = Path(users), Path(items)
    images_path = Path(images) if images is not None else None
    captions_path = Path(captions) if captions is not None else None
    inputs = [p for p in (users_path, items_path, images_path, captions_path) if p is not None]
    for path in (users_path, items_path, captions_path):
        if path is not None and not path.is_file():
            raise ConvertError(f"input file not found: {path}")
    if images_path is not None and not images_path.exists():
        raise ConvertError(f"images not found: {images_path} (expected a folder of <item>.jpg or an LMDB)")
    name = output.resolve().name
    if not name:
        raise ConvertError(f"output {output} has no folder name to use as the dataset name")
    _check_output(output, force, inputs)

    report = ConvertReport(
        format=fmt, dataset=name, output=str(output),
        settings={
            "users": str(users_path), "items": str(items_path),
            "images": str(images_path) if images_path else None,
            "captions": str(captions_path) if captions_path else None,
            "min_len": min_len, "max_len": max_len,
        },
    )
    clock = [0]
    if fmt == "iisan":
        histories = _read_history_file(users_path, report, clock)
        table = _read_item_texts(items_path, report, "\t", "title", "duplicate_item")
        columns, timed = ["title"], False
    elif fmt == "microlens":
        histories, timed = _read_microlens_pairs(users_path, report, clock)
        table = _read_item_texts(items_path, report, _sniff_delimiter(items_path), "title", "duplicate_item")
        columns = ["title"]
    else:
        histories = _read_amazon_reviews(users_path, report)
        table = _read_amazon_meta(items_path, report)
        columns, timed = ["title", "description", "image_url"], True
    report.items_read = len(table)

    kept = _finish_histories(histories, table, report, min_len, max_len, timed)
    referenced = {item for events in kept.values() for item, _ in events}
    kept_items = [item for item in table if item in referenced]
    report.users = len(kept)
    report.items = len(kept_items)
    report.interactions = sum(len(events) for events in kept.values())
    report.items_unreferenced = len(table) - len(kept_items)
    for item in kept_items:
        if not table[item]["title"]:
            report.empty_titles.add(item)

    if captions_path is not None:
        caption_table = _read_item_texts(captions_path, report, "\t", "caption", "duplicate_caption")
        for item in kept_items:
            if item in caption_table:
                table[item]["caption"] = caption_table[item]["caption"]
                report.captions += 1
            else:
                report.missing_captions.add(item)
        report.captions_unused = len(caption_table) - report.captions
        columns.append("caption")

    output.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would stay on the published folder.
    staging = output.parent / f".{name}.converting-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_inter(staging / f"{name}.inter", kept)
        _write_item(staging / f"{name}.item", kept_items, table, columns)
        if images_path is not None:
            _write_images(images_path, kept_items, staging / "images", report)
        with (staging / REPORT_FILE).open("w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        _publish(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recbole_iisan.data.convert",
        description="Convert the IISAN / MicroLens / Amazon 2018 formats to RecBole atomic files.",
    )
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--users", required=True, help="users / pairs file (amazon: the review json lines)")
    parser.add_argument("--items", required=True, help="items / titles file (amazon: the metadata json lines)")
    parser.add_argument("--images", help="folder of <item>.jpg, or the authors' LMDB (file or folder)")
    parser.add_argument("--captions", help="item<TAB>caption file, merged as the caption field")
    parser.add_argument("--output", required=True, help="output folder; its name is the dataset's name")
    parser.add_argument("--min_len", type=int, default=5, help="drop users with fewer interactions (0: off)")
    parser.add_argument("--max_len", type=int, default=13, help="keep each user's last N interactions (0: off)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        report = convert(
            args.format, args.users, args.items, args.output, images=args.images, captions=args.captions,
            min_len=args.min_len, max_len=args.max_len, force=args.force,
        )
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"  report: {Path(args.output) / REPORT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
