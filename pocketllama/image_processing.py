"""Mllama image preprocessing (SPEC 3): load any image, choose a tile canvas, resize without distortion, pad,
normalize, split into tiles; plus the text->image cross-attention mask built from `<|image|>` positions.

Pillow + torch only. Output equals transformers' `MllamaImageProcessor` (PIL backend) for RGB inputs.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# CLIP statistics written by the HF converter into every Llama 3.2 Vision preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Refuse images above this many pixels before decoding them (a decompression bomb: a small file that
# expands to gigabytes). 100 MP covers any camera; a 4-tile canvas is at most 1.3 MP anyway.
MAX_IMAGE_PIXELS = 100_000_000

ImageSource = str | os.PathLike | bytes | bytearray | Image.Image


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Every (tiles along height, tiles along width) with h*w <= max_tiles, in HF's order.

    >>> supported_aspect_ratios(4)
    [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    """
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


def choose_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """(tiles along height, tiles along width) for an H x W image (SPEC 3 step 2).

    The least upscaling if some canvas holds the image at scale >= 1, else the least downscaling; ties go
    to the smallest area, then to the first in list order. Float arithmetic as HF's (IEEE double).
    """
    options = supported_aspect_ratios(max_tiles)
    scales = [min(h * tile / height, w * tile / width) for h, w in options]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    tied = [opt for opt, s in zip(options, scales, strict=True) if s == best]
    return min(tied, key=lambda hw: hw[0] * hw[1])  # min() keeps the first of equal areas


def fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Resized (height, width): aspect ratio kept, upscaled at most until the short side reaches `tile`, never
    past the canvas (SPEC 3 step 3)."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


# ---- loading ------------------------------------------------------------------------------------------


