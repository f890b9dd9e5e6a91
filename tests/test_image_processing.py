"""Image preprocessing against transformers' MllamaImageProcessor (PIL backend), on the real photos from
llama-models and on synthetic images for every canvas; loading edge cases and the cross-attention mask."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from mllama_fixtures import one_thread  # noqa: F401  (autouse: tiny models on one thread)
from PIL import Image

from pocketllama.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    MllamaImageProcessor,
    choose_canvas,
    cross_attention_mask,
    fit_size,
    image_spans,
    load_image,
)

# SPEC 3 worked table (t = 560): input H x W -> tiles (h, w), aspect_ratio_id, resized H x W.
SPEC_TABLE = [
    ((560, 560), (1, 1), 1, (560, 560)),
    ((300, 400), (1, 1), 1, (420, 560)),
    ((480, 640), (1, 2), 2, (480, 640)),
    ((600, 800), (2, 2), 6, (600, 800)),
    ((720, 1280), (2, 2), 6, (630, 1120)),
    ((1080, 1920), (2, 2), 6, (630, 1120)),
    ((3000, 4000), (2, 2), 6, (840, 1120)),
    ((1000, 3000), (1, 3), 3, (560, 1680)),
    ((2000, 500), (4, 1), 8, (2000, 500)),
    ((100, 2000), (1, 4), 4, (100, 2000)),
]
# Besides the table: the (2, 1) and (3, 1) canvases (scaled with the tile), then tiny and odd sizes.
CANVAS_EXTRA = [(900, 500), (1500, 560)]
ODD_SIZES = [(37, 53), (1, 300), (561, 559), (449, 1347)]


def photo(name: str) -> Path:
    spec = importlib.util.find_spec("llama_models")
    assert spec is not None and spec.origin, "llama-models (test dependency) is not installed"
    return Path(spec.origin).parent / "resources" / name


def noise(h: int, w: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Smooth-ish random image (a random low-res pattern upsampled), so resizing is not trivially flat."""
    g = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    small = g.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), bands), dtype=np.uint8)
    img = Image.fromarray(small.squeeze(-1) if bands == 1 else small, mode=mode)
    return img.resize((w, h), Image.NEAREST)


def hf_processor(tile: int):
    from transformers import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": tile, "width": tile}, image_mean=list(CLIP_MEAN),
                                   image_std=list(CLIP_STD), max_image_tiles=4)


def assert_same_as_hf(ours, images_hf, tile: int):
    ref = hf_processor(tile)(images=images_hf, return_tensors="pt")
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(ours.aspect_ratio_ids, ref["aspect_ratio_ids"])
    assert torch.equal(ours.aspect_ratio_mask, ref["aspect_ratio_mask"])
    assert ours.num_tiles == ref["num_tiles"]


@pytest.mark.parametrize("row", SPEC_TABLE, ids=lambda r: f"{r[0][0]}x{r[0][1]}")
def test_spec_worked_table(row):
    (h, w), tiles, ar_id, resized = row
    assert choose_canvas(h, w, 560, 4) == tiles
    assert fit_size(h, w, tiles[0] * 560, tiles[1] * 560, 560) == resized
    assert MllamaImageProcessor().aspect_ratios.index(tiles) + 1 == ar_id


