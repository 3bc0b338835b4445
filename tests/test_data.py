import logging

import numpy as np
import pytest
import torch

from lictrain.data import (
    SAMPLES_TRAIN, SAMPLES_VAL, EvalImages, ImageList, TrainCrops, crop_to, load_rgb, pad_to_multiple, random_crop,
    resolve_image_files, train_loader,
)
from lictrain.errors import LictrainError


def test_corrupt_file_is_skipped_counted_and_warned(image_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="lictrain"):
        images = ImageList.scan(str(image_folder))
    assert [p.name for p, _ in images.skipped] == ["corrupt.png"]
    assert len(images) == 6  # the .txt file is not an image at all
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "corrupt.png" in warnings[0].getMessage()


def test_corrupt_file_skipped_without_cache_too(image_folder):
    images = ImageList.scan(str(image_folder), cache_mb=0)
    assert images.cached is None and [p.name for p, _ in images.skipped] == ["corrupt.png"]


def test_modes_become_rgb(image_folder):
    grey = load_rgb(image_folder / "grey.png")
    assert grey.shape == (70, 90, 3) and np.array_equal(grey[..., 0], grey[..., 1])
    rgba = load_rgb(image_folder / "rgba.png")
    from tests.conftest import smooth_image

    assert rgba.shape == (66, 66, 3) and np.array_equal(rgba, smooth_image(66, 66, 4))  # alpha dropped, not blended
    assert load_rgb(image_folder / "palette.png").shape == (64, 80, 3)


def test_small_image_is_reflection_padded():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = random_crop(img, 4, np.random.default_rng(0), flip=False)
    assert out.shape == (4, 4, 3)
    rows = [0, 1, 0, 1]  # reflect of 2 rows padded by 2: r0 r1 | r0 r1
    cols = [0, 1, 2, 1]  # reflect of 3 cols padded by 1: c0 c1 c2 | c1
    assert np.array_equal(out, img[np.ix_(rows, cols)])


def test_crops_cover_the_crop_size_and_range(image_folder):
    images = ImageList.scan(str(image_folder))
    ds = TrainCrops(images, 32, seed=0)
    for k in range(20):
        x = ds[k]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert 0.0 <= x.min() and x.max() <= 1.0


def test_each_epoch_visits_every_image_once(image_folder):
    images = ImageList.scan(str(image_folder))
    ds = TrainCrops(images, 32, seed=5, order="shuffle")
    n = len(images)
    for epoch in range(3):
        assert sorted(ds.image_index(epoch * n + i) for i in range(n)) == list(range(n))
    first = [ds.image_index(i) for i in range(n)]
    second = [ds.image_index(n + i) for i in range(n)]
    assert first != second  # reshuffled each epoch (for this seed)


def test_iid_order_draws_images_independently_and_uniformly(image_folder):
    """data.order=iid: every sample's image drawn with replacement, a pure function of (seed, k). Over 6000 draws
    each of the n images comes up 6000/n times within 5 binomial standard deviations, and an epoch's worth of
    draws repeats images (which a permutation never does)."""
    images = ImageList.scan(str(image_folder))
    n = len(images)
    ds = TrainCrops(images, 32, seed=5, order="iid")
    draws = [ds.image_index(k) for k in range(6000)]
    counts = np.bincount(draws, minlength=n)
    sd = (6000 * (1 / n) * (1 - 1 / n)) ** 0.5
    assert np.abs(counts - 6000 / n).max() < 5 * sd
    assert len(set(draws[:n])) < n or len(set(draws[n:2 * n])) < n
    again = TrainCrops(images, 32, seed=5, order="iid")
    assert [again.image_index(k) for k in reversed(range(6000))] == draws[::-1]  # no state: any k, any order
    assert torch.equal(ds[17], again[17])
    with pytest.raises(LictrainError, match="data.order must be shuffle or iid"):
        TrainCrops(images, 32, seed=5, order="random")


