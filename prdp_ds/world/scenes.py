"""A synthetic captioned-image world: 32x32 RGB scenes of one shape on a plain background.

Attributes (each a label index into its tuple below): colour (6), shape (3), size (2), position (5),
background (2). Captions are compositional, e.g. "a small red triangle in the top left on a dark
background"; colour and shape are always stated, size / position / background may be omitted, and
an optional prefix ("a picture of ...") varies the wording. `parse_caption` maps a caption back to
its stated attributes (and raises a ValueError naming a caption it cannot parse).

Scenes are deterministic from a seed (`sample_scenes(n, seed)`), rendered in a vectorized way as
torch tensors in [0, 1] (`render`), with small jitter of position, size and colours.

Held-out combinations: the (colour, shape) pairs in HELD_OUT_PAIRS never appear in pretraining
scenes (`sample_scenes(..., include_held_out=False)`, the default), in `world_small` or in
`world_large`; `world_unseen` consists only of them (`world_seen`: 30 seen prompts in the same wording).
"""

import itertools
import math
import re

import numpy as np
import torch

RES = 32
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOUR_RGB = torch.tensor(
    [
        (0.90, 0.10, 0.10),
        (1.00, 0.55, 0.05),
        (0.95, 0.90, 0.10),
        (0.10, 0.70, 0.20),
        (0.12, 0.30, 0.95),
        (0.60, 0.18, 0.85),
    ]
)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
SIZE_RADIUS = (5.0, 9.0)  # equal-area circle radius in pixels
POSITIONS = ("centre", "top left", "top right", "bottom left", "bottom right")
POSITION_XY = torch.tensor([(16.0, 16.0), (10.0, 10.0), (22.0, 10.0), (10.0, 22.0), (22.0, 22.0)])  # (x, y), y down
BACKGROUNDS = ("light", "dark")
BACKGROUND_GREY = (0.86, 0.14)
PREFIXES = ("", "an image of ", "a picture of ", "a drawing of ")
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}
HELD_OUT_PAIRS = (("orange", "circle"), ("green", "square"), ("purple", "triangle"))
_HELD = torch.zeros(len(COLOURS), len(SHAPES), dtype=torch.bool)
for _c, _s in HELD_OUT_PAIRS:
    _HELD[COLOURS.index(_c), SHAPES.index(_s)] = True


def is_held_out(colour, shape):
    return (colour, shape) in HELD_OUT_PAIRS


def sample_scenes(n, seed, include_held_out=False, jitter=True):
    """n random scenes -> dict of (n,) long labels per attribute plus continuous jitter params.

    Deterministic in (n, seed). Held-out (colour, shape) pairs are redrawn unless include_held_out.
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = {k: torch.randint(len(v), (n,), generator=g) for k, v in ATTRIBUTES.items()}
    if not include_held_out:
        for _ in range(100):
            bad = _HELD[labels["colour"], labels["shape"]]
            if not bad.any():
                break
            labels["colour"][bad] = torch.randint(len(COLOURS), (int(bad.sum()),), generator=g)
    u = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1  # noqa: E731, uniform in [-1, 1]
    scale = 1.0 if jitter else 0.0
    labels["offset"] = u(n, 2) * 1.5 * scale  # pixels
    labels["scale"] = 1 + u(n) * 0.08 * scale  # radius factor
    labels["tint"] = u(n, 3) * 0.05 * scale  # colour jitter
    labels["bg_tint"] = u(n, 3) * 0.04 * scale  # background jitter
    return labels


def scenes_from_attributes(attrs, seed=0, jitter=True):
    """A list of attribute dicts (names, as parse_caption returns; missing size/position/background
    are drawn at random) -> labels as sample_scenes returns."""
    n = len(attrs)
    labels = sample_scenes(n, seed, include_held_out=True, jitter=jitter)
    for k, values in ATTRIBUTES.items():
        for i, a in enumerate(attrs):
            if a.get(k) is not None:
                labels[k][i] = values.index(a[k])
    return labels


def render(labels):
    """labels (from sample_scenes) -> (n, 3, 32, 32) float images in [0, 1], plus (n, 32, 32) alpha."""
    colour, shape, size, pos, bg = (labels[k] for k in ATTRIBUTES)
    n = colour.shape[0]
    centre = POSITION_XY[pos] + labels["offset"]  # (n, 2)
    r = torch.tensor(SIZE_RADIUS)[size] * labels["scale"]  # (n,)
    coords = torch.arange(RES, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, RES) - centre[:, 0].view(n, 1, 1)  # (n, 1, W)
    dy = coords.view(1, RES, 1) - centre[:, 1].view(n, 1, 1)  # (n, H, 1)
    rr = r.view(n, 1, 1)
    d_circle = torch.sqrt(dx**2 + dy**2) - rr
    d_square = torch.maximum(dx.abs(), dy.abs()) - rr * (math.sqrt(math.pi) / 2)  # equal area
    R = rr * math.sqrt(4 * math.pi / (3 * math.sqrt(3)))  # equal-area circumradius
    c30 = math.sqrt(3) / 2
    d_tri = torch.maximum(torch.maximum(dy, c30 * dx - 0.5 * dy), -c30 * dx - 0.5 * dy) - R / 2
    d = torch.where((shape == 0).view(n, 1, 1), d_circle, torch.where((shape == 1).view(n, 1, 1), d_square, d_tri))
    alpha = (0.5 - d).clamp(0, 1)  # 1-pixel antialiasing
    fg = (COLOUR_RGB[colour] + labels["tint"]).clamp(0, 1).view(n, 3, 1, 1)
    back = (torch.tensor(BACKGROUND_GREY)[bg].view(n, 1) + labels["bg_tint"]).clamp(0, 1).view(n, 3, 1, 1)
    a = alpha.unsqueeze(1)
    return back * (1 - a) + fg * a, alpha


def caption_from(colour, shape, size=None, position=None, background=None, prefix=""):
    """Attribute names -> caption, e.g. 'a small red triangle in the top left on a dark background'."""
    words = ([size] if size else []) + [colour, shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    text = f"{prefix}{article} {' '.join(words)}"
    if position:
        text += f" in the {position}"
    if background:
        text += f" on a {background} background"
    return text


def captions(labels, seed=None, p_state=0.7):
    """Captions of the scenes in `labels`. With seed=None every attribute is stated and there is no
    prefix; with a seed, size/position/background are each stated with probability p_state and a
    random prefix is used (the pretraining captions)."""
    n = labels["colour"].shape[0]
    rng = np.random.default_rng(seed) if seed is not None else None
    out = []
    for i in range(n):
        names = {k: ATTRIBUTES[k][int(labels[k][i])] for k in ATTRIBUTES}
        prefix = ""
        if rng is not None:
            for k in ("size", "position", "background"):
                if rng.random() >= p_state:
                    names[k] = None
            prefix = PREFIXES[rng.integers(len(PREFIXES))]
        out.append(caption_from(**names, prefix=prefix))
    return out


_PATTERN = re.compile(
    r"^(?:(?:an image|a picture|a drawing) of )?an? (?:(?P<size>small|large) )?(?P<colour>"
    + "|".join(COLOURS)
    + r") (?P<shape>"
    + "|".join(SHAPES)
    + r")(?: in the (?P<position>"
    + "|".join(POSITIONS)
    + r"))?(?: on an? (?P<background>"
    + "|".join(BACKGROUNDS)
    + r") background)?\.?$"
)


class CaptionParseError(ValueError):
    pass


def parse_caption(caption):
    """Caption -> dict of its stated attributes (names; unstated ones absent). Raises
    CaptionParseError naming the caption when it is not in the world's grammar."""
    m = _PATTERN.match(" ".join(str(caption).lower().split()))
    if m is None:
        raise CaptionParseError(
            f"cannot parse prompt {caption!r} as a world caption; expected e.g. "
            f"'a small red triangle in the top left on a dark background' (colours {COLOURS}, shapes {SHAPES}, "
            f"sizes {SIZES}, positions {POSITIONS}, backgrounds {BACKGROUNDS})"
        )
    return {k: v for k, v in m.groupdict().items() if v is not None}


