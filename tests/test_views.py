import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from raykd.pipeline.data.views import ViewPolicy, apply_views, make_views, view_params


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(64, 12, 10, 3), dtype=np.uint8)


def test_replay_gives_identical_pixels(images):
    policy = ViewPolicy(pad=3, flip=True)
    ids = np.arange(1000, 1064)
    pixels, rec = make_views(images, ids, 5, seed=7, policy=policy)
    # the record is all a cache stores; replaying it (in another order, another call) gives the same bytes
    order = np.random.default_rng(1).permutation(len(ids))
    replay = apply_views(images[order], rec["ox"][order], rec["oy"][order], rec["flip"][order], policy.pad)
    assert replay.dtype == np.uint8
    np.testing.assert_array_equal(replay, pixels[order])
    # and the record itself is a pure function of (seed, sample id, view id)
    again = view_params(7, ids, 5, policy)
    for k in rec:
        np.testing.assert_array_equal(again[k], rec[k])


def test_views_match_torchvision_pad_crop_flip(images):
    policy = ViewPolicy(pad=2, flip=True)
    pixels, rec = make_views(images, np.arange(64), 0, seed=0, policy=policy)
    for i in range(len(images)):
        t = torch.from_numpy(images[i]).permute(2, 0, 1)
        ref = TF.crop(TF.pad(t, [policy.pad]), int(rec["oy"][i]), int(rec["ox"][i]), 12, 10)
        if rec["flip"][i]:
            ref = TF.horizontal_flip(ref)
        np.testing.assert_array_equal(pixels[i], ref.permute(1, 2, 0).numpy(), err_msg=f"sample {i}")


def test_params_depend_on_seed_sample_and_view():
    policy = ViewPolicy(pad=4, flip=True)
    ids = np.arange(2000)
    a = view_params(0, ids, 0, policy)
    for other in (view_params(1, ids, 0, policy), view_params(0, ids, 1, policy), view_params(0, ids + 1, 0, policy)):
        assert (a["ox"] != other["ox"]).mean() > 0.7
    # offsets cover [0, 2*pad] about uniformly, flips about half
    counts = np.bincount(a["ox"], minlength=9)
    assert counts.min() > 2000 / 9 * 0.7
    assert 0.4 < a["flip"].mean() < 0.6
    assert not view_params(0, ids, 0, ViewPolicy(pad=4, flip=False))["flip"].any()


def test_no_pad_no_flip_is_identity(images):
    pixels, rec = make_views(images, np.arange(64), 3, seed=0, policy=ViewPolicy(pad=0, flip=False))
    np.testing.assert_array_equal(pixels, images)
    assert (rec["ox"] == 0).all() and (rec["oy"] == 0).all()


RRC = ViewPolicy(flip=True, kind="random_resized_crop")


def test_crop_records_follow_torchvision_draw_and_replay_exactly(images):
    """random_resized_crop: boxes as RandomResizedCrop draws them (area share in scale, ratio in range,
    inside the image), a pure function of (seed, sample id, view id), replayed to the same pixels as
    torchvision's resized_crop + horizontal_flip on the recorded box."""
    ids = np.arange(20000)
    r = RRC.params(3, ids, 2, (12, 10))
    w, h = r["w"].astype(float), r["h"].astype(float)
    assert (r["x"] >= 0).all() and (r["y"] >= 0).all() and (r["x"] + r["w"] <= 10).all() and (r["y"] + r["h"] <= 12).all()
    drawn = (r["w"] != 10) | (r["h"] != 12)  # not the whole image (the fallback is the whole image here)
    share = w * h / 120
    assert share[drawn].min() >= 0.08 * 0.5 and share.max() <= 1  # rounding of tiny boxes on a 12x10 image
    assert (w / h)[drawn].min() > 0.75 * 0.7 and (w / h)[drawn].max() < 4 / 3 / 0.7
    assert 0.45 < r["flip"].mean() < 0.55 and drawn.mean() > 0.8
    for k, v in RRC.params(3, ids, 2, (12, 10)).items():
        np.testing.assert_array_equal(v, r[k])
    assert (RRC.params(3, ids, 3, (12, 10))["x"] != r["x"]).mean() > 0.5  # another view, another box

    pixels, rec = make_views(images, np.arange(64), 1, seed=0, policy=RRC)
    again, _ = make_views(images, np.arange(64), 1, seed=0, policy=RRC)
    np.testing.assert_array_equal(pixels, again)
    np.testing.assert_array_equal(RRC.render(images, rec), pixels)
    assert set(rec) == set(RRC.record) == {"x", "y", "w", "h", "flip"}
    for i in range(len(images)):
        t = torch.from_numpy(images[i]).permute(2, 0, 1)
        ref = TF.resized_crop(t, int(rec["y"][i]), int(rec["x"][i]), int(rec["h"][i]), int(rec["w"][i]), [12, 10],
                              antialias=True)
        if rec["flip"][i]:
            ref = TF.horizontal_flip(ref)
        np.testing.assert_array_equal(pixels[i], ref.permute(1, 2, 0).numpy(), err_msg=f"sample {i}")


def test_pad_crop_policy_keeps_its_fingerprint_dict():
    assert ViewPolicy(pad=2, flip=True).as_dict() == {"pad": 2, "flip": True}
    assert ViewPolicy(**RRC.as_dict()) == RRC
