"""Basis selection: which M tokens (or cluster means) every token is approximated from.

Each function takes fp32 tokens x [B, N, D] and returns (basis_index [B, M] int64 in selection order,
basis [B, M, D]). `fps` and `random` return real tokens (basis = x[basis_index]); `dpc` returns
cluster means and the indices of the cluster peaks.
"""

from __future__ import annotations

import math

import torch

from apet_export.compression.tensor_ops import gather_tokens, one_hot_rows, sort_descending_stable


def fps_start_index(x: torch.Tensor, fps_start: str | int) -> torch.Tensor:
    """The first FPS token per batch element, [B] int64: the largest-norm token, or a fixed index."""
    if fps_start == "norm":
        return x.pow(2).sum(-1).argmax(dim=-1)
    return torch.full(x.shape[:1], int(fps_start), dtype=torch.long, device=x.device)


def farthest_point_sampling(x: torch.Tensor, num_basis: int, start: torch.Tensor) -> torch.Tensor:
    """Farthest point sampling with squared Euclidean distance on raw features.

    x [B, N, D] fp32, start [B] int64 -> basis_index [B, M]. Each step takes the token whose running
    minimum distance to the chosen set is largest (first index on ties, like ONNX ArgMax). Distances
    are |x|^2 - 2 x.p + |p|^2: one mat-vec per step instead of three passes over [B, N, D]. The loop is
    unrolled at trace time (M is static), so it exports as M small blocks.
    """
    sq_norm = x.pow(2).sum(-1)  # [B, N]

    def sq_distance_to(index: torch.Tensor) -> torch.Tensor:  # index [B] -> [B, N]
        point = gather_tokens(x, index[:, None])  # [B, 1, D]
        return sq_norm - 2 * (x @ point.transpose(1, 2)).squeeze(-1) + torch.gather(sq_norm, 1, index[:, None])

    chosen = [start]
    nearest = sq_distance_to(start)  # [B, N] running minimum
    for _ in range(num_basis - 1):
        nxt = nearest.argmax(dim=-1)  # [B]
        chosen.append(nxt)
        nearest = torch.minimum(nearest, sq_distance_to(nxt))
    return torch.stack(chosen, dim=1)


def density_peak_clustering(x: torch.Tensor, num_basis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN: density from the k = M nearest neighbours, delta = distance to the nearest denser token.

    The M tokens of largest delta * density are the peaks (selection order: score, descending); every
    token joins its nearest peak and the basis is the mean of each cluster.
    """
    num_tokens, dim = x.shape[1:]
    dist = torch.cdist(x, x) / math.sqrt(dim)  # [B, N, N]
    k = min(num_basis, num_tokens - 1)
    # k + 1 smallest distances include the token itself (distance 0), which adds nothing to the sum.
    knn = dist.topk(k + 1, dim=-1, largest=False).values
    density = torch.exp(-knn.pow(2).sum(-1) / max(k, 1))  # [B, N]

    # j is denser than i if density_j > density_i, ties broken towards the lower index.
    idx = torch.arange(num_tokens, device=x.device)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])
    )  # [B, N(i), N(j)]
    far = dist.flatten(1).max(dim=-1).values[:, None, None]
    delta = torch.where(denser, dist, far).min(dim=-1).values  # densest token: the largest distance
    peaks = sort_descending_stable(delta * density)[:, :num_basis]  # [B, M]

    assign = torch.gather(dist, 2, peaks[:, None, :].expand(-1, num_tokens, -1)).argmin(dim=-1)  # [B, N]
    membership = one_hot_rows(assign, num_basis, x.dtype)  # [B, N, M]
    sums = membership.transpose(1, 2) @ x  # [B, M, D]
    counts = membership.sum(dim=1)  # [B, M]
    # A peak identical to an earlier one can end with an empty cluster: it keeps its own features.
    means = torch.where(counts[..., None] > 0, sums / counts.clamp(min=1)[..., None], gather_tokens(x, peaks))
    return peaks, means


def random_selection(x: torch.Tensor, num_basis: int, seed: int) -> torch.Tensor:
    """M distinct random tokens per batch element from a seeded generator: [B, M]."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = [torch.randperm(x.shape[1], generator=generator)[:num_basis] for _ in range(x.shape[0])]
    return torch.stack(rows).to(x.device)


def select_basis(x: torch.Tensor, num_basis: int, selection: str, fps_start: str | int, seed: int):
    """Dispatch on `selection`; returns (basis_index [B, M], basis [B, M, D])."""
    if selection == "dpc":
        return density_peak_clustering(x, num_basis)
    if selection == "random":
        index = random_selection(x, num_basis, seed)
    else:
        index = farthest_point_sampling(x, num_basis, fps_start_index(x, fps_start))
    return index, gather_tokens(x, index)
