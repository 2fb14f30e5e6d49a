"""The interface every replication metric follows."""

from __future__ import annotations

import torch


class ReplicationMetric:
    """Similarity between generated images and reference images, with a replication threshold.

    Subclasses set ``name`` and ``threshold`` and implement :meth:`embed` (images -> L2-normalised
    descriptors) or override :meth:`pairwise`.
    """

    name: str = "base"
    threshold: float = 0.5

    def pairwise(self, generated: torch.Tensor, references: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``N x M`` similarity of N generated images (``N x 3 x H x W`` in [0, 1]) to M references
        (an ``M x 3 x H x W`` tensor, or a list of ``3 x H_i x W_i`` tensors of any sizes)."""
        refs = [self.embed(r[None]) for r in references] if isinstance(references, list) else [self.embed(references)]
        return self.embed(generated) @ torch.cat(refs).T

    def score(self, generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Similarity of each of N generated images to one reference image (``3 x H x W``): shape N."""
        return self.pairwise(generated, reference[None])[:, 0]

    def threshold_for(self, reference: torch.Tensor, size: int = 32) -> float:
        """The threshold a score against ``reference`` must beat (a protocol may raise it per reference)."""
        return self.threshold

    def thresholds_for(self, references: list[torch.Tensor], size: int = 32) -> torch.Tensor:
        """Every reference's threshold (shape M), to check scores against all references at once."""
        return torch.tensor([self.threshold_for(r, size) for r in references])

    def replicated(self, scores: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """Scores against ``reference`` (or against references in general, when None) -> replicated."""
        thr = self.threshold if reference is None else self.threshold_for(reference)
        return scores > thr

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, threshold={self.threshold})"
