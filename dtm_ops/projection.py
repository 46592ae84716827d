"""Optional linear projection (PCA) of per-position features, fitted on sample frames."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Projection:
    """``y = normalize((x - mean) @ components)``.

    Attributes:
        mean (Tensor[C]): mean of the (already L2-normalised) sample positions.
        components (Tensor[C, D]): the top-``D`` principal directions.
    """

    mean: torch.Tensor
    components: torch.Tensor

    @property
    def out_channels(self) -> int:
        return int(self.components.shape[1])

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.mean, self.components):
            h.update(t.to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def fit(cls, positions: torch.Tensor, dim: int) -> "Projection":
        """Fit on ``positions (Tensor[P, C])`` (rows: feature vectors), keep ``dim`` axes."""
        if positions.ndim != 2:
            raise ValueError(f"positions must be Tensor[P, C], got shape {tuple(positions.shape)}")
        p, c = positions.shape
        if not 0 < dim <= c:
            raise ValueError(f"projection dim must be in 1..{c}, got {dim}")
        if p < dim:
            raise ValueError(f"need at least {dim} sample positions to fit a {dim}-d projection, got {p}")
        x = positions.to(torch.float64)
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / max(p - 1, 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        comps = evecs[:, torch.argsort(evals, descending=True)[:dim]]
        # Fix each axis's sign so the fit is deterministic.
        signs = torch.sign(comps[comps.abs().argmax(0), torch.arange(dim)])
        comps = comps * signs
        return cls(mean=mean.to(torch.float32), components=comps.to(torch.float32).contiguous())

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """``features (Tensor[N, C, H, W])`` -> ``Tensor[N, D, H, W]``, L2-normalised per position."""
        x = features.movedim(1, -1).to(self.components.dtype)
        y = (x - self.mean.to(x.device)) @ self.components.to(x.device)
        y = torch.nn.functional.normalize(y, dim=-1)
        return y.movedim(-1, 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components}