def all_captions(held_out=False):
    """Every caption of the grammar whose (colour, shape) pair is (held_out=True) or is not held out."""
    out = []
    for prefix, colour, shape, size, position, background in itertools.product(
        PREFIXES, COLOURS, SHAPES, (None,) + SIZES, (None,) + POSITIONS, (None,) + BACKGROUNDS
    ):
        if is_held_out(colour, shape) == held_out:
            out.append(caption_from(colour, shape, size, position, background, prefix))
    return out


def world_small_prompts():
    """18 prompts: each seen (colour, shape) pair once (15), plus 3 with a background; size and
    position cycle so each value appears."""
    out, i = [], 0
    for colour in COLOURS:
        for shape in SHAPES:
            if is_held_out(colour, shape):
                continue
            out.append(caption_from(colour, shape, SIZES[i % 2], POSITIONS[i % 5]))
            i += 1
    out += [
        caption_from("red", "square", "large", "centre", "dark"),
        caption_from("blue", "circle", "small", "top right", "light"),
        caption_from("yellow", "triangle", "large", "bottom left", "dark"),
    ]
    return out


def world_large_prompts():
    """Every caption of the grammar whose (colour, shape) pair is not held out."""
    return all_captions(held_out=False)


def world_demo_prompts():
    """The demo's 4 prompts: a seen (colour, shape) pair in each corner, large and small alternating. The base model
    gets colour, shape and size right and the position about 4 times in 10: what the demo's reward teaches."""
    return [
        caption_from("red", "circle", "large", "top left"),
        caption_from("blue", "square", "small", "bottom right"),
        caption_from("yellow", "triangle", "large", "top right"),
        caption_from("green", "circle", "small", "bottom left"),
    ]


def world_seen_prompts():
    """30 fully stated prompts of seen (colour, shape) pairs, two (size, position) each, in world_unseen's
    wording: the seen half of a seen/unseen comparison (each is also a world_large prompt)."""
    seen = [(c, s) for c in COLOURS for s in SHAPES if not is_held_out(c, s)]
    return [
        caption_from(c, s, SIZES[(i + j) % 2], POSITIONS[(2 * i + 3 * j) % 5])
        for i, (c, s) in enumerate(seen)
        for j in range(2)
    ]


def world_unseen_prompts():
    """The held-out (colour, shape) pairs x sizes x positions, fully stated, no prefix: 30 prompts."""
    return [caption_from(c, s, size, pos) for c, s in HELD_OUT_PAIRS for size in SIZES for pos in POSITIONS]
