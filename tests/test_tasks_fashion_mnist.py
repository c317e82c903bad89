"""Fashion-MNIST tasks: the IDX loader on small files generated here in the real format (gzip or not,
Debian's flat folder or torchvision's FashionMNIST/raw layout, corrupt files refused clearly), and the real
60k/10k files where the machine has them."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import sim
from sim.tasks.fashion_mnist import DEFAULT_DIR, FILES, MEAN, STD, data_folder
from sim.tasks.idx import parse_idx, read_idx, write_idx


def make_files(folder: Path, n_train=40, n_test=20, compress=True, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {"train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train_labels": rng.integers(0, 10, n_train).astype(np.uint8),
              "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "test_labels": rng.integers(0, 10, n_test).astype(np.uint8)}
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in FILES.items():
        write_idx(folder / (stem + (".gz" if compress else "")), arrays[key], compress=compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_loads_generated_files_standardised(tmp_path, compress):
    arrays = make_files(tmp_path, compress=compress)
    e = sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": str(tmp_path)}, workers=2, steps=1)
    task = sim.Simulation(e).task
    assert task.train_x.shape == (40, 784) and task.test_x.shape == (20, 784)
    expected = (torch.from_numpy(arrays["train_images"].reshape(40, -1)).float() / 255 - MEAN) / STD
    torch.testing.assert_close(task.train_x, expected)
    assert torch.equal(task.train_y, torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    assert torch.equal(task.test_y, torch.from_numpy(arrays["test_labels"].astype(np.int64)))


def test_torchvision_layout_and_cnn_task_train(tmp_path):
    make_files(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert data_folder(str(tmp_path)) == tmp_path / "FashionMNIST" / "raw"
    e = sim.Experiment(task="fashion-mnist-cnn", task_options={"data_dir": str(tmp_path)}, workers=2, steps=2,
                       batch_size=4, compressor={"name": "powersgd", "rank": 1})
    history = sim.run(e).history
    assert np.isfinite(history["train_loss"]).all() and 0 <= history["test_accuracy"].iloc[-1] <= 1


def test_idx_round_trip_of_every_type():
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            write_idx(Path(d) / "a", a)
            b = read_idx(Path(d) / "a")
        assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)


def test_missing_directory_lists_the_expected_files_and_how_to_get_them(tmp_path):
    with pytest.raises(ValueError) as error:
        sim.Simulation(sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": str(tmp_path / "none")}))
    message = str(error.value)
    for stem in FILES.values():
        assert stem in message
    assert "apt-get install dataset-fashion-mnist" in message and "data_dir" in message


def test_wrong_magic_number_is_refused(tmp_path):
    make_files(tmp_path, compress=False)
    path = tmp_path / FILES["train_images"]
    data = bytearray(path.read_bytes())
    data[0:4] = b"PK\x03\x04"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not an IDX file"):
        sim.Simulation(sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": str(tmp_path)}, workers=2))


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_file_is_refused(tmp_path, compress):
    make_files(tmp_path, compress=compress, seed=1)
    path = tmp_path / (FILES["test_images"] + (".gz" if compress else ""))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated|gzip"):
        sim.Simulation(sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": str(tmp_path)}, workers=2))


def test_label_image_count_mismatch_is_refused(tmp_path):
    make_files(tmp_path, compress=True, seed=2)
    write_idx(tmp_path / (FILES["train_labels"] + ".gz"), np.zeros(39, dtype=np.uint8), compress=True)
    with pytest.raises(ValueError, match="expected 40 uint8 labels"):
        sim.Simulation(sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": str(tmp_path)}, workers=2))


def test_header_that_declares_more_than_the_file_holds():
    header = bytes([0, 0, 0x08, 1]) + np.asarray([10], dtype=">u4").tobytes()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        parse_idx(header + bytes(5))
    with pytest.raises(ValueError, match="truncated header"):
        parse_idx(bytes([0, 0, 0x08, 3, 0, 0]))


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="data_dir"):
        sim.Experiment(task="fashion-mnist-mlp", task_options={"data_dir": 3})
    with pytest.raises(ValueError, match="hidden"):
        sim.Experiment(task="fashion-mnist-mlp", task_options={"hidden": []})


REAL = all((Path(DEFAULT_DIR) / (stem + ".gz")).is_file() or (Path(DEFAULT_DIR) / stem).is_file()
           for stem in FILES.values())


@pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST not installed in {DEFAULT_DIR} (make data installs it)")
def test_real_files_are_the_full_balanced_splits():
    task = sim.Simulation(sim.Experiment(task="fashion-mnist-cnn", workers=2)).task
    assert task.train_x.shape == (60000, 784) and task.test_x.shape == (10000, 784)
    assert torch.bincount(task.train_y).tolist() == [6000] * 10
    assert torch.bincount(task.test_y).tolist() == [1000] * 10
    assert abs(float(task.train_x.mean())) < 1e-3 and abs(float(task.train_x.std()) - 1) < 1e-3


@pytest.mark.skipif(not REAL, reason=f"Fashion-MNIST not installed in {DEFAULT_DIR} (make data installs it)")
def test_real_data_mlp_learns():
    e = sim.Experiment(task="fashion-mnist-mlp", workers=4, steps=40, batch_size=32, lr=0.05, eval_every=0)
    accuracy = sim.run(e).history["test_accuracy"].iloc[-1]
    assert accuracy > 0.65  # chance is 0.10; 40 steps of 128 images reach ~0.7-0.75
