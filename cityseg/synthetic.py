"""Synthetic Cityscapes: write a small street-scene tree in the exact Cityscapes layout and naming.

Each image is a random street scene described as Cityscapes polygons (sky, road toward a vanishing
point, sidewalks, facades, vegetation, street furniture, vehicles, people and void regions).  The
polygons are written as an official ``*_gtFine_polygons.json``; the three label PNGs are drawn from it
by cityscapesscripts' own ``json2labelImg``; the RGB image is then painted from the labelIds image read
back from disk (per-class colour and texture, per-instance colour, global brightness/contrast and
noise), so image and labels agree pixel for pixel.  Everything follows from ``(seed, split, index)``.

    python -m cityseg.synthetic --out DIR --num-train 20 --num-val 5 --size 256x512 --seed 0
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val", "test")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
}
FRAME = 19  # the annotated frame of every Cityscapes snippet
LAYOUT_DIRS = {
    "downloads": ("leftImg8bit", "gtFine"),
    "trainvaltest": ("leftImg8bit_trainvaltest/leftImg8bit", "gtFine_trainvaltest/gtFine"),
}
MIN_SIDE = 16
DEPTH_UNIT = 12.0  # metres per unit of inverse depth 1/t
VOID_LABELS = ("ego vehicle", "rectification border", "out of roi")

Point = tuple[float, float]
Poly = list[Point]

# Base RGB per label name: plausible, deliberately not the Cityscapes palette; some classes overlap.
BASE_COLOURS: dict[str, tuple[int, int, int]] = {
    "unlabeled": (0, 0, 0), "ego vehicle": (40, 40, 46), "rectification border": (0, 0, 0),
    "out of roi": (12, 12, 12), "static": (110, 100, 90), "dynamic": (120, 92, 62),
    "ground": (115, 105, 90), "road": (88, 88, 92), "sidewalk": (135, 128, 122),
    "parking": (104, 100, 100), "rail track": (90, 80, 70), "building": (128, 116, 104),
    "wall": (140, 130, 114), "fence": (124, 118, 98), "guard rail": (150, 150, 156),
    "pole": (104, 104, 110), "traffic light": (46, 46, 42), "traffic sign": (200, 190, 60),
    "vegetation": (72, 112, 48), "terrain": (122, 132, 74), "sky": (140, 176, 216),
    "person": (90, 72, 70), "rider": (110, 62, 60), "car": (80, 80, 118), "truck": (150, 150, 140),
    "bus": (180, 160, 60), "train": (170, 62, 52), "motorcycle": (60, 60, 70), "bicycle": (72, 52, 50),
    "license plate": (228, 228, 222),
}
# Per-instance colour jitter (std of a normal offset) and, for some classes, a palette to pick from.
JITTER = {"building": 22.0, "vegetation": 12.0, "terrain": 12.0, "sky": 8.0, "road": 6.0,
          "sidewalk": 10.0, "wall": 16.0, "fence": 14.0, "static": 20.0, "dynamic": 25.0}
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "car": ((200, 200, 205), (30, 30, 35), (238, 238, 238), (150, 22, 26), (32, 52, 120),
            (92, 92, 98), (42, 72, 52), (120, 96, 60)),
    "person": ((30, 30, 40), (60, 70, 110), (150, 42, 42), (200, 190, 170), (82, 62, 42), (42, 92, 62)),
    "rider": ((30, 30, 40), (200, 120, 30), (150, 42, 42), (60, 70, 110), (220, 220, 60)),
    "traffic sign": ((32, 82, 182), (200, 32, 32), (232, 200, 42), (235, 235, 235)),
    "bus": ((232, 200, 42), (200, 42, 42), (42, 112, 192), (230, 230, 230)),
    "train": ((200, 42, 42), (230, 230, 220), (42, 112, 62)),
    "truck": ((230, 230, 230), (42, 42, 42), (160, 42, 42), (52, 92, 162)),
    "motorcycle": ((30, 30, 30), (160, 30, 30), (40, 40, 120)),
    "bicycle": ((30, 30, 30), (40, 80, 40), (120, 40, 40), (150, 150, 150)),
}
PERSON_SHAPE: Poly = [(-0.13, 0.0), (-0.06, 0.0), (0.0, 0.42), (0.06, 0.0), (0.13, 0.0), (0.1, 0.5),
                      (0.16, 0.78), (0.1, 0.82), (0.06, 0.84), (0.07, 0.93), (0.0, 1.0), (-0.07, 0.93),
                      (-0.06, 0.84), (-0.1, 0.82), (-0.16, 0.78), (-0.1, 0.5)]
CAR_SHAPE: Poly = [(-0.5, 0.1), (-0.5, 0.55), (-0.42, 0.62), (-0.32, 1.0), (0.32, 1.0), (0.42, 0.62),
                   (0.5, 0.55), (0.5, 0.1), (0.4, 0.0), (-0.4, 0.0)]


# ----------------------------------------------------------------------------- scene geometry


@dataclass
class Scene:
    """A street scene: camera geometry plus the ordered list of (label, polygon) objects."""

    h: int
    w: int
    hz: float  # horizon row
    vx: float  # vanishing-point column
    cam_h: float  # camera height (m); ground at t == 1 projects to the bottom row
    road: tuple[float, float]  # lateral road edges (m)
    side: tuple[float, float]  # lateral facade lines (m), left < 0 < right
    t_far: float = 0.04
    objects: list[tuple[str, Poly]] = field(default_factory=list)

    @property
    def ppm(self) -> float:
        """Pixels per metre at inverse depth t == 1."""
        return (self.h - self.hz) / self.cam_h

    def project(self, x: float, z: float, t: float) -> Point:
        """Image point of lateral offset x, height z (m) at inverse depth t."""
        return (self.vx + x * self.ppm * t, self.hz + (self.cam_h - z) * self.ppm * t)

    def add(self, label: str, pts: Sequence[Point]) -> None:
        """Append an object drawn over everything added before it."""
        self.objects.append((label, list(pts)))


def _ground(sc: Scene, x0: float, x1: float, t0: float, t1: float) -> Poly:
    """Ground-plane quad between lateral x0..x1 and inverse depths t0 (far) .. t1 (near)."""
    return [sc.project(x0, 0, t1), sc.project(x1, 0, t1), sc.project(x1, 0, t0), sc.project(x0, 0, t0)]


def _facade(sc: Scene, x: float, t0: float, t1: float, z0: float, z_far: float, z_near: float) -> Poly:
    """Vertical quad parallel to the road at lateral x, between inverse depths t0 (far) and t1 (near)."""
    return [sc.project(x, z0, t1), sc.project(x, z0, t0), sc.project(x, z_far, t0), sc.project(x, z_near, t1)]


def _billboard(sc: Scene, x: float, t: float, shape: Poly, sx: float, sz: float, z0: float = 0.0) -> Poly:
    """A shape facing the camera at (x, t): shape coordinates scaled by sx, sz metres."""
    return [sc.project(x + px * sx, z0 + pz * sz, t) for px, pz in shape]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int, rng: np.random.Generator | None = None,
             wobble: float = 0.0) -> Poly:
    """Polygon approximating an ellipse in metres (optionally with random radial wobble)."""
    angles = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    rad = 1.0 + (rng.uniform(-wobble, wobble, n) if rng is not None and wobble else 0.0)
    return [(cx + rx * r * math.cos(a), cy + ry * r * math.sin(a)) for a, r in zip(angles, np.broadcast_to(rad, n))]


def _clip_polygon(pts: Sequence[Point], w: int, h: int) -> list[list[int]] | None:
    """Clip to the image (Sutherland-Hodgman), round to ints; None if nothing with area remains."""
    edges = ((0, 0.0, 1), (0, w - 1.0, -1), (1, 0.0, 1), (1, h - 1.0, -1))
    poly = [(float(x), float(y)) for x, y in pts]
    for axis, bound, sign in edges:
        if not poly:
            return None
        out: list[Point] = []
        for i, cur in enumerate(poly):
            prev = poly[i - 1]
            cur_in, prev_in = (cur[axis] - bound) * sign >= 0, (prev[axis] - bound) * sign >= 0
            if cur_in != prev_in:
                f = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + f * (cur[0] - prev[0]), prev[1] + f * (cur[1] - prev[1])))
            if cur_in:
                out.append(cur)
        poly = out
    ints: list[list[int]] = []
    for x, y in poly:
        p = [int(round(x)), int(round(y))]
        if not ints or p != ints[-1]:
            ints.append(p)
    while len(ints) > 1 and ints[0] == ints[-1]:
        ints.pop()
    if len(ints) < 3:
        return None
    area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(ints, ints[1:] + ints[:1]))
    return ints if area2 != 0 else None


# ----------------------------------------------------------------------------- scene content


def _make_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    """Random camera and street cross-section."""
    offset = rng.uniform(-1.2, 1.2)
    left, right = offset - rng.uniform(4.0, 6.5), offset + rng.uniform(4.0, 6.5)
    side = (left - rng.uniform(3.0, 6.5), right + rng.uniform(3.0, 6.5))
    return Scene(h=h, w=w, hz=h * rng.uniform(0.36, 0.48), vx=w * rng.uniform(0.42, 0.58),
                 cam_h=rng.uniform(3.0, 4.0), road=(left, right), side=side, t_far=rng.uniform(0.03, 0.06))


def _add_ground(sc: Scene, rng: np.random.Generator) -> None:
    """Sky, ground base, sidewalks, terrain strips, road and parking bays."""
    w, h = sc.w, sc.h
    sc.add("sky", [(0, 0), (w, 0), (w, sc.hz + 2), (0, sc.hz + 2)])
    sc.add("terrain" if rng.random() < 0.5 else "sidewalk", [(0, sc.hz), (w, sc.hz), (w, h), (0, h)])
    (left, right), (sl, sr) = sc.road, sc.side
    for inner, outer in ((left, sl), (right, sr)):
        walk = inner + (outer - inner) * rng.uniform(0.45, 0.8)
        sc.add("sidewalk", _ground(sc, min(inner, outer), max(inner, outer), 1e-3, 2.0))
        if rng.random() < 0.6:
            sc.add("terrain", _ground(sc, min(walk, outer), max(walk, outer), 1e-3, 2.0))
    sc.add("road", _ground(sc, left, right, 1e-3, 2.0))
    if rng.random() < 0.35:
        x = left if rng.random() < 0.5 else right - 2.2
        t1 = rng.uniform(0.2, 0.9)
        sc.add("parking", _ground(sc, x, x + 2.2, t1 / rng.uniform(1.5, 3.0), t1))
    if rng.random() < 0.2:
        t1 = rng.uniform(0.3, 1.0)
        sc.add("ground", _ground(sc, sl, left, t1 / rng.uniform(1.3, 2.0), t1))


def _add_facades(sc: Scene, rng: np.random.Generator) -> None:
    """Rows of buildings (with gaps of trees or sky) along both sides, plus walls, fences, guard rails."""
    for x in sc.side:
        d = 0.4
        while d < 1.0 / sc.t_far:
            d_next = min(d + rng.uniform(0.6, 2.5), 1.0 / sc.t_far)
            t1, t0 = 1.0 / d, 1.0 / d_next
            roll = rng.random()
            if roll < 0.72:
                z = rng.uniform(8.0, 24.0)
                sc.add("building", _facade(sc, x, t0, t1, 0.0, z * rng.uniform(0.9, 1.1), z))
            elif roll < 0.9:
                z = rng.uniform(5.0, 12.0)
                sc.add("vegetation", _facade(sc, x, t0, t1, 0.0, z * rng.uniform(0.7, 1.0), z))
            d = d_next
    for x_road, x_side in zip(sc.road, sc.side):
        _add_barriers(sc, rng, x_road, x_side)


def _add_barriers(sc: Scene, rng: np.random.Generator, x_road: float, x_side: float) -> None:
    """Walls and fences near the facade line, a guard rail at the road edge (each sometimes)."""
    for label, prob, zmax in (("wall", 0.45, 2.2), ("fence", 0.45, 1.8)):
        if rng.random() < prob:
            x = x_side + (x_road - x_side) * rng.uniform(0.05, 0.3)
            t1 = rng.uniform(0.3, 1.4)
            z = rng.uniform(0.8, zmax)
            sc.add(label, _facade(sc, x, t1 / rng.uniform(1.5, 4.0), t1, 0.0, z, z))
    if rng.random() < 0.15:
        t1 = rng.uniform(0.3, 1.2)
        sc.add("guard rail", _facade(sc, x_road, t1 / rng.uniform(1.5, 3.0), t1, 0.3, 0.8, 0.8))


def _far_band(sc: Scene, rng: np.random.Generator) -> list[tuple[str, Poly]]:
    """Buildings and trees closing the street at the far end (behind everything else)."""
    items: list[tuple[str, Poly]] = []
    x = sc.side[0]
    while x < sc.side[1]:
        width = rng.uniform(6.0, 20.0)
        label = "building" if rng.random() < 0.7 else "vegetation"
        z = rng.uniform(6.0, 30.0)
        rect = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
        items.append((label, _billboard(sc, x, sc.t_far, rect, min(width, sc.side[1] - x), z)))
        x += width
    return items


def _lateral(rng: np.random.Generator, sc: Scene, where: str) -> float:
    """A lateral position on the road, on a sidewalk, or near the kerb."""
    (left, right), (sl, sr) = sc.road, sc.side
    if where == "road":
        return rng.uniform(left + 1.2, right - 1.2)
    if where == "kerb":
        return left - rng.uniform(0.3, 0.9) if rng.random() < 0.5 else right + rng.uniform(0.3, 0.9)
    return rng.uniform(sl + 0.5, left - 0.3) if rng.random() < 0.5 else rng.uniform(right + 0.3, sr - 0.5)


def _pole(sc: Scene, rng: np.random.Generator, t: float) -> list[tuple[str, Poly]]:
    """A pole at the kerb, with a traffic sign and/or traffic light on top (often)."""
    x = _lateral(rng, sc, "kerb")
    z = rng.uniform(3.0, 6.0)
    px_w = max(0.15 * sc.ppm * t, 1.0) / (sc.ppm * t)  # at least one pixel wide
    rect = [(-0.5, 0.0), (0.5, 0.0), (0.5, 1.0), (-0.5, 1.0)]
    items = [("pole", _billboard(sc, x, t, rect, px_w, z))]
    roll = rng.random()
    if roll < 0.45 or roll > 0.85:
        size = rng.uniform(0.5, 0.9)
        shape = rng.integers(3)
        outline = (_ellipse(0, 0, 0.5, 0.5, 12) if shape == 0 else
                   [(-0.5, -0.45), (0.5, -0.45), (0.0, 0.5)] if shape == 1 else rect)
        items.append(("traffic sign", _billboard(sc, x, t, outline, size, size, z - size * 0.5)))
    if roll >= 0.45:
        lw, lh = rng.uniform(0.3, 0.45), rng.uniform(0.8, 1.2)
        items.append(("traffic light", _billboard(sc, x, t, rect, lw, lh, z - lh - 0.2)))
    return items


def _tree(sc: Scene, rng: np.random.Generator, t: float) -> list[tuple[str, Poly]]:
    """A tree on the sidewalk: trunk and wobbly crown, all vegetation."""
    x = _lateral(rng, sc, "walk")
    z, r = rng.uniform(4.0, 8.0), rng.uniform(1.2, 3.0)
    trunk = [(-0.5, 0.0), (0.5, 0.0), (0.5, 1.0), (-0.5, 1.0)]
    crown = [sc.project(x + px, pz, t) for px, pz in _ellipse(0.0, z - r, r, r * 0.9, 16, rng, 0.2)]
    return [("vegetation", _billboard(sc, x, t, trunk, 0.35, z - r)), ("vegetation", crown)]


def _vehicle(sc: Scene, rng: np.random.Generator, t: float, label: str) -> list[tuple[str, Poly]]:
    """A vehicle seen from behind (car/truck/bus) or a tram seen from the side (train)."""
    x = _lateral(rng, sc, "road")
    if label == "train":
        x = sc.road[0] + 1.5 if x < 0.5 * sum(sc.road) else sc.road[1] - 1.5
        return [("train", _facade(sc, x, t / rng.uniform(2.0, 3.5), t, 0.0, 3.6, 3.6))]
    rect = [(-0.5, 0.0), (0.5, 0.0), (0.5, 1.0), (-0.5, 1.0)]
    if label == "car":
        wm = rng.uniform(1.7, 2.0)
        items = [("car", _billboard(sc, x, t, CAR_SHAPE, wm, wm * rng.uniform(0.72, 0.85)))]
        if rng.random() < 0.6:
            items.append(("license plate", _billboard(sc, x, t, rect, 0.52, 0.12, 0.3)))
        return items
    wm, hm = (2.4, rng.uniform(2.8, 3.6)) if label == "truck" else (2.55, rng.uniform(2.9, 3.3))
    return [(label, _billboard(sc, x, t, rect, wm, hm))]


def _two_wheeler(sc: Scene, rng: np.random.Generator, t: float, ridden: bool) -> list[tuple[str, Poly]]:
    """A bicycle or motorcycle (side view), with a rider on it or parked on the sidewalk."""
    x = _lateral(rng, sc, "road" if ridden else "walk")
    label = "motorcycle" if rng.random() < 0.45 else "bicycle"
    r = 0.33 if label == "bicycle" else 0.32
    items = [(label, [sc.project(x + px, pz, t) for px, pz in _ellipse(cx, r, r, r, 10)]) for cx in (-0.55, 0.55)]
    body = ([(-0.55, r), (0.0, r), (0.35, 0.85), (-0.2, 0.85)] if label == "bicycle" else
            [(-0.7, r), (0.6, r), (0.45, 0.95), (-0.1, 0.9), (-0.6, 0.75)])
    items.append((label, [sc.project(x + px, pz, t) for px, pz in body]))
    if ridden:
        items.append(("rider", _billboard(sc, x, t, PERSON_SHAPE, 1.5, 1.55, 0.25)))
    return items


def _person(sc: Scene, rng: np.random.Generator, t: float) -> list[tuple[str, Poly]]:
    """A pedestrian on a sidewalk or crossing the road."""
    x = _lateral(rng, sc, "road" if rng.random() < 0.25 else "walk")
    hm = rng.uniform(1.55, 1.95)
    return [("person", _billboard(sc, x, t, PERSON_SHAPE, hm * rng.uniform(0.9, 1.15), hm))]


def _blob(sc: Scene, rng: np.random.Generator, t: float) -> list[tuple[str, Poly]]:
    """A static (bins, boxes) or dynamic (strollers, carts) void object on a sidewalk."""
    x, s = _lateral(rng, sc, "walk"), rng.uniform(0.4, 1.2)
    label = "static" if rng.random() < 0.6 else "dynamic"
    return [(label, [sc.project(x + px, pz, t) for px, pz in _ellipse(0, s * 0.5, s * 0.5, s * 0.5, 8, rng, 0.3)])]


def _add_objects(sc: Scene, rng: np.random.Generator) -> None:
    """Street furniture, vehicles and people, drawn far to near."""
    counts = {"pole": rng.integers(1, 5), "tree": rng.integers(0, 4), "car": rng.integers(1, 8),
              "person": rng.integers(0, 5), "blob": rng.integers(0, 3), "rider": int(rng.random() < 0.55),
              "parked": int(rng.random() < 0.35), "truck": int(rng.random() < 0.4),
              "bus": int(rng.random() < 0.35), "train": int(rng.random() < 0.3)}
    makers: dict[str, Callable[[float], list[tuple[str, Poly]]]] = {
        "pole": lambda t: _pole(sc, rng, t), "tree": lambda t: _tree(sc, rng, t),
        "car": lambda t: _vehicle(sc, rng, t, "car"), "truck": lambda t: _vehicle(sc, rng, t, "truck"),
        "bus": lambda t: _vehicle(sc, rng, t, "bus"), "train": lambda t: _vehicle(sc, rng, t, "train"),
        "person": lambda t: _person(sc, rng, t), "blob": lambda t: _blob(sc, rng, t),
        "rider": lambda t: _two_wheeler(sc, rng, t, True), "parked": lambda t: _two_wheeler(sc, rng, t, False),
    }
    far = {"pole": 8.0, "tree": 8.0, "blob": 6.0, "person": 5.0, "rider": 5.0, "parked": 5.0}
    placed: list[tuple[float, int, list[tuple[str, Poly]]]] = [(sc.t_far, 0, _far_band(sc, rng))]
    for kind, n in counts.items():
        for _ in range(int(n)):
            t = 1.0 / rng.uniform(1.1, far.get(kind, 6.0))
            placed.append((t, len(placed), makers[kind](t)))
    for _, _, items in sorted(placed, key=lambda p: (p[0], p[1])):
        for label, pts in items:
            sc.add(label, pts)


def _add_void(sc: Scene, rng: np.random.Generator) -> None:
    """Ego-vehicle hood at the bottom, sometimes rectification border / out-of-roi strips at the edges."""
    w, h = sc.w, sc.h
    if rng.random() < 0.85:
        top, side = h * (1.0 - rng.uniform(0.05, 0.13)), h * (1.0 - rng.uniform(0.0, 0.04))
        xs = np.linspace(0.0, w, 9)
        curve = [(float(x), side + (top - side) * (1.0 - ((x - w / 2) / (w / 2)) ** 2)) for x in xs]
        sc.add("ego vehicle", [(w, h + 1), (-1, h + 1)] + [(-1, curve[0][1])] + curve[1:-1] + [(w, curve[-1][1])])
    if rng.random() < 0.3:
        bw = max(1.0, w * rng.uniform(0.004, 0.015))
        sc.add("rectification border", [(-1, -1), (bw, -1), (bw, h), (-1, h)])
        sc.add("rectification border", [(w - 1 - bw, -1), (w, -1), (w, h), (w - 1 - bw, h)])
    if rng.random() < 0.2:
        bh = max(1.0, h * rng.uniform(0.01, 0.03))
        sc.add("out of roi", [(-1, h - 1 - bh), (w, h - 1 - bh), (w, h), (-1, h)])


def make_scene(rng: np.random.Generator, h: int, w: int) -> Scene:
    """Build one random street scene of size h x w."""
    sc = _make_scene(rng, h, w)
    _add_ground(sc, rng)
    _add_facades(sc, rng)
    _add_objects(sc, rng)
    _add_void(sc, rng)
    return sc


def scene_json(sc: Scene, void_only: bool = False) -> dict:
    """The scene as an official gtFine polygons dict (clipped int polygons; degenerate ones dropped)."""
    objects = []
    for label, pts in sc.objects:
        if void_only and label not in VOID_LABELS:
            continue
        poly = _clip_polygon(pts, sc.w, sc.h)
        if poly is not None:
            objects.append({"label": label, "polygon": poly})
    return {"imgHeight": sc.h, "imgWidth": sc.w, "objects": objects}


# ----------------------------------------------------------------------------- rendering


@dataclass
class _Ctx:
    """What the per-class textures may look at."""

    sc: Scene
    rng: np.random.Generator
    noise: tuple[np.ndarray, np.ndarray, np.ndarray]  # coarse, mid, fine smooth noise fields (flat)
    inst: np.ndarray  # flat instance index per pixel (0 = none)
    top: np.ndarray  # per instance: top row of its polygon
    height: np.ndarray  # per instance: polygon height in rows
    params: dict[str, float]
    plate: np.ndarray  # per instance: True for license plates (labelled car, painted as plates)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise of size h x w with features ~cell pixels."""
    cell = max(1, cell)
    grid = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    if cell == 1:
        return grid[:h, :w].copy()
    return cv2.resize(grid, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_LINEAR)[cell:cell + h, cell:cell + w]


