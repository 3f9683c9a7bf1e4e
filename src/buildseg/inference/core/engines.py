"""Inference engines behind one call: uint8/float (B, C, H, W) images -> float32 logits.

* ``torch``: the model itself (autocast precision, channels_last), on CPU or GPU.
* ``openvino``: the model's ONNX graph compiled by OpenVINO for the CPU, ``f32`` or ``bf16``
  (``INFERENCE_PRECISION_HINT``); the ``cpu`` extra (``pip install 'buildseg[cpu]'``).
* ``onnxruntime``: the same ONNX graph in onnxruntime's CPU provider; the ``onnx`` extra.
* ``auto``: OpenVINO on x86 CPUs where it is installed, torch elsewhere (GPUs).

The ONNX graph is the one ``buildseg export`` writes and parity-checks: normalisation,
stride padding and the crop back inside, dynamic batch, height and width, weights inlined. It is cached next
to the checkpoint (``<checkpoint folder>/.buildseg-engines/``, else the user cache, or wherever
``BUILDSEG_ENGINE_CACHE`` points), keyed by
a hash of the weights and model card and the deep-supervision-ensemble switch, so the second
run starts at once and a changed checkpoint is exported again; OpenVINO's own compiled-blob
cache sits beside it. Inputs smaller than the encoder's stride are padded as the torch model
pads them and the logits cropped back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from buildseg import extras
from buildseg.atomic import atomic_path
from buildseg.errors import BuildsegError
from buildseg.models.factory import SegmentationModel
from buildseg.runtime import device as device_rules
from buildseg.runtime import user_cache_dir
from buildseg.runtime.device import autocast
from buildseg.runtime.locks import folder_lock
from buildseg.settings.inference import ENGINES, OPENVINO_MODES

log = logging.getLogger("buildseg")
MAX_STATIC_SHAPES = 4  # static OpenVINO compiles kept in memory (least recently used out; see _ShapeCompiled)
# --engine-mode auto: the mode that won on each measured core count (benchmarks/engine_modes.py,
# benchmarks/README.md "OpenVINO modes"); core counts not measured yet take the latency mode.
MEASURED_MODES = {1: "latency", 2: "latency"}
EXTRAS = {"openvino": ("openvino", "cpu"), "onnxruntime": ("onnxruntime", "onnx")}


def resolve_engine(name: str, device: torch.device) -> str:
    if name not in ENGINES:
        raise BuildsegError(f"unknown engine {name!r}; use one of {', '.join(ENGINES)}")
    if name == "auto":
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        return "openvino" if device.type == "cpu" and x86 and extras.installed("openvino") else "torch"
    if name != "torch":
        module, extra = EXTRAS[name]
        if device.type != "cpu":
            raise BuildsegError(f"--engine {name} runs on the CPU; use --engine torch on {device}")
        if not extras.installed(module):
            raise BuildsegError(f"--engine {name} needs the {module} package: pip install 'buildseg[{extra}]'")
    return name


GRAPH_VERSION = 2  # bump when SegmentationModel's forward changes the exported graph (2: lane-filling ensemble resize)


def model_key(model: SegmentationModel) -> str:
    """Changes whenever the exported graph would: weights, model card, ensemble switch, and
    buildseg's graph code (:data:`GRAPH_VERSION`), so an upgrade re-exports rather than
    reusing an older, slower graph."""
    digest = hashlib.sha256(repr(sorted(model.card.to_dict().items())).encode())
    digest.update(f"graph={GRAPH_VERSION}".encode())
    digest.update(f"ds_ensemble={model.ds_ensemble}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:24]


CACHE_ENV = "BUILDSEG_ENGINE_CACHE"  # one folder for every checkpoint's graphs (a fleet's shared disk, a test run)


def writable_beside(checkpoint: Path | None) -> bool:
    """Whether files may be written beside ``checkpoint``: not for none, a read-only folder or a
    packaged model (the installed package is never written to)."""
    from buildseg.runtime.packaged import is_packaged

    return checkpoint is not None and not is_packaged(checkpoint) and os.access(checkpoint.parent, os.W_OK)


def cache_folder(checkpoint: Path | None) -> Path:
    """``$BUILDSEG_ENGINE_CACHE`` when set; else beside the checkpoint; else the user cache.
    Graphs are keyed by :func:`model_key`, so one folder can serve many checkpoints."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    if writable_beside(checkpoint):
        return checkpoint.parent / ".buildseg-engines"
    return user_cache_dir("engines")


