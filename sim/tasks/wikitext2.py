"""``wikitext2-lstm``: word-level WikiText-2 with the paper's 3-layer LSTM (``sim.models.lstm_wikitext2``).

Expected files (the tokenised "wikitext-2" release, Merity et al. 2016): ``<data_dir>/wiki.train.tokens``,
``wiki.valid.tokens``, ``wiki.test.tokens`` (or the same under ``<data_dir>/wikitext-2/``). Text is already
tokenised, space separated, with ``<unk>`` for rare words.

Processing as PyTorch's word_language_model example: each line's tokens followed by ``<eos>``; the vocabulary
is the training tokens in order of first appearance (33,278 words for the full WikiText-2, so the model is
larger than the paper's 28,869-word count); a valid/test word missing from it maps to ``<unk>``. The token
stream is cut into non-overlapping windows of ``seq_len + 1``: x = window[:-1], y = window[1:], each an
independent sequence (no hidden state carried between batches). Reported as perplexity = exp(test loss).

The model's LSTM is ``sim.models.lstm.UnrolledLSTM`` (nn.LSTM's parameters, unrolled from matmuls), so the
vmap engine batches it natively in float32 and float64 (``nn.LSTM`` has no vmap batching rule in torch 2.13).
"""
from __future__ import annotations

from pathlib import Path

import torch

from compressors.options import check_choice, check_int, invalid
from ..models import lstm_wikitext2
from .base import Task
from .charlm import sequence_cross_entropy, windows

FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
EOS, UNK = "<eos>", "<unk>"


def tokens_folder(data_dir: str | None) -> Path:
    expected = ", ".join(FILES.values())
    if not isinstance(data_dir, str):
        raise invalid("Experiment.task_options", "data_dir", data_dir, f"a folder containing {expected}")
    root = Path(data_dir).expanduser()
    for folder in (root, root / "wikitext-2"):
        if all((folder / name).is_file() for name in FILES.values()):
            return folder
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    raise ValueError(f"Experiment.task_options: data_dir={data_dir!r} is invalid; allowed: a folder containing "
                     f"{expected}; missing in {root}: {', '.join(missing)}")


def read_tokens(path: Path) -> list[str]:
    words: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words.extend(line.split() + [EOS])
    return words


def build_vocab(words: list[str]) -> dict[str, int]:
    """Word -> id in order of first appearance; ``<eos>`` and ``<unk>`` always present."""
    vocab: dict[str, int] = {}
    for word in [EOS, UNK] + words:
        vocab.setdefault(word, len(vocab))
    return vocab


def encode(words: list[str], vocab: dict[str, int]) -> torch.Tensor:
    unk = vocab[UNK]
    return torch.tensor([vocab.get(w, unk) for w in words], dtype=torch.long)


def validate_wikitext2_options(options: dict) -> None:
    owner = "Experiment.task_options"
    tokens_folder(options.get("data_dir"))
    for key, low in (("seq_len", 2), ("hidden", 1), ("layers", 1)):
        if key in options:
            check_int(owner, key, options[key], minimum=low)
    if options.get("max_train_tokens") is not None:
        check_int(owner, "max_train_tokens", options["max_train_tokens"], minimum=2)
    if "eval_split" in options:
        check_choice(owner, "eval_split", options["eval_split"], ("valid", "test"))


def wikitext2_task(*, dtype: torch.dtype, data_dir: str | None = None, seq_len: int = 35, hidden: int = 650,
                   layers: int = 3, max_train_tokens: int | None = None, eval_split: str = "test") -> Task:
    """``max_train_tokens`` keeps the first N training tokens (the vocabulary still comes from all of them)."""
    folder = tokens_folder(data_dir)
    train_words = read_tokens(folder / FILES["train"])
    vocab = build_vocab(train_words)
    train = encode(train_words, vocab)[:max_train_tokens]
    held_out = encode(read_tokens(folder / FILES[eval_split]), vocab)
    train_x, train_y = windows(train, seq_len)
    test_x, test_y = windows(held_out, seq_len)
    if len(train_x) == 0 or len(test_x) == 0:
        raise invalid("Experiment.task_options", "seq_len", seq_len,
                      "short enough for one window of seq_len + 1 tokens in both the training and held-out files")
    size = len(vocab)
    task = Task("wikitext2-lstm", train_x, train_y, test_x, test_y,
                lambda: lstm_wikitext2(vocab_size=size, hidden=hidden, layers=layers), sequence_cross_entropy,
                classification=False)
    return task


wikitext2_task.reports_perplexity = True  # type: ignore[attr-defined]
