"""Images for visual-tokenizer pretraining: generated shapes, scikit-learn digits and photo crops, a folder
of images (recursive), the splits, batches and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lightning_tokens.core.errors import ConfigError, DataError, MissingFileError
from lightning_tokens.datamodules.images import (
    DigitImages,
    ImageDataModule,
    ImageFolderDataset,
    PhotoCrops,
    ShapeImages,
    draw_shapes,
)


def test_shapes_depend_only_on_seed_split_and_index():
    a, b = ShapeImages(5, 32, seed=1), ShapeImages(50, 32, seed=1)
    assert all(torch.equal(a[i], b[i]) for i in range(5))
    assert not torch.equal(a[0], ShapeImages(1, 32, seed=1, split="val")[0])
    assert not torch.equal(a[0], ShapeImages(1, 32, seed=2)[0])
    image = a[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    # a shape's colour is one of the named colours; the background is light
    pixels = np.asarray(draw_shapes(np.random.default_rng(0), 64))
    assert (pixels[0, 0] >= 200).all() or len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1


def test_digits_are_scikit_learns_scans_in_rgb():
    from sklearn.datasets import load_digits

    scans = load_digits().images
    native = DigitImages(8, indices=[0, 5])
    assert torch.equal(native[1], torch.from_numpy(scans[5]).float().div(16).expand(3, 8, 8))
    big = DigitImages(32, indices=[0])[0]
    expected = F.interpolate(torch.from_numpy(scans[0]).float().div(16)[None, None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(big, expected.expand(3, 32, 32).clamp(0, 1))
    assert len(DigitImages(8)) == 1797


def test_photo_crops_are_square_pieces_of_the_sample_photos():
    crops = PhotoCrops(40, 427, seed=0, min_fraction=1.0)  # full-height crops at native size: no resampling
    assert [tuple(p.shape) for p in crops.photos] == [(3, 427, 640)] * 2
    for index in range(3):
        photo, top, left, side, mirrored = crops.crop_box(index)
        piece = crops.photos[photo][:, top : top + side, left : left + side].float().div(255)
        assert side == 427 and top == 0 and 0 <= left <= 640 - 427
        assert torch.equal(crops[index], piece.flip(-1) if mirrored else piece)
    boxes = [crops.crop_box(i) for i in range(40)]
    assert {b[0] for b in boxes} == {0, 1} and {b[4] for b in boxes} == {False, True}
    small = PhotoCrops(50, 24, seed=0)
    sides = [small.crop_box(i)[3] for i in range(50)]
    assert min(sides) >= round(0.15 * 427) and max(sides) <= 427 and len(set(sides)) > 40
    assert torch.equal(small[2], PhotoCrops(3, 24, seed=0)[2]) and small[2].shape == (3, 24, 24)


def _folder(tmp_path, count=12):
    for i in range(count):
        sub = tmp_path / "pictures" / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20 + i, 30, 3), i * 10, dtype=np.uint8)).save(sub / (f"{i}.PNG" if i % 2 else f"{i}.jpg"))
    (tmp_path / "pictures" / "notes.txt").write_text("not an image")
    return tmp_path / "pictures"


def test_a_folder_is_searched_recursively_and_split(tmp_path):
    root = _folder(tmp_path)
    files = ImageFolderDataset.find(root)
    assert len(files) == 12 and all(f.suffix.lower() in (".png", ".jpg") for f in files)
    data = ImageDataModule(root=str(root), image_size=16, num_val=5, batch_size=4, seed=0)
    data.setup("fit")
    train, val = data.train_set.datasets[0].files, data.val_set.datasets[0].files
    assert len(val) == 1 and len(train) == 11 and not set(train) & set(val)  # at most a tenth held out
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"images"} and batch["images"].shape == (4, 3, 16, 16)
    # evaluation: short side resized, centre crop
    flat = ImageFolderDataset([root / "part0" / "0.jpg"], image_size=20)[0]
    assert flat.shape == (3, 20, 20)
    separate = ImageDataModule(root=str(root), val_root=str(root / "part1"), image_size=8)
    separate.setup("fit")
    assert len(separate.val_set) == 4 and len(separate.train_set) == 12


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(MissingFileError, match="does not exist"):
        ImageDataModule(root=str(tmp_path / "nowhere")).setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ImageDataModule(root=str(tmp_path / "empty")).setup("fit")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        ImageFolderDataset([broken], image_size=8)[0]


def test_offline_sources_mix_into_batches_and_hold_out_validation():
    data = ImageDataModule(image_size=16, num_train=6, num_val=3, batch_size=5, seed=0)
    assert data.sources == ["shapes", "digits", "photo_crops"]
    data.setup("fit")
    assert len(data.train_set) == 6 + (1797 - 3) + 6 and len(data.val_set) == 9
    digits_train, digits_val = data.train_set.datasets[1], data.val_set.datasets[1]
    assert len(digits_val.indices) == 3 and sorted(digits_train.indices + digits_val.indices) == list(range(1797))
    val = list(data.val_dataloader())
    assert sum(b["images"].shape[0] for b in val) == 9
    # the training order is a function of the seed (resumable)
    first = [next(iter(ImageDataModule(image_size=8, num_train=6, num_val=1, batch_size=4, seed=s).train_dataloader()))["images"] for s in (3, 3)]
    assert torch.equal(*first)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sources": ["pictures"]}, ConfigError, "sources must be one of"),
        ({"sources": ["shapes", "shapes"]}, ConfigError, "each source may appear once"),
        ({"sources": []}, ConfigError, "no images"),
        ({"image_size": 0}, ConfigError, "image_size=0"),
        ({"num_val": -1}, ConfigError, "num_val=-1"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ImageDataModule(**kwargs)


def test_labels_are_opt_in_digit_classes_and_minus_one_elsewhere():
    from sklearn.datasets import load_digits

    plain = ImageDataModule(sources=["shapes", "digits"], image_size=8, num_train=4, num_val=2, batch_size=4, seed=0)
    assert set(next(iter(plain.train_dataloader()))) == {"images"} and plain.num_classes == 10
    data = ImageDataModule(sources=["shapes", "digits"], image_size=8, num_train=4, num_val=2, batch_size=4, seed=0, labels=True)
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].shape == (4,) and batch["labels"].dtype == torch.long
    ordered = list(data.ordered_dataloader("train"))
    labels = torch.cat([b["labels"] for b in ordered])
    digits = data.train_set.datasets[1]
    assert labels[:4].tolist() == [-1] * 4  # shapes have no class
    assert labels[4:].tolist() == load_digits().target[digits.indices].tolist()
    assert torch.equal(torch.cat([b["images"] for b in ordered])[4], digits[0])
    assert ImageDataModule(sources=["shapes"], image_size=8, num_train=2).num_classes == 0