def cached_onnx(model: SegmentationModel, folder: Path) -> Path:
    """The model's ONNX graph in ``folder``, exported once per :func:`model_key`."""
    from buildseg.inference.core.onnx_graph import export_model_onnx

    path = folder / f"{model_key(model)}.onnx"
    with folder_lock(folder, required=False):  # torchrun's ranks and Ray workers start together: one exports, the rest reuse
        if path.is_file():
            log.info("engine cache: reusing %s", path)
            return path
        log.info("engine cache: exporting the model to %s (once per checkpoint)", path)
        started = time.perf_counter()
        with atomic_path(path, scratch=(".data",)) as tmp:
            export_model_onnx(model.to("cpu").float().to(memory_format=torch.contiguous_format), tmp)
        from buildseg.inference.core.payoff import record_cost

        record_cost(cache_folder(None), "onnx_export", time.perf_counter() - started)  # what the next decision weighs
    return path


def onnx_cached(model: SegmentationModel, checkpoint: Path | None) -> bool:
    """The model's ONNX graph is in its engine cache already (OpenVINO costs no export)."""
    return (cache_folder(checkpoint) / f"{model_key(model)}.onnx").is_file()


class _PadSmall:
    """Pads inputs below the encoder's stride as the torch model does (reflect, or the mean
    pixel = zero after normalisation where the margin exceeds the image); the ONNX graph
    needs H, W >= stride."""

    def __init__(self, model: SegmentationModel) -> None:
        self.check_input = model.check_input  # the torch model's clear errors (channels, too small) on every engine
        self.stride = model.stride
        self.mean = model.mean.detach().cpu().float().view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        self.check_input(images)
        images = images.float()
        h, w = images.shape[-2:]
        if h >= self.stride and w >= self.stride:
            return images, (h, w)
        ph, pw = max(0, self.stride - h), max(0, self.stride - w)
        if ph < h and pw < w:  # the torch model's own rule: reflect where the margin is smaller than the image
            return torch.nn.functional.pad(images, (0, pw, 0, ph), mode="reflect"), (h, w)
        padded = self.mean.expand(images.shape[0], -1, h + ph, w + pw).clone()
        padded[..., :h, :w] = images
        return padded, (h, w)


