import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.views import ViewPolicy, apply_views, make_views, view_params


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
