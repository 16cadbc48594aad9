"""Merge duplicate detections from overlapping tiles (``--merge``, ``--merge-iou``).

Tiles overlap, so one object near a tile edge is usually detected on two or four tiles. Detections of the
same item, task and label are clustered greedily, as non-maximum merging does for sliced inference (SAHI's
greedy NMM, which ranks by confidence; GeoChat gives none, so here the box area ranks): the largest
detection not yet taken opens a cluster, and every detection not yet taken whose polygon IoU with it
reaches the threshold joins it. Equal areas (up to a relative 1e-9) are ranked by tile id, then by
geometry, so a run gives the same objects whatever order Ray Data delivered its rows in, and a
``--resume`` the same as a fresh run. A cluster therefore never reaches
past its first box: clustering was transitive before (union-find, A~B and B~C put A, B, C together), and
a row of boxes each overlapping the next (a synthetic model answering the same box on overlapping tiles)
chained 110 detections over a kilometre into one object.

IoU is the true polygon IoU of the rotated boxes (not of their axis-aligned bounds), computed in a metric
CRS: the item's native CRS when the caller passes it, else the UTM zone (UPS beyond 84 degrees) of the
group's mean centroid. Areas in degrees would weigh east-west against north-south by ``cos(lat)``. (IoU
itself is invariant under affine maps, so for tile-sized boxes it barely depends on the CRS; areas, the
choice of representative, and large boxes at high latitudes do.)

Each cluster becomes ONE detection whose geometry is that of its LARGEST member (the one that opened it:
by metric area, ties as above). Decision: the union of rotated rectangles is not a
rotated rectangle and would grow with every false neighbour, and an average of rotated boxes is ill-defined
for angles; the largest member is a real model output and usually the least clipped view (an object cut by
a tile edge gets a smaller box).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry

from rsflow.errors import RequestError
from rsflow.georef import centroid_lonlat, transform_geometry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """One located object on one tile, already on the map."""

    tile_id: str
    """Tile it was found on."""
    item_id: str
    """STAC item of the tile (detections of different items are never merged)."""
    label: str
    """What was located: the detect category or the refer expression."""
    polygon_4326: Polygon
    """The (rotated) box in EPSG:4326 ``(lon, lat)``."""
    score: float | None = None
    """Confidence, if the model gives one (GeoChat does not)."""
    task: str = "detect"
    """``detect`` or ``refer`` (detections of different tasks are never merged)."""

    def __post_init__(self) -> None:
        if not isinstance(self.polygon_4326, Polygon | MultiPolygon) or self.polygon_4326.is_empty:
            # a MultiPolygon: a box across the antimeridian, split there (rsflow.georef.split_at_antimeridian)
            raise ValueError(f"detection on tile {self.tile_id!r} needs a non-empty Polygon")


@dataclass(frozen=True)
class MergedDetection:
    """One object after merging: a cluster of detections of the same item, task and label."""

    item_id: str
    """STAC item."""
    task: str
    """``detect`` or ``refer``."""
    label: str
    """Category or expression."""
    polygon_4326: Polygon
    """Geometry of the largest member, EPSG:4326."""
    tile_ids: list[str]
    """Sorted, distinct ids of the tiles the members came from."""
    n_merged: int
    """Number of detections in the cluster (1 = not merged)."""
    score: float | None = None
    """Highest member score, None if no member has one."""
    member_indices: list[int] = field(default_factory=list)
    """Positions of the members in the input list, ascending."""
    best_index: int = -1
    """Position of the member the cluster opened with (the largest; ties by tile id, then geometry):
    the detection that stands for the object, whatever order the input came in."""


def rotated_iou(p: BaseGeometry, q: BaseGeometry) -> float:
    """Intersection over union of two polygons, by area, in their own (planar) coordinates.

    Unlike an IoU of axis-aligned bounds this is exact for rotated boxes: two thin crossing strips whose
    bounds coincide have a small IoU. Pass coordinates of a metric CRS for map polygons.

    Returns:
        A value in [0, 1]; 0 when either has no area.
    """
    if p.is_empty or q.is_empty or p.area <= 0 or q.area <= 0:
        return 0.0
    inter = p.intersection(q).area
    union = p.area + q.area - inter
    return float(inter / union) if union > 0 else 0.0


def local_metric_crs(lon: float, lat: float) -> str:
    """The WGS 84 UTM zone of a point: ``EPSG:326zz`` (north) or ``EPSG:327zz`` (south).

    Universal Polar Stereographic (EPSG:32661 / EPSG:32761) north of 84N and south of 80S, where UTM ends.
    """
    if lat > 84.0:
        return "EPSG:32661"
    if lat < -80.0:
        return "EPSG:32761"
    zone = math.floor((lon + 180.0) / 6.0) % 60 + 1
    return f"EPSG:{32600 + zone if lat >= 0 else 32700 + zone}"


def _check_threshold(iou_threshold: float | None) -> None:
    if iou_threshold is None:
        return
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real):
        raise RequestError("--merge-iou", f"must be a number in (0, 1], got {iou_threshold!r}")
    if not (0.0 < float(iou_threshold) <= 1.0):
        raise RequestError("--merge-iou", f"must be in (0, 1] (or use --merge none), got {iou_threshold}")


def _metric_crs_for(item_id: str, group: list[Detection], metric_crs: str | Mapping[str, str] | None) -> str:
    if isinstance(metric_crs, str):
        return metric_crs
    if metric_crs is not None and item_id in metric_crs:
        return metric_crs[item_id]
    centroids = np.array([centroid_lonlat(d.polygon_4326) for d in group])
    lon = np.radians(centroids[:, 0])  # the circular mean: boxes either side of the antimeridian average there
    mean_lon = math.degrees(math.atan2(float(np.mean(np.sin(lon))), float(np.mean(np.cos(lon)))))
    return local_metric_crs(mean_lon, float(np.mean(centroids[:, 1])))


def _rank(objects: Sequence[Detection], areas: dict[int, float], idx: Sequence[int]) -> list[int]:
    """``idx`` largest first; areas equal up to reprojection noise (relative 1e-9) by tile id, then by the
    geometry's WKB: an order that does not depend on the order the detections arrived in."""
    largest = max((areas[i] for i in idx), default=0.0) or 1.0
    return sorted(idx, key=lambda i: (-round(areas[i] / largest, 9), objects[i].tile_id,
                                      shapely.to_wkb(objects[i].polygon_4326, hex=True), i))


