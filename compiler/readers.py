"""Real calibration data that is not tensors yet: images for image models, text for token models.

Each reader is a generator over files (or lines) that turns one item into one batch-1 sample at a
time, so a folder of thousands of photos or a long text file never sits in memory at once.

  * images (.png .jpg .jpeg .bmp), for a model with one 4-D float input: read with scikit-image,
    RGBA -> RGB, gray -> RGB (or RGB -> gray for a 1-channel input), bilinear resize to the input's
    H x W, scaled to [0, 1], optionally RGB -> BGR, then ``(x - mean) / std``, NCHW or NHWC;
  * text (.txt: a file of one sample per non-empty line, or a folder of one sample per file), for a
    model whose inputs are among input_ids/attention_mask/token_type_ids: tokenized with the
    ``tokenizer.json`` next to the model (or ``--tokenizer``), padded/truncated to the sequence length.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from edgec.errors import CalibrationError
from edgec.signature import show_shape

ARRAYS, IMAGES, TEXT = "arrays", "images", "text"
#: file suffix (lower case) -> kind of calibration data
KINDS = {".npz": ARRAYS, ".npy": ARRAYS, ".png": IMAGES, ".jpg": IMAGES, ".jpeg": IMAGES, ".bmp": IMAGES, ".txt": TEXT}
SUFFIXES = {kind: "/".join(s for s, k in KINDS.items() if k == kind) for kind in (ARRAYS, IMAGES, TEXT)}
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DEFAULT_MAX_LENGTH = 128
#: metadata_props keys (lower case) a model may carry its normalization under
MEAN_KEYS = ("mean", "image_mean", "img_mean", "pixel_mean", "norm_mean", "normalize_mean")
STD_KEYS = ("std", "image_std", "img_std", "pixel_std", "norm_std", "normalize_std")


@dataclass(frozen=True)
class CalibOptions:
    """How ``--calib`` images and text become input tensors (arrays are taken as they are).

    ``mean``/``std`` are on [0, 1] pixels, one value or one per channel (values above 1 are taken
    as 0-255 units, as many configs write them); unset, the model's metadata_props are looked at,
    else 0 and 1. ``tokenizer`` defaults to ``tokenizer.json`` next to the model. The driver fills
    ``model``, ``metadata`` and ``shapes`` (``--sample-shape``).
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    bgr: bool = False
    tokenizer: Path | None = None
    max_length: int | None = None
    model: Path | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    shapes: Mapping[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", _floats(self.mean, "--calib-mean"))
        object.__setattr__(self, "std", _floats(self.std, "--calib-std"))
        if self.std is not None and not all(math.isfinite(s) and s != 0 for s in self.std):
            raise CalibrationError(f"--calib-std {','.join(map(str, self.std))}: every value must be a non-zero number")
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer))
        if self.max_length is not None and self.max_length < 1:
            raise CalibrationError(f"--calib-max-length {self.max_length}: must be at least 1")

    @classmethod
    def of(cls, options: "CalibOptions | Mapping[str, Any] | None", **fill: Any) -> "CalibOptions":
        """``options`` (or a dict of its fields) with the fields in ``fill`` set."""
        if options is None:
            options = cls()
        elif isinstance(options, Mapping):
            options = cls(**options)
        return replace(options, **{k: v for k, v in fill.items() if v is not None})

    def given(self) -> dict[str, str]:
        """The flags set, each with the kind of data it is for."""
        flags = {"--calib-mean": (self.mean, IMAGES), "--calib-std": (self.std, IMAGES), "--calib-bgr": (self.bgr, IMAGES),
                 "--tokenizer": (self.tokenizer, TEXT), "--calib-max-length": (self.max_length, TEXT)}
        return {flag: kind for flag, (value, kind) in flags.items() if value}

    def check_applies(self, kind: str, path: Path) -> None:
        """Flags for one kind of data given with another are a mistake worth saying so."""
        for applies in (IMAGES, TEXT):
            flags = [flag for flag, k in self.given().items() if k == applies]
            if flags and kind != applies:
                verb = "is" if len(flags) == 1 else "are"
                raise CalibrationError(f"{', '.join(flags)} {verb} for {applies} ({SUFFIXES[applies]}), but --calib {path} holds {kind}")


def _floats(value: Any, flag: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value),)
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        out = ()
    if not out or not all(math.isfinite(v) for v in out):
        raise CalibrationError(f"{flag} {value!r}: give one number or one per channel, comma-separated (e.g. 0.485,0.456,0.406)")
    return out


