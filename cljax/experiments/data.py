"""Offline, deterministic task streams for continual-learning experiments (EX-03, EX-05).

Nothing here downloads anything. Every stream is built from data that ships with an installed
package or is generated:

* scikit-learn's bundled digits (1,797 images of 8 x 8 pixels, values 0-16, scaled to [0, 1]):
  `split_digits` (5 tasks of 2 classes, task- and class-incremental from one run),
  `split_digits_domain` (the same tasks labelled by class parity, domain-incremental),
  `permuted_digits` and `rotated_digits` (domain-incremental);
* MNIST-1D generated procedurally by `make_mnist1d` (our own templates and generator, written
  from the MNIST-1D paper's description): `split_mnist1d`, `permuted_mnist1d`;
* SCoLe (`scole`): long sequences of small random class subsets of a fixed pool of digits or
  MNIST-1D classes with controlled re-occurrence, plus the pool's whole test set for measuring
  knowledge accumulation (EX-12);
* character-level language modelling on text that ships with Python (`char_lm`): documentation
  prose (``pydoc_data``), standard-library source code, Unicode character names, and ROT13-encoded
  prose (the encoding of ``this``'s Zen of Python), one domain per task (continual pre-training).

A stream is a `Stream` of `Task`s holding NumPy arrays. Train / test splits are fixed (a stratified
80/20 split with a fixed seed for the digits) and identical for every task of a stream; the model
seed of a run never changes the data.
"""

from __future__ import annotations

import codecs
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "CHAR_DOMAINS",
    "CHAR_VOCAB_SIZE",
    "SCOLE_BASES",
    "Scenario",
    "Stream",
    "Task",
    "char_lm",
    "decode_chars",
    "encode_chars",
    "load_digits_split",
    "make_mnist1d",
    "mnist1d_templates",
    "permute_features",
    "permuted_digits",
    "permuted_mnist1d",
    "rotate_images",
    "rotated_digits",
    "scole",
    "scole_classes",
    "split_digits",
    "split_digits_domain",
    "split_mnist1d",
]

Scenario = Literal["task", "class", "domain"]


