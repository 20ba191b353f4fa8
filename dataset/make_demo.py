"""Generate the bundled synthetic multimodal demo dataset (``dataset/demo``).

Every item has a colour, a kind (a drawn shape / motif) and a category. All three are
visible both in the item's title and in its image, and users move between items by
attribute (a Markov chain over attributes) while item popularity is long-tailed. An
ID-only model therefore sees most items too rarely to learn them, while a model that
reads titles or images can generalise from the shared attributes.

Usage::

    python dataset/make_demo.py [--output dataset/demo] [--seed 2024]

The output is deterministic: the same seed gives byte-identical files (numpy RNG,
PIL JPEG at a fixed quality, no timestamps or metadata written anywhere).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SEED = 2024
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "demo"
DATASET_NAME = "demo"

N_ITEMS = 500
N_USERS = 1000
IMAGE_SIZE = 64
JPEG_QUALITY = 90
MIN_LEN, MAX_LEN = 5, 20
EXTRA_LEN_MEAN = 4.0  # history length = MIN_LEN + Poisson(EXTRA_LEN_MEAN), capped at MAX_LEN
# A few users fall below the 5-core threshold so the filter has something to do.
SHORT_USER_SHARE = 0.025
ZIPF_EXPONENT = 1.1
BASE_TIMESTAMP = 1_600_000_000
# Next-item sampling: logit = sum of weight * [attribute matches target] + weight * log(popularity).
# Matching dominates, so content decides what comes next; popularity keeps a long tail.
MATCH_WEIGHTS = (4.5, 4.5, 4.0)  # colour, kind, category
POPULARITY_WEIGHT = 0.8

# name -> (RGB fill, title words). The first word is the most common one.
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((205, 35, 35), ("red", "crimson", "scarlet")),
    "orange": ((240, 135, 25), ("orange", "tangerine", "amber")),
    "yellow": ((235, 205, 35), ("yellow", "lemon", "golden")),
    "green": ((45, 155, 60), ("green", "emerald", "leafy")),
    "blue": ((35, 85, 205), ("blue", "navy", "azure")),
    "purple": ((125, 55, 165), ("purple", "violet", "lilac")),
    "pink": ((235, 115, 170), ("pink", "rose", "blush")),
    "black": ((30, 30, 30), ("black", "jet", "charcoal")),
}

# kind (the drawn shape) -> title words.
KINDS: dict[str, tuple[str, ...]] = {
    "circle": ("round", "circle", "disc"),
    "square": ("square", "boxy", "cube"),
    "triangle": ("triangle", "triangular", "pyramid"),
    "star": ("star", "starry", "star-shaped"),
    "ring": ("ring", "hoop", "donut"),
    "cross": ("cross", "plus-sign", "criss-cross"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "crescent": ("crescent", "moon", "lunar"),
}

# category -> (background pattern, product nouns, place word).
CATEGORIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "kitchen": ("checker", ("mug", "plate", "bowl", "kettle", "teapot"), "kitchen"),
    "garden": ("vstripes", ("planter", "watering can", "trowel", "bird feeder"), "garden"),
    "office": ("grid", ("stapler", "notebook", "desk organiser", "folder"), "office"),
    "toys": ("dots", ("puzzle", "plush toy", "kite", "yo-yo"), "playroom"),
    "sports": ("diagonal", ("water bottle", "gym bag", "towel", "frisbee"), "gym"),
    "music": ("hstripes", ("guitar pick", "drum pad", "speaker", "headphone stand"), "studio"),
    "decor": ("waves", ("cushion", "vase", "wall clock", "candle"), "living room"),
}

FILLERS = (
    "classic", "deluxe", "mini", "large", "eco", "handmade", "vintage", "modern",
    "compact", "premium", "lightweight", "durable", "everyday", "limited edition", "soft",
)
TITLE_TEMPLATES = (
    "{filler} {colour} {kind} {noun}",
    "{colour} {noun} with {kind} print",
    "{kind} {noun} in {colour}, {filler}",
    "{noun} - {colour} {kind} design for the {place}",
    "{filler} {noun}, {kind} motif, {colour}",
    "{colour} {kind} {noun}",
)

COLOUR_NAMES = tuple(COLOURS)
KIND_NAMES = tuple(KINDS)
CATEGORY_NAMES = tuple(CATEGORIES)

# Independent RNG streams, so changing one stage never reshuffles another.
_STREAM_ITEMS, _STREAM_IMAGES, _STREAM_USERS, _STREAM_TIMES = 1, 2, 3, 4


@dataclass(frozen=True)
class DemoItem:
    """One catalogue item; attributes are indices into the *_NAMES tuples."""

    item_id: str
    colour: int
    kind: int
    category: int
    title: str
    popularity: float  # unnormalised Zipf weight


@dataclass(frozen=True)
class DemoSummary:
    users: int
    items: int
    interactions: int
    bytes_on_disk: int


def _stream(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _pick(rng: np.random.Generator, words: tuple[str, ...], first_weight: float = 0.6) -> str:
    """Pick a word, favouring the first (canonical) one."""
    rest = (1.0 - first_weight) / (len(words) - 1)
    probs = [first_weight] + [rest] * (len(words) - 1)
    return words[int(rng.choice(len(words), p=probs))]


def _make_title(rng: np.random.Generator, colour: int, kind: int, category: int) -> str:
    _, nouns, place = CATEGORIES[CATEGORY_NAMES[category]]
    template = TITLE_TEMPLATES[int(rng.integers(len(TITLE_TEMPLATES)))]
    title = template.format(
        filler=FILLERS[int(rng.integers(len(FILLERS)))],
        colour=_pick(rng, COLOURS[COLOUR_NAMES[colour]][1]),
        kind=_pick(rng, KINDS[KIND_NAMES[kind]]),
        noun=nouns[int(rng.integers(len(nouns)))],
        place=place,
    )
    if rng.random() < 0.15:
        title += f", set of {int(rng.integers(2, 6))}"
    return title


def make_catalog(seed: int = DEFAULT_SEED, n_items: int = N_ITEMS) -> list[DemoItem]:
    """The item catalogue: attributes, titles and Zipf popularity weights."""
    rng = _stream(seed, _STREAM_ITEMS)
    colours = rng.integers(len(COLOUR_NAMES), size=n_items)
    kinds = rng.integers(len(KIND_NAMES), size=n_items)
    categories = rng.integers(len(CATEGORY_NAMES), size=n_items)
    ranks = rng.permutation(n_items) + 1
    popularity = 1.0 / ranks.astype(np.float64) ** ZIPF_EXPONENT
    width = max(4, len(str(n_items)))
    return [
        DemoItem(
            item_id=f"i{i + 1:0{width}d}",
            colour=int(colours[i]),
            kind=int(kinds[i]),
            category=int(categories[i]),
            title=_make_title(rng, int(colours[i]), int(kinds[i]), int(categories[i])),
            popularity=float(popularity[i]),
        )
        for i in range(n_items)
    ]


# ---------------------------------------------------------------- images


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a shape of radius r in centred, rotated coordinates (u right, v down)."""
    dist = np.hypot(u, v)
    if kind == "circle":
        return dist < r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.82 * r
    if kind == "triangle":
        # Upward triangle: below the two slanted edges and above the base.
        return (v < 0.6 * r) & (v > -r + 1.8 * np.abs(u))
    if kind == "star":
        angle = np.arctan2(v, u) + np.pi / 2
        edge = r * (0.55 + 0.45 * np.abs(np.cos(2.5 * angle)) ** 3)
        return dist < edge
    if kind == "ring":
        return (dist < r) & (dist > 0.55 * r)
    if kind == "cross":
        arm = 0.3 * r
        return ((np.abs(u) < arm) & (np.abs(v) < r)) | ((np.abs(v) < arm) & (np.abs(u) < r))
    if kind == "diamond":
        return np.abs(u) + np.abs(v) < r
    if kind == "crescent":
        return (dist < r) & (np.hypot(u - 0.45 * r, v + 0.15 * r) > 0.8 * r)
    raise ValueError(f"make_demo: unknown kind {kind!r}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """Boolean mask of the category's background pattern."""
    half = period / 2
    if pattern == "checker":
        return ((np.floor((x + phase) / half) + np.floor((y + phase) / half)) % 2) == 0
    if pattern == "vstripes":
        return ((x + phase) % period) < half * 0.8
    if pattern == "hstripes":
        return ((y + phase) % period) < half * 0.8
    if pattern == "grid":
        return (((x + phase) % period) < 1.5) | (((y + phase) % period) < 1.5)
    if pattern == "dots":
        dx = ((x + phase) % period) - half
        dy = ((y + phase) % period) - half
        return np.hypot(dx, dy) < period * 0.22
    if pattern == "diagonal":
        return ((x + y + phase) % period) < half * 0.8
    if pattern == "waves":
        return ((y + 2.5 * np.sin((x + phase) / period * 2.0) + phase) % period) < half * 0.7
    raise ValueError(f"make_demo: unknown pattern {pattern!r}")


def render_image(item: DemoItem, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one item: category pattern behind a shape of the item's kind and colour, plus noise."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    pattern = CATEGORIES[CATEGORY_NAMES[item.category]][0]
    period = size / 8 * rng.uniform(0.85, 1.15)
    background = np.array([232.0, 228.0, 218.0]) + rng.uniform(-8, 8, size=3)
    ink = np.array([165.0, 165.0, 160.0]) + rng.uniform(-12, 12, size=3)
    image = np.empty((size, size, 3))
    image[:] = background
    image[_pattern_mask(pattern, x, y, period, rng.uniform(0, period))] = ink

    centre = size / 2 + rng.uniform(-0.06, 0.06, size=2) * size
    radius = size * rng.uniform(0.27, 0.33)
    theta = rng.uniform(-0.25, 0.25)  # small tilt only, so shapes stay recognisable
    dx, dy = x - centre[0], y - centre[1]
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    shape = _shape_mask(KIND_NAMES[item.kind], u, v, radius)
    fill = np.array(COLOURS[COLOUR_NAMES[item.colour]][0], dtype=np.float64)
    fill = fill + rng.uniform(-12, 12, size=3)
    shading = 1.0 - 0.12 * np.clip(v / radius, -1, 1)[..., None]  # light from above
    image = np.where(shape[..., None], fill * shading, image)

    image += rng.normal(0.0, 5.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def write_images(items: list[DemoItem], image_dir: Path, seed: int) -> None:
    """Write ``<item_id>.jpg`` for every item; removes stale ``i*.jpg`` left by larger runs."""
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = _stream(seed, _STREAM_IMAGES)
    wanted = {f"{item.item_id}.jpg" for item in items}
    for stale in sorted(image_dir.glob("i*.jpg")):
        if stale.name not in wanted:
            stale.unlink()
    for item in items:
        pixels = render_image(item, rng)
        # Fixed quality/subsampling and no optimize/progressive/EXIF: stable bytes.
        Image.fromarray(pixels).save(
            image_dir / f"{item.item_id}.jpg", format="JPEG", quality=JPEG_QUALITY, subsampling=0
        )


# ---------------------------------------------------------------- sequences


def _draw_length(rng: np.random.Generator) -> int:
    if rng.random() < SHORT_USER_SHARE:
        return int(rng.integers(3, MIN_LEN))
    return int(min(MAX_LEN, MIN_LEN + rng.poisson(EXTRA_LEN_MEAN)))


def _choose(rng: np.random.Generator, p_keep: float, keep: int, p_other: float, other: int, n: int) -> int:
    """With p_keep return keep, with p_other return other, else a uniform draw."""
    roll = rng.random()
    if roll < p_keep:
        return keep
    if roll < p_keep + p_other:
        return other
    return int(rng.integers(n))


def make_histories(items: list[DemoItem], seed: int = DEFAULT_SEED, n_users: int = N_USERS) -> list[list[int]]:
    """Per-user item index sequences, driven by item attributes (no repeats within a user).

    Each user prefers one colour and one category. The next item's target attributes
    come from the previous item (same colour, same or the "next" kind, same category)
    or the user's preferences; an item is then sampled by attribute match and
    popularity, so the content, not the id, decides what comes next.
    """
    rng = _stream(seed, _STREAM_USERS)
    colours = np.array([item.colour for item in items])
    kinds = np.array([item.kind for item in items])
    categories = np.array([item.category for item in items])
    log_pop = np.log(np.array([item.popularity for item in items]))
    n_col, n_kind, n_cat = len(COLOUR_NAMES), len(KIND_NAMES), len(CATEGORY_NAMES)

    histories = []
    for _ in range(n_users):
        length = _draw_length(rng)
        pref_colour = int(rng.integers(n_col))
        pref_category = int(rng.integers(n_cat))
        colour = _choose(rng, 0.7, pref_colour, 0.0, 0, n_col)
        kind = int(rng.integers(n_kind))
        category = _choose(rng, 0.7, pref_category, 0.0, 0, n_cat)
        seen = np.zeros(len(items), dtype=bool)
        history = []
        for step in range(length):
            if step > 0:
                prev = history[-1]
                colour = _choose(rng, 0.5, int(colours[prev]), 0.25, pref_colour, n_col)
                kind = _choose(rng, 0.45, int(kinds[prev]), 0.35, (int(kinds[prev]) + 1) % n_kind, n_kind)
                category = _choose(rng, 0.6, pref_category, 0.25, int(categories[prev]), n_cat)
            logits = (
                MATCH_WEIGHTS[0] * (colours == colour)
                + MATCH_WEIGHTS[1] * (kinds == kind)
                + MATCH_WEIGHTS[2] * (categories == category)
                + POPULARITY_WEIGHT * log_pop
            )
            logits[seen] = -np.inf
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            choice = int(rng.choice(len(items), p=probs))
            seen[choice] = True
            history.append(choice)
        histories.append(history)
    return histories


def make_timestamps(rng: np.random.Generator, length: int) -> list[int]:
    """Strictly increasing integer timestamps (seconds) for one history."""
    start = BASE_TIMESTAMP + int(rng.integers(0, 60 * 86400))
    gaps = rng.integers(600, 3 * 86400, size=length)
    gaps[0] = 0
    return (start + np.cumsum(gaps)).tolist()


# ---------------------------------------------------------------- files


def _check_text(item: DemoItem) -> None:
    if not item.title or "\t" in item.title or "\n" in item.title or item.title.startswith('"'):
        raise ValueError(f"make_demo: bad title for item {item.item_id}: {item.title!r}")


def write_item_file(items: list[DemoItem], path: Path) -> None:
    lines = ["item_id:token\ttitle:token_seq"]
    for item in items:
        _check_text(item)
        lines.append(f"{item.item_id}\t{item.title}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_inter_file(items: list[DemoItem], histories: list[list[int]], path: Path, seed: int) -> None:
    rng = _stream(seed, _STREAM_TIMES)
    width = max(4, len(str(len(histories))))
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, history in enumerate(histories):
        user_id = f"u{u + 1:0{width}d}"
        for index, stamp in zip(history, make_timestamps(rng, len(history))):
            lines.append(f"{user_id}\t{items[index].item_id}\t{stamp}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


README_TEXT = """\
# demo: a synthetic multimodal sequential-recommendation dataset

Generated by `dataset/make_demo.py` (seed {seed}); regenerate with

    python dataset/make_demo.py --output dataset/demo --seed {seed}

The script is deterministic: rerunning it gives byte-identical files.

## What it is

{items} items and {users} users ({interactions} interactions, histories of
{min_len}..{max_len} items; a few users have fewer and are dropped by the 5-core filter).
Each item has three attributes: a colour (8), a kind (8 shapes: circle, square, triangle,
star, ring, cross, diamond, crescent) and a category (7: kitchen, garden, office, toys,
sports, music, decor). All three show up in the item's title (with synonyms and filler
words, e.g. "vintage crimson ring mug") and in its {size}x{size} RGB image: the colour is
the fill colour, the kind is the drawn shape, the category is the background pattern.

Each user prefers one colour and one category; the next item tends to share colour,
kind (or follow a fixed kind cycle) and category with the previous one, and item
popularity is Zipf-like (the top 10% of items take {top_share:.0%} of the interactions;
{rare} items occur fewer than 5 times, the median item {median} times). Rare items give an
ID-only model little to learn from, while a model reading titles or images can generalise
from the attributes they share with frequent items.

## Files

- `demo.inter`: `user_id:token`, `item_id:token`, `timestamp:float` (tab separated;
  rows grouped by user in history order, timestamps strictly increasing per user).
- `demo.item`: `item_id:token`, `title:token_seq` (every title non-empty, no tabs).
- `images/<item_id>.jpg`: one image per item (JPEG, quality {quality}).

Item ids look like `i0001`, user ids like `u0001`.
"""


def _disk_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def generate_demo(output: Path = DEFAULT_OUTPUT, seed: int = DEFAULT_SEED) -> DemoSummary:
    """Write demo.inter, demo.item, images/ and README.md under ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    items = make_catalog(seed)
    histories = make_histories(items, seed)
    write_item_file(items, output / f"{DATASET_NAME}.item")
    write_inter_file(items, histories, output / f"{DATASET_NAME}.inter", seed)
    write_images(items, output / "images", seed)
    interactions = sum(len(h) for h in histories)
    counts = np.sort(np.bincount([i for h in histories for i in h], minlength=len(items)))[::-1]
    readme = README_TEXT.format(
        seed=seed, items=len(items), users=len(histories), interactions=interactions,
        min_len=MIN_LEN, max_len=MAX_LEN, size=IMAGE_SIZE, quality=JPEG_QUALITY,
        top_share=counts[: len(items) // 10].sum() / interactions,
        rare=int((counts < 5).sum()), median=int(np.median(counts)),
    )
    (output / "README.md").write_text(readme, encoding="utf-8")
    return DemoSummary(len(histories), len(items), interactions, _disk_bytes(output))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args(argv)
    summary = generate_demo(args.output, args.seed)
    print(
        f"demo dataset in {args.output}: {summary.users} users, {summary.items} items, "
        f"{summary.interactions} interactions, {summary.bytes_on_disk / 1e6:.2f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
