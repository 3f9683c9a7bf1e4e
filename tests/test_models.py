import pytest
import torch
from safetensors.torch import save_file

from buildseg.errors import BuildsegError
from buildseg.models import ModelCard, build_model
from buildseg.models.encoders import create_encoder
from buildseg.runtime.checkpoint import FORMAT, load_model, save_atomic

SIZES = [(32, 32), (33, 47), (100, 300), (224, 224)]


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "efficientnet_b3", "efficientnet_lite0", "convnext_atto"])
@pytest.mark.parametrize("in_chans", [1, 3, 4])
@pytest.mark.slow
def test_any_encoder_any_size_any_channels(encoder, in_chans):
    model = build_model(ModelCard(encoder=encoder, in_chans=in_chans, deep_supervision=False, ds_ensemble=False)).eval()
    with torch.no_grad():
        for h, w in SIZES:
            out = model(torch.randint(0, 256, (1, in_chans, h, w), dtype=torch.uint8))
            assert out.shape == (1, 1, h, w)


def test_deep_supervision_heads_gradients_and_shapes():
    model = build_model(ModelCard(encoder="resnet18", deep_supervision=True, ds_ensemble=False)).train()
    outs = model(torch.randint(0, 256, (2, 3, 64, 96)))
    assert isinstance(outs, list) and len(outs) == 5  # final + one per earlier decoder block
    assert outs[0].shape == (2, 1, 64, 96)
    assert [o.shape[-2:] for o in outs[1:]] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    from buildseg.losses import DeepSupervisionLoss, parse_loss

    loss = DeepSupervisionLoss(parse_loss("bce+dice"))(outs, torch.zeros(2, 64, 96))
    loss.backward()
    heads = [model.net.head] + list(model.net.aux_heads)
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in heads)


@pytest.mark.parametrize("targets, size", [(["footprint"], (64, 64)), (["footprint", "contact"], (61, 75))])
def test_ds_ensemble_is_the_mean_of_head_probabilities(targets, size):
    """Against each head upsampled on its own (the ensemble folds batch and channels into
    one resize: the same numbers for several images, channels and odd sizes). The heads are
    resized on the grid padded to the encoder's stride, by a whole factor, and the mean cropped
    back: the definition OpenVINO's static and dynamic graphs compute alike."""
    torch.manual_seed(0)
    model = build_model(ModelCard(encoder="resnet18", deep_supervision=True, targets=targets, ds_ensemble=False))
    x = torch.randint(0, 256, (3, 3, *size))
    h, w = size
    hp, wp = -(-h // model.stride) * model.stride, -(-w // model.stride) * model.stride
    padded = torch.nn.functional.pad(x.float(), (0, wp - w, 0, hp - h), mode="reflect")  # the model's own padding
    with torch.no_grad():
        model.eval()
        final = model(x)
        model.ds_ensemble = True
        ensemble = model(x)
        model.training = True  # forward returns every head; BN stays in eval for identical numbers
        heads = model(padded)  # a stride multiple: nothing cropped
        model.training = False
    manual = torch.stack([torch.sigmoid(torch.nn.functional.interpolate(h_, size=(hp, wp), mode="bilinear"))
                          for h_ in heads]).mean(0)[..., :h, :w]
    assert manual.shape == (3, len(targets), *size)
    torch.testing.assert_close(torch.sigmoid(ensemble), manual, atol=1e-5, rtol=1e-4)
    heads = [hd[..., :h, :w] for hd in heads]
    torch.testing.assert_close(final, heads[0])


@pytest.mark.parametrize("batch", [1, 2])  # eval mode: 2 takes the same code path as 8, at a quarter of the cost
@pytest.mark.parametrize("size", [224, 256])
@pytest.mark.slow
def test_seed_unet_runs_at_any_batch_and_size(batch, size):
    model = build_model(ModelCard(arch="seed_unet", encoder="resnet50", dropout=0.2, deep_supervision=False, ds_ensemble=False)).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (batch, 3, size, size))).shape == (batch, 1, size, size)


