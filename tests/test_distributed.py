"""Collectives live in one module, on the process group's device."""

import re
from pathlib import Path

import pytest
import torch

from buildseg import distributed
from buildseg.distributed import DistInfo

SRC = Path(__file__).resolve().parents[1] / "src" / "buildseg"
COLLECTIVES = r"\b(all_reduce|all_gather|all_gather_object|broadcast|reduce_scatter|barrier|gather|scatter)\("


def test_only_the_distributed_module_calls_torch_collectives():
    """NCCL rejects CPU tensors; every call goes through buildseg.distributed, which moves them."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"(torch\.distributed|\bdist)\." + COLLECTIVES[2:], line):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_collectives_run_on_the_groups_device(monkeypatch):
    seen = []
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: seen.append(t.device) or t.mul_(2))
    info = DistInfo(rank=0, world_size=2, launched=True, device=torch.device("meta"))
    moved_to = []
    real_to = torch.Tensor.to

    def record_to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        moved_to.append(str(target))
        return real_to(self, "cpu")  # stand-in for a GPU copy on this CPU machine

    monkeypatch.setattr(torch.Tensor, "to", record_to)
    out = distributed.all_reduce(torch.ones(3), info)
    assert moved_to[0] == "meta"  # moved to the group's device before the collective
    assert torch.equal(out, torch.full((3,), 2.0))
    assert distributed.any_true(True, info) is True


def test_a_single_process_needs_no_group():
    info = distributed.init_distributed("cpu")
    assert not info.enabled and info.is_main
    t = torch.arange(3.0)
    assert distributed.all_reduce(t, info) is t and distributed.any_true(False, info) is False


def test_timm_sync_batchnorm_keeps_activations_and_checkpoint_keys():
    """What --sync-bn relies on: timm converts BatchNormAct2d without dropping its activation."""
    timm_layers = pytest.importorskip("timm.layers")
    from buildseg.models import ModelCard, build_model

    model = build_model(ModelCard(encoder="efficientnet_lite0", decoder_channels=[16, 16, 8, 8, 8], deep_supervision=False, ds_ensemble=False))
    fused = {n: type(m.act).__name__ for n, m in model.named_modules() if type(m).__name__ == "BatchNormAct2d"}
    assert fused
    synced = timm_layers.convert_sync_batchnorm(model)
    modules = dict(synced.named_modules())
    for name, act in fused.items():
        assert isinstance(modules[name], torch.nn.SyncBatchNorm) and type(modules[name].act).__name__ == act
    assert list(synced.state_dict()) == list(build_model(ModelCard(encoder="efficientnet_lite0",
                                                                    decoder_channels=[16, 16, 8, 8, 8], deep_supervision=False, ds_ensemble=False)).state_dict())


def test_inference_does_not_import_training():
    """Dependencies point down the pipeline: inference uses models and runtime, never training."""
    offenders = [f"{p.relative_to(SRC)}: {line.strip()}" for p in (SRC / "inference").rglob("*.py")
                 for line in p.read_text().splitlines() if re.match(r"\s*(from|import) buildseg\.training", line)]
    assert not offenders, offenders
