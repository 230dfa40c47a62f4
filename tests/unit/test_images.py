import pytest
import torch

from omni_attribute.errors import ImageInputError
from omni_attribute.images import fit_pixels, to_rgb_batch


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_channel_modes_become_rgb(channels):
    image = torch.rand(2, 10, 12, channels)
    rgb = to_rgb_batch(image)
    assert rgb.shape == (2, 3, 10, 12)
    assert torch.equal(rgb[:, 0], image[..., 0])
    if channels < 3:  # gray is repeated
        assert torch.equal(rgb[:, 1], rgb[:, 0]) and torch.equal(rgb[:, 2], rgb[:, 0])


def test_single_image_without_batch_and_out_of_range_values():
    rgb = to_rgb_batch(torch.full((4, 4, 3), 2.0))
    assert rgb.shape == (1, 3, 4, 4) and rgb.max() == 1.0


@pytest.mark.parametrize("image, fragment", [
    (torch.rand(1, 8, 8, 5), "5 channels"),
    (torch.rand(1, 0, 8, 3), "empty"),
    (torch.rand(8, 8), "shape"),
    (torch.full((1, 4, 4, 3), float("nan")), "NaN"),
    ("not a tensor", "IMAGE tensor"),
])
def test_unusable_images_are_refused(image, fragment):
    with pytest.raises(ImageInputError, match=fragment):
        to_rgb_batch(image)


def test_fit_pixels_bounds():
    big = fit_pixels(torch.rand(1, 3, 1000, 2000), min_pixels=100, max_pixels=10_000, min_side=28)
    assert big.shape[2] * big.shape[3] <= 10_000 * 1.05 and abs(big.shape[3] / big.shape[2] - 2) < 0.1
    small = fit_pixels(torch.rand(1, 3, 1, 1), min_pixels=28 * 28, max_pixels=10_000, min_side=28)
    assert min(small.shape[2:]) >= 28
    with pytest.raises(ImageInputError, match="aspect ratio"):
        fit_pixels(torch.rand(1, 3, 1, 500), 100, 10_000, 28)