def _batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_deterministic_given_seed_workers_and_start_step(image_folder):
    images = ImageList.scan(str(image_folder))
    a = _batches(train_loader(images, 32, 3, seed=1, order="shuffle"), 4)
    b = _batches(train_loader(images, 32, 3, seed=1, workers=2, order="shuffle"), 4)
    c = _batches(train_loader(images, 32, 3, seed=1, start_step=2, order="shuffle"), 2)
    d = _batches(train_loader(images, 32, 3, seed=2, order="shuffle"), 1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(a[2], c[0]) and torch.equal(a[3], c[1])
    assert not torch.equal(a[0], d[0])
    iid = _batches(train_loader(images, 32, 3, seed=1), 4)  # the same guarantees for data.order=iid (the default)
    iid_workers = _batches(train_loader(images, 32, 3, seed=1, workers=2), 4)
    iid_resumed = _batches(train_loader(images, 32, 3, seed=1, start_step=2, order="iid"), 2)
    assert all(torch.equal(x, y) for x, y in zip(iid, iid_workers))
    assert torch.equal(iid[2], iid_resumed[0]) and torch.equal(iid[3], iid_resumed[1])
    assert not all(torch.equal(x, y) for x, y in zip(a, iid))


def test_the_default_order_is_iid_and_a_checkpoint_from_before_the_choice_resumes_on_its_shuffle(tmp_path):
    """data.order's default is iid (the measurements: README "Data order"); a checkpoint whose config has no
    data.order was trained on the per-epoch shuffle, the only order there was, and resumes on it (exact resume)."""
    from lictrain.checkpoint import checkpoint_config
    from lictrain.config import RunConfig

    assert RunConfig().data.order == "iid"
    old = RunConfig().to_dict()
    del old["data"]["order"]
    assert checkpoint_config({"config": old}).data.order == "shuffle"
    assert checkpoint_config({"config": RunConfig().to_dict()}).data.order == "iid"


def test_ranks_draw_disjoint_blocks_of_the_global_batch(image_folder):
    images = ImageList.scan(str(image_folder))
    whole = _batches(train_loader(images, 32, 4, seed=1), 2)
    r0 = _batches(train_loader(images, 32, 2, seed=1, rank=0, world=2), 2)
    r1 = _batches(train_loader(images, 32, 2, seed=1, rank=1, world=2), 2)
    for s in range(2):
        assert torch.equal(torch.cat([r0[s], r1[s]]), whole[s])


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(LictrainError, match="not found"):
        resolve_image_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LictrainError, match="no images"):
        resolve_image_files(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(LictrainError, match="no readable images"):
        ImageList.scan(str(tmp_path / "bad"))


def test_samples_are_bundled_colour_photos_split_without_overlap():
    train, val = resolve_image_files("samples:train"), resolve_image_files("samples:val")
    assert {p.name for p in train} == set(SAMPLES_TRAIN) and {p.name for p in val} == set(SAMPLES_VAL)
    assert not {p.name for p in train} & {p.name for p in val}
    for p in train + val:
        assert load_rgb(p).shape[2] == 3 and min(load_rgb(p).shape[:2]) >= 256


def test_eval_images_sorted_cropped_and_limited(image_folder):
    ds = EvalImages(str(image_folder))
    names = [ds.name(i) for i in range(len(ds))]
    assert names == sorted(names, key=lambda n: str(next(p for p in ds.images.files if p.name == n)))
    assert ds[0].shape == (3, 80, 96)
    ds = EvalImages(str(image_folder), crop=40, max_images=2)
    assert len(ds) == 2 and ds[0].shape == (3, 40, 40)


def test_pad_to_multiple_replicates_and_crops_back():
    x = torch.rand(1, 3, 30, 41)
    p = pad_to_multiple(x, 16)
    assert p.shape == (1, 3, 32, 48)
    assert torch.equal(p[..., 30:, :41], x[..., 29:30, :].expand(-1, -1, 2, -1))
    assert torch.equal(p[..., :30, 41:], x[..., :, 40:41].expand(-1, -1, -1, 7))
    assert torch.equal(crop_to(p, 30, 41), x)


def test_specs_combine_with_comma_and_fall_back_with_double_bar(image_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "z.png").write_bytes((image_folder / "a.png").read_bytes())
    both = resolve_image_files(f"{image_folder}, {other}")
    assert len(both) == len(resolve_image_files(str(image_folder))) + 1
    assert resolve_image_files(f"{tmp_path / 'missing'},{other} || samples:val") == resolve_image_files("samples:val")
    assert resolve_image_files(f"{other} || samples:val") == [other / "z.png"]


def test_hold_out_split_is_disjoint_complete_and_spread(tmp_path):
    from PIL import Image

    from tests.conftest import smooth_image

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(10):
        Image.fromarray(smooth_image(32, 32, i)).save(d / f"{i:02d}.png")
    val = resolve_image_files(f"{d}[val:3]")
    train = resolve_image_files(f"{d}[train:-3]")
    # indices floor((i + 1/2) * 10 / 3) = 1, 5, 8: spread over the sorted list, not its first three
    assert [p.name for p in val] == ["01.png", "05.png", "08.png"]
    assert not set(val) & set(train) and sorted(val + train) == resolve_image_files(str(d))
    both = resolve_image_files(f"{d}[val:3], {d}[train:-3]")
    assert len(both) == 10
    with pytest.raises(LictrainError, match=r"cannot hold out 10 of 10"):
        resolve_image_files(f"{d}[val:10]")
    # a split inside a fallback: the folder's existence decides, the selector does not get in the way
    assert resolve_image_files(f"{d}[val:3] || samples:val") == val
    assert len(resolve_image_files(f"{tmp_path / 'missing'}[val:3] || samples:train[val:2]")) == 2


def test_bench_config_keeps_training_validation_and_test_apart():
    """configs/bench.yaml: no image in two roles, with ../shared/data and with the bundled fallback alike."""
    from lictrain.comparison.compare import data_roles
    from lictrain.config import load_config

    cfg = load_config("bench")
    roles = data_roles(cfg)
    assert set(roles["shared_images"].values()) == {0}, roles
    assert roles["images"]["validation"] >= 2 and roles["images"]["test"] >= 2
    fallback = load_config("bench", [f"data.{k}=" + getattr(cfg.data, k).split("||")[1].strip() for k in ("train", "val")]
                           + ["compare.eval_data=[" + cfg.compare.eval_data[0].split("||")[1].strip() + "]"])
    assert set(data_roles(fallback)["shared_images"].values()) == {0}


def test_the_first_spelling_of_a_training_split_warns_and_means_what_it_meant(tmp_path, caplog):
    """FOLDER[train:N] reads as "N images" but meant "all but N" (a user trained on 3 of 14 photos with
    photos[train:11]): it keeps its meaning with a one-line warning that shows [train:-N]; [val:-N] is refused;
    both spellings give the same configuration hash (stored compare runs stay found)."""
    from PIL import Image

    from lictrain.comparison.compare import legacy_hash as config_hash
    from lictrain.config import load_config
    from tests.conftest import smooth_image

    d = tmp_path / "photos"
    d.mkdir()
    for i in range(14):
        Image.fromarray(smooth_image(32, 32, i)).save(d / f"{i:02d}.png")
    caplog.clear()
    assert resolve_image_files(f"{d}[train:11]") == resolve_image_files(f"{d}[train:-11]")
    assert len(resolve_image_files(f"{d}[train:-11]")) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{d}[train:11] means the images left after holding 11 out" in warnings[0]
    assert f"write {d}[train:-11]" in warnings[0]
    with pytest.raises(LictrainError, match=r"\[val:N\] is N held-out images"):
        resolve_image_files(f"{d}[val:-2]")
    old, new = (load_config(None, [f"data.train={d}[train:{n}]", f"data.val={d}[val:2]"]) for n in ("2", "-2"))
    assert config_hash(old) == config_hash(new)
    from lictrain.config import identity_hash

    assert identity_hash(old) == identity_hash(new)
