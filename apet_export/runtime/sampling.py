"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling, seeded."""

from __future__ import annotations

import math

import numpy as np

from apet_export.errors import InvalidInputError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if not (math.isfinite(temperature) and temperature >= 0):  # nan compares false with everything
            raise InvalidInputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidInputError(f"seed must be an integer >= 0, got {seed!r}")
        self.temperature, self.top_p = temperature, top_p
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits [V] -> token id."""
        if self.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, self.top_p) + 1)]  # smallest set with mass >= top_p
        return int(self.rng.choice(keep, p=probs[keep] / probs[keep].sum()))