def _merge(members: list[int], objects: Sequence[Detection], areas: dict[int, float], best: int) -> MergedDetection:
    first = objects[members[0]]
    scores = [s for s in (objects[i].score for i in members) if s is not None]
    return MergedDetection(
        item_id=first.item_id,
        task=first.task,
        label=first.label,
        polygon_4326=objects[best].polygon_4326,
        tile_ids=sorted({objects[i].tile_id for i in members}),
        n_merged=len(members),
        score=max(scores) if scores else None,
        member_indices=sorted(members),
        best_index=best,
    )


def merge_detections(
    objects: Sequence[Detection],
    iou_threshold: float | None,
    *,
    metric_crs: str | Mapping[str, str] | None = None,
) -> list[MergedDetection]:
    """Cluster duplicate detections across tiles and keep one per cluster.

    Args:
        objects: detections from any number of tiles and items.
        iou_threshold: a detection joins the cluster of a larger one of the same (item, task, label) when
            their polygon IoU in the metric CRS is >= this (greedily, largest first; see the module
            docstring); in (0, 1]. None keeps every detection (``--merge none``).
        metric_crs: CRS in which areas and IoU are computed: one CRS for all, or item id -> CRS (the items'
            native CRSs). Items not given use the UTM zone of their detections' mean centroid.

    Returns:
        One ``MergedDetection`` per cluster, ordered by the first input position of each cluster.

    Raises:
        RequestError: ``iou_threshold`` outside (0, 1] (``--merge-iou``).
        ValueError: a polygon does not project to the metric CRS.
    """
    _check_threshold(iou_threshold)
    n = len(objects)
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, det in enumerate(objects):
        groups.setdefault((det.item_id, det.task, det.label), []).append(i)

    areas: dict[int, float] = {}
    clusters: list[list[int]] = []
    for (item_id, _, _), idx in groups.items():
        crs = _metric_crs_for(item_id, [objects[i] for i in idx], metric_crs)
        polys = [transform_geometry(objects[i].polygon_4326, "EPSG:4326", crs) for i in idx]
        for i, poly in zip(idx, polys, strict=True):
            areas[i] = float(poly.area)
        if iou_threshold is None or len(idx) < 2:
            clusters += [[i] for i in idx]
            continue
        tree = shapely.STRtree(polys)
        position = {i: k for k, i in enumerate(idx)}
        taken = [False] * len(idx)
        for i in _rank(objects, areas, idx):  # largest first, in an order independent of the input's
            a = position[i]
            if taken[a]:
                continue
            taken[a] = True
            members = [a]
            for b in tree.query(polys[a], predicate="intersects").tolist():
                if not taken[b] and rotated_iou(polys[a], polys[b]) >= iou_threshold:
                    taken[b] = True
                    members.append(b)
            clusters.append([idx[k] for k in members])  # the opener first

    merged = [_merge(sorted(members), objects, areas, members[0]) for members in clusters]
    merged.sort(key=lambda m: m.member_indices[0])
    if iou_threshold is not None:
        logger.info("merged %d detections into %d (IoU >= %s)", n, len(merged), iou_threshold)
    return merged
