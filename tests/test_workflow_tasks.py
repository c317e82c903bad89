"""The workflow's tasks: charlm-lstm on real text, and the CIFAR-10 / WikiText-2 loaders on files generated in
the real formats (pickled batch dicts; tokenised text files)."""
from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sim
from sim.tasks import load_task
from sim.models.lstm import UnrolledLSTM
from sim.tasks.charlm import read_corpus, stdlib_dir, windows
from sim.tasks.cifar10 import MEAN, STD

TINY_CHARLM = {"corpus_bytes": 20_000, "seq_len": 12, "embedding": 8, "hidden": 16}


# -- charlm -------------------------------------------------------------------------------------------------
def test_unrolled_lstm_matches_torch_lstm():
    """The vmap-friendly LSTM equals nn.LSTM (the slow obvious reference) with the same weights: outputs, final
    states, with and without an initial state; the state dicts are interchangeable (same names and shapes)."""
    g = torch.Generator().manual_seed(0)
    ours, ref = UnrolledLSTM(5, 7, num_layers=2).double(), nn.LSTM(5, 7, num_layers=2, batch_first=True).double()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)  # (B, T, in)
    state = tuple(torch.randn(2, 3, 7, generator=g, dtype=torch.float64) for _ in range(2))  # (L, B, h) each
    for hx in (None, state):
        out, (h, c) = ours(x, hx)
        ref_out, (ref_h, ref_c) = ref(x, hx)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, ref_h, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, ref_c, rtol=1e-12, atol=1e-12)


def test_charlm_lstm_gets_the_lstm_init():
    """U(-1/sqrt h, 1/sqrt h) for every LSTM parameter (not nn.Linear's 1/sqrt(fan_in): 1/sqrt(8) > 1/sqrt(16)
    for the first layer's input weights here), and all of that range is used."""
    task = load_task("charlm-lstm", dict(TINY_CHARLM, layers=2), torch.float32)
    model = sim.models.build(task.model, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(TINY_CHARLM["hidden"])
    lstm = dict(model.lstm.named_parameters())
    assert len(lstm) == 8 and lstm["weight_ih_l0"].shape == (64, 8)
    for name, p in lstm.items():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, name


def test_charlm_corpus_is_the_stdlib_in_sorted_order():
    first = sorted(stdlib_dir().glob("*.py"))[0].read_bytes()
    corpus = read_corpus(stdlib_dir(), 5000)
    assert len(corpus) == 5000 and corpus.startswith(first[:5000])
    task = load_task("charlm-lstm", dict(TINY_CHARLM), torch.float32)
    # next-byte targets: y is x shifted by one, across the window boundary too
    assert torch.equal(task.train_x[:, 1:], task.train_y[:, :-1])
    assert torch.equal(task.train_y[0, -1], task.train_x[1, 0])
    stream = torch.tensor(list(corpus[:25]))
    x, y = windows(stream, 12)
    assert x.shape == (2, 12) and torch.equal(y.flatten(), stream[1:25])
    assert task.train_x.dtype == torch.long and int(task.train_x.max()) < 256
    n_train, n_test = task.train_x.numel(), task.test_x.numel()
    assert 0.05 < n_test / (n_train + n_test) < 0.15  # test_fraction=0.1 of the bytes, held out at the end


def test_charlm_trains_and_reports_perplexity(tmp_path):
    e = sim.Experiment(task="charlm-lstm", workers=2, steps=4, batch_size=8, lr=1.0, momentum=0.0, eval_every=2,
                       task_options=TINY_CHARLM, compressor={"name": "powersgd", "rank": 1})
    result = sim.run(e)
    h = result.history
    assert h["train_loss"].iloc[0] == pytest.approx(math.log(256), rel=0.1)  # near uniform at the start
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]
    store = sim.workflow.store.ResultsStore(tmp_path)
    store.write(e, result)
    table = sim.load_results(tmp_path)
    evaluated = table.dropna(subset=["test_loss"])
    assert len(evaluated) == 2
    np.testing.assert_allclose(evaluated["test_perplexity"], np.exp(evaluated["test_loss"]), rtol=1e-12)
    assert 1 < evaluated["test_perplexity"].iloc[-1] < 256


def test_charlm_vmap_engine_matches_loop_engine():
    e = sim.Experiment(task="charlm-lstm", workers=2, steps=2, batch_size=4, eval_every=0, dtype="float64",
                       task_options=TINY_CHARLM, compressor={"name": "powersgd", "rank": 1})
    fast, slow = sim.run(e.replace(engine="vmap")), sim.run(e.replace(engine="loop"))  # "auto" picks the loop
    for name in fast.params:
        torch.testing.assert_close(fast.params[name], slow.params[name], rtol=1e-10, atol=1e-12)


