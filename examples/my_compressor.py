"""A compressor written from docs/writing_a_compressor.md: top-k by magnitude in every row.

Each worker keeps, in every row of a tensor's matrix view (shape[0] x prod(shape[1:])), the ``k`` entries of
largest magnitude, and sends their values and int32 column indices. Workers keep different coordinates, so
the messages are all-gathered (not all-reduced) and the update is the mean of the decoded rows.

Per row, dropping all but the k largest of m squares leaves at most (1 - k/m) of the row's squared norm
(Stich, Cordonnier, Jaggi 2018, Lemma A.1, applied row by row), so the operator is a deterministic
contraction with delta = min over tensors of k/m (``theory.operators.topk_delta``).

    import compressors, my_compressor          # (examples/ on sys.path) importing registers "row_topk"
    agg = compressors.make("row_topk", k=2)
    compressors.testing.check_compressor("row_topk", k=2)
"""
from __future__ import annotations

import torch

import compressors
from compressors import Aggregator, Reduced, TheoryClaim, dtype_bits, matrix_view_shape
from compressors.options import check_int
from theory import operators


class RowTopK(Aggregator):
    name = "row_topk"
    all_reducible = False  # each worker keeps its own coordinates: values and indices are all-gathered

    def __init__(self, k: int):
        self.k = k

    def init(self, shapes, workers, seed=0, *, dtype=torch.float32, device="cpu"):
        return ()  # nothing to remember between steps (error feedback, if any, is a wrapper with its own state)

    def reduce(self, grads, state, comm, want_local=False):
        update, local = {}, {}
        for name, g in grads.items():
            rows, cols = matrix_view_shape(tuple(g.shape[1:]))
            k = min(self.k, cols)
            x = g.reshape(g.shape[0], rows, cols)  # (w, n, m): this process's w workers
            indices = x.abs().topk(k, dim=2).indices  # (w, n, k)
            values = x.gather(2, indices)  # (w, n, k)
            all_values = comm.all_gather(values.reshape(g.shape[0], rows * k), tag=name)  # (W, n*k)
            all_indices = comm.all_gather(indices.to(torch.int32).reshape(g.shape[0], rows * k), tag=name)  # (W, n*k)
            decoded = self.decode(all_values, all_indices, rows, cols, k)  # (W, n, m)
            update[name] = decoded.mean(0).reshape(g.shape[1:])  # (*shape)
            if want_local:
                local[name] = self.decode(values, indices, rows, cols, k).reshape(g.shape)  # (w, *shape)
        return Reduced(update, local if want_local else None), state

    @staticmethod
    def decode(values, indices, rows: int, cols: int, k: int) -> torch.Tensor:
        """(R, n*k) values and indices -> (R, n, m) rows with zeros everywhere else."""
        out = torch.zeros((values.shape[0], rows, cols), dtype=values.dtype, device=values.device)
        return out.scatter_(2, indices.reshape(-1, rows, k).long(), values.reshape(-1, rows, k))

    def bits_per_step(self, shapes, *, dtype=torch.float32):
        """n * min(k, m) values of ``dtype`` and as many int32 indices per tensor."""
        bits = 0
        for shape in shapes.values():
            rows, cols = matrix_view_shape(tuple(shape))
            bits += rows * min(self.k, cols) * (dtype_bits(dtype) + 32)
        return bits

    def theory(self, shapes):
        delta = operators.combine_delta(operators.topk_delta(matrix_view_shape(tuple(s))[1], self.k)
                                        for s in shapes.values())
        if delta == 1.0:
            return TheoryClaim("exact", omega=0.0, delta=1.0)
        return TheoryClaim("contractive", delta=delta, deterministic=True)

    def __repr__(self):
        return f"RowTopK(k={self.k})"


@compressors.register("row_topk")
def make_row_topk(*, k: int = 1, error_feedback: str = "local") -> Aggregator:
    """Row top-k with error feedback (as top-k was proposed); tensors it would not shrink go dense."""
    check_int("row_topk", "k", k, minimum=1)
    return compressors.compose(RowTopK(k), error_feedback=error_feedback, min_compression_rate=1.0)
