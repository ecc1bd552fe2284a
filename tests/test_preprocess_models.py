"""The shared preprocessing (against plain numpy) and the model registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.models import build_model
from training.preprocess import InputSpec, Preprocessor, to_mode


def test_normalisation_is_the_papers_on_a_known_image() -> None:
    pixels = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    tensor = Preprocessor(InputSpec(channels=1, height=12, width=10))(Image.fromarray(pixels))
    expected = (pixels.astype(np.float32) - 127.5) / 128.0
    assert tensor.shape == (1, 12, 10)
    np.testing.assert_allclose(tensor[0].numpy(), expected, rtol=0, atol=1e-7)


def test_rgb_is_channel_first_and_resized_to_height_by_width() -> None:
    pixels = np.zeros((20, 30, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    tensor = Preprocessor(InputSpec(channels=3, height=8, width=6))(Image.fromarray(pixels))
    assert tensor.shape == (3, 8, 6)
    assert torch.allclose(tensor[0], torch.full((8, 6), 127.5 / 128))
    assert torch.allclose(tensor[1], torch.full((8, 6), -127.5 / 128))


def test_16_bit_images_are_rescaled_not_clipped_to_white() -> None:
    array = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    image = Image.fromarray(array)
    assert image.mode == "I;16"
    converted = np.asarray(to_mode(image, "L"), dtype=np.int32)
    np.testing.assert_allclose(converted, np.round(array / 65535 * 255), atol=1)
    assert converted.max() < 255 and converted.min() == 0


def test_transparent_pixels_become_black_and_palette_images_convert() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white but fully transparent
    rgba[0, 0, 3] = 255  # one opaque white pixel
    gray = np.asarray(to_mode(Image.fromarray(rgba), "L"))
    assert gray[0, 0] == 255 and gray[1:, :].max() == 0
    palette = Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).convert("P")
    assert np.asarray(to_mode(palette, "L")).min() == 200


def test_cmyk_converts_to_rgb() -> None:
    cmyk = Image.new("CMYK", (5, 5), (0, 255, 255, 0))  # pure red
    assert to_mode(cmyk, "RGB").getpixel((2, 2)) == (255, 0, 0)


def test_training_flip_only_when_enabled() -> None:
    pixels = np.tile(np.arange(10, dtype=np.uint8) * 20, (4, 1))
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    flipping = Preprocessor(InputSpec(1, 4, 10), hflip=True)
    outputs = {tuple(flipping(image, train=True)[0, 0].tolist()) for _ in range(30)}
    assert len(outputs) == 2
    plain = Preprocessor(InputSpec(1, 4, 10), hflip=False)
    assert all(torch.equal(plain(image, train=True), plain(image)) for _ in range(10))
    assert all(torch.equal(flipping(image), plain(image)) for _ in range(10))


@pytest.mark.parametrize("field", [{"channels": 2}, {"height": 0}, {"std": 0.0}, {"resize": "magic"}])
def test_invalid_input_spec_is_refused(field: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        InputSpec(**field)  # type: ignore[arg-type]


def test_input_spec_round_trips_through_a_dict() -> None:
    spec = InputSpec(channels=3, height=64, width=56, mean=0.0, std=255.0, resize="bicubic")
    assert InputSpec.from_dict({**spec.to_dict(), "unknown": 1}) == spec


@pytest.mark.parametrize(
    ("arch", "kwargs", "feat_dim"),
    [
        ("lenetpp", {"image_size": (28, 28), "feat_dim": 2}, 2),
        ("resnet18", {"image_size": (112, 96), "feat_dim": 32, "width": 4}, 32),
        ("resnet18", {"in_channels": 3, "image_size": (56, 48), "feat_dim": 16, "width": 4}, 16),
        ("resnet34", {"image_size": (28, 28), "feat_dim": 8, "width": 4}, 8),
    ],
)
def test_registry_builds_embedding_networks_that_record_their_kwargs(
    arch: str, kwargs: dict[str, object], feat_dim: int
) -> None:
    model = build_model(arch, **kwargs).eval()
    channels = int(kwargs.get("in_channels", 1))  # type: ignore[call-overload]
    height, width = kwargs["image_size"]  # type: ignore[misc]
    with torch.no_grad():
        assert model(torch.randn(2, channels, height, width)).shape == (2, feat_dim)
    rebuilt = build_model(model.arch, **model.arch_kwargs)
    rebuilt.load_state_dict(model.state_dict())


def test_resnet34_is_deeper_than_resnet18() -> None:
    def count(name: str) -> int:
        return sum(p.numel() for p in build_model(name, image_size=(28, 28), feat_dim=8, width=4).parameters())

    assert count("resnet34") > count("resnet18")


def test_unknown_arch_and_bad_kwargs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build_model("vgg")
    with pytest.raises(ValueError, match="bad arguments for arch 'lenetpp'"):
        build_model("lenetpp", depth=3)
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("lenetpp", image_size=(4, 4))


def test_lenetpp_keeps_the_signal_alive_through_six_convolutions() -> None:
    torch.manual_seed(0)
    model = build_model("lenetpp", image_size=(28, 28), feat_dim=2)
    with torch.no_grad():
        assert model(torch.randn(64, 1, 28, 28)).std() > 0.1