class Task(NamedTuple):
    """One task of a stream: fixed train and test arrays plus the label ids it uses.

    For classification, ``x_*`` has shape ``(N, *input_shape)`` (float32) and ``y_*`` shape
    ``(N,)`` (int32). For language modelling, ``x_*`` holds token windows ``(N, L)`` and ``y_*``
    the next tokens ``(N, L)`` (both int32).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[int, ...]  # label ids of this task (Task-IL masks the logits to these)


class Stream(NamedTuple):
    """A sequence of tasks sharing one input shape and one output space.

    ``pool_test``, when set, is an extra evaluation set ``(x, y)`` (the test examples of every
    class of the stream's class pool, as `scole` builds): the runner evaluates it at every
    evaluation point (knowledge accumulation, EX-12). Streams without it cost nothing extra.
    """

    name: str
    tasks: tuple[Task, ...]
    num_classes: int  # size of the output layer (the vocabulary for language modelling)
    input_shape: tuple[int, ...]  # shape of one input example
    scenarios: tuple[Scenario, ...]  # what one run reports: ("task", "class") or ("domain",)
    kind: Literal["classification", "language_model"] = "classification"
    description: str = ""
    pool_test: tuple[np.ndarray, np.ndarray] | None = None  # all classes' test set (EX-12)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)


def _check_tasks(fn: str, num_tasks: int, low: int = 1, high: int | None = None) -> None:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
        raise TypeError(f"{fn}(num_tasks=...) must be an int, got {num_tasks!r}.")
    if num_tasks < low or (high is not None and num_tasks > high):
        upper = f" and at most {high}" if high is not None else ""
        raise ValueError(f"{fn}(num_tasks=...) must be at least {low}{upper}, got {num_tasks}.")


# ---------------------------------------------------------------------------------------------
# scikit-learn digits.


@functools.lru_cache(maxsize=4)
def _digits_split(split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=split_seed
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)
    return x_tr, y_tr, x_te, y_te


def load_digits_split(split_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    A stratified 80/20 split with `split_seed`; pixels scaled from 0-16 to [0, 1] (float32, shape
    ``(N, 64)``); labels int32. The data file ships inside the scikit-learn wheel: no download.

    Args:
        split_seed: Seed of the train/test split.

    Returns:
        Read-only arrays: 1,437 training and 360 test examples.

    Example:
        >>> from cljax.experiments.data import load_digits_split
        >>> x_train, y_train, x_test, y_test = load_digits_split()
        >>> x_train.shape, x_test.shape
        ((1437, 64), (360, 64))
    """
    return _digits_split(int(split_seed))


def _split_by_classes(
    name: str, x_tr, y_tr, x_te, y_te, groups: Sequence[Sequence[int]], relabel: Callable | None
) -> tuple[Task, ...]:
    tasks = []
    for t, group in enumerate(groups):
        tr = np.isin(y_tr, group)
        te = np.isin(y_te, group)
        ytr, yte = y_tr[tr], y_te[te]
        classes = tuple(int(c) for c in group)
        if relabel is not None:
            ytr, yte = relabel(ytr), relabel(yte)
            classes = tuple(sorted({int(relabel(np.asarray([c]))[0]) for c in group}))
        tasks.append(
            Task(
                f"{name}/{t}",
                x_tr[tr],
                ytr.astype(np.int32),
                x_te[te],
                yte.astype(np.int32),
                classes,
            )
        )
    return tuple(tasks)


def _class_groups(fn: str, num_classes: int, num_tasks: int) -> list[list[int]]:
    _check_tasks(fn, num_tasks, 1, num_classes)
    if num_classes % num_tasks:
        raise ValueError(
            f"{fn}(num_tasks=...) must divide the {num_classes} classes evenly, got {num_tasks}."
        )
    per = num_classes // num_tasks
    return [list(range(t * per, (t + 1) * per)) for t in range(num_tasks)]


def split_digits(num_tasks: int = 5, *, split_seed: int = 0) -> Stream:
    """Split-Digits: the 10 digit classes in `num_tasks` tasks of consecutive classes.

    Labels stay global (0-9) and one head covers all classes, so one run reports class-incremental
    accuracy (argmax over all logits) and task-incremental accuracy (argmax over the evaluated
    task's classes: logit masking).

    Args:
        num_tasks: 1, 2, 5 or 10 (must divide 10). Default 5 tasks of 2 classes.
        split_seed: Seed of the fixed train/test split.

    Returns:
        A `Stream` with scenarios ``("task", "class")``.

    Raises:
        ValueError: when `num_tasks` does not divide 10.

    Example:
        >>> stream = cljax.experiments.data.split_digits()
        >>> [task.classes for task in stream.tasks][:2]
        [(0, 1), (2, 3)]
    """
    groups = _class_groups("split_digits", 10, num_tasks)
    tasks = _split_by_classes("split-digits", *load_digits_split(split_seed), groups, None)
    return Stream(
        "split-digits",
        tasks,
        10,
        (64,),
        ("task", "class"),
        description=f"scikit-learn digits, {num_tasks} tasks of {10 // num_tasks} classes",
    )


def split_digits_domain(num_tasks: int = 5, *, split_seed: int = 0) -> Stream:
    """Domain-incremental Split-Digits: each task's label is the class parity (2 outputs).

    The tasks of `split_digits`, labelled ``y mod 2`` (the domain-IL form of Split-MNIST: which
    of the task's two classes, without knowing the task).

    Args:
        num_tasks: 1 or 5 (each task must hold one even and one odd class).
        split_seed: Seed of the fixed train/test split.

    Returns:
        A `Stream` with scenario ``("domain",)`` and 2 output classes.

    Raises:
        ValueError: when `num_tasks` is not 1 or 5.

    Example:
        >>> stream = cljax.experiments.data.split_digits_domain()
        >>> stream.num_classes, stream.tasks[1].classes
        (2, (0, 1))
    """
    if num_tasks not in (1, 5):
        raise ValueError(f"split_digits_domain(num_tasks=...) must be 1 or 5, got {num_tasks!r}.")
    groups = _class_groups("split_digits_domain", 10, num_tasks)
    tasks = _split_by_classes(
        "split-digits-domain", *load_digits_split(split_seed), groups, lambda y: y % 2
    )
    return Stream(
        "split-digits-domain",
        tasks,
        2,
        (64,),
        ("domain",),
        description=f"scikit-learn digits, {num_tasks} tasks, label = class parity",
    )


def permute_features(x: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    """Returns `x` with its trailing feature axis reordered: ``out[..., i] = x[..., perm[i]]``.

    Args:
        x: Array ``(..., d)``.
        permutation: A permutation of ``range(d)``.

    Raises:
        ValueError: when `permutation` is not a permutation of ``range(d)``.

    Example:
        >>> from cljax.experiments.data import permute_features
        >>> permute_features(np.array([[1.0, 2.0, 3.0]]), np.array([2, 0, 1]))
        array([[3., 1., 2.]])
    """
    permutation = np.asarray(permutation)
    d = x.shape[-1]
    if permutation.shape != (d,) or not np.array_equal(np.sort(permutation), np.arange(d)):
        raise ValueError(
            f"permute_features: `permutation` must be a permutation of range({d}), got shape "
            f"{permutation.shape}."
        )
    return x[..., permutation]


def _permutations(num_tasks: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.arange(size)] + [rng.permutation(size) for _ in range(num_tasks - 1)]


def _domain_stream(name, x_tr, y_tr, x_te, y_te, transforms, input_shape, description) -> Stream:
    tasks = tuple(
        Task(f"{name}/{t}", f(x_tr), y_tr, f(x_te), y_te, tuple(range(10)))
        for t, f in enumerate(transforms)
    )
    return Stream(name, tasks, 10, input_shape, ("domain",), description=description)


def permuted_digits(num_tasks: int = 5, *, seed: int = 0, split_seed: int = 0) -> Stream:
    """Permuted-Digits: task 0 is the identity, task ``k`` a fixed random pixel permutation.

    Args:
        num_tasks: Number of tasks (at least 1).
        seed: Seed of the permutations.
        split_seed: Seed of the fixed train/test split.

    Returns:
        A domain-incremental `Stream` (10 classes in every task).

    Example:
        >>> stream = cljax.experiments.data.permuted_digits(3)
        >>> bool(np.array_equal(stream.tasks[0].x_test, cljax.experiments.data.load_digits_split()[2]))
        True
    """
    _check_tasks("permuted_digits", num_tasks)
    x_tr, y_tr, x_te, y_te = load_digits_split(split_seed)
    perms = _permutations(num_tasks, 64, seed)
    transforms = [functools.partial(permute_features, permutation=p) for p in perms]
    return _domain_stream(
        "permuted-digits",
        x_tr,
        y_tr,
        x_te,
        y_te,
        transforms,
        (64,),
        f"scikit-learn digits, {num_tasks} pixel permutations",
    )


def rotate_images(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotates square images counter-clockwise about their centre, bilinear, zeros outside.

    Each output pixel ``(r, c)`` samples the input at the inverse-rotated position; values
    outside the image are 0. Written in NumPy float64 so every host gives the same result.
    Rotating by a multiple of 90 degrees equals `np.rot90` (up to float rounding).

    Args:
        images: ``(N, s * s)`` flat or ``(N, s, s)`` images.
        degrees: The angle.

    Returns:
        Rotated images in the input's shape and dtype.

    Raises:
        ValueError: when the images are not square.

    Example:
        >>> from cljax.experiments.data import rotate_images
        >>> img = np.arange(4.0).reshape(1, 2, 2)
        >>> rotate_images(img, 90.0).round(6)
        array([[[1., 3.],
                [0., 2.]]])
    """
    x = np.asarray(images)
    shape = x.shape
    if x.ndim == 2:
        side = math.isqrt(shape[1])
        if side * side != shape[1]:
            raise ValueError(f"rotate_images: flat images of {shape[1]} pixels are not square.")
        x = x.reshape(shape[0], side, side)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"rotate_images: `images` has shape {shape}; need (N, s, s) or (N, s*s).")
    side = x.shape[1]
    centre = (side - 1) / 2.0
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    rows, cols = np.meshgrid(
        np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij"
    )
    # (u, v) = (col - c, c - row) are Cartesian coordinates; rotating the image by +theta means
    # sampling the source at the point rotated by -theta.
    u, v = cols - centre, centre - rows
    su = cos * u + sin * v
    sv = -sin * u + cos * v
    src_c, src_r = su + centre, centre - sv
    src_r = np.where(np.abs(src_r - np.round(src_r)) < 1e-9, np.round(src_r), src_r)
    src_c = np.where(np.abs(src_c - np.round(src_c)) < 1e-9, np.round(src_c), src_c)
    r0, c0 = np.floor(src_r).astype(int), np.floor(src_c).astype(int)
    fr, fc = src_r - r0, src_c - c0
    data = x.astype(np.float64)
    out = np.zeros_like(data)
    for dr, wr in ((0, 1.0 - fr), (1, fr)):
        for dc, wc in ((0, 1.0 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            inside = (rr >= 0) & (rr < side) & (cc >= 0) & (cc < side)
            w = np.where(inside, wr * wc, 0.0)
            vals = data[:, np.clip(rr, 0, side - 1), np.clip(cc, 0, side - 1)]
            out += w[None] * vals
    return out.reshape(shape).astype(x.dtype)


def rotated_digits(
    num_tasks: int = 5, *, max_degrees: float = 180.0, split_seed: int = 0
) -> Stream:
    """Rotated-Digits: task ``k`` rotates every image by ``k * max_degrees / num_tasks`` degrees.

    Args:
        num_tasks: Number of tasks (at least 1).
        max_degrees: The angles are ``0, d, 2d, ...`` with ``d = max_degrees / num_tasks``.
        split_seed: Seed of the fixed train/test split.

    Returns:
        A domain-incremental `Stream`; bilinear interpolation by `rotate_images`.

    Example:
        >>> stream = cljax.experiments.data.rotated_digits(2)
        >>> stream.tasks[1].name
        'rotated-digits/1'
    """
    _check_tasks("rotated_digits", num_tasks)
    x_tr, y_tr, x_te, y_te = load_digits_split(split_seed)
    angles = [k * max_degrees / num_tasks for k in range(num_tasks)]
    transforms = [functools.partial(rotate_images, degrees=a) for a in angles]
    return _domain_stream(
        "rotated-digits",
        x_tr,
        y_tr,
        x_te,
        y_te,
        transforms,
        (64,),
        f"scikit-learn digits rotated by {', '.join(f'{a:g}' for a in angles)} degrees",
    )


# ---------------------------------------------------------------------------------------------
# MNIST-1D, generated procedurally.

# Ten hand-made 12-point signals, one per digit: our own shapes (the published dataset uses
# different templates), so accuracies are not comparable with MNIST-1D papers.
_TEMPLATES = np.array(
    [
        [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0, -0.5, -1.0, -1.0, -0.5, 0.0],
        [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0],
        [1.0, 0.8, 0.6, 0.4, 0.2, 0.0, -0.2, -0.4, -0.6, -0.8, -1.0, -1.0],
        [0.0, 1.0, 0.0, -0.5, 0.0, 1.0, 0.0, -0.5, 0.0, 1.0, 0.0, 0.0],
        [-1.0, -1.0, 0.5, 0.5, 0.5, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0],
        [1.0, 1.0, 1.0, -0.5, -0.5, 0.5, 1.0, 0.5, -0.5, -1.0, -0.5, 0.0],
        [0.0, -0.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.5, 1.0],
        [1.0, 1.0, 1.0, 1.0, 0.5, 0.0, -0.5, -1.0, -1.0, -1.0, -1.0, -1.0],
        [0.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0],
        [-1.0, -0.5, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0, 0.5, 0.0, -0.5],
    ]
)


def mnist1d_templates(template_len: int = 12) -> np.ndarray:
    """Returns the ten digit templates ``(10, template_len)`` used by `make_mnist1d`.

    Args:
        template_len: Points per template; the 12-point shapes are linearly resampled.

    Example:
        >>> cljax.experiments.data.mnist1d_templates().shape
        (10, 12)
    """
    if isinstance(template_len, bool) or not isinstance(template_len, int) or template_len < 2:
        raise ValueError(
            f"mnist1d_templates(template_len=...) must be an int >= 2, got {template_len!r}."
        )
    if template_len == _TEMPLATES.shape[1]:
        return _TEMPLATES.copy()
    old = np.linspace(0.0, 1.0, _TEMPLATES.shape[1])
    new = np.linspace(0.0, 1.0, template_len)
    return np.stack([np.interp(new, old, t) for t in _TEMPLATES])


def _smooth_noise(rng: np.random.Generator, length: int, width: float = 2.0) -> np.ndarray:
    """Unit-variance Gaussian noise smoothed with a Gaussian kernel of `width` samples."""
    radius = int(math.ceil(3 * width))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / width) ** 2)
    kernel /= np.sqrt(np.sum(kernel**2))
    raw = rng.standard_normal(length + 2 * radius)
    return np.convolve(raw, kernel, mode="valid")


@functools.lru_cache(maxsize=8)
def _mnist1d_cached(
    num_samples,
    seed,
    template_len,
    padding,
    scale_coeff,
    max_translation,
    corr_noise_scale,
    iid_noise_scale,
    shear_scale,
    final_seq_length,
    train_split,
):
    rng = np.random.default_rng(seed)
    templates = mnist1d_templates(template_len)
    labels = rng.permutation(np.arange(num_samples) % 10).astype(np.int32)
    out = np.empty((num_samples, final_seq_length), np.float64)
    for i, y in enumerate(labels):
        # 1. pad the template with a random number of trailing zeros;
        pad = int(rng.integers(padding[0], padding[1] + 1))
        signal = np.concatenate([templates[y], np.zeros(pad)])
        length = signal.size
        # 2. random circular translation;
        signal = np.roll(signal, int(rng.integers(0, max_translation + 1)))
        # 3. random horizontal scaling about the centre (resampled, zeros outside);
        scale = 1.0 + scale_coeff * rng.uniform(-1.0, 1.0)
        grid = np.arange(length, dtype=np.float64)
        centre = (length - 1) / 2.0
        signal = np.interp(centre + (grid - centre) / scale, grid, signal, left=0.0, right=0.0)
        # 4. correlated (smooth) noise;
        signal = signal + corr_noise_scale * _smooth_noise(rng, length)
        # 5. shear: a random linear ramp in amplitude;
        signal = signal + shear_scale * rng.uniform(-1.0, 1.0) * np.linspace(-1.0, 1.0, length)
        # 6. resample to the final length, then 7. white noise.
        signal = np.interp(np.linspace(0, length - 1, final_seq_length), grid, signal)
        out[i] = signal + iid_noise_scale * rng.standard_normal(final_seq_length)
    x = out.astype(np.float32)
    n_train = int(round(train_split * num_samples))
    arrays = (x[:n_train], labels[:n_train], x[n_train:], labels[n_train:])
    for a in arrays:
        a.setflags(write=False)
    return arrays


def make_mnist1d(
    num_samples: int = 5000,
    *,
    seed: int = 42,
    template_len: int = 12,
    padding: tuple[int, int] = (36, 60),
    scale_coeff: float = 0.4,
    max_translation: int = 48,
    corr_noise_scale: float = 0.25,
    iid_noise_scale: float = 2e-2,
    shear_scale: float = 0.75,
    final_seq_length: int = 40,
    train_split: float = 0.8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generates an MNIST-1D-style dataset: noisy, shifted, scaled 1-D digit signals.

    Each example starts from its class template (`mnist1d_templates`), then: random trailing
    zero padding (``padding``), a random circular shift (up to `max_translation`), a random
    horizontal scale ``1 ± scale_coeff``, smooth correlated noise (`corr_noise_scale`), a random
    linear shear (`shear_scale`), linear resampling to `final_seq_length` points and white noise
    (`iid_noise_scale`). Classes are balanced. The generator uses its own NumPy `Generator`
    (never the global RNG) and is cached per argument set.

    Args:
        num_samples: Total examples (train + test).
        seed: Generator seed.
        template_len, padding, scale_coeff, max_translation, corr_noise_scale, iid_noise_scale,
            shear_scale, final_seq_length: The generation knobs, with the published defaults.
        train_split: Fraction of examples in the training set.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: read-only float32 ``(N, final_seq_length)``
        signals and int32 labels.

    Raises:
        ValueError: for a non-positive size or an invalid range.

    Example:
        >>> x_train, y_train, x_test, y_test = cljax.experiments.data.make_mnist1d(100)
        >>> x_train.shape, x_test.shape
        ((80, 40), (20, 40))

    References:
        Greydanus and Kobak, "Scaling Down Deep Learning with MNIST-1D", ICML 2024.
        https://arxiv.org/abs/2011.14439
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(
            f"make_mnist1d(num_samples=...) must be an int >= 10, got {num_samples!r}."
        )
    if not (0.0 < train_split < 1.0):
        raise ValueError(f"make_mnist1d(train_split=...) must be in (0, 1), got {train_split!r}.")
    if len(padding) != 2 or not 0 <= padding[0] <= padding[1]:
        raise ValueError(
            f"make_mnist1d(padding=...) must be (low, high) with 0 <= low <= high, got {padding!r}."
        )
    if final_seq_length < 2 or max_translation < 0:
        raise ValueError(
            "make_mnist1d: `final_seq_length` must be >= 2 and `max_translation` >= 0, got "
            f"{final_seq_length!r} and {max_translation!r}."
        )
    return _mnist1d_cached(
        num_samples,
        seed,
        template_len,
        tuple(int(p) for p in padding),
        float(scale_coeff),
        int(max_translation),
        float(corr_noise_scale),
        float(iid_noise_scale),
        float(shear_scale),
        int(final_seq_length),
        float(train_split),
    )


def _standardize(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = x_tr.mean(), x_tr.std()
    return ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)


def split_mnist1d(num_tasks: int = 5, *, num_samples: int = 5000, seed: int = 42) -> Stream:
    """Split-MNIST1D: the 10 classes of `make_mnist1d` in tasks of consecutive classes.

    Inputs are standardized with the training set's mean and standard deviation.

    Args:
        num_tasks: Must divide 10.
        num_samples: Examples generated (80% for training).
        seed: Generator seed.

    Returns:
        A `Stream` with scenarios ``("task", "class")``, inputs of shape ``(40,)``.

    Example:
        >>> stream = cljax.experiments.data.split_mnist1d(num_samples=200)
        >>> stream.input_shape, stream.num_tasks
        ((40,), 5)
    """
    groups = _class_groups("split_mnist1d", 10, num_tasks)
    x_tr, y_tr, x_te, y_te = make_mnist1d(num_samples, seed=seed)
    x_tr, x_te = _standardize(x_tr, x_te)
    tasks = _split_by_classes("split-mnist1d", x_tr, y_tr, x_te, y_te, groups, None)
    return Stream(
        "split-mnist1d",
        tasks,
        10,
        (x_tr.shape[1],),
        ("task", "class"),
        description=f"MNIST-1D ({num_samples} generated), {num_tasks} tasks",
    )


def permuted_mnist1d(
    num_tasks: int = 5, *, num_samples: int = 5000, seed: int = 42, permutation_seed: int = 0
) -> Stream:
    """Permuted-MNIST1D: task 0 the identity, task ``k`` a fixed permutation of the 40 positions.

    Args:
        num_tasks: Number of tasks (at least 1).
        num_samples: Examples generated (80% for training).
        seed: Generator seed.
        permutation_seed: Seed of the permutations.

    Returns:
        A domain-incremental `Stream`.

    Example:
        >>> cljax.experiments.data.permuted_mnist1d(2, num_samples=100).scenarios
        ('domain',)
    """
    _check_tasks("permuted_mnist1d", num_tasks)
    x_tr, y_tr, x_te, y_te = make_mnist1d(num_samples, seed=seed)
    x_tr, x_te = _standardize(x_tr, x_te)
    perms = _permutations(num_tasks, x_tr.shape[1], permutation_seed)
    transforms = [functools.partial(permute_features, permutation=p) for p in perms]
    return _domain_stream(
        "permuted-mnist1d",
        x_tr,
        y_tr,
        x_te,
        y_te,
        transforms,
        (x_tr.shape[1],),
        f"MNIST-1D ({num_samples} generated), {num_tasks} position permutations",
    )


# ---------------------------------------------------------------------------------------------
# SCoLe: long sequences of small class subsets with re-occurrence (EX-12).

SCOLE_BASES = ("digits", "mnist1d")


def _check_int(fn: str, arg: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{fn}({arg}=...) must be an int, got {value!r}.")
    if value < low or (high is not None and value > high):
        upper = f" and at most {high}" if high is not None else ""
        raise ValueError(f"{fn}({arg}=...) must be at least {low}{upper}, got {value}.")
    return int(value)


def scole_classes(
    num_tasks: int,
    *,
    pool_size: int = 10,
    classes_per_task: int = 2,
    recurrence: float = 0.0,
    seed: int = 0,
) -> tuple[tuple[int, ...], ...]:
    """The class sets of a SCoLe stream: one sorted tuple of class ids per task.

    Task ``t`` draws `classes_per_task` distinct classes uniformly from the pool
    ``{0, ..., pool_size - 1}``, then adds every other pool class independently with probability
    `recurrence`. A class is therefore in a task with probability
    ``k / C + (1 - k / C) * recurrence`` (``k`` classes per task, ``C`` the pool size), the same
    for every task and class; ``recurrence=1`` makes every task the whole pool. Every task
    consumes the same number of random draws, from a generator seeded by ``(seed, 0)`` only, so
    the class sequence depends on nothing but these arguments.

    Args:
        num_tasks: Number of tasks (at least 1).
        pool_size: Size ``C`` of the class pool (at least 2).
        classes_per_task: Classes ``k`` drawn for every task (1 to `pool_size`).
        recurrence: Probability in [0, 1] that each pool class not drawn joins the task.
        seed: Seed of the draws.

    Returns:
        ``num_tasks`` sorted tuples of class ids.

    Raises:
        TypeError: when a count is not an int.
        ValueError: for a count out of range or `recurrence` outside [0, 1].

    Example:
        >>> from cljax.experiments.data import scole_classes
        >>> scole_classes(3, pool_size=4, classes_per_task=2, recurrence=1.0)
        ((0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2, 3))
    """
    return _draw_classes("scole_classes", num_tasks, pool_size, classes_per_task, recurrence, seed)


def _draw_classes(
    fn: str, num_tasks, pool_size, classes_per_task, recurrence, seed
) -> tuple[tuple[int, ...], ...]:
    num_tasks = _check_int(fn, "num_tasks", num_tasks, 1)
    pool_size = _check_int(fn, "pool_size", pool_size, 2)
    k = _check_int(fn, "classes_per_task", classes_per_task, 1, pool_size)
    if not 0.0 <= float(recurrence) <= 1.0:
        raise ValueError(f"{fn}(recurrence=...) must be in [0, 1], got {recurrence!r}.")
    rng = np.random.default_rng([int(seed), 0])
    out = []
    for _ in range(num_tasks):
        drawn = rng.choice(pool_size, size=k, replace=False)
        joins = rng.random(pool_size) < recurrence  # random() < 1 always; < 0 never
        joins[drawn] = True
        out.append(tuple(int(c) for c in np.flatnonzero(joins)))
    return tuple(out)


def scole(
    num_tasks: int = 50,
    *,
    base: str = "digits",
    pool_size: int = 10,
    classes_per_task: int = 2,
    recurrence: float = 0.0,
    samples_per_class: int | None = None,
    seed: int = 0,
    split_seed: int = 0,
    num_samples: int = 5000,
) -> Stream:
    """SCoLe: a long sequence of tasks, each a small random subset of a fixed class pool.

    The pool is the classes ``0 .. pool_size - 1`` of `base` (scikit-learn digits or generated
    MNIST-1D). Task ``t``'s classes come from `scole_classes`: `classes_per_task` classes drawn
    uniformly without replacement, plus every other pool class independently with probability
    `recurrence` (1: every task is the whole pool). Its training set is, for each of its classes,
    `samples_per_class` training examples of that class drawn without replacement (a fresh draw
    per task, from a generator seeded by ``(seed, 1, t)``; None: all of them); its test set is
    every test example of its classes. Labels stay global and one head covers the pool
    (class-incremental). ``Stream.pool_test`` is the test set of the whole pool, on which the
    runner measures knowledge accumulation (accuracy on all classes over time).

    Sampling is seeded and logged: each ``Task.classes`` is its class list, the description
    names every argument, and the same arguments always give the same stream. The data split
    (`split_seed`, or the MNIST-1D sample) never depends on `seed`.

    Args:
        num_tasks: Number of tasks (at least 1).
        base: ``'digits'`` or ``'mnist1d'``.
        pool_size: Classes in the pool, 2 to 10.
        classes_per_task: Classes drawn for each task, 1 to `pool_size`.
        recurrence: Probability in [0, 1] that each pool class not drawn for a task joins it.
        samples_per_class: Training examples per class and task (None: all), at most the
            smallest class's training count.
        seed: Seed of the class draws and the per-task training subsets.
        split_seed: Train/test split seed of the digits.
        num_samples: Examples generated for MNIST-1D (80% for training).

    Returns:
        A `Stream` with scenario ``("class",)``, ``num_classes = pool_size`` and `pool_test` set.

    Raises:
        TypeError: when a count is not an int.
        ValueError: for an unknown `base`, a count out of range, `recurrence` outside [0, 1],
            or more `samples_per_class` than a class holds.

    Notes:
        The paper's tasks are random class subsets of a finite environment with data
        re-occurring at various frequencies (how it varies them was not checked);
        ``recurrence=0`` is the uniform draw, and `recurrence` is our own knob for denser
        re-occurrence (it cannot make a class rarer than the uniform draw). The per-task training
        subset stands in for the paper's per-task data sampling, whose exact form we did not
        check.

    Example:
        >>> stream = cljax.experiments.data.scole(4, classes_per_task=2, samples_per_class=5)
        >>> [len(task.y_train) for task in stream.tasks], stream.pool_test[1].shape
        ([10, 10, 10, 10], (360,))

    References:
        Lesort et al., "Challenging Common Assumptions about Catastrophic Forgetting and
        Knowledge Accumulation", CoLLAs 2023. https://arxiv.org/abs/2207.04543
    """
    fn = "scole"
    if base not in SCOLE_BASES:
        raise ValueError(
            f"{fn}(base=...) must be one of {', '.join(map(repr, SCOLE_BASES))}, got {base!r}."
        )
    pool_size = _check_int(fn, "pool_size", pool_size, 2, 10)
    classes = _draw_classes(fn, num_tasks, pool_size, classes_per_task, recurrence, seed)
    if base == "digits":
        x_tr, y_tr, x_te, y_te = load_digits_split(split_seed)
        source = f"scikit-learn digits (split seed {split_seed})"
    else:
        x_tr, y_tr, x_te, y_te = make_mnist1d(num_samples)
        x_tr, x_te = _standardize(x_tr, x_te)
        source = f"MNIST-1D ({num_samples} generated)"
    by_class = [np.flatnonzero(y_tr == c) for c in range(pool_size)]
    if samples_per_class is not None:
        smallest = min(len(i) for i in by_class)
        samples_per_class = _check_int(fn, "samples_per_class", samples_per_class, 1)
        if samples_per_class > smallest:
            raise ValueError(
                f"{fn}(samples_per_class=...) must be at most {smallest} (the smallest class's "
                f"training examples in {base}), got {samples_per_class}; pass None for all."
            )
    tasks = []
    for t, group in enumerate(classes):
        rng = np.random.default_rng([int(seed), 1, t])
        rows = []
        for c in group:
            idx = by_class[c]
            if samples_per_class is not None:
                idx = np.sort(rng.choice(idx, size=samples_per_class, replace=False))
            rows.append(idx)
        tr = np.concatenate(rows)
        te = np.isin(y_te, group)
        tasks.append(Task(f"scole-{base}/{t}", x_tr[tr], y_tr[tr], x_te[te], y_te[te], group))
    pool = y_te < pool_size
    per_class = "all" if samples_per_class is None else str(samples_per_class)
    description = (
        f"SCoLe on {source}: {num_tasks} tasks of {classes_per_task} classes drawn from a pool of "
        f"{pool_size}, recurrence {float(recurrence):g}, {per_class} training examples per "
        f"class and task, seed {seed}"
    )
    return Stream(
        f"scole-{base}",
        tuple(tasks),
        pool_size,
        (x_tr.shape[1],),
        ("class",),
        description=description,
        pool_test=(x_te[pool], y_te[pool]),
    )


# ---------------------------------------------------------------------------------------------
# Character-level language modelling on text shipped with Python.

# Vocabulary: id 0 is newline, ids 1-95 are printable ASCII 32-126; anything else maps to '?'.
CHAR_VOCAB_SIZE = 96
_UNKNOWN = ord("?") - 31


def encode_chars(text: str) -> np.ndarray:
    """Encodes text to int32 ids: newline 0, printable ASCII ``c`` to ``ord(c) - 31``, else '?'.

    Tabs become a space; every other character outside the vocabulary becomes '?'.

    Example:
        >>> from cljax.experiments.data import decode_chars, encode_chars
        >>> decode_chars(encode_chars("hi\\n\\u00e9"))
        'hi\\n?'
    """
    codes = np.frombuffer(text.replace("\t", " ").encode("utf-32-le"), dtype=np.uint32).astype(
        np.int64
    )
    ids = np.where((codes >= 32) & (codes <= 126), codes - 31, _UNKNOWN)
    return np.where(codes == 10, 0, ids).astype(np.int32)


def decode_chars(ids: np.ndarray) -> str:
    """Inverse of `encode_chars` (unknown characters come back as '?')."""
    ids = np.asarray(ids).reshape(-1)
    return "".join("\n" if i == 0 else chr(int(i) + 31) for i in ids)


def _read_module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


_CODE_MODULES = (
    "textwrap",
    "string",
    "heapq",
    "bisect",
    "fractions",
    "colorsys",
    "calendar",
    "json.decoder",
    "json.encoder",
    "shlex",
    "difflib",
    "graphlib",
    "dataclasses",
    "statistics",
)


def _prose_text() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _domain_text(domain: str, max_chars: int) -> str:
    if domain == "prose":
        return _prose_text()[:max_chars]
    if domain == "code":
        return "\n".join(_read_module_source(m) for m in _CODE_MODULES)[:max_chars]
    if domain == "unicode":
        import unicodedata

        lines = []
        for code in range(32, 0x3000):
            name = unicodedata.name(chr(code), "")
            if name:
                lines.append(f"U+{code:04X} {name}")
        return "\n".join(lines)[:max_chars]
    if domain == "rot13":  # prose after the slice used by "prose", ROT13-encoded like `this.s`
        text = _prose_text()
        return codecs.encode(text[max_chars : 2 * max_chars], "rot13")
    raise ValueError(
        f"char_lm(domains=...) has unknown domain {domain!r}; choose from {', '.join(CHAR_DOMAINS)}."
    )


CHAR_DOMAINS = ("prose", "code", "unicode", "rot13")


def _windows(ids: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    n = (ids.size - 1) // context
    x = ids[: n * context].reshape(n, context)
    y = ids[1 : n * context + 1].reshape(n, context)
    return x, y


def char_lm(
    domains: Sequence[str] = CHAR_DOMAINS,
    *,
    context: int = 64,
    max_chars: int = 60_000,
    test_fraction: float = 0.1,
) -> Stream:
    """Character-level language modelling, one text domain per task (continual pre-training).

    Domains (all from the running Python's own files, so the text depends on the Python version):
    ``'prose'`` (the reference documentation in ``pydoc_data.topics``), ``'code'`` (source of a
    fixed list of standard-library modules), ``'unicode'`` (``unicodedata`` character names, one
    per line) and ``'rot13'`` (further documentation prose, ROT13-encoded as the Zen of Python is in
    ``this``). Each domain's text (first `max_chars` characters) is cut into non-overlapping windows
    of `context` characters; the last `test_fraction` of the text is the test set. Accuracy is
    next-character top-1 accuracy.

    Args:
        domains: Which domains, in task order.
        context: Window length.
        max_chars: Characters per domain.
        test_fraction: Fraction of each domain's text held out (contiguous, at the end).

    Returns:
        A `Stream` of kind ``'language_model'`` with scenario ``("domain",)``.

    Raises:
        ValueError: for an unknown domain or a domain too short for one test window.

    Example:
        >>> stream = cljax.experiments.data.char_lm(("prose", "code"), context=32, max_chars=4000)
        >>> stream.tasks[0].x_train.shape[1], stream.num_classes
        (32, 96)
    """
    if not domains:
        raise ValueError("char_lm(domains=...) is empty; pass at least one domain.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"char_lm(test_fraction=...) must be in (0, 1), got {test_fraction!r}.")
    tasks = []
    for t, domain in enumerate(domains):
        ids = encode_chars(_domain_text(domain, max_chars))
        cut = int(ids.size * (1.0 - test_fraction))
        x_tr, y_tr = _windows(ids[:cut], context)
        x_te, y_te = _windows(ids[cut:], context)
        if len(x_te) == 0 or len(x_tr) == 0:
            raise ValueError(
                f"char_lm: domain {domain!r} has {ids.size} characters, too few for a window of "
                f"{context} in both splits; lower `context` or raise `max_chars`."
            )
        tasks.append(
            Task(f"char-lm/{t}:{domain}", x_tr, y_tr, x_te, y_te, tuple(range(CHAR_VOCAB_SIZE)))
        )
    return Stream(
        "char-lm",
        tuple(tasks),
        CHAR_VOCAB_SIZE,
        (context,),
        ("domain",),
        kind="language_model",
        description=f"character LM on {', '.join(domains)} ({context}-character windows)",
    )