def _instance_map(sc: Scene, objects: list[dict]) -> tuple[np.ndarray, list[str]]:
    """Draw object indices with PIL (same rasteriser as json2labelImg), including license plates."""
    img = Image.new("I", (sc.w, sc.h), 0)
    draw = ImageDraw.Draw(img)
    for k, obj in enumerate(objects, start=1):
        draw.polygon([tuple(p) for p in obj["polygon"]], fill=k)
    return np.asarray(img, dtype=np.int32), ["unlabeled"] + [o["label"] for o in objects]


def _instance_offsets(rng: np.random.Generator, labels: list[str]) -> np.ndarray:
    """Per-instance RGB offset from its class base colour (palette pick and/or jitter)."""
    off = np.zeros((len(labels), 3), np.float32)
    for k, label in enumerate(labels[1:], start=1):
        base = np.array(BASE_COLOURS[label], np.float32)
        if label == "license plate":  # its pixels are labelled car: offset from the car base colour
            off[k] = base - np.array(BASE_COLOURS["car"], np.float32) + rng.normal(0, 6, 3)
        elif label in PALETTES:
            pal = PALETTES[label]
            off[k] = np.array(pal[rng.integers(len(pal))], np.float32) - base + rng.normal(0, 8, 3)
        else:
            sigma = JITTER.get(label, 7.0)
            off[k] = rng.normal(0, sigma * 0.4, 3) + rng.normal(0, sigma)
    return off


