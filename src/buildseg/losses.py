"""The loss family of the notes, exact and composable.

Every loss takes logits (B,1,H,W) or (B,H,W) and a target of the same spatial size
(float or integer 0/1), checks the shapes with a message that names both, and computes in
float32 (safe under bf16 autocast). Names:

========================  ==========================================================
``bce``                   binary cross-entropy; ``pos_weight``, ``label_smoothing``
``focal``                 Lin et al. 2017, class-balanced: alpha for buildings,
                          1-alpha for background (alpha=0.25, gamma=2)
``focal_notes``           the notes' form ``alpha * (1-pt)^gamma * bce`` (alpha=0.5,
                          gamma=2); here alpha only rescales the loss
``dice``                  soft Dice, ``reduction`` image (default) or batch, ``smooth``
``jaccard``               soft IoU, same options
``tversky``               ``alpha`` (FP weight), ``beta`` (FN weight), same options
``lovasz``                Lovasz hinge (Berman et al. 2018), ``per_image`` (default
                          true), ``symmetric`` (also on (-logits, 1-y))
========================  ==========================================================

Sums: ``"bce+dice"``, ``"bce:0.5,dice:1,lovasz:0.5"`` or a YAML mapping
``{bce: 0.5, focal: {weight: 1, gamma: 2}}``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from buildseg.errors import BuildsegError


def as_pair(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float32 (B,1,H,W); a clear error for anything that does not line up."""
    expected = "logits (B,1,H,W) or (B,H,W) and a target of the same batch and spatial size"
    if logits.ndim == 3:
        logits = logits.unsqueeze(1)
    if target.ndim == 3:
        target = target.unsqueeze(1)
    if logits.ndim != 4 or target.ndim != 4 or logits.shape[1] != 1 or target.shape[1] != 1:
        raise BuildsegError(f"loss got logits {tuple(logits.shape)} and target {tuple(target.shape)}; expected {expected}")
    if logits.shape != target.shape:
        raise BuildsegError(
            f"loss got logits {tuple(logits.shape)} and target {tuple(target.shape)}: batch or size differ; expected "
            f"{expected}. A batch mismatch usually means outputs were squeezed or stacked; a size mismatch, an "
            "auxiliary head that must be upsampled (DeepSupervisionLoss does that)"
        )
    return logits.float(), target.float()


