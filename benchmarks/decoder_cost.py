"""Where a UNet's CPU time goes: model-only img/s per decoder width and head setting.

One process, 224x224 tiles in batches of 8, every engine given all cores. Rows vary what
the decoder costs (its channel widths, the deep-supervision ensemble's upsampled heads) on
the default efficientnet_lite0 encoder and on ResNet-50, next to smp's Unet-ResNet50 as the
peer. MACs are counted from the convolutions (the decoder's share beside it), so the table
shows whether a row is compute- or memory-bound. Run:

    .venv/bin/python -W ignore benchmarks/decoder_cost.py [--engines torch openvino] [--batches 12]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from buildseg.inference.core import engines  # noqa: E402
from buildseg.models import ModelCard, build_model  # noqa: E402
from loader_throughput import cpu_flags  # noqa: E402

ROWS = [  # label, encoder, decoder_width, ds_ensemble
    ("lite0, width 1 (256-128-64-32-16), DS ensemble", "efficientnet_lite0", 1.0, True),
    ("lite0, width 1, final head only", "efficientnet_lite0", 1.0, False),
    ("lite0, width 0.5 (128-64-32-16-8, the default), DS ensemble", "efficientnet_lite0", 0.5, True),
    ("lite0, width 0.5, final head only", "efficientnet_lite0", 0.5, False),
    ("lite0, width 0.25 (64-32-16-8-8), DS ensemble", "efficientnet_lite0", 0.25, True),
    ("resnet50, width 1, DS ensemble", "resnet50", 1.0, True),
    ("resnet50, width 0.5, DS ensemble", "resnet50", 0.5, True),
    ("resnet50, width 0.5, final head only", "resnet50", 0.5, False),
]


def conv_macs(model: nn.Module, side: int = 224) -> tuple[float, float]:
    """Multiply-accumulates of every Conv2d for one tile (total, decoder part), in GMAC."""
    total, decoder = [0.0], [0.0]

    def hook(name):
        def count(module, inputs, output):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs = output.numel() * k
            total[0] += macs
            if not name.startswith("net.encoder"):
                decoder[0] += macs
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    return total[0] / 1e9, decoder[0] / 1e9


def smp_model() -> nn.Module | None:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return None
    net = smp.Unet("resnet50", encoder_weights=None, classes=1).eval()

    class Wrapped(nn.Module):  # the same raw-pixel input contract as buildseg's models
        def __init__(self):
            super().__init__()
            self.net = net
            self.stride = 32

        def forward(self, x):
            return self.net(x.float() / 255.0)

    return Wrapped().eval()


def rate(run, batch: torch.Tensor, batches: int) -> float:
    for _ in range(2):
        run(batch)
    started = time.perf_counter()
    for _ in range(batches):
        run(batch)
    return batch.shape[0] * batches / (time.perf_counter() - started)


def openvino_run(model: nn.Module, folder: Path):
    import openvino as ov

    from buildseg.inference.core.onnx_graph import export_model_onnx

    path = folder / f"m{len(list(folder.glob('*.onnx')))}.onnx"
    if hasattr(model, "card"):  # buildseg: the engine's own export (dynamic sizes, then compiled static below)
        export_model_onnx(model, path)
    else:  # smp's Unet needs sizes divisible by 32: a static export
        torch.onnx.export(model, (torch.zeros(8, 3, 224, 224),), str(path), input_names=["image"], dynamo=True)
    core = ov.Core()
    graph = core.read_model(str(path))
    graph.reshape({graph.inputs[0]: [8, 3, 224, 224]})
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    return lambda x: compiled(x.numpy())[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=["torch", "openvino"], choices=["torch", "openvino"])
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    if "openvino" in args.engines and not engines._installed("openvino"):
        args.engines.remove("openvino")
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8).float()
    tmp = Path(tempfile.mkdtemp(prefix="decoder_cost_"))
    print(f"CPU: {cpu_flags()}, {torch.get_num_threads()} threads, torch {torch.__version__}; model only, batch 8, 224 px\n")
    print("| model | GMAC/tile | decoder share | " + " | ".join(f"{e} fp32 img/s" for e in args.engines) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.engines))
    models = []
    for label, encoder, width, ensemble in ROWS:
        card = ModelCard(encoder=encoder, decoder_width=width, deep_supervision=True, ds_ensemble=ensemble)
        models.append((label, build_model(card).eval()))
    peer = smp_model()
    if peer is not None:
        models.append(("smp Unet-resnet50 (the peer)", peer))
    for label, model in models:
        total, decoder = conv_macs(model)
        cells = []
        for engine in args.engines:
            if engine == "torch":
                def run(x, model=model):
                    with torch.inference_mode():
                        return model(x)
            else:
                run = openvino_run(model, tmp)
            cells.append(f"{rate(run, batch, args.batches):.1f}")
        print(f"| {label} | {total:.2f} | {decoder / total:.0%} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
