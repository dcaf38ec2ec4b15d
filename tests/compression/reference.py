"""A straightforward ApET reference: one batch element at a time, Python loops, torch.linalg.solve.

Written from docs/design.md independently of apet_export.compression, so the tests compare two
implementations rather than one with itself.
"""

from __future__ import annotations

import torch


def fps_reference(x: torch.Tensor, num_basis: int, start: int) -> list[int]:
    """x [N, D]: farthest point sampling with squared distances, first index on ties."""
    chosen = [start]
    for _ in range(num_basis - 1):
        best, best_dist = None, -1.0
        for n in range(x.shape[0]):
            d = min(float(((x[n] - x[c]) ** 2).sum()) for c in chosen)
            if d > best_dist:
                best, best_dist = n, d
        chosen.append(best)
    return chosen


def error_by_solve(x: torch.Tensor, basis: torch.Tensor, ridge: float, dtype=torch.float64) -> torch.Tensor:
    """x [N, D], basis S [M, D] -> ||x - C S|| with C = solve(S S^T + ridge I, S x^T)^T (the released code)."""
    x, s = x.to(dtype), basis.to(dtype)
    gram = s @ s.T + ridge * torch.eye(s.shape[0], dtype=dtype)
    coeff = torch.linalg.solve(gram, s @ x.T).T  # [N, M]
    return (x - coeff @ s).norm(dim=-1)


def apet_reference(x: torch.Tensor, keep: int, basis_index: list[int], scores: torch.Tensor):
    """x [N, D] (one element), basis given, scores given -> (tokens [T, D], index [T]).

    Follows docs/design.md steps 3-5 with loops: rank, basis features into the M lowest-error kept slots
    (the released code's `features[mask] = seeds`: masked positions filled in ascending order with the
    seeds in the order they were selected), cosine merge of dropped tokens into the high-error kept tokens.
    """
    num_tokens, num_basis = x.shape[0], len(basis_index)
    ranked = sorted(range(num_tokens), key=lambda n: (-float(scores[n]), n))
    high, slots, dropped = ranked[: keep - num_basis], sorted(ranked[keep - num_basis : keep]), ranked[keep:]

    groups: dict[int, list[int]] = {r: [] for r in high}
    for j in dropped:
        sims = [float(torch.nn.functional.cosine_similarity(x[j], x[r], dim=0)) for r in high]
        groups[high[max(range(len(high)), key=lambda i: (sims[i], -i))]].append(j)

    out = {}
    for r in high:
        out[r] = (x[r] + sum((x[j] for j in groups[r]), torch.zeros_like(x[r]))) / (1 + len(groups[r]))
    for slot, b in zip(slots, basis_index, strict=True):
        out[slot] = x[b]
    index = sorted(out)
    return torch.stack([out[i] for i in index]), torch.tensor(index)
