"""ALBEF's transforms, caption cleaning and collation, without Ray."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from albef_ray.data.collate import (
    CaptionCollator,
    collate_batch,
    load_tokenizer,
    pretokenize,
    tokenize,
)
from albef_ray.data.randaugment import ALBEF_OPS, OPS, apply_op, rand_augment
from albef_ray.data.transforms import (
    MEAN,
    STD,
    AugmentSpec,
    decode_image,
    eval_image,
    eval_transform,
    normalize,
    pre_caption,
    pretrain_image,
    pretrain_transform,
    sample_crop,
    transform_batch,
)

from .shard_fixtures import CORRUPT, encode, make_tokenizer, solid


def _photo(h=96, w=128, seed=0):
    """Smooth gradients plus a little noise: compresses like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w) + 64], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


LOW = torch.tensor([(0 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(3, 1, 1)


# ----------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("res", [32, 64])
def test_pretrain_transform_shape_dtype_range(fmt, res):
    data = encode(_photo(), fmt)
    out = pretrain_transform(data, AugmentSpec(res), _gen(0))
    assert out.shape == (3, res, res) and out.dtype == torch.float32
    assert (out >= LOW - 1e-5).all() and (out <= HIGH + 1e-5).all()
    assert out.std() > 0.1  # an image, not a constant


def test_normalize_is_to_tensor_then_official_normalize():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (x.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(normalize(x), expected)


@pytest.mark.parametrize("size", [(480, 640), (100, 100), (300, 200)])
def test_crop_area_and_aspect_within_bounds(size):
    h, w = size
    g = _gen(1)
    fractions = []
    for _ in range(500):
        box = sample_crop(h, w, (0.2, 1.0), generator=g)
        assert 0 <= box.top and box.top + box.height <= h and 0 <= box.left and box.left + box.width <= w
        fraction = box.height * box.width / (h * w)
        # Sides are rounded to whole pixels: allow a pixel of slack on each.
        slack = (box.height + box.width + 1) / (h * w)
        assert 0.2 - slack <= fraction <= 1.0 + slack, box
        assert 3 / 4 - 1 / min(box.height, box.width) <= box.width / box.height <= 4 / 3 + 1 / min(box.height, box.width)
        fractions.append(fraction)
    assert min(fractions) < 0.3 and max(fractions) > 0.8  # the whole range is used


def test_crop_is_torchvisions_resized_crop_at_the_sampled_box():
    spec = AugmentSpec(40, flip_prob=0.0, randaug_ops=0)
    box = sample_crop(96, 128, spec.crop_scale, generator=_gen(5))  # the transform's first draws
    pixels = F.pil_to_tensor(Image.fromarray(_photo()))
    expected = F.resized_crop(pixels, box.top, box.left, box.height, box.width, [40, 40],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(pretrain_image(encode(_photo()), spec, _gen(5)), expected)


def test_crop_falls_back_to_a_centred_box_for_extreme_aspect():
    box = sample_crop(10, 1000, (0.2, 1.0), generator=_gen(0))
    assert (box.height, box.width) == (10, 13) and box.left == (1000 - 13) // 2


def test_same_seed_same_output_and_seeds_differ():
    data, spec = encode(_photo()), AugmentSpec(32)
    a, b = pretrain_transform(data, spec, _gen(3)), pretrain_transform(data, spec, _gen(3))
    assert torch.equal(a, b)
    outs = [pretrain_transform(data, spec, _gen(s)) for s in range(6)]
    assert len({o.numpy().tobytes() for o in outs}) == 6


def test_flip_is_applied_half_the_time():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :8] = 255  # bright left edge
    spec = AugmentSpec(32, crop_scale=(1.0, 1.0), randaug_ops=0)  # square, full area: no crop
    g = _gen(0)
    flipped = [float(pretrain_image(encode(img), spec, g)[:, :, -4:].float().mean()) > 128 for _ in range(400)]
    assert 0.43 < np.mean(flipped) < 0.57
    never = AugmentSpec(32, crop_scale=(1.0, 1.0), randaug_ops=0, flip_prob=0.0)
    assert torch.equal(pretrain_image(encode(img), never, g), torch.from_numpy(img).permute(2, 0, 1))


def test_randaugment_uses_albefs_ops_each_applied_with_probability_half():
    assert ALBEF_OPS == ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                         "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    img = Image.fromarray(np.full((16, 16, 3), 100, np.uint8))
    g = _gen(0)
    changed = [np.asarray(rand_augment(img, 1, 7, g, ops=("Brightness",)))[0, 0, 0] != 100 for _ in range(400)]
    assert 0.43 < np.mean(changed) < 0.57
    assert np.asarray(apply_op(img, "Brightness", 7))[0, 0, 0] == int(100 * 1.36)  # factor 1.8 * 0.7 + 0.1


@pytest.mark.parametrize("name", ALBEF_OPS)
def test_every_op_keeps_size_and_mode(name):
    img = Image.fromarray(_photo(40, 48) // 2 + 40)  # low contrast, so AutoContrast and Equalize act
    out = apply_op(img, name, 7, -1.0)
    assert out.size == img.size and out.mode == "RGB"
    assert (np.asarray(out) == np.asarray(img)).all() == (name == "Identity")


@pytest.mark.parametrize("name,inverse", [("ShearX", (1, -0.21, 0, 0, 1, 0)), ("ShearY", (1, 0, 0, -0.21, 1, 0))])
def test_shear_is_the_official_matrix(name, inverse):
    # Official (OpenCV): x' = x + 0.21 y about the top-left corner, grey fill; PIL takes the inverse map.
    img = Image.fromarray(_photo(64, 64))
    expected = img.transform(img.size, Image.AFFINE, inverse, resample=Image.BILINEAR, fillcolor=(128, 128, 128))
    diff = np.abs(np.asarray(OPS[name](img, 0.7, 1.0), np.int16) - np.asarray(expected, np.int16))
    assert diff.max() <= 1


def test_jpeg_draft_keeps_the_crop_geometry():
    big = encode(_photo(768, 1024, seed=2), "JPEG", quality=90)
    fast, full = AugmentSpec(64, jpeg_draft=True), AugmentSpec(64, jpeg_draft=False)
    for seed in range(5):  # same draws, so the same crop box, flip and ops
        a, b = pretrain_image(big, fast, _gen(seed)).float(), pretrain_image(big, full, _gen(seed)).float()
        assert (a - b).abs().mean() < 1.5, seed  # out of 255: a DCT-domain reduction, not a wider filter
    assert decode_image(big, (256, 192)).size == (256, 192)  # 1024 / 4: the draft does reduce
    assert decode_image(big).size == (1024, 768)


def test_eval_transform_is_deterministic_resize():
    data = encode(_photo(), "PNG")
    a, b = eval_transform(data, 48), eval_transform(data, 48)
    assert torch.equal(a, b) and a.shape == (3, 48, 48)
    pil = torch.from_numpy(np.array(Image.fromarray(_photo()).resize((48, 48), Image.BICUBIC))).permute(2, 0, 1)
    torch.testing.assert_close(a, normalize(pil), atol=1.01 / 255 / min(STD), rtol=0)  # PIL's bicubic, +-1 level
    assert torch.equal(eval_image(data, 48), eval_image(data, 48)) and eval_image(data, 48).dtype == torch.uint8


@pytest.mark.parametrize("bad", [b"", b"garbage", CORRUPT, encode(_photo(), "JPEG")[:300], encode(_photo())[:200]])
def test_undecodable_bytes_give_none(bad):
    assert decode_image(bad) is None
    assert pretrain_transform(bad, AugmentSpec(32), _gen(0)) is None
    assert eval_transform(bad, 32) is None


# ----------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("A Man Riding a Horse.", "a man riding a horse"),
        ("Hello, world! (It's \"great\"); ok? #1 *yes*: ~done", "hello world its great ok 1 yes done"),
        ("a   dog \t\n on  the   grass  ", "a dog on the grass"),
        ("  leading and trailing   ", "leading and trailing"),
        ("well-known black/white photo", "well known black white photo"),
        ("<person> holds an umbrella", "person holds an umbrella"),
        ("one two three four five six", "one two three four"),
        ("", ""),
    ],
)
def test_pre_caption(raw, expected):
    assert pre_caption(raw, max_words=4 if expected.startswith("one") else 30) == expected


def test_pre_caption_is_idempotent_and_limits_words():
    text = " ".join(f"Word{i}," for i in range(50))
    once = pre_caption(text, 30)
    assert len(once.split(" ")) == 30 and pre_caption(once, 30) == once


# ----------------------------------------------------------------------------- batches


def _rows(values, corrupt=()):
    images = [CORRUPT if v in corrupt else encode(solid(v)) for v in values]
    return {
        "image": np.array(images, dtype=object),
        "caption": np.array([f"The  Value {v}!" for v in values], dtype=object),
        "image_id": np.array([f"img-{v}" for v in values], dtype=object),
    }


@pytest.mark.parametrize("training", [True, False])
def test_transform_batch_drops_counts_and_keeps_rows_aligned(training):
    values = [10, 50, 90, 130, 170, 210]
    spec = AugmentSpec(16, randaug_ops=0)  # keep the colour that identifies each row
    out = transform_batch(_rows(values, corrupt={50, 170}), spec, training, 30, _gen(0))
    assert out["image"].shape == (4, 3, 16, 16) and out["image"].dtype == np.uint8
    assert out["num_dropped"].tolist() == [2, 0, 0, 0]
    for img, caption, image_id in zip(out["image"], out["caption"], out["image_id"]):
        value = int(image_id.split("-")[1])
        assert abs(int(img[0].mean()) - value) <= 1 and caption == f"the value {value}"
    ids = out["image_id"].tolist()
    assert sorted(ids) == sorted(f"img-{v}" for v in (10, 90, 130, 210))
    if not training:
        assert ids == ["img-10", "img-90", "img-130", "img-210"]


def test_transform_batch_shuffles_rows_when_training():
    values = list(range(0, 240, 10))
    orders = {tuple(transform_batch(_rows(values), AugmentSpec(8), True, 30, _gen(s))["image_id"]) for s in range(3)}
    assert len(orders) == 3


def test_transform_batch_of_only_corrupt_rows_is_empty():
    out = transform_batch(_rows([1, 2], corrupt={1, 2}), AugmentSpec(8), True, 30, _gen(0))
    assert out["image"].shape == (0, 3, 8, 8) and len(out["caption"]) == 0 and len(out["num_dropped"]) == 0


# ----------------------------------------------------------------------------- collation


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_tokenize_pads_to_longest_and_truncates(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids, mask = tokenize(tok, ["a red circle", "a small blue square left of the large green circle"], 8, append_sep=True)
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (2, 8)  # 12 tokens truncated to 8
    assert ids[0].tolist()[:5] == [tok.cls_token_id, *tok.convert_tokens_to_ids(["a", "red", "circle"]), tok.sep_token_id]
    assert mask[0].tolist() == [1] * 5 + [0] * 3 and ids[0, 5:].eq(tok.pad_token_id).all()
    assert ids[1, -1] == tok.sep_token_id and mask[1].all()
    ids, _ = tokenize(tok, ["a red circle", "the circle"], 25, append_sep=True)
    assert ids.shape == (2, 5)  # longest in the batch, not max_text_len


def test_collate_drops_invalid_rows_and_counts_them(tokenizer_dir):
    batch = {
        "image": np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8),
        "caption": np.array(["a red circle", "junk", "the blue square", "a circle"], dtype=object),
        "valid": np.array([True, False, True, True]),
        "num_dropped": np.array([2, 0, 0, 1]),  # counted upstream
    }
    out = collate_batch(batch, load_tokenizer(tokenizer_dir), 25)
    assert set(out) == {"image", "input_ids", "attention_mask", "num_dropped"}
    assert all(isinstance(v, torch.Tensor) for v in out.values())
    assert out["num_dropped"].shape == () and out["num_dropped"].dtype == torch.int64 and int(out["num_dropped"]) == 4
    assert out["image"].shape == (3, 3, 8, 8) and out["image"].dtype == torch.float32
    torch.testing.assert_close(out["image"], normalize(torch.from_numpy(batch["image"][[0, 2, 3]])))
    assert out["input_ids"].shape[0] == 3


def test_collator_cleans_captions_pickles_without_its_tokenizer_and_passes_floats(tokenizer_dir):
    import pickle

    collate = CaptionCollator(tokenizer_dir, max_text_len=25, max_words=30)
    images = np.zeros((2, 3, 8, 8), np.float32)
    out = collate({"image": images, "caption": np.array(["A  RED, circle!", "Circle."], dtype=object)})
    tok = collate.tokenizer
    assert out["input_ids"][0, 1:4].tolist() == tok.convert_tokens_to_ids(["a", "red", "circle"])
    assert int(out["num_dropped"]) == 0 and torch.equal(out["image"], torch.from_numpy(images))
    clone = pickle.loads(pickle.dumps(collate))
    assert clone._tokenizer is None and torch.equal(clone({"image": images, "caption": np.array(["a", "b"])})["image"], out["image"])


def test_normalize_looks_up_the_same_float32_values_as_the_arithmetic():
    from albef_ray.data.transforms import _SCALE, _SHIFT

    x = torch.randint(0, 256, (2, 4, 3, 9, 7), dtype=torch.uint8)
    for images in (x, x[:, 1], x.transpose(-1, -2)):  # batched, one level, non-contiguous
        flat = images.reshape(-1, *images.shape[-3:])
        expected = torch.stack([img.float().mul(_SCALE).add(_SHIFT) for img in flat]).view(images.shape)
        assert torch.equal(normalize(images), expected)
    assert torch.equal(normalize(x.float()), normalize(x))  # float input: computed


def test_pretokenized_rows_collate_as_tokenising_the_batch(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    captions = ["a red circle", "a small blue square left of the large green circle and a red one", "circle"]
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    for sep in (False, True):
        ids, lengths = pretokenize(tok, captions, 10, sep)
        assert ids.shape == (3, 10) and ids.dtype == lengths.dtype == np.int32
        for rows in ([0, 1, 2], [0, 2], [2], []):
            text = collate_batch({"image": images[rows], "caption": np.array(captions, dtype=object)[rows]}, tok, 10, append_sep=sep)
            pre = collate_batch({"image": images[rows], "input_ids": ids[rows], "num_tokens": lengths[rows]}, None, 10)
            assert set(pre) == set(text) and all(torch.equal(pre[k], text[k]) for k in text), (sep, rows)
    valid = np.array([True, False, True])
    pre = collate_batch({"image": images, "input_ids": ids, "num_tokens": lengths, "valid": valid}, None, 10)
    assert int(pre["num_dropped"]) == 1 and torch.equal(pre["input_ids"], tokenize(tok, [captions[0], captions[2]], 10, True)[0])


def test_collate_can_leave_images_uint8(tokenizer_dir):
    images = np.random.default_rng(1).integers(0, 256, (2, 3, 8, 8), dtype=np.uint8)
    images.flags.writeable = False  # as Ray hands them out
    out = CaptionCollator(tokenizer_dir, 25, normalized=False)({"image": images, "caption": np.array(["a", "b"])})
    assert out["image"].dtype == torch.uint8 and torch.equal(normalize(out["image"]), normalize(torch.from_numpy(images.copy())))
    out["image"][0] = 0  # a copy of its own: the caller may write to it


def test_collate_of_no_valid_rows(tokenizer_dir):
    batch = {"image": np.zeros((1, 3, 8, 8), np.uint8), "caption": np.array(["a"]), "valid": np.array([False])}
    out = collate_batch(batch, load_tokenizer(tokenizer_dir), 25)
    assert out["image"].shape == (0, 3, 8, 8) and out["input_ids"].shape[0] == 0 and int(out["num_dropped"]) == 1


def test_data_modules_do_not_import_ray():
    code = "import sys, albef_ray.data.transforms, albef_ray.data.collate; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_translate_is_a_whole_pixel_shift_with_grey_fill(sign):
    img = Image.fromarray(_photo(20, 30))
    out = np.asarray(OPS["TranslateX"](img, 0.7, sign))  # official: 10 x 0.7 = 7 pixels
    src = np.asarray(img)
    if sign > 0:
        assert (out[:, 7:] == src[:, :-7]).all() and (out[:, :7] == 128).all()
    else:
        assert (out[:, :-7] == src[:, 7:]).all() and (out[:, -7:] == 128).all()
    shifted = np.asarray(OPS["TranslateY"](img, 0.3, 1.0))  # 10 x 0.3 = 3.0000000000000004 pixels
    assert (shifted[:3] == 128).all() and (shifted[3:] == src[:-3]).all()
