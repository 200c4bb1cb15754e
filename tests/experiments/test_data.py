"""Streams: deterministic, correctly split, offline; the MNIST-1D generator; text encoding."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cljax.experiments import data as D


def _same_stream(a: D.Stream, b: D.Stream) -> bool:
    fields = ("x_train", "y_train", "x_test", "y_test")
    return all(
        np.array_equal(getattr(s, f), getattr(t, f))
        for s, t in zip(a.tasks, b.tasks, strict=True)
        for f in fields
    )


def test_digits_build_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    D._digits_split.cache_clear()
    stream = D.split_digits()
    assert stream.num_tasks == 5


def test_split_digits_tasks_are_disjoint_and_cover_the_split():
    stream = D.split_digits()
    x_tr, y_tr, x_te, y_te = D.load_digits_split()
    assert sum(len(t.y_train) for t in stream.tasks) == len(y_tr)
    assert sum(len(t.y_test) for t in stream.tasks) == len(y_te)
    seen: set[int] = set()
    for task in stream.tasks:
        labels = set(np.unique(np.concatenate([task.y_train, task.y_test])).tolist())
        assert labels == set(task.classes)
        assert not labels & seen
        seen |= labels
    assert seen == set(range(10))
    assert stream.scenarios == ("task", "class")
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32


def test_digits_split_is_stratified_and_fixed():
    a = D.load_digits_split()
    b = D.load_digits_split()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    counts = np.bincount(a[3])
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of ~180 per class
    assert not np.array_equal(D.load_digits_split(1)[1], a[1])


def test_split_digits_domain_labels_are_parity():
    stream = D.split_digits_domain()
    full = D.split_digits()
    for dom, cls in zip(stream.tasks, full.tasks, strict=True):
        np.testing.assert_array_equal(dom.y_train, cls.y_train % 2)
        np.testing.assert_array_equal(dom.x_test, cls.x_test)
        assert dom.classes == (0, 1)
    assert stream.num_classes == 2 and stream.scenarios == ("domain",)


def test_permuted_digits_permutations_are_fixed_bijections():
    a, b = D.permuted_digits(4, seed=3), D.permuted_digits(4, seed=3)
    assert _same_stream(a, b)
    assert not _same_stream(a, D.permuted_digits(4, seed=4))
    base = a.tasks[0]
    np.testing.assert_array_equal(base.x_test, D.load_digits_split()[2])
    perms = D._permutations(4, 64, 3)
    for task, perm in zip(a.tasks[1:], perms[1:], strict=True):
        assert sorted(perm.tolist()) == list(range(64))  # a bijection of the 64 pixels
        assert not np.array_equal(perm, np.arange(64))
        np.testing.assert_array_equal(task.x_test, base.x_test[:, perm])
        np.testing.assert_array_equal(task.x_train, base.x_train[:, perm])
        np.testing.assert_array_equal(np.sort(task.x_train, axis=1), np.sort(base.x_train, axis=1))
        np.testing.assert_array_equal(task.y_train, base.y_train)


def test_permute_features_rejects_non_permutations():
    with pytest.raises(ValueError, match="permutation of range"):
        D.permute_features(np.zeros((2, 3)), np.array([0, 0, 1]))


def test_rotation_matches_rot90_and_zero_is_identity():
    imgs = np.random.default_rng(0).uniform(size=(3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(D.rotate_images(imgs, 0.0), imgs)
    for k in (1, 2, 3):
        np.testing.assert_allclose(
            D.rotate_images(imgs, 90.0 * k), np.rot90(imgs, k, axes=(1, 2)), atol=1e-6
        )
    flat = imgs.reshape(3, 64)
    np.testing.assert_allclose(
        D.rotate_images(flat, 90.0), np.rot90(imgs, 1, axes=(1, 2)).reshape(3, 64), atol=1e-6
    )


def test_rotation_reference_at_45_degrees():
    # Bilinear reference for one pixel, written out: rotating by +45 degrees samples the source at
    # the point rotated by -45 degrees about the centre (3.5, 3.5).
    img = np.random.default_rng(1).uniform(size=(1, 8, 8))
    out = D.rotate_images(img, 45.0)
    r, c = 1, 5
    u, v = c - 3.5, 3.5 - r
    su, sv = (u + v) / np.sqrt(2), (-u + v) / np.sqrt(2)
    sr, sc = 3.5 - sv, su + 3.5
    r0, c0 = int(np.floor(sr)), int(np.floor(sc))
    fr, fc = sr - r0, sc - c0
    ref = sum(
        wr * wc * img[0, rr, cc]
        for rr, wr in ((r0, 1 - fr), (r0 + 1, fr))
        for cc, wc in ((c0, 1 - fc), (c0 + 1, fc))
        if 0 <= rr < 8 and 0 <= cc < 8
    )
    assert out[0, r, c] == pytest.approx(ref)


def test_rotated_digits_angles_and_errors():
    stream = D.rotated_digits(4)
    np.testing.assert_allclose(
        stream.tasks[2].x_test, D.rotate_images(D.load_digits_split()[2], 90.0), atol=1e-6
    )
    with pytest.raises(ValueError, match="not square"):
        D.rotate_images(np.zeros((1, 10)), 10.0)
    with pytest.raises(ValueError, match="need"):
        D.rotate_images(np.zeros((1, 2, 3)), 10.0)


def test_stream_builders_validate_num_tasks():
    with pytest.raises(ValueError, match="divide the 10 classes"):
        D.split_digits(3)
    with pytest.raises(ValueError, match="at least 1"):
        D.permuted_digits(0)
    with pytest.raises(TypeError, match="must be an int"):
        D.rotated_digits(2.5)
    with pytest.raises(ValueError, match="must be 1 or 5"):
        D.split_digits_domain(2)


def test_mnist1d_is_deterministic_balanced_and_seeded():
    a = D.make_mnist1d(200, seed=7)
    b = D.make_mnist1d(200, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (160, 40) and x_te.shape == (40, 40) and x_tr.dtype == np.float32
    assert np.bincount(np.concatenate([y_tr, y_te])).tolist() == [20] * 10
    assert np.all(np.isfinite(x_tr))
    assert not np.array_equal(D.make_mnist1d(200, seed=8)[0], x_tr)
    assert D.make_mnist1d(100, final_seq_length=24)[0].shape[1] == 24


def test_mnist1d_without_noise_or_transforms_is_the_padded_template():
    x_tr, y_tr, _, _ = D.make_mnist1d(
        20,
        padding=(28, 28),
        scale_coeff=0.0,
        max_translation=0,
        corr_noise_scale=0.0,
        iid_noise_scale=0.0,
        shear_scale=0.0,
        final_seq_length=40,
    )
    templates = D.mnist1d_templates()
    for x, y in zip(x_tr, y_tr, strict=True):
        padded = np.concatenate([templates[y], np.zeros(28)])  # 40 points: resampling is exact
        np.testing.assert_allclose(x, padded, atol=1e-6)


def test_mnist1d_classes_differ_and_errors():
    t = D.mnist1d_templates()
    assert len({tuple(row) for row in t}) == 10
    assert D.mnist1d_templates(20).shape == (10, 20)
    with pytest.raises(ValueError, match="num_samples"):
        D.make_mnist1d(5)
    with pytest.raises(ValueError, match="train_split"):
        D.make_mnist1d(100, train_split=1.0)
    with pytest.raises(ValueError, match="padding"):
        D.make_mnist1d(100, padding=(5, 1))
    with pytest.raises(ValueError, match="final_seq_length"):
        D.make_mnist1d(100, final_seq_length=1)
    with pytest.raises(ValueError, match="template_len"):
        D.mnist1d_templates(1)


def test_mnist1d_streams():
    split = D.split_mnist1d(num_samples=300)
    assert [t.classes for t in split.tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for task in split.tasks:
        assert set(np.unique(task.y_train)) <= set(task.classes)
    perm = D.permuted_mnist1d(3, num_samples=300)
    assert perm.scenarios == ("domain",) and perm.input_shape == (40,)
    np.testing.assert_array_equal(
        np.sort(perm.tasks[1].x_train, axis=1), np.sort(perm.tasks[0].x_train, axis=1)
    )


@settings(max_examples=20, deadline=None)
@given(text=st.text(max_size=40))
def test_char_encoding_round_trips_printable_text(text):
    ids = D.encode_chars(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert ids.min(initial=0) >= 0 and ids.max(initial=0) < D.CHAR_VOCAB_SIZE
    expected = "".join(
        c if c == "\n" or 32 <= ord(c) <= 126 else (" " if c == "\t" else "?") for c in text
    )
    assert D.decode_chars(ids) == expected


def test_char_lm_stream():
    stream = D.char_lm(("prose", "code", "unicode", "rot13"), context=32, max_chars=5000)
    assert stream.kind == "language_model" and stream.num_classes == D.CHAR_VOCAB_SIZE
    for task in stream.tasks:
        assert task.x_train.shape[1] == 32 and task.y_train.shape == task.x_train.shape
        # Targets are the inputs shifted by one character.
        np.testing.assert_array_equal(task.x_train[0, 1:], task.y_train[0, :-1])
    again = D.char_lm(("prose", "code", "unicode", "rot13"), context=32, max_chars=5000)
    assert _same_stream(stream, again)
    rot = D.decode_chars(stream.tasks[3].x_train[0])
    assert rot.isascii()
    with pytest.raises(ValueError, match="unknown domain"):
        D.char_lm(("poetry",))
    with pytest.raises(ValueError, match="empty"):
        D.char_lm(())
    with pytest.raises(ValueError, match="too few"):
        D.char_lm(("prose",), context=64, max_chars=100)
    with pytest.raises(ValueError, match="test_fraction"):
        D.char_lm(("prose",), test_fraction=0.0)