def list_files(path: Path) -> tuple[str, list[Path]]:
    """``(kind, files)`` of ``--calib path``: a file, or a folder holding one kind of file."""
    if not path.exists():
        raise CalibrationError(f"--calib {path}: no such file or folder")
    if not path.is_dir():
        return KINDS.get(path.suffix.lower(), ARRAYS), [path]  # an unknown suffix is read (and refused) as an array file
    by_kind: dict[str, list[Path]] = {}
    for p in sorted(path.iterdir()):
        if p.suffix.lower() in KINDS and not p.name.startswith(".") and p.is_file():
            by_kind.setdefault(KINDS[p.suffix.lower()], []).append(p)
    if not by_kind:
        raise CalibrationError(
            f"--calib {path}: no .npz or .npy files, images ({SUFFIXES[IMAGES]}) or .txt files in it (the calibration set is empty)"
        )
    if len(by_kind) > 1:
        kinds = [f"{kind} ({files[0].name}{f' and {len(files) - 1} more' if len(files) > 1 else ''})" for kind, files in sorted(by_kind.items())]
        found = ", ".join(kinds[:-1]) + " and " + kinds[-1]
        raise CalibrationError(f"--calib {path} mixes {found}: keep one kind of data per folder")
    [(kind, files)] = by_kind.items()
    return kind, files


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageInput:
    name: str
    dtype: np.dtype
    height: int
    width: int
    channels: int
    nhwc: bool


