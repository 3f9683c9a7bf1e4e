"""Style mixing of feature statistics (MixStyle, Zhou et al., ICLR 2021): during training the
per-image, per-channel mean and standard deviation of early encoder features are mixed with
those of another image of the batch, so the network cannot key on a sensor's or a place's
colour and contrast. Applied by forward hooks on the encoder's first feature stages (strides
4 and 8), so the deeper layers see mixed styles.

At eval time the hook returns nothing and the module's output is untouched: prediction, every
engine and every exported graph are exactly the network without it (tested).
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = (1, 2)  # feature levels after which statistics are mixed: strides 4 and 8
ALPHA = 0.1  # Beta(alpha, alpha) mixing weights, the paper's choice
EPS = 1e-6


class StyleMix(nn.Module):
    """With probability ``p`` per batch, mix each image's feature statistics with a shuffled
    image's: ``x_norm * (l*sigma + (1-l)*sigma') + (l*mu + (1-l)*mu')``."""

    def __init__(self, p: float, alpha: float = ALPHA) -> None:
        super().__init__()
        self.p = p
        self.beta = torch.distributions.Beta(alpha, alpha)

    def hook(self, module: nn.Module, inputs, output):
        if not self.training or self.p <= 0 or not isinstance(output, torch.Tensor) or output.shape[0] < 2:
            return None
        if torch.rand(()) >= self.p:
            return None
        return self.mix(output)

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        dtype = x.dtype
        xf = x.float()
        mu = xf.mean(dim=(2, 3), keepdim=True)
        sigma = (xf.var(dim=(2, 3), keepdim=True) + EPS).sqrt()
        normed = (xf - mu.detach()) / sigma.detach()
        lam = self.beta.sample((b, 1, 1, 1)).to(x.device)
        order = torch.randperm(b, device=x.device)
        mu_mix = lam * mu + (1 - lam) * mu[order]
        sigma_mix = lam * sigma + (1 - lam) * sigma[order]
        return (normed * sigma_mix + mu_mix).to(dtype)


def attach_style_mix(encoder: nn.Module, p: float) -> StyleMix | None:
    """Hook a :class:`StyleMix` after the encoder's early feature stages; None when ``p`` is 0."""
    if p <= 0:
        return None
    names = encoder.feature_info.module_name()
    mixer = StyleMix(p)
    modules = dict(encoder.named_modules())
    for level in STAGES:
        if level < len(names):
            name = names[level]
            module = modules.get(name) or modules.get(name.replace(".", "_"))
            if module is not None:
                module.register_forward_hook(mixer.hook)
    return mixer
