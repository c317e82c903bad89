"""``cifar10-resnet18``: CIFAR-10 from the standard python pickle batches, with the paper's ResNet-18.

Expected files (the "CIFAR-10 python version" archive, https://www.cs.toronto.edu/~kriz/cifar.html, unpacked):
``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (``data_dir`` may also be that folder itself).
Each file is a pickled dict with ``b"data"``: uint8 (N, 3072), a row being the 1024 red, then green, then
blue values of a 32x32 image in row-major order, and ``b"labels"``: N integers in 0..9. A batch is read as data
only: the unpickler builds containers, numbers, bytes and numpy arrays and nothing else, a file may reference
an object already built at most ``MAX_MEMO_GETS`` times, and anything else is a ValueError naming the file.

Pixels are scaled to [0, 1] and normalised per channel with the usual CIFAR-10 training-set statistics
(mean 0.4914, 0.4822, 0.4465; std 0.2470, 0.2435, 0.2616). No augmentation: a Task holds a fixed training
set, so random crops and flips of the paper's setup are not simulated.
"""
from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

import numpy as np
import torch

from compressors.options import check_int, invalid
from ..models import resnet18_cifar
from .base import Task, cross_entropy

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def batches_folder(data_dir: str | None) -> Path:
    """The folder holding the batch files; a ValueError naming every expected file when any is missing."""
    expected = ", ".join(TRAIN_FILES + (TEST_FILE,))
    if not isinstance(data_dir, str):
        raise invalid("Experiment.task_options", "data_dir", data_dir,
                      f"a folder containing {FOLDER}/ with the CIFAR-10 python batches ({expected})")
    root = Path(data_dir).expanduser()
    for folder in (root / FOLDER, root):
        if all((folder / name).is_file() for name in TRAIN_FILES + (TEST_FILE,)):
            return folder
    candidate = root / FOLDER if (root / FOLDER).is_dir() else root
    missing = [name for name in TRAIN_FILES + (TEST_FILE,) if not (candidate / name).is_file()]
    raise ValueError(f"Experiment.task_options: data_dir={data_dir!r} is invalid; allowed: a folder containing "
                     f"{FOLDER}/ with the CIFAR-10 python batches ({expected}); missing in {candidate}: "
                     f"{', '.join(missing)}")


#: The only globals a CIFAR-10 batch needs: numpy's array reconstructors (numpy < 2 and >= 2 module names),
#: and ``_codecs.encode``, with which Python 3 writes bytes into protocol-2 pickles (text -> bytes, no effects).
DATA_GLOBALS = frozenset({(module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")} |
                         {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} |
                         {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")})


class DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, bytes and numpy arrays only: a pickle naming any other global (a
    function to call, e.g. ``os.system``) is refused before anything runs (files never name code to run)."""

    def find_class(self, module: str, name: str):
        if (module, name) not in DATA_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a CIFAR-10 batch holds only data")
        return super().find_class(module, name)


#: Memo look-ups (references to an object already built) a batch may make: a real batch makes two per file
#: name (the ``_codecs.encode`` global and its encoding); a crafted one could repeat one big object millions
#: of times at a few bytes per reference, to be copied out later.
MAX_MEMO_GETS = 100_000
MAX_BATCH_BYTES = 1 << 30  # a real batch is 31 MB
MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> images uint8 (N, 3, 32, 32), labels int64 (N,). ``b"data"`` must be a uint8 array
    and ``b"labels"`` a list of integers: nothing in the file is expanded or converted before that is checked."""
    with open(path, "rb") as f:
        raw = f.read(MAX_BATCH_BYTES + 1)
    try:
        if len(raw) > MAX_BATCH_BYTES:
            raise ValueError(f"larger than {MAX_BATCH_BYTES} bytes")
        gets = sum(op.name in MEMO_GETS for op, _, _ in pickletools.genops(raw))
        if gets > MAX_MEMO_GETS:
            raise ValueError(f"{gets} memo references; allowed: at most {MAX_MEMO_GETS}")
        batch = DataOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError, MemoryError,
            RecursionError, IndexError, KeyError) as error:
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected a dict with b'data' and b'labels')")
    data, labels = batch[b"data"], batch[b"labels"]
    if type(data) is not np.ndarray or data.dtype != np.uint8 or type(labels) is not list or not all(
            type(v) is int and 0 <= v < 10 for v in labels):
        raise ValueError(f"{path}: not a CIFAR-10 python batch (expected b'data' a uint8 array and b'labels' a "
                         "list of integers in [0, 10))")
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected b'data' of shape (N, 3072) and N b'labels', got {data.shape} and "
                         f"{len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def normalise(images: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(images, dtype=torch.float64) / 255.0  # (N, 3, 32, 32)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


def validate_cifar_options(options: dict) -> None:
    batches_folder(options.get("data_dir"))
    for key in ("train_samples", "test_samples"):
        if options.get(key) is not None:
            check_int("Experiment.task_options", key, options[key], minimum=1)


def cifar10_task(*, dtype: torch.dtype, data_dir: str | None = None, train_samples: int | None = None,
                 test_samples: int | None = None) -> Task:
    """``train_samples`` / ``test_samples`` keep the first N images of each split (None: all 50,000 / 10,000)."""
    folder = batches_folder(data_dir)
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    train_images = np.concatenate([p[0] for p in parts])[:train_samples]
    train_labels = np.concatenate([p[1] for p in parts])[:train_samples]
    test_images, test_labels = read_batch(folder / TEST_FILE)
    test_images, test_labels = test_images[:test_samples], test_labels[:test_samples]
    train_y = torch.as_tensor(train_labels)
    return Task("cifar10-resnet18", normalise(train_images, dtype), train_y, normalise(test_images, dtype),
                torch.as_tensor(test_labels), resnet18_cifar, cross_entropy, labels=train_y)
