"""Reference photos of every PIL mode and size turned into 512 x 512 RGB on white."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreamcache_core.errors import DreamCacheMismatchError
from dreamcache_core.image import pil_to_image_tensor, prepare_reference


def pixel(image: torch.Tensor, row: int, column: int) -> list[float]:
    return image[0, row, column].tolist()


def test_rgba_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    image.putpixel((1, 1), (0, 0, 255, 255))
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 3, 4, 3)
    assert tensor.dtype == torch.float32
    assert pixel(tensor, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(tensor, 1, 1) == [0.0, 0.0, 1.0]


def test_rgba_half_transparent_red():
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 255))
    image.putpixel((0, 1), (255, 0, 0, 128))
    tensor = pil_to_image_tensor(image)

    # Alpha compositing on white: colour * alpha + white * (1 - alpha), per channel.
    alpha = 128 / 255
    expected = [1.0 * alpha + (1.0 - alpha), 0.0 * alpha + (1.0 - alpha), 0.0 * alpha + (1.0 - alpha)]
    assert pixel(tensor, 1, 0) == pytest.approx(expected, abs=1e-6)
    assert pixel(tensor, 1, 0)[1] == pytest.approx(127 / 255, abs=1e-6)
    assert pixel(tensor, 0, 0) == [0.0, 0.0, 0.0]


def test_greyscale_l_repeats_channels():
    image = Image.fromarray(np.array([[0, 51], [102, 255]], dtype=np.uint8), mode="L")
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 2, 2, 3)
    assert pixel(tensor, 0, 1) == pytest.approx([0.2, 0.2, 0.2])
    assert pixel(tensor, 1, 0) == pytest.approx([0.4, 0.4, 0.4])
    assert pixel(tensor, 1, 1) == [1.0, 1.0, 1.0]


def test_greyscale_la_composites_on_white():
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (0, 255))
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 1, 2, 3)
    assert pixel(tensor, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(tensor, 0, 1) == [0.0, 0.0, 0.0]


def test_palette_transparency_becomes_white():
    image = Image.new("P", (3, 1), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    tensor = pil_to_image_tensor(image)

    assert pixel(tensor, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(tensor, 0, 1) == [0.0, 1.0, 0.0]
    assert pixel(tensor, 0, 2) == [1.0, 1.0, 1.0]


def test_palette_without_transparency():
    image = Image.new("P", (2, 1), 0)
    image.putpalette([255, 0, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((1, 0), 1)
    tensor = pil_to_image_tensor(image)

    assert pixel(tensor, 0, 0) == [1.0, 0.0, 0.0]
    assert pixel(tensor, 0, 1) == [0.0, 0.0, 1.0]


def test_sixteen_bit_greyscale_scaled():
    values = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 2, 2, 3)
    assert tensor.dtype == torch.float32
    assert pixel(tensor, 0, 0) == [0.0, 0.0, 0.0]
    assert pixel(tensor, 0, 1) == [1.0, 1.0, 1.0]
    assert pixel(tensor, 1, 0) == pytest.approx([32768 / 65535] * 3)
    assert pixel(tensor, 1, 1) == pytest.approx([1000 / 65535] * 3)


def test_cmyk_converted_to_rgb():
    image = Image.new("CMYK", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    image.putpixel((2, 0), (0, 0, 0, 255))
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 1, 3, 3)
    assert pixel(tensor, 0, 0) == [1.0, 1.0, 1.0]
    assert pixel(tensor, 0, 1) == [0.0, 1.0, 1.0]
    assert pixel(tensor, 0, 2) == [0.0, 0.0, 0.0]


def test_one_bit_image():
    image = Image.new("1", (2, 2), 0)
    image.putpixel((1, 0), 1)
    tensor = pil_to_image_tensor(image)

    assert tensor.shape == (1, 2, 2, 3)
    assert pixel(tensor, 0, 0) == [0.0, 0.0, 0.0]
    assert pixel(tensor, 0, 1) == [1.0, 1.0, 1.0]


def test_tiny_image_upscaled():
    image = Image.new("RGB", (8, 8), (51, 102, 204))
    reference = prepare_reference(pil_to_image_tensor(image))

    assert reference.shape == (1, 512, 512, 3)
    expected = torch.tensor([0.2, 0.4, 0.8]).expand(1, 512, 512, 3)
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=0)


def test_large_photo_downscaled():
    # Built only when this test runs: 6000 x 4000 RGB with a black band over the top quarter.
    image = Image.new("RGB", (6000, 4000), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 6000, 1000))
    reference = prepare_reference(pil_to_image_tensor(image))
    del image

    assert reference.shape == (1, 512, 512, 3)
    assert reference.dtype == torch.float32
    assert float(reference.min()) >= 0.0
    assert float(reference.max()) <= 1.0
    assert pixel(reference, 10, 256) == pytest.approx([0.0] * 3, abs=1e-5)
    assert pixel(reference, 400, 256) == pytest.approx([1.0] * 3, abs=1e-5)


def crop_test_image() -> torch.Tensor:
    """Return a 64 x 128 (H x W) RGB image: red left quarter, blue right quarter, white centre
    square with a black bar over its left quarter (columns 32 to 47)."""
    image = torch.ones(1, 64, 128, 3)
    image[:, :, :32] = torch.tensor([1.0, 0.0, 0.0])
    image[:, :, 96:] = torch.tensor([0.0, 0.0, 1.0])
    image[:, :, 32:48] = 0.0
    return image


def test_crop_takes_centre_square():
    image = crop_test_image()
    reference = prepare_reference(image, resolution=64, fit="crop")

    assert reference.shape == (1, 64, 64, 3)
    assert torch.equal(reference, image[:, :, 32:96])
    assert torch.all(reference[:, :, :16] == 0.0)
    assert torch.all(reference[:, :, 16:] == 1.0)


def test_crop_keeps_proportions_when_scaling():
    reference = prepare_reference(crop_test_image(), resolution=128, fit="crop")

    # The bar is a quarter of the crop's width, so it stays a quarter: columns 0 to 31 of 128.
    assert reference.shape == (1, 128, 128, 3)
    assert torch.all(reference[:, :, :30] < 0.01)
    assert torch.all(reference[:, :, 34:] > 0.99)


def test_stretch_keeps_whole_image():
    reference = prepare_reference(crop_test_image(), resolution=64, fit="stretch")

    assert reference.shape == (1, 64, 64, 3)
    assert pixel(reference, 32, 2) == pytest.approx([1.0, 0.0, 0.0], abs=1e-5)
    assert pixel(reference, 32, 61) == pytest.approx([0.0, 0.0, 1.0], abs=1e-5)


def test_comfy_image_batch_with_alpha():
    image = torch.zeros(2, 64, 64, 4)
    image[1, ..., 3] = 1.0
    reference = prepare_reference(image, resolution=64)

    assert reference.shape == (2, 64, 64, 3)
    assert torch.all(reference[0] == 1.0)
    assert torch.all(reference[1] == 0.0)


@pytest.mark.parametrize("resolution", [500, 0, 32])
def test_invalid_resolution(resolution):
    with pytest.raises(DreamCacheMismatchError, match=rf"resolution {resolution} is invalid; use a multiple of 64"):
        prepare_reference(torch.zeros(1, 8, 8, 3), resolution=resolution)


def test_unknown_fit():
    with pytest.raises(DreamCacheMismatchError, match=r"Unknown fit 'pad'"):
        prepare_reference(torch.zeros(1, 8, 8, 3), fit="pad")


def test_bad_channel_count():
    with pytest.raises(DreamCacheMismatchError, match="has 5 channels"):
        prepare_reference(torch.zeros(1, 8, 8, 5))