def test_charlm_bad_options_name_the_field(tmp_path):
    for options, field in [({"seq_len": 1}, "seq_len"), ({"corpus_dir": str(tmp_path / "nope")}, "corpus_dir"),
                           ({"test_fraction": 0.9}, "test_fraction"), ({"hidden": 0}, "hidden")]:
        with pytest.raises(ValueError, match=field):
            sim.Experiment(task="charlm-lstm", task_options=options)
    (tmp_path / "a.txt").write_text("hello world " * 200)
    task = load_task("charlm-lstm", {"corpus_dir": str(tmp_path), "pattern": "*.txt", "seq_len": 8}, torch.float32)
    assert bytes(task.train_x[0].tolist()) == b"hello wo"
    with pytest.raises(ValueError, match="corpus_dir"):
        load_task("charlm-lstm", {"corpus_dir": str(tmp_path)}, torch.float32)  # no *.py files there


# -- CIFAR-10 -----------------------------------------------------------------------------------------------
def write_cifar(root: Path, per_batch: int = 3, skip: str | None = None) -> dict[str, dict]:
    """The real format: pickled dicts with b'data' uint8 (N, 3072) and b'labels' (plus the other real keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        batches[name] = batch
        if name != skip:
            with open(folder / name, "wb") as f:
                pickle.dump(batch, f, protocol=2)
    return batches


def test_cifar_loader_reads_the_pickle_layout(tmp_path):
    batches = write_cifar(tmp_path)
    task = load_task("cifar10-resnet18", {"data_dir": str(tmp_path)}, torch.float32)
    assert task.train_x.shape == (15, 3, 32, 32) and task.test_x.shape == (3, 3, 32, 32)
    labels = sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    assert task.train_y.tolist() == labels and task.labels.tolist() == labels
    assert task.test_y.tolist() == batches["test_batch"][b"labels"]
    # row layout: 1024 red, then green, then blue values, each a row-major 32x32 image
    raw = batches["data_batch_2"][b"data"][1]
    for c, h, w in [(0, 0, 0), (1, 2, 3), (2, 31, 30)]:
        expected = (raw[c * 1024 + h * 32 + w] / 255.0 - MEAN[c]) / STD[c]
        assert float(task.train_x[3 + 1, c, h, w]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    subset = load_task("cifar10-resnet18", {"data_dir": str(tmp_path / "cifar-10-batches-py"), "train_samples": 4,
                                            "test_samples": 2}, torch.float32)
    assert len(subset.train_x) == 4 and len(subset.test_x) == 2
    torch.testing.assert_close(subset.train_x, task.train_x[:4])
    assert tuple(sim.models.build(task.model, torch.Generator().manual_seed(0))(task.test_x[:1]).shape) == (1, 10)


def test_cifar_missing_files_error_names_them(tmp_path):
    write_cifar(tmp_path, skip="data_batch_3")
    with pytest.raises(ValueError, match="missing in .*data_batch_3") as info:
        sim.Experiment(task="cifar10-resnet18", task_options={"data_dir": str(tmp_path)})
    assert "test_batch" in str(info.value) and "cifar-10-batches-py" in str(info.value)
    with pytest.raises(ValueError, match="data_dir=None"):
        sim.Experiment(task="cifar10-resnet18")


@pytest.mark.slow
def test_cifar_resnet18_trains_one_step(tmp_path):
    write_cifar(tmp_path, per_batch=2)
    result = sim.run(sim.Experiment(task="cifar10-resnet18", workers=2, steps=1, batch_size=2, lr=0.01,
                                    task_options={"data_dir": str(tmp_path)}, compressor={"name": "powersgd", "rank": 1}))
    assert math.isfinite(result.final("train_loss")) and result.final("bits") > 0


# -- WikiText-2 ---------------------------------------------------------------------------------------------
TRAIN = " = Valkyria = \n\n the game began in 2010 . \n the game <unk> well . \n"
VALID = " the game began . \n"
TEST = " the new game began in 2011 . \n"


def write_wikitext(root: Path, skip: str | None = None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (("wiki.train.tokens", TRAIN), ("wiki.valid.tokens", VALID), ("wiki.test.tokens", TEST)):
        if name != skip:
            (root / name).write_text(text, encoding="utf-8")


def test_wikitext2_loader_builds_the_vocabulary_and_windows(tmp_path):
    write_wikitext(tmp_path / "wikitext-2")
    task = load_task("wikitext2-lstm", {"data_dir": str(tmp_path), "seq_len": 3, "hidden": 4, "layers": 1},
                     torch.float32)
    words = TRAIN.replace("\n", " <eos> ").split()
    vocab = {}
    for w in ["<eos>", "<unk>"] + words:
        vocab.setdefault(w, len(vocab))
    stream = torch.tensor([vocab[w] for w in words])
    x, y = windows(stream, 3)
    assert torch.equal(task.train_x, x) and torch.equal(task.train_y, y)
    test_words = TEST.replace("\n", " <eos> ").split()  # "new" and "2011" are not in training: <unk>
    test_ids = [vocab.get(w, vocab["<unk>"]) for w in test_words]
    assert task.test_x.flatten().tolist() == test_ids[:6] and task.test_y.flatten().tolist() == test_ids[1:7]
    assert test_ids[:3] == [vocab["the"], vocab["<unk>"], vocab["game"]]
    model = sim.models.build(task.model, torch.Generator().manual_seed(0))
    assert model.embedding.num_embeddings == len(vocab)
    valid = load_task("wikitext2-lstm", {"data_dir": str(tmp_path), "seq_len": 2, "eval_split": "valid",
                                         "max_train_tokens": 7}, torch.float32)
    assert valid.test_x[0].tolist() == [vocab["the"], vocab["game"]] and valid.train_x.numel() == 6


def test_wikitext2_lstm_runs_and_reports_perplexity(tmp_path):
    write_wikitext(tmp_path)
    e = sim.Experiment(task="wikitext2-lstm", workers=2, steps=2, batch_size=2, lr=0.5, momentum=0.0, eval_every=1,
                       task_options={"data_dir": str(tmp_path), "seq_len": 3, "hidden": 6, "layers": 1},
                       compressor={"name": "powersgd", "rank": 1})
    result = sim.run(e)
    vocab = len(set(TRAIN.split()) | {"<eos>", "<unk>"})
    # an uninitialised parameter (to_empty garbage in the decoder bias) once gave a loss of 1e29 here
    assert result.history["train_loss"].iloc[0] == pytest.approx(math.log(vocab), rel=0.5)
    table = sim.workflow.store.history_table(result.history, e)
    np.testing.assert_allclose(table["test_perplexity"], np.exp(table["test_loss"]), rtol=1e-12)


def test_wikitext2_missing_files_error_names_them(tmp_path):
    write_wikitext(tmp_path, skip="wiki.valid.tokens")
    with pytest.raises(ValueError, match="missing in .*wiki.valid.tokens") as info:
        sim.Experiment(task="wikitext2-lstm", task_options={"data_dir": str(tmp_path)})
    assert "wiki.train.tokens" in str(info.value)
    write_wikitext(tmp_path)
    with pytest.raises(ValueError, match="eval_split"):
        sim.Experiment(task="wikitext2-lstm", task_options={"data_dir": str(tmp_path), "eval_split": "train"})


def test_wikitext2_vmap_engine_matches_loop_engine_in_float64(tmp_path):
    """The LSTM is unrolled (no nn.LSTM), so vmap batches it natively: no fallback warning, and float64 works
    (with nn.LSTM it failed in float64 and warned about aten::mkldnn_rnn_layer in float32)."""
    write_wikitext(tmp_path)
    e = sim.Experiment(task="wikitext2-lstm", workers=2, steps=2, batch_size=2, eval_every=0, dtype="float64",
                       task_options={"data_dir": str(tmp_path), "seq_len": 3, "hidden": 5, "layers": 2},
                       compressor={"name": "powersgd", "rank": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = sim.run(e.replace(engine="vmap"))  # "auto" picks the loop for this embedding LSTM
    assert not [w for w in caught if "batching rule" in str(w.message)], [str(w.message) for w in caught]
    slow = sim.run(e.replace(engine="loop"))
    assert fast.params.keys() == slow.params.keys() and any("lstm.weight_hh_l1" in n for n in fast.params)
    for name in fast.params:
        assert fast.params[name].dtype == torch.float64
        torch.testing.assert_close(fast.params[name], slow.params[name], rtol=1e-10, atol=1e-12)


class _RunsCommand:
    """A pickle payload that would run a shell command when unpickled by plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batch_naming_code_is_refused_without_running_it(tmp_path):
    from sim.tasks.cifar10 import read_batch

    marker = tmp_path / "ran"
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": _RunsCommand(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="refused global"):
        read_batch(path)
    assert not marker.exists()
    path.write_bytes(b"\x80\x02}q\x00")  # a truncated pickle
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        read_batch(path)