@pytest.mark.parametrize("tile", [560, 448])
def test_synthetic_sizes_equal_transformers(tile):
    """Every canvas of the SPEC table at both tile sizes (sizes scaled by tile/560, so each row keeps its
    canvas), plus odd sizes; one image per sample. The two largest inputs are only in the table test."""
    proc = MllamaImageProcessor(tile_size=tile)
    table = [hw for hw, *_ in SPEC_TABLE if hw[0] * hw[1] < 2_000_000] + CANVAS_EXTRA
    seen = set()
    for i, (h, w) in enumerate([(h * tile // 560, w * tile // 560) for h, w in table] + ODD_SIZES):
        img = noise(h, w, seed=i)
        ours = proc([[img]])
        assert_same_as_hf(ours, [[img]], tile)
        seen.add(int(ours.aspect_ratio_ids[0, 0]))
    assert seen == set(range(1, 9))  # all eight canvases exercised


@pytest.mark.parametrize("name", ["dog.jpg", "pasta.jpeg"])
@pytest.mark.parametrize("tile", [560, 448])
def test_real_photos_equal_transformers(name, tile):
    ours = MllamaImageProcessor(tile_size=tile)(photo(name))
    assert_same_as_hf(ours, [[Image.open(photo(name))]], tile)
    assert ours.pixel_values.shape == (1, 1, 4, 3, tile, tile)


def test_batch_with_different_image_counts_equals_transformers():
    a, b, c = noise(300, 400), noise(2000, 500, seed=1), Image.open(photo("dog.jpg"))
    ours = MllamaImageProcessor(tile_size=448)([[a], [b, c]])
    assert_same_as_hf(ours, [[a], [b, c]], 448)
    assert ours.aspect_ratio_ids.tolist() == [[1, 0], [8, 6]]  # 512x512 at 448: upscaled onto 2x2
    assert ours.aspect_ratio_mask[0, 1].tolist() == [1, 0, 0, 0]  # padded slot: tile 0 forced on (as HF)
    assert ours.pixel_values[0, 1].abs().sum() == 0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P_transparent", "CMYK"])
def test_modes_equal_transformers(mode):
    """Alpha is composited onto white, like transformers' convert_to_rgb; greyscale/CMYK are converted."""
    if mode == "P_transparent":
        img = noise(200, 300).convert("P")
        img.info["transparency"] = 0
    else:
        img = noise(200, 300, mode="RGBA" if mode == "RGBA" else mode.replace("CMYK", "RGB"))
        img = img.convert(mode)
    if mode in ("RGBA", "LA"):
        alpha = np.zeros((200, 300), np.uint8)
        alpha[:, 150:] = 255
        img.putalpha(Image.fromarray(alpha))
    ours = MllamaImageProcessor()(img)
    assert_same_as_hf(ours, [[img]], 560)
    if mode in ("RGBA", "LA"):  # the transparent half is white: (1 - mean) / std
        white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        torch.testing.assert_close(ours.pixel_values[0, 0, 0, :, 10, 10], white)


def test_exif_rotation_applied():
    img = noise(200, 400)  # landscape pixels, stored with "rotate 90" (orientation 6): a portrait photo
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif)
    loaded = load_image(buf.getvalue())
    assert loaded.size == (200, 400)
    ours = MllamaImageProcessor()(buf.getvalue())
    upright = img.transpose(Image.Transpose.ROTATE_270)
    assert_same_as_hf(ours, [[upright]], 560)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((40, 40), 32768, dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    assert load_image(img).getpixel((0, 0)) == (128, 128, 128)


def test_every_source_kind_gives_the_same_tiles(tmp_path):
    img = noise(300, 700)
    path = tmp_path / "x.png"
    img.save(path)
    data = path.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    proc = MllamaImageProcessor()
    ref = proc(img).pixel_values
    for source in (path, str(path), data, bytearray(data), url):
        assert torch.equal(proc(source).pixel_values, ref)


def test_huge_image_downscaled():
    ours = MllamaImageProcessor(tile_size=448)(noise(4000, 6000))
    assert ours.aspect_ratio_ids.tolist() == [[6]] and ours.num_tiles == [[4]]


@pytest.mark.parametrize(
    "source, message",
    [
        (b"definitely not an image", r"image bytes \(23 bytes\) is not an image Pillow can read"),
        ("/nonexistent/cat.png", "image file '/nonexistent/cat.png' does not exist"),
        ("https://example.com/cat.png", "is a remote URL; pocketllama does not download images"),
        ("data:text/plain;base64,aGk=", "image data URL must look like 'data:image/<type>;base64,<data>'"),
        ("data:image/png;base64,@@@", "image data URL has invalid base64 data"),
        (12, "cannot read an image from a int"),
    ],
)
def test_load_errors(source, message):
    with pytest.raises(ValueError, match=message):
        load_image(source)


def test_truncated_image_error():
    buf = io.BytesIO()
    noise(200, 200).save(buf, format="PNG")
    with pytest.raises(ValueError, match="image bytes .* is truncated or corrupt"):
        load_image(buf.getvalue()[:300])


def test_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    noise(100, 120).save(path)
    with pytest.raises(ValueError, match=r"is 120x100 = 12000 pixels, over the 10000-pixel limit"):
        load_image(path, max_pixels=10_000)
    with pytest.raises(ValueError, match="over the 10000-pixel limit"):
        MllamaImageProcessor(max_pixels=10_000)(Image.new("RGB", (200, 200)))


def test_processor_argument_errors():
    with pytest.raises(ValueError, match="tile_size and max_tiles must be positive"):
        MllamaImageProcessor(tile_size=0)
    with pytest.raises(ValueError, match="mean and std need 3 values"):
        MllamaImageProcessor(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="no images given"):
        MllamaImageProcessor()([])
    with pytest.raises(ValueError, match="preprocessor size must be square"):
        MllamaImageProcessor.from_config({"size": {"height": 560, "width": 448}})


def test_from_preprocessor_config():
    proc = MllamaImageProcessor.from_config(
        {"size": {"height": 448, "width": 448}, "max_image_tiles": 4, "image_mean": list(CLIP_MEAN),
         "image_std": list(CLIP_STD)})
    assert proc.tile_size == 448 and proc.max_tiles == 4


IMG = 300
ID_CASES = [
    [1, 2, 3],  # no image
    [1, IMG, 5, 6, 7],  # one image
    [1, 2, IMG, 5, IMG, 7, 8],  # two separate images
    [1, IMG, IMG, 4, 5, IMG, 7],  # consecutive pair, then a third
    [IMG, IMG, IMG, 9],  # three consecutive at the start
    [1, IMG, 3, IMG, IMG],  # a consecutive pair at the very end
]


@pytest.mark.parametrize("ids", ID_CASES)
def test_image_spans_equal_transformers(ids):
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    assert [list(s) for s in image_spans(ids, IMG)] == get_cross_attention_token_mask(ids, IMG)


def test_dense_mask_equals_transformers_with_padding():
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    batch = [ID_CASES[3], ID_CASES[1] + [0, 0]]  # second row right-padded
    tiles = [[2, 4, 1], [3]]
    ours = cross_attention_mask(batch, tiles, IMG, max_tiles=4)
    sparse = [get_cross_attention_token_mask(ids, IMG) for ids in batch]
    ref = convert_sparse_cross_attention_mask_to_dense(sparse, tiles, 4, length=7)
    assert torch.equal(ours, torch.from_numpy(ref))
    assert ours[0, 0].sum() == 0 and ours[0, 1, :, :].tolist() == [[1, 1, 0, 0], [0] * 4, [0] * 4]
    assert ours[0, 2, :2].tolist() == [[1, 1, 0, 0], [1] * 4]  # consecutive images attended jointly
    assert ours[0, 5].tolist() == [[0] * 4, [0] * 4, [1, 0, 0, 0]]


def test_mask_errors():
    with pytest.raises(ValueError, match=r"sample 0 has 2 <\|image\|> tokens \(id 300\) but 1 images"):
        cross_attention_mask([ID_CASES[2]], [[4]], IMG)
    with pytest.raises(ValueError, match="2 token rows but tile counts for 1 samples"):
        cross_attention_mask([ID_CASES[1], ID_CASES[1]], [[4]], IMG)
