"""``charlm-lstm``: a byte-level LSTM language model on text every machine has (no download).

Corpus: the Python standard library's own top-level ``*.py`` files (``os.path.dirname(os.__file__)``), read in
sorted file-name order and concatenated until ``corpus_bytes`` bytes; ``corpus_dir`` points it at any other
folder of text files. The corpus depends on the Python version (3.11's stdlib differs from 3.12's), so results
are comparable within one interpreter version; the run record stores it.

Tokens are bytes (vocabulary 256, independent of the corpus). The byte stream is split into a training part
and the last ``test_fraction`` as held-out text, each cut into non-overlapping windows of ``seq_len + 1``
bytes: x = window[:-1], y = window[1:]. Every window is an independent sequence (the hidden state starts at
zero; no state is carried between batches, unlike truncated BPTT over a stream).

Model: byte embedding -> ``sim.models.lstm.UnrolledLSTM`` (nn.LSTM's parameters and function, unrolled so the
vmap engine batches it; LSTM init U(-1/sqrt h, 1/sqrt h)) -> linear decoder to 256 logits.

Reported as perplexity: exp(mean per-byte cross-entropy) on the held-out text (``sim.workflow.store`` adds the
``test_perplexity`` column to the history of every task whose loader has ``reports_perplexity = True``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from compressors.options import check_float, check_int, invalid
from ..models.lstm import UnrolledLSTM
from .base import Task

VOCAB = 256  # bytes


class CharLSTM(nn.Module):
    def __init__(self, embedding: int = 32, hidden: int = 128, layers: int = 1):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, embedding)
        self.lstm = UnrolledLSTM(embedding, hidden, num_layers=layers)  # vmap-friendly (no nn.LSTM)
        self.decoder = nn.Linear(hidden, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, T) int64 -> (B, T, 256) logits
        x, _ = self.lstm(self.embedding(tokens))  # (B, T, h)
        return self.decoder(x)


def sequence_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per token: outputs (B, T, V), targets (B, T)."""
    return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def windows(stream: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 tokens -> inputs (N, seq_len) and next-token targets (N, seq_len)."""
    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].reshape(n, seq_len)
    y = stream[1: n * seq_len + 1].reshape(n, seq_len)
    return x, y


def stdlib_dir() -> Path:
    return Path(os.path.dirname(os.__file__))


def read_corpus(folder: Path, budget: int, pattern: str = "*.py") -> bytes:
    """The first ``budget`` bytes of the files matching ``pattern`` directly in ``folder``, in sorted name order."""
    chunks, total = [], 0
    for path in sorted(folder.glob(pattern)):
        if total >= budget:
            break
        if not path.is_file():
            continue
        data = path.read_bytes()[: budget - total]
        chunks.append(data)
        total += len(data)
    if total == 0:
        raise ValueError(f"Experiment.task_options: corpus_dir={str(folder)!r} is invalid; allowed: a folder with "
                         f"{pattern} files (none found)")
    return b"".join(chunks)


def validate_charlm_options(options: dict) -> None:
    owner = "Experiment.task_options"
    if "corpus_bytes" in options:
        check_int(owner, "corpus_bytes", options["corpus_bytes"], minimum=1024)
    for key, low in (("seq_len", 2), ("embedding", 1), ("hidden", 1), ("layers", 1)):
        if key in options:
            check_int(owner, key, options[key], minimum=low)
    if "test_fraction" in options:
        check_float(owner, "test_fraction", options["test_fraction"], minimum=0.0, maximum=0.5, min_inclusive=False)
    corpus_dir = options.get("corpus_dir")
    if corpus_dir is not None and (not isinstance(corpus_dir, str) or not Path(corpus_dir).is_dir()):
        raise invalid(owner, "corpus_dir", corpus_dir, "an existing folder of text files, or None for the "
                                                       "Python standard library's source")
    if "pattern" in options and not isinstance(options["pattern"], str):
        raise invalid(owner, "pattern", options["pattern"], "a glob string such as '*.py'")


def charlm_task(*, dtype: torch.dtype, corpus_bytes: int = 1 << 20, seq_len: int = 64, test_fraction: float = 0.1,
                embedding: int = 32, hidden: int = 128, layers: int = 1, corpus_dir: str | None = None,
                pattern: str = "*.py") -> Task:
    """``dtype`` applies to the model only: tokens are int64."""
    folder = Path(corpus_dir) if corpus_dir is not None else stdlib_dir()
    stream = torch.frombuffer(bytearray(read_corpus(folder, corpus_bytes, pattern)), dtype=torch.uint8).long()
    split = len(stream) - max(seq_len + 1, int(len(stream) * test_fraction))
    train_x, train_y = windows(stream[:split], seq_len)
    test_x, test_y = windows(stream[split:], seq_len)
    if len(train_x) == 0 or len(test_x) == 0:
        raise invalid("Experiment.task_options", "corpus_bytes", corpus_bytes,
                      f"enough bytes for at least one training and one test window of seq_len + 1 = {seq_len + 1}")
    return Task("charlm-lstm", train_x, train_y, test_x, test_y, lambda: CharLSTM(embedding, hidden, layers),
                sequence_cross_entropy, classification=False)


#: Tasks whose history gets ``test_perplexity = exp(test_loss)`` (per-token cross-entropy in nats).
charlm_task.reports_perplexity = True  # type: ignore[attr-defined]
