"""Pre/post-processing for the PP-OCRv4 ONNX models shipped with rapidocr.

Pure numpy/scipy: the caller runs the detector and recognizer itself.
Mirrors rapidocr_onnxruntime (config.yaml, ch_ppocr_det, ch_ppocr_rec) but
with axis-aligned boxes instead of rotated rectangles.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

Box = tuple[int, int, int, int]  # (y0, x0, y1, x1), end-exclusive: img[y0:y1, x0:x1]


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of HxWxC to hxwxC float32 (cv2.INTER_LINEAR's half-pixel grid)."""
    def taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(s).astype(np.intp)
        return i0, np.minimum(i0 + 1, n_in - 1), (s - i0).astype(np.float32)

    y0, y1, fy = taps(img.shape[0], h)
    x0, x1, fx = taps(img.shape[1], w)
    img = img.astype(np.float32)
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def _to_bgr(image: np.ndarray) -> np.ndarray:
    # PaddleOCR trained on cv2-loaded (BGR) images, so RGB input is flipped.
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[..., 2::-1]


def _to_nchw(img: np.ndarray) -> np.ndarray:
    # mean = std = 0.5 on [0, 1] pixels (config.yaml), i.e. a map to [-1, 1].
    return ((img / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)


def det_preprocess(image: np.ndarray, limit_side: int = 736,
                   max_side: int = 2000) -> tuple[np.ndarray, tuple[float, float]]:
    """HxWx3 uint8 RGB (or HxW gray) -> ((1,3,H',W') float32, (sy, sx)).

    H', W' are multiples of 32; the scale (sy, sx) = (H'/H, W'/W) is what
    `text_boxes` needs to map boxes back to the original image.
    """
    img = _to_bgr(image)
    h, w = img.shape[:2]
    # rapidocr first caps the long side, then lifts the short side to
    # limit_side (limit_type "min"): small print needs the upscaling.
    r = min(1.0, max_side / max(h, w))
    if min(h, w) * r < limit_side:
        r = limit_side / min(h, w)
    # The backbone downsamples 32x, so both sides must be multiples of 32.
    nh = max(32, int(round(int(h * r) / 32) * 32))
    nw = max(32, int(round(int(w * r) / 32) * 32))
    return _to_nchw(_resize(img, nh, nw)), (nh / h, nw / w)


def text_boxes(prob: np.ndarray, scale: tuple[float, float], thresh: float = 0.3,
               box_thresh: float = 0.5, min_size: int = 3,
               unclip_ratio: float = 1.6) -> list[Box]:
    """DB probability map (1,1,H',W') -> boxes in original image coordinates.

    Boxes are (y0, x0, y1, x1), end-exclusive, in reading order.
    """
    pred = prob.reshape(prob.shape[-2:])
    H, W = pred.shape
    oh, ow = round(H / scale[0]), round(W / scale[1])
    # 2x2 dilation (use_dilation) bridges hairline gaps between glyphs.
    mask = ndimage.binary_dilation(pred > thresh, np.ones((2, 2), bool))
    labels, _ = ndimage.label(mask, np.ones((3, 3), bool))  # 8-connected, like cv2 contours
    boxes = []
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        if min(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) <= min_size:
            continue  # specks; also keeps the covariance below well defined
        # Scanned lines are skewed/curved, so the axis-aligned bbox is far
        # looser than rapidocr's cv2.minAreaRect; a PCA-aligned rectangle
        # stands in for it when scoring, size-filtering and unclipping.
        blob = labels[sl] == k
        pts = np.argwhere(blob).astype(np.float64)
        c = pts.mean(0)
        axes = np.linalg.eigh(np.cov((pts - c).T))[1]  # columns: minor, major
        proj = (pts - c) @ axes
        lo, hi = proj.min(0), proj.max(0)
        short, long = hi - lo
        if short < min_size:
            continue
        # Score the blob itself (rapidocr's "slow" mode): on curved lines the
        # rectangle is mostly background and "fast" mode drops real text.
        if pred[sl][blob].mean() < box_thresh:
            continue
        # DB predicts a shrunk kernel; grow it back by area*ratio/perimeter,
        # the offset pyclipper applies in rapidocr's unclip.
        d = long * short * unclip_ratio / (2 * (long + short))
        if short + 2 * d < min_size + 2:
            continue
        corners = np.array([[a, b] for a in (lo[0] - d, hi[0] + d)
                            for b in (lo[1] - d, hi[1] + d)])
        corners = corners @ axes.T + c + (sl[0].start, sl[1].start)
        ys = np.clip(np.round(corners[:, 0] * oh / H), 0, oh).astype(int)
        xs = np.clip(np.round(corners[:, 1] * ow / W), 0, ow).astype(int)
        boxes.append((int(ys.min()), int(xs.min()), int(ys.max()), int(xs.max())))
    boxes.sort(key=lambda b: (b[0], b[1]))
    # Same-line boxes rarely share y0 exactly; like rapidocr, treat tops
    # within 10 px as one line and bubble those into left-to-right order.
    for i in range(1, len(boxes)):
        j = i
        while j and abs(boxes[j][0] - boxes[j - 1][0]) < 10 and boxes[j][1] < boxes[j - 1][1]:
            boxes[j - 1], boxes[j] = boxes[j], boxes[j - 1]
            j -= 1
    return boxes


def rec_preprocess(crop: np.ndarray, height: int = 48, min_width: int = 320,
                   max_width: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB line crop -> (1,3,height,W) float32 in [-1, 1].

    Aspect ratio is kept and the line right-padded with zeros to
    W = max(min_width, int(height*w/h)), as rapidocr does for one crop;
    max_width, if given, caps W (squeezing long lines) for a static shape.
    """
    img = _to_bgr(crop)
    h, w = img.shape[:2]
    # rapidocr sizes the canvas with int() but the resize with ceil(), so a
    # line wider than min_width loses at most its last sub-pixel column.
    width = max(min_width, int(height * w / h))
    if max_width is not None:
        width = min(width, max_width)
    rw = min(math.ceil(height * w / h), width)
    out = np.zeros((1, 3, height, width), np.float32)  # pad = mid-grey, as rapidocr
    out[:, :, :, :rw] = _to_nchw(_resize(img, height, rw))
    return out


def charset(model: Any) -> list[str]:
    """CTC labels from an onnx.ModelProto or a metadata dict (e.g. ort's
    custom_metadata_map): blank at 0, the 'character' lines, then ' ' last."""
    meta = model if isinstance(model, Mapping) else {
        p.key: p.value for p in model.metadata_props}
    # splitlines (not split('\n')) to keep indices identical to rapidocr.
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: list[str]) -> tuple[str, float]:
    """Greedy CTC over rec output (1,T,C) -> (text, mean confidence of kept steps)."""
    p = probs.reshape(probs.shape[-2:])
    idx, conf = p.argmax(1), p.max(1)
    keep = idx != 0
    keep[1:] &= idx[1:] != idx[:-1]  # collapse repeats; a blank between separates them
    text = "".join(chars[i] for i in idx[keep])
    return text, float(conf[keep].mean()) if keep.any() else 0.0


def line_crops(image: np.ndarray, detect) -> list[tuple[Box, np.ndarray]]:
    """Text lines of ``image``: ``detect(x) -> prob map`` runs the detector; returns (box, crop) pairs."""
    x, scale = det_preprocess(image)
    return [((y0, x0, y1, x1), image[y0:y1, x0:x1]) for y0, x0, y1, x1 in text_boxes(detect(x), scale)]


def read(image: np.ndarray, detect, recognize, chars: list[str]) -> list[str]:
    """The text of each line of ``image``, top to bottom; ``recognize(x) -> probs`` runs the recognizer."""
    return [ctc_decode(recognize(rec_preprocess(crop)), chars)[0] for _, crop in line_crops(image, detect)]


def word_crops(line: np.ndarray, min_gap: int = 4) -> list[np.ndarray]:
    """Split a line crop at blank columns at least ``min_gap`` wide (gaps between words)."""
    gray = line.mean(axis=2) if line.ndim == 3 else line.astype(np.float32)
    ink = (gray < gray.mean() - gray.std()).any(axis=0)
    words, start, gap = [], None, 0
    for i, inked in enumerate(np.append(ink, False)):
        if inked:
            start = i if start is None else start
            gap = 0
        elif start is not None:
            gap += 1
            if gap >= min_gap or i == len(ink):
                end = i - gap + 1
                if end - start > 2:
                    words.append(line[:, max(0, start - 2):min(len(ink), end + 2)])
                start, gap = None, 0
    return words
