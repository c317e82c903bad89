"""``fashion-mnist-mlp`` and ``fashion-mnist-cnn``: Fashion-MNIST (Xiao et al. 2017, MIT license).

60,000 training and 10,000 test images, 28x28 grey, 10 balanced classes (6,000 / 1,000 per class), read
from the four standard IDX files (``sim.tasks.idx``), gzip-compressed or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``.

Where they are looked for (``task_options.data_dir``): that folder itself, or torchvision's layout below it
(``<data_dir>/FashionMNIST/raw/``). By default ``data_dir`` is where Debian's package
``dataset-fashion-mnist`` installs them, ``/usr/share/datasets/fashion-mnist``; ``make demo`` / ``make test``
install that package when the files are missing (``scripts/ensure_fashion_mnist.sh``).

Pixels are scaled to [0, 1] and standardised with the training set's mean and standard deviation
(0.2860, 0.3530). The full 10k test split is the evaluation set: one image is 0.01 accuracy points.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from compressors.options import invalid
from ..models import fashion_cnn, mlp
from .base import Task, cross_entropy
from .idx import read_idx

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
MEAN, STD = 0.2860, 0.3530  # of the 60k training images scaled to [0, 1]
CLASSES = 10
GET_IT = ("install Debian's package (as root: apt-get install dataset-fashion-mnist), or download the four "
          "files from https://github.com/zalandoresearch/fashion-mnist and set task_options.data_dir")


def find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def data_folder(data_dir) -> Path:
    """The folder holding all four files (``data_dir`` or ``data_dir/FashionMNIST/raw``); a ValueError listing
    the expected files and how to get them when any is missing."""
    if not isinstance(data_dir, (str, Path)):
        raise invalid("Experiment.task_options", "data_dir", data_dir, "a folder path (string)")
    root = Path(data_dir).expanduser()
    candidates = (root, root / "FashionMNIST" / "raw")
    for folder in candidates:
        if all(find_file(folder, stem) for stem in FILES.values()):
            return folder
    expected = ", ".join(f"{stem}[.gz]" for stem in FILES.values())
    raise ValueError(f"Experiment.task_options: data_dir={str(data_dir)!r} does not hold the Fashion-MNIST files; "
                     f"expected {expected} in {root} or in {candidates[1]}. To get them: {GET_IT}.")


@lru_cache(maxsize=2)
def _load_uint8(folder: str, stamp: tuple) -> tuple[np.ndarray, ...]:
    """The four arrays, read once per process (a sweep builds its task once per run); ``stamp`` (sizes and
    mtimes) makes a changed file a cache miss."""
    paths = {key: find_file(Path(folder), stem) for key, stem in FILES.items()}
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise ValueError(f"{paths[f'{split}_images']}: expected uint8 images of shape (N, 28, 28), got "
                             f"{images.dtype} {images.shape}")
        if labels.ndim != 1 or labels.dtype != np.uint8 or len(labels) != len(images):
            raise ValueError(f"{paths[f'{split}_labels']}: expected {len(images)} uint8 labels (one per image in "
                             f"{paths[f'{split}_images'].name}), got {labels.dtype} {labels.shape}")
        if labels.size and labels.max() >= CLASSES:
            raise ValueError(f"{paths[f'{split}_labels']}: labels must be in 0..{CLASSES - 1}, found {labels.max()}")
    return tuple(arrays[key] for key in FILES)


def load_fashion_mnist(data_dir, dtype: torch.dtype):
    """(train_x (N, 784), train_y (N,), test_x (M, 784), test_y (M,)), pixels standardised."""
    folder = data_folder(data_dir)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in
                  (find_file(folder, stem) for stem in FILES.values()))
    train_images, train_labels, test_images, test_labels = _load_uint8(str(folder), stamp)

    def features(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)  # (N, 784) in [0, 1]
        return ((x - MEAN) / STD).to(dtype)

    return (features(train_images), torch.from_numpy(train_labels.astype(np.int64)),
            features(test_images), torch.from_numpy(test_labels.astype(np.int64)))


def validate_fashion_options(options: dict) -> None:
    if "data_dir" in options and not isinstance(options["data_dir"], str):
        raise invalid("Experiment.task_options", "data_dir", options["data_dir"], "a folder path (string)")
    hidden = options.get("hidden", (1,))
    if not isinstance(hidden, (list, tuple)) or not hidden or not all(
            isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
        raise invalid("Experiment.task_options", "hidden", hidden, "a non-empty list of integers >= 1")


def fashion_mnist_mlp_task(*, dtype: torch.dtype, data_dir: str = DEFAULT_DIR,
                           hidden: tuple[int, ...] = (256, 128)) -> Task:
    train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, dtype)
    widths = tuple(hidden)
    return Task("fashion-mnist-mlp", train_x, train_y, test_x, test_y, lambda: mlp(28 * 28, widths, CLASSES),
                cross_entropy, labels=train_y)


def fashion_mnist_cnn_task(*, dtype: torch.dtype, data_dir: str = DEFAULT_DIR) -> Task:
    train_x, train_y, test_x, test_y = load_fashion_mnist(data_dir, dtype)
    return Task("fashion-mnist-cnn", train_x, train_y, test_x, test_y, fashion_cnn, cross_entropy, labels=train_y)