@pytest.mark.slow
def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    card = ModelCard(encoder="resnet18", norm="group", dropout=0.2, attention="scse", deep_supervision=True, ds_ensemble=False)
    model = build_model(card).eval()
    save_atomic({"format": FORMAT, "model_card": card.to_dict(), "model": model.state_dict()}, tmp_path / "m.pt")
    loaded, _ = load_model(tmp_path / "m.pt")
    x = torch.randint(0, 256, (2, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    torch.load(tmp_path / "m.pt", weights_only=True)


@pytest.mark.slow
def test_decoder_width_scales_the_default_plan_and_old_checkpoints_keep_theirs(tmp_path):
    def widths(model):
        return [block.convs[0][0].out_channels for block in model.net.blocks]

    assert widths(build_model(ModelCard(encoder="resnet18", decoder_width=1.0, deep_supervision=False, ds_ensemble=False))) == [256, 128, 64, 32, 16]
    half = build_model(ModelCard(encoder="resnet18", deep_supervision=True, ds_ensemble=False)).eval()  # the default: 0.5
    assert widths(half) == [128, 64, 32, 16, 8]  # multiples of 8, at least 8
    assert widths(build_model(ModelCard(encoder="resnet18", decoder_width=0.75, deep_supervision=False, ds_ensemble=False))) == [192, 96, 48, 24, 16]
    # explicit channels win over the width
    assert widths(build_model(ModelCard(encoder="resnet18", decoder_channels=[32, 16, 16, 16, 8], decoder_width=0.5, deep_supervision=False, ds_ensemble=False))) == [
        32, 16, 16, 16, 8]
    with torch.no_grad():
        assert half(torch.randint(0, 256, (2, 3, 75, 61))).shape == (2, 1, 75, 61)
    # a checkpoint written before decoder_width existed has no such key: it rebuilds at width 1
    card = ModelCard(encoder="resnet18", decoder_width=1.0, deep_supervision=False, ds_ensemble=False)
    old = card.to_dict()
    del old["decoder_width"]
    model = build_model(card).eval()
    torch.save({"format": FORMAT, "model_card": old, "model": model.state_dict()}, tmp_path / "old.pt")  # no schema: v1
    loaded, _ = load_model(tmp_path / "old.pt")
    assert widths(loaded) == [256, 128, 64, 32, 16]
    with pytest.raises(BuildsegError, match="decoder_width"):
        build_model(ModelCard(encoder="resnet18", decoder_width=0.0, deep_supervision=False, ds_ensemble=False))


def test_local_weights_file_is_loaded_into_the_encoder(tmp_path):
    import timm

    source = timm.create_model("resnet18")
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    encoder = create_encoder("resnet18", 3, str(path))
    assert encoder.weight_report["missing"] == []
    assert set(encoder.weight_report["unused"]) == {"fc.weight", "fc.bias"}
    torch.testing.assert_close(encoder.state_dict()["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    four = create_encoder("resnet18", 4, str(path))  # first conv adapted to 4 bands
    assert four.state_dict()["conv1.weight"].shape[1] == 4


def test_shared_efficientnet_lite0_weights_if_present():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/weights/efficientnet_lite0_imagenet_timm.safetensors"
    if not path.is_file():
        pytest.skip("../shared weights not present (optional real-weights check)")
    encoder = create_encoder("efficientnet_lite0", 3, str(path))
    assert encoder.weight_report["missing"] == []


def test_clear_errors():
    with pytest.raises(BuildsegError, match="resnet34"):
        create_encoder("resnet343")
    model = build_model(ModelCard(encoder="resnet18", deep_supervision=False, ds_ensemble=False)).eval()
    with pytest.raises(BuildsegError, match="too small"):
        model(torch.zeros(1, 3, 8, 64))
    with pytest.raises(BuildsegError, match="expects 3"):
        model(torch.zeros(1, 4, 64, 64))
    with pytest.raises(BuildsegError, match="pyramid"):
        build_model(ModelCard(encoder="vit_tiny_patch16_224", deep_supervision=False, ds_ensemble=False))
    with pytest.raises(BuildsegError, match="decoder_channels"):
        build_model(ModelCard(encoder="resnet18", decoder_channels=[16, 16], deep_supervision=False, ds_ensemble=False))
    with pytest.raises(BuildsegError, match="not found"):
        create_encoder("resnet18", 3, "/nonexistent/weights.safetensors")


@pytest.mark.parametrize("arch", ["smp.Unet", "smp.FPN"])
def test_smp_architectures_through_the_same_wrapper(arch):
    pytest.importorskip("segmentation_models_pytorch")  # the smp extra, installed by `make test`
    model = build_model(ModelCard(arch=arch, encoder="resnet18", deep_supervision=False, ds_ensemble=False)).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 256, (2, 3, 33, 47))).shape == (2, 1, 33, 47)
    with pytest.raises(BuildsegError, match="deep supervision"):
        build_model(ModelCard(arch=arch, encoder="resnet18", deep_supervision=True, ds_ensemble=False))