def load_image(source: ImageSource | Any, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Any supported source -> an RGB PIL image, EXIF orientation applied.

    source: a file path, raw file bytes, a PIL image, or a `data:image/...;base64,...` URL. Transparent
    images are composited onto white (as transformers does); greyscale, palette, CMYK and 16-bit images
    become 8-bit RGB. Raises ValueError for anything that is not a readable image or has more than
    `max_pixels` pixels.
    """
    name = "image"
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data, name = bytes(source), f"image bytes ({len(source)} bytes)"
        elif isinstance(source, str) and source.startswith("data:"):
            data, name = decode_data_url(source), "data URL image"
        elif isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "ftp"):
            raise ValueError(f"image {source[:80]!r} is a remote URL; pocketllama does not download images: "
                             "save it to a file and pass the path (or pass bytes / a data URL)")
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source).expanduser()
            if not path.is_file():
                raise ValueError(f"image file {str(path)!r} does not exist")
            data, name = path.read_bytes(), f"image file {str(path)!r}"
        else:
            raise ValueError(f"cannot read an image from a {type(source).__name__}; pass a file path, bytes, "
                             "a PIL image or a data:image/...;base64 URL")
        image = _open(data, name, max_pixels)
    _check_pixels(image, name, max_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} is truncated or corrupt ({e})") from None


def decode_data_url(url: str) -> bytes:
    """`data:image/png;base64,....` -> the file bytes."""
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:image/") or not head.lower().endswith(";base64"):
        raise ValueError(f"image data URL must look like 'data:image/<type>;base64,<data>', got {url[:40]!r}...")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data URL has invalid base64 data") from None


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():  # our own limit applies; PIL's warning threshold is lower
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError as e:
            raise ValueError(f"{name} is too large to decode safely ({e}); the limit is {max_pixels} pixels") \
                from None
        except (UnidentifiedImageError, OSError, SyntaxError):
            raise ValueError(f"{name} is not an image Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)") \
                from None


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    w, h = image.size
    if w * h > max_pixels:
        raise ValueError(f"{name} is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel limit; "
                         "downscale it first (or raise max_pixels)")
    if w < 1 or h < 1:
        raise ValueError(f"{name} is empty ({w}x{h})")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB. Alpha (RGBA, LA, palette transparency) is composited onto white, like transformers'
    `convert_to_rgb`; 16/32-bit greyscale is scaled to 8 bits instead of clipped."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max(initial=0.0)
        if image.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# ---- tiling -------------------------------------------------------------------------------------------


@dataclass
class ImageInputs:
    """What the vision encoder takes for a batch: B samples with up to I images each, T = max tiles.

    pixel_values: float32 [B, I, T, 3, tile, tile]; aspect_ratio_ids: int64 [B, I] (0 = no image);
    aspect_ratio_mask: int64 [B, I, T] (tile slot 0 always 1); num_tiles: tiles per image, per sample.
    """

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    num_tiles: list[list[int]]


class MllamaImageProcessor:
    """Images -> tiles for Llama 3.2 Vision (SPEC 3). tile_size 560 (instruct, 90B) or 448 (11B base)."""

    def __init__(self, tile_size: int = 560, max_tiles: int = 4, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        if tile_size < 1 or max_tiles < 1:
            raise ValueError(f"tile_size and max_tiles must be positive, got {tile_size} and {max_tiles}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values (std > 0), got {list(mean)} and {list(std)}")
        self.tile_size, self.max_tiles, self.max_pixels = tile_size, max_tiles, max_pixels
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]  # (3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.aspect_ratios = supported_aspect_ratios(max_tiles)

    @classmethod
    def from_config(cls, config: dict[str, Any], **defaults: Any) -> MllamaImageProcessor:
        """From an HF preprocessor_config.json dict (size, max_image_tiles, image_mean, image_std)."""
        size = config.get("size") or {}
        tile = size.get("height", defaults.get("tile_size", 560)) if isinstance(size, dict) else size
        if isinstance(size, dict) and size.get("width", tile) != tile:
            raise ValueError(f"preprocessor size must be square, got {size}")
        return cls(tile_size=int(tile), max_tiles=int(config.get("max_image_tiles", defaults.get("max_tiles", 4))),
                   mean=config.get("image_mean", CLIP_MEAN), std=config.get("image_std", CLIP_STD))

    def tiles(self, image: ImageSource) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (tiles [h*w, 3, t, t] float32, (h, w) tiles along height and width)."""
        img = load_image(image, max_pixels=self.max_pixels)
        t = self.tile_size
        h_tiles, w_tiles = choose_canvas(img.height, img.width, t, self.max_tiles)
        new_h, new_w = fit_size(img.height, img.width, h_tiles * t, w_tiles * t, t)
        img = img.resize((new_w, new_h), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, new_h, new_w) uint8
        canvas = torch.zeros(3, h_tiles * t, w_tiles * t, dtype=torch.float32)
        # rescale in float64 then cast, as HF; the zero padding is normalized with everything else
        canvas[:, :new_h, :new_w] = (pixels.to(torch.float64) * (1 / 255)).to(torch.float32)
        canvas = (canvas - self.mean) / self.std
        tiles = canvas.view(3, h_tiles, t, w_tiles, t).permute(1, 3, 0, 2, 4)  # (h, w, 3, t, t): row-major
        return tiles.reshape(h_tiles * w_tiles, 3, t, t), (h_tiles, w_tiles)

    def __call__(self, images: Sequence[Sequence[ImageSource]] | Sequence[ImageSource] | ImageSource
                 ) -> ImageInputs:
        """A batch: a list of images per sample (a flat list is one sample; a single image, one image)."""
        batch = _nest(images)
        if not batch or not any(batch):
            raise ValueError("no images given")
        n_img = max(len(sample) for sample in batch)
        t, T = self.tile_size, self.max_tiles
        pixel_values = torch.zeros(len(batch), n_img, T, 3, t, t, dtype=torch.float32)
        ids = torch.zeros(len(batch), n_img, dtype=torch.long)
        mask = torch.zeros(len(batch), n_img, T, dtype=torch.long)
        mask[:, :, 0] = 1  # HF (and Meta's batch padding with (1, 1)) mark tile 0 even for padded image slots
        num_tiles: list[list[int]] = []
        for b, sample in enumerate(batch):
            counts = []
            for i, image in enumerate(sample):
                tiles, hw = self.tiles(image)
                pixel_values[b, i, : len(tiles)] = tiles
                ids[b, i] = self.aspect_ratios.index(hw) + 1
                mask[b, i, : len(tiles)] = 1
                counts.append(len(tiles))
            num_tiles.append(counts)
        return ImageInputs(pixel_values, ids, mask, num_tiles)


def _nest(images: Any) -> list[list[Any]]:
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return [[images]]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    return [images]


# ---- cross-attention mask -----------------------------------------------------------------------------


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Token rows each image is attended from: `[start, end)` per `<|image|>`, end -1 = to the end (SPEC 2.3).

    Image k covers its own token up to the next image; the last image covers the rest; an image directly
    followed by another shares that one's range (consecutive images are attended jointly).
    """
    locs = [i for i, tok in enumerate(ids) if tok == image_token_id]
    if len(locs) <= 1:
        return [(locs[0], -1)] if locs else []
    spans = [[a, b] for a, b in zip(locs[:-1], locs[1:], strict=True)] + [[locs[-1], len(ids)]]
    end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(batch_ids: Sequence[Sequence[int]], num_tiles: Sequence[Sequence[int]],
                         image_token_id: int, max_tiles: int = 4, length: int | None = None) -> torch.Tensor:
    """Dense mask int64 [B, L, I, max_tiles]: 1 where token row l attends tile k of image i (HF processor).

    Tiles past an image's own count are never attended. L = `length` or the longest row.
    """
    if len(batch_ids) != len(num_tiles):
        raise ValueError(f"{len(batch_ids)} token rows but tile counts for {len(num_tiles)} samples")
    spans = [image_spans(ids, image_token_id) for ids in batch_ids]
    for b, (s, n) in enumerate(zip(spans, num_tiles, strict=True)):
        if len(s) != len(n):
            raise ValueError(f"sample {b} has {len(s)} <|image|> tokens (id {image_token_id}) but {len(n)} "
                             "images; put exactly one <|image|> token per image")
    L = length if length is not None else max(len(ids) for ids in batch_ids)
    out = torch.zeros(len(batch_ids), L, max((len(s) for s in spans), default=0), max_tiles, dtype=torch.long)
    for b, (sample, counts) in enumerate(zip(spans, num_tiles, strict=True)):
        for i, ((start, end), n) in enumerate(zip(sample, counts, strict=True)):
            end = L if end == -1 else min(end, L)
            out[b, start:end, i, :n] = 1
    return out
