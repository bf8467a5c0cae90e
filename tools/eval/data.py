"""Evaluation inputs (clips, ground truth) and the one result type every codec returns.

A data set is a list of :class:`Clip` values:

- a video file is one clip; its frames are coded in order, every ``every``-th frame is scored
  (index ``% every == 0``: the frames the codec's training never sees);
- an image folder gives one single-frame clip per image, every image scored;
- a COCO-format annotation file gives one single-frame clip per annotated image, with its
  boxes as ground truth (:class:`GtBox`, COCO category names mapped to the detector's classes).

Frames are read again for every codec point (never held in memory as a whole clip), so a
long camera recording costs time, not memory.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["Clip", "CodecRun", "GtBox", "IMAGE_SUFFIXES", "load_data", "video_clip", "image_clip"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class GtBox:
    """A ground-truth box in frame pixels (x1 > x0, y1 > y0) with the detector's class id."""

    x0: float
    y0: float
    x1: float
    y1: float
    class_id: int
    iscrowd: bool = False


@dataclass(frozen=True)
class Clip:
    """Frames coded together: a video, or one image (a one-frame clip)."""

    name: str  # file name (video or image), unique within a data set
    fps: float  # frames per second (images: 1.0)
    width: int
    height: int
    n_frames: int  # frames the codecs code (after --max-frames)
    scored: tuple[int, ...]  # frame indices whose reconstructions are scored, ascending
    read: Callable[[], Iterator[np.ndarray]] = field(repr=False, compare=False)  # RGB uint8 (H,W,3) frames in order
    gt: dict[int, list[GtBox]] | None = field(default=None, repr=False, compare=False)  # annotations by frame index

    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(index, RGB uint8 frame) for the clip's ``n_frames`` frames, in order."""
        for i, f in enumerate(self.read()):
            if i >= self.n_frames:
                return
            yield i, f

    def scored_frames(self) -> Iterator[tuple[int, np.ndarray]]:
        keep = set(self.scored)
        for i, f in self.frames():
            if i in keep:
                yield i, f


@dataclass
class CodecRun:
    """One codec at one setting on one clip. Bytes are real coded bytes, headers included."""

    bytes: int  # video codecs: the whole clip's bitstream; image codecs: the scored frames' files/packets
    pixels: int  # pixels those bytes code (frames coded x width x height)
    frames_coded: int
    recon: dict[int, np.ndarray]  # scored frame index -> reconstruction, RGB uint8, the clip's size
    encode_seconds: float = 0.0
    decode_seconds: float = 0.0


def _read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    return np.ascontiguousarray(img[:, :, ::-1])


def image_clip(path: Path, gt: list[GtBox] | None = None, name: str | None = None) -> Clip:
    img = _read_rgb(path)  # read once for the size; read() reads it again per use
    h, w = img.shape[:2]
    return Clip(name=name or path.name, fps=1.0, width=w, height=h, n_frames=1, scored=(0,),
                read=lambda: iter([_read_rgb(path)]), gt=None if gt is None else {0: gt})


def video_clip(path: Path, *, every: int = 8, max_frames: int | None = None) -> Clip:
    import cv2

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every {every!r} must be an integer >= 1")
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open this video")
    fps = float(cap.get(cv2.CAP_PROP_FPS)) or 25.0
    n = 0
    w = h = 0
    while True:  # count by decoding: CAP_PROP_FRAME_COUNT is an estimate for many containers
        ok, f = cap.read()
        if not ok or (max_frames is not None and n >= max_frames):
            break
        h, w = f.shape[:2]
        n += 1
    cap.release()
    if n == 0:
        raise ValueError(f"{path}: no frames could be decoded")

    def read() -> Iterator[np.ndarray]:
        c = cv2.VideoCapture(str(path))
        try:
            while True:
                ok, f = c.read()
                if not ok:
                    return
                yield np.ascontiguousarray(f[:, :, ::-1])
        finally:
            c.release()

    return Clip(name=path.name, fps=fps, width=w, height=h, n_frames=n, scored=tuple(range(0, n, every)), read=read)


def _coco_clips(path: Path, images_dir: Path | None, classes: list[str], max_frames: int | None) -> list[Clip]:
    doc = json.loads(path.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in doc:
            raise ValueError(f"{path}: not a COCO annotation file (no {key!r} list)")
    by_name = {c.strip().lower(): i for i, c in enumerate(classes)}
    cat_map, unknown = {}, []
    for c in doc["categories"]:
        k = by_name.get(str(c["name"]).strip().lower())
        if k is None:
            unknown.append(c["name"])
        else:
            cat_map[c["id"]] = k
    if unknown:
        log.warning("%s: %d categories are not detector classes and are ignored: %s", path.name, len(unknown),
                    ", ".join(map(str, unknown[:10])))
    if not cat_map:
        raise ValueError(f"{path}: none of the categories {[c['name'] for c in doc['categories']][:10]} is a "
                         f"detector class ({', '.join(classes[:5])}, ...)")
    anns: dict[int, list[GtBox]] = {}
    for a in doc["annotations"]:
        if a["category_id"] not in cat_map:
            continue
        x, y, bw, bh = (float(v) for v in a["bbox"])
        if bw <= 0 or bh <= 0:
            continue
        anns.setdefault(a["image_id"], []).append(
            GtBox(
                x0=x, y0=y, x1=x + bw, y1=y + bh, class_id=cat_map[a["category_id"]], iscrowd=bool(a.get("iscrowd", 0))
            )
        )
    root = images_dir or path.parent
    clips = []
    for im in sorted(doc["images"], key=lambda im: im["id"])[: max_frames or None]:
        p = root / im["file_name"]
        if not p.is_file():
            raise FileNotFoundError(f"{p}: image {im['id']} of {path.name} not found (set --images to the folder "
                                    "holding the annotation file's file_name paths)")
        clips.append(image_clip(p, gt=anns.get(im["id"], []), name=str(im["file_name"])))
    return clips


def load_data(path: str | Path, *, classes: list[str], every: int = 8, max_frames: int | None = None,
              images_dir: str | Path | None = None) -> list[Clip]:
    """Clips from a video file, an image folder, or a COCO annotation file (``.json``).

    ``max_frames`` limits a video's length, or the number of images."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1):
        raise ValueError(f"max_frames {max_frames!r} must be an integer >= 1")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"--data {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return [image_clip(f) for f in files[: max_frames or None]]
    if p.suffix.lower() == ".json":
        return _coco_clips(p, Path(images_dir) if images_dir else None, classes, max_frames)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return [image_clip(p)]
    return [video_clip(p, every=every, max_frames=max_frames)]