def _ground_coords(ctx: _Ctx, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lateral metres and depth (in DEPTH_UNIT metres) of ground pixels."""
    sc = ctx.sc
    t = np.maximum((ys - sc.hz) / (sc.h - sc.hz), 2e-3)
    return (xs - sc.vx) / (sc.ppm * t), DEPTH_UNIT / t


def _facade_coords(ctx: _Ctx, ys: np.ndarray, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth (m) and height (m) of pixels on the side facades."""
    sc = ctx.sc
    x_side = np.where(xs < sc.vx, sc.side[0], sc.side[1])
    t = np.maximum((xs - sc.vx) / (x_side * sc.ppm), 2e-3)
    return np.minimum(DEPTH_UNIT / t, 1e4), sc.cam_h - (ys - sc.hz) / (sc.ppm * t)


def _rel_height(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """0 at the top of each pixel's instance, 1 at its bottom."""
    inst = ctx.inst[idx]
    return (ys - ctx.top[inst]) / np.maximum(ctx.height[inst], 1.0)


Tex = tuple[np.ndarray, np.ndarray | None]


def _tex_sky(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    mult = 0.8 + 0.3 * np.clip(ys / max(ctx.sc.hz, 1.0), 0, 1.2)
    clouds = np.clip(ctx.noise[0][idx] - 0.3, 0, None) * ctx.params["clouds"]
    return mult, np.repeat(clouds[:, None], 3, axis=1)


def _tex_road(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    lat, depth = _ground_coords(ctx, ys, xs)
    mark = (np.abs(lat - ctx.params["lane_x"]) < 0.09) & ((depth / 6.0) % 1.0 < 0.5)
    if ctx.params["edge_lines"] > 0.5:
        left, right = ctx.sc.road
        mark |= (np.abs(lat - left - 0.3) < 0.08) | (np.abs(lat - right + 0.3) < 0.08)
    add = np.zeros((len(idx), 3), np.float32)
    add[mark] = 105.0
    return 1.0 + 0.07 * ctx.noise[0][idx] + 0.05 * ctx.noise[2][idx], add


def _tex_tiles(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    lat, depth = _ground_coords(ctx, ys, xs)
    size = ctx.params["tile"]
    line = ((lat / size) % 1.0 < 0.08) | ((depth / size) % 1.0 < 0.08)
    return np.where(line & (depth < 120), 0.82, 1.0) + 0.06 * ctx.noise[1][idx], None


def _tex_building(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    depth, z = _facade_coords(ctx, ys, xs)
    p = ctx.params
    win = ((depth / p["win_d"]) % 1.0 < p["win_frac"]) & ((z / p["floor"]) % 1.0 > 0.35) & (z > 2.5)
    add = np.zeros((len(idx), 3), np.float32)
    add[win] = (-45.0, -35.0, -15.0)
    return np.where(win, 0.6, 1.0) + 0.08 * ctx.noise[1][idx], add


def _tex_leafy(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    leaf = 0.22 * ctx.noise[2][idx] + 0.12 * ctx.noise[1][idx] + 0.08 * ctx.noise[0][idx]
    add = np.zeros((len(idx), 3), np.float32)
    add[:, 0] = 20.0 * ctx.noise[1][idx]  # yellowish/brownish patches
    return 1.0 + leaf, add


def _tex_grass(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    add = np.zeros((len(idx), 3), np.float32)
    add[:, 0] = 18.0 * ctx.noise[0][idx]
    return 1.0 + 0.1 * ctx.noise[2][idx] + 0.08 * ctx.noise[1][idx], add


def _tex_bricks(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    step = max(2, ctx.sc.h // 90)
    return np.where(ys % (2 * step) == 0, 0.85, 1.0) + 0.05 * ctx.noise[2][idx], None


def _tex_bars(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    step = max(2, ctx.sc.w // 300)
    bars = (xs // step) % 3 == 0
    return np.where(bars, 1.25, 0.8) + 0.05 * ctx.noise[2][idx], None


def _tex_stripes(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    step = max(2, ctx.sc.h // 150)
    return np.where((ys // step) % 2 == 0, 1.15, 0.85), None


def _tex_vehicle(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    rel = _rel_height(ctx, idx, ys)
    glass = (rel > 0.06) & (rel < 0.4)
    lights = (rel > 0.45) & (rel < 0.55) & (ctx.noise[1][idx] > 0.8)
    add = np.zeros((len(idx), 3), np.float32)
    plate = ctx.plate[ctx.inst[idx]]
    glass &= ~plate
    add[glass] = (-20.0, -15.0, 0.0)
    add[lights & ~plate] = (120.0, -20.0, -20.0)
    return np.where(glass, 0.45, np.where(plate, 1.0, 1.0 - 0.25 * rel)), add


def _tex_big_vehicle(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    rel = _rel_height(ctx, idx, ys)
    step = max(2, ctx.sc.w // 120)
    band = (rel > 0.15) & (rel < 0.5) & ((xs // step) % 4 != 0)
    return np.where(band, 0.4, 1.0) + 0.04 * ctx.noise[1][idx], None


def _tex_human(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    rel = _rel_height(ctx, idx, ys)
    add = np.zeros((len(idx), 3), np.float32)
    head = rel < 0.13
    add[head] = np.array((205.0, 160.0, 130.0), np.float32) - BASE_COLOURS["person"]
    legs = rel > 0.55
    return np.where(head, 1.0, np.where(legs, 0.6, 1.0)) + 0.05 * ctx.noise[2][idx], add


def _tex_light(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    rel = _rel_height(ctx, idx, ys)
    lamp = ((rel * 3.0) % 1.0 > 0.3) & ((rel * 3.0) % 1.0 < 0.7)
    add = np.zeros((len(idx), 3), np.float32)
    add[lamp] = ctx.params["lamp"] * np.array((150.0, 120.0, 20.0), np.float32)
    return np.ones(len(idx), np.float32), add


def _tex_ego(ctx: _Ctx, idx: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> Tex:
    return 0.8 + 0.4 * ((ctx.sc.h - ys) / (0.15 * ctx.sc.h)).clip(0, 1) + 0.1 * ctx.noise[0][idx], None


TEXTURES: dict[str, Callable[[_Ctx, np.ndarray, np.ndarray, np.ndarray], Tex]] = {
    "sky": _tex_sky, "road": _tex_road, "parking": _tex_road, "sidewalk": _tex_tiles, "ground": _tex_grass,
    "building": _tex_building, "vegetation": _tex_leafy, "terrain": _tex_grass, "wall": _tex_bricks,
    "fence": _tex_bars, "guard rail": _tex_stripes, "car": _tex_vehicle, "truck": _tex_vehicle,
    "bus": _tex_big_vehicle, "train": _tex_big_vehicle, "person": _tex_human, "rider": _tex_human,
    "traffic light": _tex_light, "ego vehicle": _tex_ego, "static": _tex_bricks, "dynamic": _tex_grass,
}


def _texture_params(rng: np.random.Generator, sc: Scene) -> dict[str, float]:
    """Per-image texture parameters."""
    left, right = sc.road
    return {"clouds": rng.uniform(0.0, 40.0), "lane_x": left + (right - left) * rng.uniform(0.4, 0.6),
            "edge_lines": rng.random(), "tile": rng.uniform(0.4, 0.9), "win_d": rng.uniform(3.0, 5.0),
            "win_frac": rng.uniform(0.35, 0.65), "floor": rng.uniform(2.8, 3.6), "lamp": rng.uniform(0.3, 1.0)}


def _make_ctx(rng: np.random.Generator, sc: Scene, objects: list[dict]) -> tuple[_Ctx, np.ndarray]:
    """Instance map, instance geometry, noise fields and per-instance colour offsets."""
    inst, labels = _instance_map(sc, objects)
    top = np.zeros(len(labels), np.float32)
    height = np.ones(len(labels), np.float32)
    for k, obj in enumerate(objects, start=1):
        ys = [p[1] for p in obj["polygon"]]
        top[k], height[k] = min(ys), max(ys) - min(ys) + 1
    h, w = sc.h, sc.w
    noise = tuple(_smooth_noise(rng, h, w, h // d).ravel() for d in (8, 40, 220))
    plate = np.array([lab == "license plate" for lab in labels])
    ctx = _Ctx(sc, rng, noise, inst.ravel(), top, height, _texture_params(rng, sc), plate)  # type: ignore[arg-type]
    return ctx, _instance_offsets(rng, labels)


def render_image(rng: np.random.Generator, sc: Scene, objects: list[dict], label_ids: np.ndarray) -> np.ndarray:
    """Paint an RGB uint8 image whose classes follow ``label_ids`` pixel for pixel."""
    from cityscapesscripts.helpers.labels import id2label

    ctx, offsets = _make_ctx(rng, sc, objects)
    lut = np.zeros((256, 3), np.float32)
    for lid, lab in id2label.items():
        if lid >= 0:
            lut[lid] = BASE_COLOURS.get(lab.name, (0, 0, 0))
    flat = label_ids.ravel()
    img = lut[flat] + offsets[ctx.inst]
    present = np.flatnonzero(np.bincount(flat, minlength=256))
    for lid in present:
        tex = TEXTURES.get(id2label[int(lid)].name) if int(lid) in id2label else None
        if tex is None:
            continue
        idx = np.flatnonzero(flat == lid)
        mult, add = tex(ctx, idx, (idx // sc.w).astype(np.float32), (idx % sc.w).astype(np.float32))
        px = img[idx] * np.asarray(mult, np.float32)[:, None]
        img[idx] = px if add is None else px + add
    return _finish(rng, img.reshape(sc.h, sc.w, 3))


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Global brightness/contrast/colour cast, pixel noise, clip to uint8."""
    contrast, bright = rng.uniform(0.75, 1.25), rng.uniform(-30.0, 30.0)
    cast = rng.uniform(-10.0, 10.0, 3).astype(np.float32)
    img = (img - 110.0) * contrast + (110.0 + bright) + cast
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(2.0, 7.0)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- files


def image_names(split: str, n: int) -> list[str]:
    """Cityscapes ids ``city_seq_frame`` for n images of a split (spread over two cities when n >= 2)."""
    first = (n + 1) // 2 if n >= 2 else n
    names = []
    for i in range(n):
        city, seq = (CITIES[split][0], i) if i < first else (CITIES[split][1], i - first)
        names.append(f"{city}_{seq:06d}_{FRAME:06d}")
    return names


def dump_polygons(data: dict) -> str:
    """gtFine polygons JSON text, one object per line (fast C encoder, still readable)."""
    objs = ",\n        ".join(json.dumps(o) for o in data["objects"])
    body = f"[\n        {objs}\n    ]" if objs else "[]"
    return (f'{{\n    "imgHeight": {int(data["imgHeight"])},\n    "imgWidth": {int(data["imgWidth"])},\n'
            f'    "objects": {body}\n}}\n')


def write_image(img_dir: Path, gt_dir: Path, split: str, index: int, name: str,
                size: tuple[int, int], seed: int) -> None:
    """Write one image and its four gtFine files."""
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.preparation.json2labelImg import createLabelImage, json2labelImg

    city = name.split("_")[0]
    (img_dir / split / city).mkdir(parents=True, exist_ok=True)
    (gt_dir / split / city).mkdir(parents=True, exist_ok=True)
    stem = gt_dir / split / city / f"{name}_gtFine_"
    rng = np.random.default_rng([seed, SPLIT_CODE[split], index])
    sc = make_scene(rng, *size)
    full = scene_json(sc)
    written = scene_json(sc, void_only=True) if split == "test" else full
    json_path = Path(f"{stem}polygons.json")
    json_path.write_text(dump_polygons(written))
    for encoding, suffix in (("ids", "labelIds"), ("trainIds", "labelTrainIds"), ("color", "color")):
        json2labelImg(str(json_path), f"{stem}{suffix}.png", encoding)
    if split == "test":  # the image still shows the full scene; the written labels are void only
        ann = Annotation()
        ann.fromJsonText(json.dumps(full))
        label_ids = np.asarray(createLabelImage(ann, "ids"), dtype=np.uint8)
    else:
        label_ids = np.asarray(Image.open(f"{stem}labelIds.png"), dtype=np.uint8)
    rgb = render_image(rng, sc, full["objects"], label_ids)
    out = img_dir / split / city / f"{name}_leftImg8bit.png"
    if not cv2.imwrite(str(out), np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_PNG_COMPRESSION, 1]):
        raise OSError(f"could not write {out}")


def write_tree(out: str | Path, num_train: int, num_val: int, num_test: int = 0,
               size: tuple[int, int] = (256, 512), seed: int = 0, layout: str = "downloads", workers: int = 1) -> Path:
    """Write a synthetic Cityscapes tree under ``out`` and return the root for ``--data-root``; ``workers``
    processes write images at once (each image depends only on its split, index and seed)."""
    if layout not in LAYOUT_DIRS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUT_DIRS)}, got {layout!r}")
    if min(num_train, num_val, num_test) < 0:
        raise ValueError("image counts must be >= 0")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    h, w = int(size[0]), int(size[1])
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"size must be at least {MIN_SIDE}x{MIN_SIDE}, got {h}x{w}")
    root = Path(out)
    img_rel, gt_rel = LAYOUT_DIRS[layout]
    jobs = [(root / img_rel, root / gt_rel, split, i, name, (h, w), seed)
            for split, n in zip(SPLITS, (num_train, num_val, num_test)) for i, name in enumerate(image_names(split, n))]
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            list(pool.map(_write_job, jobs))
    else:
        for job in jobs:
            _write_job(job)
    return root


def _write_job(job: tuple) -> None:
    write_image(*job)


def parse_size(text: str) -> tuple[int, int]:
    """Parse ``"HxW"`` (e.g. ``256x512``) into ``(H, W)``."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x512, got {text!r}")
    h, w = int(parts[0]), int(parts[1])
    if min(h, w) < MIN_SIDE:
        raise argparse.ArgumentTypeError(f"height and width must be at least {MIN_SIDE}, got {text!r}")
    return h, w


class _OneLineParser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print ``prog: error: message`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _count(text: str) -> int:
    """A non-negative int for the --num-* options."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = _OneLineParser(prog="python -m cityseg.synthetic",
                       description="Write a small synthetic dataset in the exact Cityscapes layout.")
    p.add_argument("--out", required=True, help="directory to write (becomes --data-root)")
    p.add_argument("--num-train", type=_count, default=20, help="train images (default 20)")
    p.add_argument("--num-val", type=_count, default=5, help="val images (default 5)")
    p.add_argument("--num-test", type=_count, default=0, help="test images, void labels only (default 0)")
    p.add_argument("--size", type=parse_size, default=(256, 512), help="HxW (default 256x512)")
    p.add_argument("--seed", type=_count, default=0, help="random seed (default 0)")
    p.add_argument("--layout", choices=sorted(LAYOUT_DIRS), default="downloads",
                   help="downloads: leftImg8bit/ + gtFine/; trainvaltest: the *_trainvaltest wrappers")
    p.add_argument("--workers", type=_count, default=1, help="processes writing images at once (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the tree and print one summary line."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        root = write_tree(args.out, args.num_train, args.num_val, args.num_test, args.size, args.seed, args.layout,
                          max(1, args.workers))
    except (OSError, ValueError) as exc:
        print(f"python -m cityseg.synthetic: error: {exc}", file=sys.stderr)
        return 1
    h, w = args.size
    print(f"wrote {args.num_train} train, {args.num_val} val, {args.num_test} test images ({h}x{w}, "
          f"seed {args.seed}, layout {args.layout}) to {root} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