def torch_engine(model: SegmentationModel, device: torch.device, precision: str,
                 channels_last: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            return model(images).float()

    return run


INT8_FOLDER = "int8"  # beside the checkpoint: RUN/int8/<model key>.xml/.bin and .json (the verdict)


def int8_path(model: SegmentationModel, checkpoint: Path | None) -> Path:
    """Where a new int8 OpenVINO model of ``model`` is written: with the run
    (``<checkpoint folder>/int8/<key>.xml``), so it travels with ``best.pt``; the engine
    cache when the run folder is read-only, the checkpoint is a packaged model (the installed
    package is never written to) or there is no checkpoint."""
    if writable_beside(checkpoint):
        return checkpoint.parent / INT8_FOLDER / f"{model_key(model)}.xml"
    return cache_folder(checkpoint) / f"{model_key(model)}.int8.xml"


def _int8_places(model: SegmentationModel, checkpoint: Path | None) -> list[Path]:
    """With the run first, then the engine cache (where ``buildseg quantize`` wrote int8
    models before they moved into the run folder)."""
    key = model_key(model)
    places = [checkpoint.parent / INT8_FOLDER / f"{key}.xml"] if checkpoint is not None else []
    return [*places, cache_folder(checkpoint) / f"{key}.int8.xml"]


def find_int8(model: SegmentationModel, checkpoint: Path | None) -> Path | None:
    """The int8 OpenVINO model of ``model``, or None."""
    return next((p for p in _int8_places(model, checkpoint) if p.is_file()), None)


def int8_verdict(model: SegmentationModel, checkpoint: Path | None) -> dict | None:
    """The record written with the int8 model (fp32 and int8 Dice, accepted or refused and
    why; a refused model's record stays even though its model is not kept). None when none
    was recorded (no int8 yet, or one made before verdicts were recorded)."""
    import json

    for place in _int8_places(model, checkpoint):
        try:
            return json.loads(place.with_suffix(".json").read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            log.warning("ignoring an unreadable int8 record %s (%s)", place.with_suffix(".json"), exc)
    return None


def auto_cpu_precision(engine: str, models: Sequence[SegmentationModel],
                       checkpoints: Sequence[Path | None]) -> tuple[str, str]:
    """``--precision auto`` on the CPU: (precision, why). bf16 where the CPU runs it natively
    (AMX, AVX512-BF16); elsewhere int8 when every model has an int8 model whose verdict says
    accepted (it kept the validation Dice), the fastest path there; fp32 otherwise."""
    if device_rules.cpu_has_native_bf16():
        return "bf16", "this CPU has native bf16 (AMX/AVX512-BF16)"
    if engine != "openvino":
        return "fp32", f"no native bf16 on this CPU, and int8 runs on the openvino engine only (this is {engine})"
    verdicts = [int8_verdict(m, c) for m, c in zip(models, checkpoints)]
    usable = [bool(v and v.get("accepted")) and find_int8(m, c) is not None
              for v, m, c in zip(verdicts, models, checkpoints)]
    if all(usable):
        changes = ", ".join(f"{v['dice_int8'] - v['dice_fp32']:+.4f}" for v in verdicts)
        return "int8", f"no native bf16 on this CPU; the run's int8 model was accepted (validation Dice change {changes})"
    refused = next((v for v in verdicts if v and not v.get("accepted")), None)
    if refused is not None:
        return "fp32", f"no native bf16 on this CPU; the run's int8 model was refused ({refused.get('reason')})"
    return "fp32", "no native bf16 on this CPU and no accepted int8 model with the run (`buildseg quantize` makes one)"


def openvino_mode(name: str, cores: int | None = None) -> str:
    """``latency`` (one synchronous request of the whole batch on every core) or
    ``throughput`` (the batch split over OpenVINO's streams, in flight together)."""
    if name not in OPENVINO_MODES:
        raise BuildsegError(f"unknown engine mode {name!r}; use one of {', '.join(OPENVINO_MODES)}")
    if name != "auto":
        return name
    return MEASURED_MODES.get(cores or device_rules.usable_cores(), "latency")


def openvino_engine(model: SegmentationModel, precision: str, folder: Path, checkpoint: Path | None = None,
                    threads: int | None = None, mode: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    import openvino as ov

    if precision == "bf16" and not device_rules.cpu_has_native_bf16():
        log.warning("this CPU has no native bf16 (AVX512-BF16/AMX): OpenVINO emulates it, usually slower than fp32")
    core = ov.Core()
    blobs = folder / "openvino"
    core.set_property({"CACHE_DIR": str(blobs)})
    if precision == "int8":
        source = find_int8(model, checkpoint)
        if source is None:
            raise BuildsegError(f"no int8 model for {checkpoint or 'this model'}: calibrate one first with "
                                f"`buildseg quantize --checkpoint {checkpoint or 'CKPT'} --data VAL`")
        config = {}
    else:
        source = cached_onnx(model, folder)
        config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    mode = openvino_mode(mode, threads)
    config["PERFORMANCE_HINT"] = mode.upper()
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = (_StreamCompiled if mode == "throughput" else _ShapeCompiled)(core, str(source), config, MAX_STATIC_SHAPES,
                                                                            blobs=blobs, stride=model.stride)
    pad = _PadSmall(model)

    def run(images: torch.Tensor) -> torch.Tensor:
        padded, (h, w) = pad(images)
        logits = compiled(padded.contiguous().numpy())
        return torch.from_numpy(np.ascontiguousarray(logits[..., :h, :w]))

    return run


class _ShapeCompiled:
    """A static OpenVINO compile for each input shape whose sides are multiples of the
    encoder's stride, the one dynamic compile for every other shape.

    A static shape lets the CPU plugin plan memory and pick kernels once (7-17% faster on
    batches of 224 px tiles); the shapes that repeat (the competition's 224s, a sliding window)
    are such multiples, while a folder of odd images would compile again and again. Which
    compile runs is a function of the shape alone, never of the shapes seen before, so a
    block's probabilities do not depend on the order of the scenes or tiles of a run. At most
    ``max_shapes`` static compiles stay in memory (least recently used out); OpenVINO's
    CACHE_DIR keeps the blobs, so a shape seen again loads its blob rather than compiling.
    """

    def __init__(self, core, source: str, config: dict, max_shapes: int, *, blobs: Path, stride: int = 32) -> None:
        self.core, self.source, self.config, self.max_shapes = core, source, config, max_shapes
        self.blobs = blobs  # OpenVINO's CACHE_DIR: compiles hold its lock (see runtime/locks.py)
        self.stride = stride
        self.static: dict[tuple[int, ...], object] = {}  # insertion order = least recently used first
        self.dynamic = None

    def compile(self, graph):
        """``compile_model`` under the blob folder's lock: the first process compiles and
        writes the blob, the others wait and then load it."""
        with folder_lock(self.blobs, required=False):
            return self.core.compile_model(graph, "CPU", self.config)

    def is_static(self, shape: tuple[int, ...]) -> bool:
        return self.max_shapes > 0 and shape[-2] % self.stride == 0 and shape[-1] % self.stride == 0

    def _compiled(self, shape: tuple[int, ...]):
        if not self.is_static(shape):
            if self.dynamic is None:
                self.dynamic = self.compile(self.core.read_model(self.source))
            return self.dynamic
        compiled = self.static.pop(shape, None)
        if compiled is None:
            if len(self.static) >= self.max_shapes:
                self.static.pop(next(iter(self.static)))
            graph = self.core.read_model(self.source)
            graph.reshape({graph.inputs[0]: list(shape)})
            compiled = self.compile(graph)
        self.static[shape] = compiled
        return compiled

    def __call__(self, array: np.ndarray) -> np.ndarray:
        return self._compiled(array.shape)(array)[0]


class _StreamCompiled(_ShapeCompiled):
    """OpenVINO's throughput mode: the batch cut into one chunk per infer request, all in
    flight at once on the plugin's streams (each stream a few cores), gathered in order.
    On many cores a small model's single batch cannot keep every core busy; several
    streams can. The chunk shapes are compiled statically like the latency mode's batches."""

    def __init__(self, core, source: str, config: dict, max_shapes: int, *, blobs: Path, stride: int = 32) -> None:
        super().__init__(core, source, config, max_shapes, blobs=blobs, stride=stride)
        self.queues: dict[int, object] = {}  # id(compiled model) -> its AsyncInferQueue
        self.requests = 0  # OpenVINO's optimal number of requests in flight (one per stream), read once

    def __call__(self, array: np.ndarray) -> np.ndarray:
        import openvino as ov

        if not self.requests:
            probe = self.compile(self.core.read_model(self.source))
            self.requests = int(probe.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        requests = self.requests
        size = -(-len(array) // min(requests, len(array)))
        chunks = [array[i : i + size] for i in range(0, len(array), size)]
        outputs: list[np.ndarray | None] = [None] * len(chunks)
        queues = []
        for k, chunk in enumerate(chunks):
            compiled = self._compiled(chunk.shape)
            queue = self.queues.get(id(compiled))
            if queue is None:
                queue = self.queues[id(compiled)] = ov.AsyncInferQueue(compiled, requests)
                queue.set_callback(lambda request, slot: slot[0].__setitem__(
                    slot[1], request.get_output_tensor(0).data.copy()))
            queue.start_async({0: chunk}, userdata=(outputs, k))
            queues.append(queue)
        for queue in {id(q): q for q in queues}.values():
            queue.wait_all()
        return np.concatenate(outputs)


def onnxruntime_engine(model: SegmentationModel, folder: Path,
                       threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(str(cached_onnx(model, folder)), options, providers=["CPUExecutionProvider"])
    pad = _PadSmall(model)

    def run(images: torch.Tensor) -> torch.Tensor:
        padded, (h, w) = pad(images)
        logits = session.run(["logits"], {"image": padded.contiguous().numpy()})[0]
        return torch.from_numpy(np.ascontiguousarray(logits[..., :h, :w]))

    return run


def build_engine(name: str, model: SegmentationModel, device: torch.device, precision: str, channels_last: bool,
                 checkpoint: Path | None = None, threads: int | None = None,
                 mode: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits function of ``model`` on engine ``name`` (already resolved, not ``auto``).

    ``threads``: the engine's compute threads (None: the engine's default, all cores this
    process may use). torch's setting is process-wide (``torch.set_num_threads``).
    ``mode``: OpenVINO's latency or throughput mode (:func:`openvino_mode`).
    """
    if threads:
        torch.set_num_threads(int(threads))  # also the thread count of pre/post-processing in torch
    if name == "torch":
        if precision == "int8":
            raise BuildsegError("int8 runs on --engine openvino (after `buildseg quantize`); torch runs fp32/bf16/fp16")
        return torch_engine(model, device, precision, channels_last)
    if precision == "fp16":
        raise BuildsegError(f"--engine {name} runs fp32 or bf16 on the CPU; fp16 is for CUDA GPUs (--engine torch)")
    folder = cache_folder(checkpoint)
    if name == "openvino":
        return openvino_engine(model, precision, folder, checkpoint, threads, mode)
    if precision == "int8":
        raise BuildsegError("int8 runs on --engine openvino (after `buildseg quantize`)")
    if precision == "bf16":
        raise BuildsegError("--engine onnxruntime runs fp32 only here; use --engine openvino for bf16")
    return onnxruntime_engine(model, folder, threads)
