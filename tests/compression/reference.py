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


def merge_groups(x: torch.Tensor, targets: list[int], sources: list[int]) -> dict[int, torch.Tensor]:
    """Each source token averaged into its most similar target (cosine to the unmerged targets, first on ties):
    target r -> (x_r + sum of its sources) / (1 + count)."""
    groups: dict[int, list[int]] = {r: [] for r in targets}
    for j in sources:
        sims = [float(torch.nn.functional.cosine_similarity(x[j], x[r], dim=0)) for r in targets]
        groups[targets[max(range(len(targets)), key=lambda i: (sims[i], -i))]].append(j)
    return {
        r: (x[r] + sum((x[j] for j in groups[r]), torch.zeros_like(x[r]))) / (1 + len(groups[r])) for r in targets
    }


def apet_reference(x: torch.Tensor, keep: int, basis_index: list[int], scores: torch.Tensor, rule: str = "position_slots"):
    """x [N, D] (one element), basis given, scores given -> (tokens [T, D], index [T]).

    Follows docs/design.md steps 3-5 with loops: rank, basis features into the M lowest-error kept slots, cosine
    merge of dropped tokens into the high-error kept tokens, rows in ascending position. The slot rule, as
    each released code path writes it:
      position_slots: `features[mask] = seeds` (vision stage): masked positions filled in ascending order
                      with the seeds in the order they were selected;
      topk_slots:     `image_embeds[errors_indices[-k:]] = seed_features` (LLM stage): the top-k list's last
                      M entries, in that list's (descending error) order, get the seeds in selection order;
      blend_slots:    `image_embeds[index_mask] = 0.5 * seed + 0.5 * image_embeds[index_mask]` (Qwen2.5-VL).
    """
    num_tokens, num_basis = x.shape[0], len(basis_index)
    ranked = sorted(range(num_tokens), key=lambda n: (-float(scores[n]), n))
    topk = ranked[:keep]  # errors_indices: the kept tokens, largest error first
    high, dropped = topk[: keep - num_basis], ranked[keep:]
    out = merge_groups(x, high, dropped)
    seeds = x[basis_index]  # [M, D] in selection order
    if rule == "topk_slots":
        for slot, seed in zip(topk[-num_basis:], seeds, strict=True):
            out[slot] = seed
    else:
        mask = torch.zeros(num_tokens, dtype=torch.bool)
        mask[topk[-num_basis:]] = True
        features = x.clone()
        features[mask] = seeds if rule == "position_slots" else 0.5 * seeds + 0.5 * features[mask]
        for slot in topk[-num_basis:]:
            out[slot] = features[slot]
    index = sorted(out)
    return torch.stack([out[i] for i in index]), torch.tensor(index)


def video_frame_reference(x: torch.Tensor, keep: int, basis_index: list[int], scores: torch.Tensor):
    """One frame's patch rows x [N, H] (after the projector) -> (rows [T, H], index [T]) as encode_videos
    builds them: the T-M highest-error tokens in top-k order, each merged with all N-(T-M) other tokens
    (the next M by error included), then the M basis features appended in selection order."""
    num_basis = len(basis_index)
    ranked = sorted(range(x.shape[0]), key=lambda n: (-float(scores[n]), n))
    high, others = ranked[: keep - num_basis], ranked[keep - num_basis :]
    merged = merge_groups(x, high, others)
    rows = [merged[r] for r in high] + [x[b] for b in basis_index]
    return torch.stack(rows), torch.tensor(high + list(basis_index))