def read_images(files: list[Path], signature: list[dict], options: CalibOptions, where: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(file, sample)``: one batch-1 sample per image file, preprocessed for the model's single 4-D float input."""
    spec = _image_input(signature, where)
    mean, std = _normalization(options, spec.channels)
    imread, resize = _skimage()
    for file in files:
        try:
            image = imread(str(file))
        except Exception as exc:  # image decoders raise anything from OSError to SyntaxError on a broken file
            raise CalibrationError(f"{file}: not a readable image ({type(exc).__name__}: {exc})") from None
        yield str(file), {spec.name: preprocess(image, spec, mean, std, options.bgr, resize, file)}


def _image_input(signature: list[dict], where: Path) -> _ImageInput:
    described = ", ".join(f"{s['name']} {s['dtype']} {show_shape(s['shape'])}" for s in signature)
    if len(signature) != 1:
        raise CalibrationError(f"--calib {where} holds images, but the model has {len(signature)} inputs ({described}); images need one 4-D float input")
    [s] = signature
    shape = s["shape"]
    if shape is None or len(shape) != 4 or s["dtype"] is None or np.dtype(s["dtype"]).kind != "f":
        raise CalibrationError(f"--calib {where} holds images, but the model's input is {described}; images need a 4-D float input")
    static = [d if isinstance(d, int) and d > 0 else None for d in shape]
    nhwc = static[3] in (1, 3) and static[1] not in (1, 3)
    channels, height, width = (static[3], static[1], static[2]) if nhwc else (static[1], static[2], static[3])
    c = str(channels or "C")
    hw = ",".join(["1", str(height or "H"), str(width or "W"), c] if nhwc else ["1", c, str(height or "H"), str(width or "W")])
    if height is None or width is None:
        raise CalibrationError(
            f"--calib {where}: images are resized to the input's height and width, but {s['name']!r} is {show_shape(shape)}; "
            f"give them with --sample-shape {s['name']}={hw} (or fix them with --input-shape)"
        )
    if static[0] not in (None, 1):
        raise CalibrationError(f"--calib {where}: images are fed one at a time, but input {s['name']!r} has a fixed batch of {static[0]}")
    if channels not in (None, 1, 3):
        raise CalibrationError(f"--calib {where}: input {s['name']!r} {show_shape(shape)} takes {channels} channels; images give 1 (gray) or 3 (RGB)")
    return _ImageInput(s["name"], np.dtype(s["dtype"]), height, width, channels or 3, nhwc)


def _normalization(options: CalibOptions, channels: int) -> tuple[np.ndarray, np.ndarray]:
    props = {k.lower(): v for k, v in options.metadata.items()}
    out = []
    for flag, value, keys, default in (("--calib-mean", options.mean, MEAN_KEYS, 0.0), ("--calib-std", options.std, STD_KEYS, 1.0)):
        if value is None:
            key = next((k for k in keys if k in props), None)
            value = _metadata_floats(props.get(key)) or (default,)
            flag = f"the model's metadata_props {key!r}" if key else flag
        if len(value) not in (1, channels):
            raise CalibrationError(f"{flag} has {len(value)} values; the input takes {channels} channel(s): give 1 or {channels}")
        values = np.array(value, np.float64)
        out.append(values / 255 if values.max() > 1 else values)  # 0-255 units (123.675, 58.395) as configs often write them
    return out[0], out[1]


def _metadata_floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    # "0.5", "0.485,0.456,0.406", "[0.485, 0.456, 0.406]": whatever the exporter wrote, the numbers in it
    values = tuple(float(v) for v in re.findall(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", text))
    return values or None


def _skimage():
    try:
        from skimage.io import imread
        from skimage.transform import resize
    except ImportError:
        raise CalibrationError("reading --calib images needs scikit-image: pip install scikit-image") from None
    return imread, resize


def preprocess(image: np.ndarray, spec: _ImageInput, mean: np.ndarray, std: np.ndarray, bgr: bool, resize, file: Path) -> np.ndarray:
    """HxW, HxWx{1,2,3,4} image -> the input tensor, batch 1."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (2, 4):  # drop alpha
        image = image[..., :-1]
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] == 0 or image.shape[1] == 0:
        raise CalibrationError(f"{file}: an image of shape {list(image.shape)}, expected height x width (x 1, 3 or 4 channels)")
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(image.dtype, 1.0)  # float images are taken as [0, 1]
    x = resize(image.astype(np.float64), (spec.height, spec.width), order=1, preserve_range=True, anti_aliasing=True) / scale
    if spec.channels == 3 and x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    elif spec.channels == 1 and x.shape[2] == 3:
        x = x @ np.array([0.2125, 0.7154, 0.0721])[:, None]  # skimage.color.rgb2gray's weights
    if bgr:
        x = x[..., ::-1]
    x = (x - mean) / std
    if not spec.nhwc:
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None], dtype=spec.dtype)


# --- text ----------------------------------------------------------------------------------------


def read_texts(files: list[Path], signature: list[dict], options: CalibOptions, where: Path) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(where, sample)``: one batch-1 sample per text, a non-empty line of a single .txt or a .txt file of a folder."""
    names, length, dtypes = _token_inputs(signature, where)
    tokenizer = _tokenizer(options, where)
    pad = tokenizer.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = pad.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
    length = length or options.max_length or DEFAULT_MAX_LENGTH
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(length=length, pad_id=pad_id, pad_token=pad_token)
    for place, text in _texts(files, where):
        e = tokenizer.encode(text)
        values = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
        yield place, {name: np.array([values[name]], dtypes[name]) for name in names}


def _token_inputs(signature: list[dict], where: Path) -> tuple[list[str], int | None, dict[str, np.dtype]]:
    names = [s["name"] for s in signature]
    if "input_ids" not in names or not set(names) <= set(TOKEN_INPUTS):
        # says "no .npz or .npy": before text was read, a folder of only .txt notes was refused as holding no arrays
        raise CalibrationError(
            f"--calib {where} holds text and no .npz or .npy arrays, but the model's inputs {names} are not token inputs "
            f"(input_ids, attention_mask, token_type_ids): give arrays keyed by input name"
        )
    dtypes = {}
    for s in signature:
        if s["dtype"] is None or np.dtype(s["dtype"]).kind not in "iu":
            raise CalibrationError(f"--calib {where} holds text, but input {s['name']!r} is {s['dtype']}; token inputs are integers")
        dtypes[s["name"]] = np.dtype(s["dtype"])
        shape = s["shape"]
        if shape is not None and (len(shape) != 2 or (isinstance(shape[0], int) and shape[0] > 0 and shape[0] != 1)):
            raise CalibrationError(f"--calib {where} holds text, fed one text at a time as [1, seq]; input {s['name']!r} is {show_shape(shape)}")
    ids = next(s for s in signature if s["name"] == "input_ids")["shape"]
    seq = ids[1] if ids is not None and isinstance(ids[1], int) and ids[1] > 0 else None
    return names, seq, dtypes


def _tokenizer(options: CalibOptions, where: Path):
    if options.tokenizer is not None:
        path = options.tokenizer / "tokenizer.json" if options.tokenizer.is_dir() else options.tokenizer
        if not path.is_file():
            raise CalibrationError(f"--tokenizer {options.tokenizer}: no such file")
    else:
        path = options.model.parent / "tokenizer.json" if options.model is not None else None
        if path is None or not path.is_file():
            looked = f": there is no {path}" if path is not None else ""
            raise CalibrationError(f"--calib {where} holds text, which needs the model's tokenizer.json{looked}; give it with --tokenizer PATH")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise CalibrationError("tokenizing --calib text needs Hugging Face tokenizers: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception subclass on a malformed file
        raise CalibrationError(f"{path}: not a Hugging Face tokenizer.json ({exc})") from None


def _texts(files: list[Path], where: Path) -> Iterator[tuple[str, str]]:
    one_file = not where.is_dir()
    found = False
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                if one_file:
                    for number, line in enumerate(f, 1):  # streamed: a long file is read one line at a time
                        if line.strip():
                            found = True
                            yield f"{file} line {number}", line.strip()
                else:
                    text = f.read().strip()
                    if text:
                        found = True
                        yield str(file), text
        except UnicodeDecodeError as exc:
            raise CalibrationError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise CalibrationError(f"{file}: cannot be read ({exc.strerror})") from None
    if not found:
        raise CalibrationError(f"--calib {where}: every {'line' if one_file else 'file'} is empty (the calibration set is empty)")
