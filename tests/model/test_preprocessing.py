"""The official preprocessing (docs/method.md, section 3) against oracles written here: PIL's own
bilinear resize for the frozen and evaluation inputs, and the training augmentation drawn step by
step in the official order (flip, then colour jitter on the full image, then random resized crop)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import ColorJitter, RandomResizedCrop
from torchvision.transforms import functional as TF

from fpt_fast import FPTTransforms
from fpt_fast.model.preprocessing import FrozenTransform, SideTransform, as_rgb8
from helpers import tiny_config

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def photo(height=75, width=61, seed=0):
    """A smooth RGB image with fine noise: resizing filters give visibly different results on it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    smooth = np.stack([np.sin(6 * yy + c) * np.cos(4 * xx - c) for c in range(3)], axis=-1)
    pixels = 127.5 + 90 * smooth + rng.normal(0, 20, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def normalised(image, mean=MEAN, std=STD):
    """(3, h, w) float32 of an 8-bit RGB PIL image: [0, 1], then (x - mean) / std per channel."""
    x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return torch.from_numpy((x - np.float32(mean)[:, None, None]) / np.float32(std)[:, None, None])


def test_frozen_input_is_the_pil_bilinear_resize_of_the_uint8_image():
    image = photo()
    out = FrozenTransform((48, 40), MEAN, STD)(image)
    assert out.shape == (3, 48, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalised(image.resize((40, 48), Image.BILINEAR)), atol=1e-6, rtol=0)
    # Resizing the float image with torch instead (fpt_fast's former frozen input) is not the same.
    from fpt_fast.model import resize_images
    tensor_resize = (resize_images(normalised(image, [0] * 3, [1] * 3), (48, 40)) - torch.tensor(MEAN)[:, None, None]) \
        / torch.tensor(STD)[:, None, None]
    assert (tensor_resize - out).abs().max() > 1e-3


def test_side_input_for_evaluation_is_a_separate_resize():
    image = photo()
    out = SideTransform((16, 24), MEAN, STD, train=False)(image)
    torch.testing.assert_close(out, normalised(image.resize((24, 16), Image.BILINEAR)), atol=1e-6, rtol=0)


def official_order(image, seed, size, brightness=0.2, contrast=0.2, flip=0.5, scale=(0.8, 1.0), ratio=(0.7, 1.3)):
    """The official training side input, drawn step by step: flip with probability flip; colour
    jitter of the full image (one draw of the always-applied wrapper, then the jitter's order and
    factors); random resized crop (one wrapper draw, then the crop box) to size; normalise."""
    torch.manual_seed(seed)
    if torch.rand(1) < flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    torch.rand(1)
    order, b, c, _, _ = ColorJitter.get_params((1 - brightness, 1 + brightness), (1 - contrast, 1 + contrast),
                                               None, None)
    for step in order.tolist():
        if step == 0:
            image = TF.adjust_brightness(image, b)
        elif step == 1:
            image = TF.adjust_contrast(image, c)
    torch.rand(1)
    top, left, height, width = RandomResizedCrop.get_params(image, list(scale), list(ratio))
    image = image.crop((left, top, left + width, top + height)).resize((size[1], size[0]), Image.BILINEAR)
    return normalised(image)


def crop_first(image, seed, size):
    """fpt_fast's former order (crop, then flip and jitter the small crop), for contrast."""
    torch.manual_seed(seed)
    top, left, height, width = RandomResizedCrop.get_params(image, [0.8, 1.0], [0.7, 1.3])
    image = image.crop((left, top, left + width, top + height)).resize((size[1], size[0]), Image.BILINEAR)
    if torch.rand(1) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    _, b, c, _, _ = ColorJitter.get_params((0.8, 1.2), (0.8, 1.2), None, None)
    return normalised(TF.adjust_contrast(TF.adjust_brightness(image, b), c))


def test_training_side_input_flips_then_jitters_the_full_image_then_crops():
    image = photo(90, 70)
    side = SideTransform((24, 20), MEAN, STD, train=True)
    flipped = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = side(image)
        torch.testing.assert_close(out, official_order(image, seed, (24, 20)), atol=1e-6, rtol=0)
        assert (out - crop_first(image, seed, (24, 20))).abs().max() > 1e-2
        torch.manual_seed(seed)
        flipped += bool(torch.rand(1) < 0.5)
    assert 0 < flipped < 6  # both branches of the flip were checked


def test_other_image_modes_become_8_bit_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(np.asarray(as_rgb8(Image.fromarray(gray))), np.repeat(gray[..., None], 3, axis=2))
    floats = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert np.asarray(as_rgb8(floats))[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    with pytest.raises(TypeError, match="PIL.Image.Image, got Tensor"):
        FrozenTransform((16, 16), MEAN, STD)(torch.rand(3, 16, 16))


def test_the_pair_of_inputs_for_a_model():
    config = tiny_config("fpt+")
    transforms = FPTTransforms(config, MEAN, STD)
    x_hi, x_lo = transforms(photo())
    assert x_hi.shape == (3, *config.image_size) and x_lo.shape == (3, *config.side_input_size)
    torch.testing.assert_close(x_hi, FrozenTransform(config.image_size, MEAN, STD)(photo()))
    torch.manual_seed(0)
    augmented = FPTTransforms(config, MEAN, STD, train=True, hflip_prob=1.0)(photo())[1]
    assert augmented.shape == x_lo.shape and not torch.equal(augmented, x_lo)
    with pytest.raises(ValueError, match="std must be positive"):
        FPTTransforms(config, MEAN, [0.2, 0.0, 0.3])
    with pytest.raises(ValueError, match="3 \\(RGB\\) values"):
        FPTTransforms(config, [0.5] * 2, STD)


# ------------------------------------------------------------------ the GPU decode option (CPU stand-in)
def _jpeg_bytes(image, **save):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **save)
    return buffer.getvalue()


def _encoded(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def test_device_decodable_jpegs_are_8_bit_huffman_gray_or_ycbcr_and_whole():
    import io

    from fpt_fast.model.preprocessing import device_decodable_jpeg

    rgb = photo()
    assert device_decodable_jpeg(_jpeg_bytes(rgb))
    assert device_decodable_jpeg(_jpeg_bytes(rgb, progressive=True))
    assert device_decodable_jpeg(_jpeg_bytes(rgb.convert("L")))
    assert not device_decodable_jpeg(_jpeg_bytes(rgb.convert("CMYK")))    # PIL's colour conversion instead
    assert not device_decodable_jpeg(_jpeg_bytes(rgb)[:-200])              # cut short: PIL names the error
    png = io.BytesIO()
    rgb.save(png, format="PNG")
    assert not device_decodable_jpeg(png.getvalue()) and not device_decodable_jpeg(b"")


@pytest.mark.parametrize("kind", ["jpeg", "jpeg-gray", "jpeg-progressive", "png-rgba", "png-16bit"])
def test_device_transform_on_the_cpu_is_within_one_level_of_the_official(kind):
    """DeviceFrozenTransform on the CPU (torchvision's decoder and uint8 resize: the GPU path's code)
    against FrozenTransform (PIL): within one level of 255 per pixel, mostly equal; images of two
    sizes in one call; the description names the decoder, so store fingerprints differ."""
    import io

    from fpt_fast.model.preprocessing import DeviceFrozenTransform, image_pixels

    images, inputs = [], []
    for seed, (height, width) in enumerate([(75, 61), (75, 61), (90, 52)]):
        image = photo(height, width, seed)
        if kind.startswith("jpeg"):
            data = _jpeg_bytes(image.convert("L") if kind == "jpeg-gray" else image,
                               progressive=kind == "jpeg-progressive")
            images.append(Image.open(io.BytesIO(data)))
            inputs.append(_encoded(data))
        else:
            image = image.convert("RGBA") if kind == "png-rgba" else \
                Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
            images.append(image)
            inputs.append(image_pixels(image))
    official = FrozenTransform((48, 40), MEAN, STD)
    device = DeviceFrozenTransform((48, 40), MEAN, STD)
    got = device(inputs, "cpu")
    want = torch.stack([official(image) for image in images])
    assert got.shape == want.shape and got.dtype == torch.float32
    levels = ((got - want) * torch.tensor(STD)[:, None, None] * 255).abs()
    assert levels.max() <= 1 + 1e-3 and (levels < 1e-3).float().mean() > 0.9
    assert device.description() != official.description() and "decode" in device.description()


def test_a_device_that_cannot_decode_jpeg_is_named(monkeypatch):
    import torchvision.io as tv_io

    from fpt_fast.model.preprocessing import DeviceFrozenTransform

    assert DeviceFrozenTransform.decoding_problem("cpu") is None

    def unavailable(*args, **kwargs):
        raise RuntimeError("not compiled with nvJPEG support")
    monkeypatch.setattr(tv_io, "decode_jpeg", unavailable)
    assert DeviceFrozenTransform.decoding_problem("cpu") == \
        "torchvision cannot decode JPEG files on cpu (not compiled with nvJPEG support)"


@pytest.mark.cuda
def test_device_transform_on_a_gpu_is_close_to_the_official():
    """nvJPEG and the CUDA resize against PIL (unmeasured before the first GPU run): a few levels of
    255 at most, under one on average; a swapped channel, a missing normalisation or a colour-space
    slip would be tens of levels off."""
    import io

    from fpt_fast.model.preprocessing import DeviceFrozenTransform

    assert DeviceFrozenTransform.decoding_problem("cuda") is None
    data = [_jpeg_bytes(photo(300, 400, seed)) for seed in range(3)] + [_jpeg_bytes(photo(300, 400, 9).convert("L"))]
    got = DeviceFrozenTransform((128, 96), MEAN, STD)([_encoded(d) for d in data], "cuda")
    assert got.device.type == "cuda"
    want = torch.stack([FrozenTransform((128, 96), MEAN, STD)(Image.open(io.BytesIO(d))) for d in data])
    levels = ((got.cpu() - want) * torch.tensor(STD)[:, None, None] * 255).abs()
    assert levels.max() <= 8 and levels.mean() < 1, (levels.max().item(), levels.mean().item())
