"""A buffered stream of uniform draws from a seeded numpy Generator.

Sampling a scene takes a few dozen scalar draws; each Generator call costs about a microsecond of
Python overhead, more than the draw itself. Drawing them in blocks keeps the result a pure function of
the seed while making scene sampling several times faster.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 48  # more than a typical scene needs, so one block usually suffices


class Uniforms:
    def __init__(self, seed_words: list[int]):
        self._rng = np.random.default_rng(seed_words)
        self._buffer: list[float] = []

    def random(self) -> float:
        """A uniform draw in [0, 1)."""
        if not self._buffer:
            self._buffer = self._rng.random(_BLOCK).tolist()
            self._buffer.reverse()  # pop() from the end yields them in drawn order
        return self._buffer.pop()

    def below(self, n: int) -> int:
        """A uniform integer in [0, n)."""
        return min(int(self.random() * n), n - 1)

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def seed(self) -> int:
        """A fresh 31-bit seed, for draws that need a numpy Generator of their own (textures, noise)."""
        return self.below(2**31)
