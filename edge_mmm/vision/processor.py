"""Idefics3 / SmolVLM image processor and prompt expansion, matching transformers' PIL backend.

Pipeline per image (as `Idefics3ImageProcessorPil` + `Idefics3Processor` do it):
resize so the longest edge is `size` (even-rounded, capped at 4096) -> if splitting, resize up to a multiple
of `max_image_size` and cut `rows x cols` square tiles plus one global image resized to a square; otherwise
one square image -> rescale 1/255 (float64, then float32) -> normalize (x - mean) / std -> pad to the largest
tile, with `pixel_attention_mask` marking real pixels. All resizes are PIL LANCZOS on uint8 RGB.

Input conversion (stated, not silent): grayscale / palette -> RGB; transparency is composited on white
(as transformers does); 16-bit images are scaled to 8 bit (value / 257) before that, where PIL would
clip; numpy arrays are OpenCV frames (HxWx3 BGR, HxWx4 BGRA or HxW gray, uint8 or uint16).
Images above `MAX_INPUT_PIXELS` are refused before decoding.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from edge_mmm.errors import InputError, ModelFileError

# Special tokens of the Idefics3 prompt format, named once.
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE_TOKEN = "<end_of_utterance>"

MAX_IMAGE_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: the resized longest edge never exceeds this
MAX_INPUT_PIXELS = 50_000_000  # refuse larger inputs (e.g. 20000x20000) before decoding them
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

ImageLike = Union[str, Path, bytes, Image.Image, np.ndarray]


@dataclass
class ImageProcessorConfig:
    """The fields of `preprocessor_config.json` that change the output."""

    longest_edge: int = 4 * 364  # `size["longest_edge"]`
    max_image_size: int = 364  # tile side, `max_image_size["longest_edge"]`
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Tuple[float, float, float] = IMAGENET_STANDARD_MEAN
    image_std: Tuple[float, float, float] = IMAGENET_STANDARD_STD
    do_pad: bool = True
    image_seq_len: int = 169  # <image> tokens per tile (processor config)

    @classmethod
    def from_dict(cls, d: dict, image_seq_len: Optional[int] = None) -> "ImageProcessorConfig":
        """Build from an HF `preprocessor_config.json` dict (and the processor's image_seq_len)."""
        size = d.get("size") or {}
        mis = d.get("max_image_size") or {}
        resample = d.get("resample", 1)
        if resample not in (1, None):  # PILImageResampling.LANCZOS == 1
            raise ModelFileError(f"preprocessor_config.json: resample={resample} is not supported (LANCZOS=1)")
        return cls(
            longest_edge=int(size.get("longest_edge", cls.longest_edge)),
            max_image_size=int(mis.get("longest_edge", cls.max_image_size)),
            do_resize=bool(d.get("do_resize", True)),
            do_image_splitting=bool(d.get("do_image_splitting", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_normalize=bool(d.get("do_normalize", True)),
            image_mean=tuple(d.get("image_mean", IMAGENET_STANDARD_MEAN)),
            image_std=tuple(d.get("image_std", IMAGENET_STANDARD_STD)),
            do_pad=bool(d.get("do_pad", True)),
            image_seq_len=int(image_seq_len if image_seq_len is not None else d.get("image_seq_len", 169)),
        )


@dataclass
class ProcessedImages:
    """Model inputs for one prompt: tiles of every image, their pixel mask and each image's tile grid."""

    pixel_values: Optional[np.ndarray]  # (1, n_tiles, 3, H, W) float32; None when features are cached
    pixel_attention_mask: Optional[np.ndarray]  # (1, n_tiles, H, W) int64
    rows: List[int] = field(default_factory=list)  # per image; 0 = not split
    cols: List[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# loading and conversion
# ---------------------------------------------------------------------------------------------
def _name(src: Any) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    return f"<{type(src).__name__} image>"


def _check_size(width: int, height: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"image {name} is empty ({width}x{height})")
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"image {name} is too large ({width}x{height} = {width * height} pixels; "
                         f"the limit is {MAX_INPUT_PIXELS})")


def _to_8bit_pil(img: Image.Image) -> Image.Image:
    """16/32-bit integer modes -> 8-bit 'L' by /257 (PIL's convert would clip at 255)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if arr.max(initial=0) <= 65535 else arr.max() / 255.0
        return Image.fromarray(np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        hi = hi if hi > lo else lo + 1
        return Image.fromarray(np.rint((arr - lo) / (hi - lo) * 255).astype(np.uint8), mode="L")
    return img


def pil_to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion as transformers' `convert_to_rgb` does it (alpha over white), after 16->8 bit."""
    img = _to_8bit_pil(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    """OpenCV frame (BGR/BGRA/gray, uint8/uint16/float in [0,1]) -> RGB(A) PIL image."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"image {name}: expected an HxW, HxWx3 (BGR) or HxWx4 (BGRA) array, got shape "
                         f"{arr.shape}")
    _check_size(arr.shape[1], arr.shape[0], name)
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise InputError(f"image {name}: unsupported array dtype {arr.dtype} (use uint8, uint16 or float)")
    if arr.ndim == 3:
        arr = arr[:, :, [2, 1, 0]] if arr.shape[2] == 3 else arr[:, :, [2, 1, 0, 3]]
    return Image.fromarray(np.ascontiguousarray(arr))


def _upright(img: Image.Image) -> Image.Image:
    """A file's pixels turned as its EXIF Orientation tag says (a phone photo taken sideways), as
    transformers' `load_image` does for paths and URLs; an image without the tag is returned as is."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError):  # a malformed EXIF block: keep the pixels
        return img


def load_image(src: ImageLike) -> Image.Image:
    """Open a path / bytes / PIL image / OpenCV BGR array as an RGB PIL image; InputError names the source.
    Files and bytes are turned upright by their EXIF orientation; arrays and PIL images are taken as given."""
    name = _name(src)
    if isinstance(src, np.ndarray):
        return pil_to_rgb(_array_to_pil(src, name))
    if isinstance(src, Image.Image):
        _check_size(src.width, src.height, name)
        return pil_to_rgb(src)
    if isinstance(src, (str, Path, bytes)):
        if isinstance(src, (str, Path)) and not Path(src).is_file():
            if str(src).startswith(("http://", "https://")):
                raise InputError(f"image {name}: a URL; images are read from files only (download it first)")
            raise InputError(f"image {name}: " + ("a directory, not an image file" if Path(src).is_dir()
                                                  else "no such file"))
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            _check_size(img.width, img.height, name)  # from the header, before decoding the pixels
            img.load()
        except InputError:
            raise
        except Image.DecompressionBombError as exc:
            raise InputError(f"image {name} is too large ({exc}); the limit is {MAX_INPUT_PIXELS} pixels") from exc
        except Image.UnidentifiedImageError as exc:
            raise InputError(f"image {name}: not a readable image ({exc.__class__.__name__})") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise InputError(f"image {name}: cannot decode ({exc})") from exc
        return pil_to_rgb(_upright(img))
    raise InputError(f"unsupported image input of type {type(src).__name__}")


# ---------------------------------------------------------------------------------------------
# sizes (same integer arithmetic as transformers)
# ---------------------------------------------------------------------------------------------
def resize_to_longest_edge(height: int, width: int, longest_edge: int) -> Tuple[int, int]:
    """Longest edge -> `longest_edge` (up or down), the other even-rounded; then capped at 4096."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIDE:
        width, height = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif height > width and height > MAX_IMAGE_SIDE:
        height, width = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(height, 1), max(width, 1)


def size_for_vision_encoder(height: int, width: int, tile: int) -> Tuple[int, int]:
    """Both sides rounded up to multiples of the tile side, keeping the aspect ratio as transformers does."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def _resize(img: Image.Image, height: int, width: int) -> Image.Image:
    return img.resize((width, height), resample=Image.LANCZOS)


# ---------------------------------------------------------------------------------------------
# processor
# ---------------------------------------------------------------------------------------------
class Idefics3ImageProcessor:
    """Images -> tiles -> normalized float32 pixel_values + pixel_attention_mask (see module docstring)."""

    def __init__(self, config: ImageProcessorConfig):
        self.config = config

    def tiles(self, image: ImageLike) -> Tuple[List[Image.Image], int, int]:
        """Resized uint8 tiles (split tiles row-major, then the global image) and the grid (rows, cols)."""
        c = self.config
        img = load_image(image)
        if c.do_resize:
            img = _resize(img, *resize_to_longest_edge(img.height, img.width, c.longest_edge))
        m = c.max_image_size
        if not c.do_image_splitting:
            return [_resize(img, m, m)], 0, 0
        img = _resize(img, *size_for_vision_encoder(img.height, img.width, m))
        if img.height <= m and img.width <= m:
            return [img], 0, 0
        rows, cols = img.height // m, img.width // m
        crops = [img.crop((c_ * m, r * m, c_ * m + m, r * m + m)) for r in range(rows) for c_ in range(cols)]
        return crops + [_resize(img, m, m)], rows, cols

    def normalize(self, tile: Image.Image) -> np.ndarray:
        """uint8 HWC -> float32 CHW, rescaled in float64 and normalized in float32 like transformers."""
        c = self.config
        x = np.asarray(tile).transpose(2, 0, 1)
        if c.do_rescale:
            x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if c.do_normalize:
            mean = np.asarray(c.image_mean, dtype=np.float32)[:, None, None]
            std = np.asarray(c.image_std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return x

    def __call__(self, images: Sequence[ImageLike]) -> ProcessedImages:
        """Process the images of one prompt into one padded batch row."""
        if not images:
            raise InputError("no images given")
        arrays, rows, cols = [], [], []
        for image in images:
            tiles, r, c = self.tiles(image)
            arrays.extend(self.normalize(t) for t in tiles)
            rows.append(r)
            cols.append(c)
        h = max(a.shape[1] for a in arrays)
        w = max(a.shape[2] for a in arrays)
        pixel_values = np.zeros((1, len(arrays), 3, h, w), dtype=np.float32)
        mask = np.zeros((1, len(arrays), h, w), dtype=np.int64)
        for i, a in enumerate(arrays):
            pixel_values[0, i, :, : a.shape[1], : a.shape[2]] = a
            mask[0, i, : a.shape[1], : a.shape[2]] = 1
        return ProcessedImages(pixel_values, mask, rows, cols)


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The text that replaces one `<image>` placeholder (exactly Idefics3Processor's layout)."""
    global_part = FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_IMAGE_TOKEN
    if rows == 0 and cols == 0:
        return global_part
    text = ""
    for r in range(rows):
        for c in range(cols):
            text += FAKE_IMAGE_TOKEN + f"<row_{r + 1}_col_{c + 1}>" + IMAGE_TOKEN * image_seq_len
        text += "\n"
    return text + "\n" + global_part


def expand_image_tokens(text: str, rows: Sequence[int], cols: Sequence[int], image_seq_len: int) -> str:
    """Replace the i-th `<image>` in `text` by image i's tile prompt; counts must match."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(rows):
        raise InputError(f"the prompt has {len(parts) - 1} {IMAGE_TOKEN} placeholders but {len(rows)} "
                         f"images were given")
    out = [parts[0]]
    for i, part in enumerate(parts[1:]):
        out.append(image_prompt(rows[i], cols[i], image_seq_len))
        out.append(part)
    return "".join(out)