class BCELoss(nn.Module):
    def __init__(self, pos_weight: float | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.pos_weight = pos_weight
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = as_pair(logits, target)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        pos_weight = None if self.pos_weight is None else torch.tensor(float(self.pos_weight), device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


class FocalLoss(nn.Module):
    """Focal loss. ``balanced=True`` (Lin et al.): alpha_t = alpha on positives, 1-alpha on
    negatives. ``balanced=False`` (the notes): alpha multiplies every pixel."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, balanced: bool = True) -> None:
        super().__init__()
        self.alpha, self.gamma, self.balanced = alpha, gamma, balanced

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = as_pair(logits, target)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        loss = (1 - p_t) ** self.gamma * bce
        if self.balanced:
            loss = (self.alpha * target + (1 - self.alpha) * (1 - target)) * loss
        else:
            loss = self.alpha * loss
        return loss.mean()


class OverlapLoss(nn.Module):
    """Soft Tversky index loss; Dice and Jaccard are its special cases.

    index = (TP + s) / (TP + alpha*FP + beta*FN + s) on probabilities. ``reduction='image'``
    computes one index per image and averages: an empty target with a non-empty prediction
    has index ~s/(alpha*FP+s) ~ 0, so it costs, as in the metric; an empty target with an
    empty prediction has index 1, no cost, and never a division by zero (s > 0).
    """

    def __init__(self, alpha: float, beta: float, smooth: float = 1.0, reduction: str = "image") -> None:
        super().__init__()
        if reduction not in ("image", "batch"):
            raise BuildsegError(f"reduction must be image or batch, got {reduction!r}")
        if smooth <= 0:
            raise BuildsegError(f"smooth must be > 0 (it prevents 0/0 on empty images), got {smooth}")
        self.alpha, self.beta, self.smooth, self.reduction = alpha, beta, smooth, reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = as_pair(logits, target)
        p = torch.sigmoid(logits)
        dims = (1, 2, 3) if self.reduction == "image" else (0, 1, 2, 3)
        tp = (p * target).sum(dims)
        fp = (p * (1 - target)).sum(dims)
        fn = ((1 - p) * target).sum(dims)
        index = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return 1 - index.mean()


def dice_loss(smooth: float = 1.0, reduction: str = "image") -> OverlapLoss:
    """Soft Dice: (2TP + s) / (|P| + |G| + s), written as Tversky(0.5, 0.5) with smooth s/2."""
    return OverlapLoss(0.5, 0.5, smooth / 2, reduction)


def jaccard_loss(smooth: float = 1.0, reduction: str = "image") -> OverlapLoss:
    """Soft IoU: (TP + s) / (TP + FP + FN + s)."""
    return OverlapLoss(1.0, 1.0, smooth, reduction)


def tversky_loss(alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0, reduction: str = "image") -> OverlapLoss:
    return OverlapLoss(alpha, beta, smooth, reduction)


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors."""
    gts = gt_sorted.sum()
    intersection = gts - gt_sorted.cumsum(0)
    union = gts + (1 - gt_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if len(jaccard) > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_hinge_flat(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovasz hinge of one flat set of pixels: <relu(sorted errors), lovasz_grad>."""
    signs = 2.0 * labels - 1.0
    errors = 1.0 - logits * signs
    errors_sorted, perm = torch.sort(errors, descending=True)
    grad = lovasz_grad(labels[perm])
    return torch.dot(F.relu(errors_sorted), grad)


class LovaszHingeLoss(nn.Module):
    def __init__(self, per_image: bool = True, symmetric: bool = False) -> None:
        super().__init__()
        self.per_image, self.symmetric = per_image, symmetric

    def _one_way(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return torch.stack([lovasz_hinge_flat(l.flatten(), t.flatten()) for l, t in zip(logits, target)]).mean()
        return lovasz_hinge_flat(logits.flatten(), target.flatten())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = as_pair(logits, target)
        loss = self._one_way(logits, target)
        if self.symmetric:  # also rewards getting the background right: a signal on empty images
            loss = (loss + self._one_way(-logits, 1 - target)) / 2
        return loss


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "bce": BCELoss,
    "focal": lambda alpha=0.25, gamma=2.0: FocalLoss(alpha, gamma, balanced=True),
    "focal_notes": lambda alpha=0.5, gamma=2.0: FocalLoss(alpha, gamma, balanced=False),
    "dice": dice_loss,
    "jaccard": jaccard_loss,
    "tversky": tversky_loss,
    "lovasz": LovaszHingeLoss,
    "lovasz_symmetric": lambda per_image=True: LovaszHingeLoss(per_image, symmetric=True),
}


def make_loss(name: str, **params: Any) -> nn.Module:
    if name not in LOSSES:
        raise BuildsegError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    try:
        return LOSSES[name](**params)
    except TypeError as exc:
        raise BuildsegError(f"bad parameters for loss {name!r}: {params} ({exc})") from None


class CompositeLoss(nn.Module):
    """A weighted sum of named losses; ``parts`` keeps the last value of each for logging."""

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise BuildsegError("the loss needs at least one term, e.g. 'bce+dice'")
        self.names = [n for n, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList(m for _, _, m in terms)
        self.parts: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        parts = {}
        for name, weight, term in zip(self.names, self.weights, self.terms):
            value = term(logits, target)
            parts[name] = value.detach()
            total = total + weight * value
        self.parts = parts
        return total


_TERM = re.compile(r"^\s*([a-z_]+)\s*(?::\s*([0-9.eE+-]+))?\s*$")


def parse_loss(spec: str | Mapping[str, Any]) -> CompositeLoss:
    """``"bce+focal"``, ``"bce:0.5,dice:1"``, or ``{name: weight | {weight: w, **params}}``."""
    terms = []
    if isinstance(spec, Mapping):
        for name, value in spec.items():
            params = dict(value) if isinstance(value, Mapping) else {"weight": value}
            weight = float(params.pop("weight", 1.0))
            terms.append((name, weight, make_loss(name, **params)))
        return CompositeLoss(terms)
    if not isinstance(spec, str) or not spec.strip():
        raise BuildsegError(f"loss must be a string like 'bce+dice' or a mapping, got {spec!r}")
    for item in re.split(r"[+,]", spec):
        match = _TERM.match(item)
        if not match:
            raise BuildsegError(f"cannot parse loss term {item!r} in {spec!r}; write name or name:weight, e.g. 'bce:0.5,dice:1'")
        name, weight = match.group(1), float(match.group(2) or 1.0)
        terms.append((name, weight, make_loss(name)))
    return CompositeLoss(terms)


def default_ds_weights(n_heads: int) -> list[float]:
    """1.0 for the final head, halving for each coarser auxiliary head."""
    return [1.0] + [0.5 ** (k + 1) for k in range(n_heads - 1)]


class DeepSupervisionLoss(nn.Module):
    """Applies ``base`` to every head, upsampling each auxiliary logit to the target's size.

    Accepts a plain tensor too, so one loss object serves models with and without deep
    supervision. Targets may be (B,H,W) or (B,1,H,W).
    """

    def __init__(self, base: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.base = base
        self.weights = list(weights) if weights else None
        self.head_values: list[float] = []

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.base(outputs, target)
        outputs = list(outputs)
        weights = self.weights or default_ds_weights(len(outputs))
        if len(weights) != len(outputs):
            raise BuildsegError(f"ds_weights has {len(weights)} entries but the model has {len(outputs)} heads")
        size = target.shape[-2:]
        total = 0.0
        values = []
        parts: dict[str, torch.Tensor] = {}
        for k, (out, weight) in enumerate(zip(outputs, weights)):
            if out.shape[-2:] != size:
                out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
            value = self.base(out, target)
            if k == 0:
                parts = dict(getattr(self.base, "parts", {}))
            values.append(value.detach())
            total = total + weight * value
        self.head_values = values
        if hasattr(self.base, "parts"):
            self.base.parts = parts  # log the final head's parts
        return total


class TargetsLoss(nn.Module):
    """The loss of a model with several targets (``card.targets``): the footprint loss on
    channel 0 plus ``extra_weight`` times the same loss on every other channel (e.g. the
    contact zone between buildings), each with deep supervision.

    ``base`` is the footprint's loss, so the loop logs its parts as for one target.
    """

    def __init__(self, footprint: DeepSupervisionLoss, extra: DeepSupervisionLoss, channels: int,
                 extra_weight: float = 0.5) -> None:
        super().__init__()
        self.footprint = footprint
        self.extra = extra
        self.channels = channels
        self.extra_weight = extra_weight

    @property
    def base(self) -> nn.Module:
        return self.footprint.base

    @staticmethod
    def _channel(outputs: torch.Tensor | Sequence[torch.Tensor], c: int):
        if isinstance(outputs, torch.Tensor):
            return outputs[:, c : c + 1]
        return [o[:, c : c + 1] for o in outputs]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if target.ndim != 4 or target.shape[1] != self.channels:
            raise BuildsegError(f"the targets have shape {tuple(target.shape)}; the model predicts {self.channels} "
                                "channels (one per target)")
        total = self.footprint(self._channel(outputs, 0), target[:, :1])
        for c in range(1, self.channels):
            total = total + self.extra_weight * self.extra(self._channel(outputs, c), target[:, c : c + 1])
        return total
