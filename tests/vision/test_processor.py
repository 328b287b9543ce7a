"""Our Idefics3 processor vs transformers' (PIL backend) on real photos from skimage.data.

Identical input_ids; pixel_values within 1e-5 (observed: bit-identical); same pixel_attention_mask.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from tiny_idefics3 import CHAT_TEMPLATE, build_tokenizer  # noqa: E402

from edge_mmm.errors import InputError  # noqa: E402
from edge_mmm.vision.processor import ImageProcessorConfig, load_image  # noqa: E402
from edge_mmm.vision.prompt import Idefics3Processor  # noqa: E402

PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "camera"]  # camera is grayscale
SETTINGS = [  # (size longest_edge, max_image_size, do_image_splitting, image_seq_len)
    (256, 64, True, 16), (200, 96, True, 9), (300, 64, False, 16), (128, 128, True, 4),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _pair(tmp_path, tokenizer, longest, tile, split, seq_len):
    from transformers import Idefics3Processor as HFProcessor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                   do_image_splitting=split)
    hf = HFProcessor(ip, tokenizer, image_seq_len=seq_len, chat_template=CHAT_TEMPLATE)
    hf.save_pretrained(tmp_path)
    pc = json.loads((tmp_path / "processor_config.json").read_text())
    ours = Idefics3Processor.from_dir(ImageProcessorConfig.from_dict(pc["image_processor"], pc["image_seq_len"]),
                                      tmp_path)
    return hf, ours


@pytest.mark.parametrize("setting", SETTINGS, ids=[f"le{s[0]}-tile{s[1]}-split{int(s[2])}" for s in SETTINGS])
def test_processor_matches_transformers(tmp_path, tokenizer, setting):
    hf, ours = _pair(tmp_path, tokenizer, *setting)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == prompt
    for name in PHOTOS:
        arr = getattr(skdata, name)()
        ref = hf(images=[Image.fromarray(arr)], text=prompt, return_tensors="np")
        got = ours([Image.fromarray(arr)], prompt)
        assert got.input_ids.tolist() == ref["input_ids"].tolist(), name
        assert got.images.pixel_values.shape == ref["pixel_values"].shape, name
        assert np.abs(got.images.pixel_values - ref["pixel_values"]).max() <= 1e-5, name
        assert np.array_equal(got.images.pixel_attention_mask, ref["pixel_attention_mask"]), name


def test_two_images_and_input_kinds(tmp_path, tokenizer):
    """Two images in one prompt; a path, a PIL image and an OpenCV BGR frame give the same result."""
    hf, ours = _pair(tmp_path, tokenizer, 256, 64, True, 16)
    rgb_a, rgb_b = skdata.coffee(), skdata.chelsea()
    path = tmp_path / "coffee.png"
    Image.fromarray(rgb_a).save(path)
    text = "<|im_start|>User:<image>and<image>compare<end_of_utterance>\nAssistant:"
    ref = hf(images=[Image.fromarray(rgb_a), Image.fromarray(rgb_b)], text=text, return_tensors="np")
    for a, b in [(path, Image.fromarray(rgb_b)), (rgb_a[:, :, ::-1].copy(), rgb_b[:, :, ::-1].copy())]:
        got = ours([a, b], text)
        assert got.input_ids.tolist() == ref["input_ids"].tolist()
        assert np.abs(got.images.pixel_values - ref["pixel_values"]).max() <= 1e-5


def test_grayscale_rgba_16bit_are_converted():
    gray = skdata.camera()
    assert np.array_equal(np.asarray(load_image(gray)), np.stack([gray] * 3, -1))
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white, as transformers composites
    assert (np.asarray(load_image(Image.fromarray(rgba, "RGBA"))) == 255).all()
    g16 = (gray.astype(np.uint16) * 257)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(g16))), np.stack([gray] * 3, -1))
    assert np.array_equal(np.asarray(load_image(g16)), np.stack([gray] * 3, -1))


@pytest.mark.parametrize("orientation,turn", [(1, None), (3, Image.Transpose.ROTATE_180),
                                               (6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_of_files_is_applied(tmp_path, orientation, turn):
    """A sideways phone photo (EXIF Orientation) is read upright from a path or bytes, as transformers'
    `load_image` reads it; a PIL image passed in is taken as it is."""
    pixels = np.zeros((30, 50, 3), np.uint8)
    pixels[:10, :20] = (255, 0, 0)  # a red block in the top-left corner tells the turns apart
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    img.save(path, exif=exif)
    want = np.asarray(img if turn is None else img.transpose(turn))
    assert np.array_equal(np.asarray(load_image(path)), want)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), want)
    assert np.array_equal(np.asarray(load_image(Image.open(path))), pixels)
    from transformers.image_utils import load_image as hf_load_image

    assert np.array_equal(np.asarray(hf_load_image(str(path)).convert("RGB")), want)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height (the pixels are never decoded: refused first)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def test_bad_images_raise_input_error_naming_the_file(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.txt"):
        load_image(bad)
    with pytest.raises(InputError, match="empty"):
        load_image(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(InputError, match="too large"):
        load_image(png_header_only(tmp_path / "huge.png", 20000, 20000))
    with pytest.raises(InputError, match="too large"):
        load_image(png_header_only(tmp_path / "big.png", 9000, 9000))  # under PIL's bomb limit, over ours
    with pytest.raises(InputError, match="zero.png"):
        load_image(png_header_only(tmp_path / "zero.png", 0, 0))
    with pytest.raises(InputError, match="missing.png: no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="a directory"):
        load_image(tmp_path)
    with pytest.raises(InputError, match="a URL"):
        load_image("https://example.com/cat.jpg")
