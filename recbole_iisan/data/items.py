"""Raw item content: text from a RecBole atomic `.item` file, images from a folder.

RecBole remaps `token_seq` fields into its own vocabulary, so the raw text an encoder
needs is read here, straight from the file. Everything works on raw item tokens (the
strings of the file); mapping to RecBole's internal ids is the dataset's job.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
POLICIES = ("error", "blank")


class ItemDataError(ValueError):
    """Item text or images are missing, malformed or inconsistent with the interactions."""


def describe_items(ids: list[str], limit: int = 5) -> str:
    """A short, bounded description of a list of item ids for error messages."""
    ids = [str(i) for i in ids]
    noun = "item" if len(ids) == 1 else "items"
    shown = ", ".join(ids[:limit])
    if len(ids) > limit:
        shown += ", ..."
    return f"{len(ids)} {noun} ({shown})"


def _check_policy(key: str, policy: str) -> None:
    if policy not in POLICIES:
        raise ItemDataError(f"{key}={policy!r} is not a known policy; use one of {', '.join(POLICIES)}")


def _split_header(line: str, path: Path) -> list[str]:
    """Field names of a `name:type` header (the type part is dropped)."""
    names = [column.split(":", 1)[0].strip() for column in line.split("\t")]
    if any(not name for name in names):
        raise ItemDataError(f"{path}: line 1: header has an empty field name: {line!r}")
    return names


def read_item_text(
    item_file: str | Path,
    text_fields: list[str],
    item_field: str = "item_id",
    separator: str = " | ",
) -> dict[str, str]:
    """Map each raw item token to its text fields' non-empty values joined by `separator`.

    The file is read as plain tab-separated utf-8 without quoting rules, so titles may
    hold quotes of any kind. Blank lines are skipped.
    """
    path = Path(item_file)
    if isinstance(text_fields, str):
        text_fields = [text_fields]
    if not text_fields:
        raise ItemDataError(f"{path}: no text fields requested")
    if not path.is_file():
        raise ItemDataError(f"item file not found: {path}")

    texts: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    # Binary reading, decoded per line, so a bad byte is reported with its line number.
    with path.open("rb") as handle:
        header: list[str] | None = None
        columns: list[int] = []
        item_column = 0
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise ItemDataError(
                    f"{path}: line {line_no}: not valid utf-8 ({exc.reason} at byte {exc.start})"
                ) from exc
            line = line.rstrip("\r\n")
            if header is None:
                header = _split_header(line, path)
                wanted = [item_field, *text_fields]
                unknown = [name for name in wanted if name not in header]
                if unknown:
                    raise ItemDataError(
                        f"{path}: field(s) {', '.join(unknown)} not in the header; "
                        f"the header has: {', '.join(header)}"
                    )
                item_column = header.index(item_field)
                columns = [header.index(name) for name in text_fields]
                continue
            if not line.strip():
                continue
            values = line.split("\t")
            if len(values) != len(header):
                raise ItemDataError(
                    f"{path}: line {line_no}: {len(values)} tab-separated columns, the header has {len(header)}"
                )
            token = values[item_column].strip()
            if token in first_seen:
                raise ItemDataError(
                    f"{path}: line {line_no}: duplicate item id {token!r} (first on line {first_seen[token]})"
                )
            first_seen[token] = line_no
            parts = [values[c].strip() for c in columns]
            texts[token] = separator.join(p for p in parts if p).strip()
    if header is None:
        raise ItemDataError(f"{path}: empty file, no header")
    return texts


def find_item_images(image_dir: str | Path, item_tokens: list[str]) -> dict[str, Path | None]:
    """Each token's image `<image_dir>/<token><suffix>`, the first suffix of IMAGE_SUFFIXES present.

    One directory listing serves all items (tens of thousands of stat calls on a network
    disk are slow). Suffixes match case-insensitively.
    """
    folder = Path(image_dir)
    if not folder.is_dir():
        raise ItemDataError(f"image folder not found: {folder}")
    rank = {suffix: i for i, suffix in enumerate(IMAGE_SUFFIXES)}
    best: dict[str, tuple[int, str]] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, suffix = entry.name.rpartition(".")
            if not dot:
                continue
            order = rank.get("." + suffix.lower())
            if order is None or not entry.is_file():
                continue
            if stem not in best or order < best[stem][0]:
                best[stem] = (order, entry.name)
    return {token: (folder / best[token][1]) if token in best else None for token in item_tokens}


def load_image(path: Path) -> Image.Image:
    """The image at `path` as RGB, fully decoded (so truncated files fail here, not later)."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt data; all mean "unreadable"
        raise ItemDataError(f"cannot read image {path}: {exc}") from exc


def blank_image(size: int = 224) -> Image.Image:
    """A black RGB square standing in for an item without an image."""
    return Image.new("RGB", (size, size), (0, 0, 0))


def resolve_item_text(tokens: list[str], texts: dict[str, str], policy: str, source: str) -> list[str]:
    """The text of each token, in order, applying the `empty_text` policy.

    Tokens are raw item ids (RecBole's padding token excluded). An item of the
    interactions without a row in the `.item` file is always an error.
    """
    _check_policy("empty_text", policy)
    absent = [t for t in tokens if t not in texts]
    if absent:
        raise ItemDataError(f"items in .inter absent from .item {source}: {describe_items(absent)}")
    resolved = [texts[t].strip() for t in tokens]
    empty = [t for t, text in zip(tokens, resolved) if not text]
    if empty:
        if policy == "error":
            raise ItemDataError(
                f"empty text in {source} for {describe_items(empty)}; "
                "set empty_text: blank to encode them as empty strings"
            )
        logger.warning("%d item(s) with empty text in %s encoded as '': %s", len(empty), source, describe_items(empty))
    return resolved


def resolve_item_images(tokens: list[str], image_dir: str | Path, policy: str) -> list[Path | None]:
    """Each token's image path, in order, applying the `missing_image` policy (None = blank)."""
    _check_policy("missing_image", policy)
    found = find_item_images(image_dir, tokens)
    missing = [t for t in tokens if found[t] is None]
    if missing:
        if policy == "error":
            raise ItemDataError(
                f"no image in {image_dir} for {describe_items(missing)} "
                f"(looked for <item>{'|'.join(IMAGE_SUFFIXES)}); set missing_image: blank to use blank images"
            )
        logger.warning(
            "%d item(s) without an image in %s get a blank image: %s", len(missing), image_dir, describe_items(missing)
        )
    return [found[t] for t in tokens]
