
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from buildseg.errors import BuildsegError
from buildseg.losses import (
    LOSSES,
    BCELoss,
    DeepSupervisionLoss,
    FocalLoss,
    LovaszHingeLoss,
    dice_loss,
    jaccard_loss,
    parse_loss,
    tversky_loss,
)


def random_pair(seed, b=3, h=9, w=11, empty_first=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, 1, h, w, generator=g, dtype=torch.float64) * 3
    target = (torch.rand(b, 1, h, w, generator=g) < 0.3).double()
    if empty_first:
        target[0] = 0
    return logits, target


def test_bce_matches_torch():
    logits, target = random_pair(0)
    assert BCELoss()(logits, target).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, target).item())
    pw = BCELoss(pos_weight=3.0)(logits, target).item()
    assert pw == pytest.approx(F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(3.0)).item(), rel=1e-6)
    smooth = BCELoss(label_smoothing=0.2)(logits, target).item()
    assert smooth == pytest.approx(F.binary_cross_entropy_with_logits(logits, target * 0.8 + 0.1).item(), rel=1e-6)


def test_balanced_focal_matches_torchvision():
    for seed in range(5):
        logits, target = random_pair(seed)
        ours = FocalLoss(0.25, 2.0, balanced=True)(logits, target).item()
        ref = sigmoid_focal_loss(logits.float(), target.float(), alpha=0.25, gamma=2.0, reduction="mean").item()
        assert ours == pytest.approx(ref, rel=1e-5)


def test_notes_focal_matches_its_formula():
    logits, target = random_pair(1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = torch.exp(-bce)
    expected = (0.5 * (1 - pt) ** 2 * bce).mean().item()
    assert LOSSES["focal_notes"]()(logits, target).item() == pytest.approx(expected, rel=1e-5)


def direct_overlap(logits, target, alpha, beta, smooth, per_image):
    p = torch.sigmoid(logits.double()).numpy()
    g = target.double().numpy()
    groups = [(p[i], g[i]) for i in range(len(p))] if per_image else [(p, g)]
    values = []
    for pi, gi in groups:
        tp, fp, fn = (pi * gi).sum(), (pi * (1 - gi)).sum(), ((1 - pi) * gi).sum()
        values.append((tp + smooth) / (tp + alpha * fp + beta * fn + smooth))
    return 1 - float(np.mean(values))


@pytest.mark.parametrize("reduction", ["image", "batch"])
def test_overlap_losses_match_direct_formulas(reduction):
    per_image = reduction == "image"
    for seed in range(4):
        logits, target = random_pair(seed)
        p = torch.sigmoid(logits).numpy()
        g = target.numpy()
        groups = [(p[i], g[i]) for i in range(len(p))] if per_image else [(p, g)]
        dice_ref = 1 - np.mean([(2 * (a * b).sum() + 1) / (a.sum() + b.sum() + 1) for a, b in groups])
        assert dice_loss(1.0, reduction)(logits, target).item() == pytest.approx(dice_ref, rel=1e-6)
        jac_ref = 1 - np.mean([((a * b).sum() + 1) / (a.sum() + b.sum() - (a * b).sum() + 1) for a, b in groups])
        assert jaccard_loss(1.0, reduction)(logits, target).item() == pytest.approx(jac_ref, rel=1e-6)
        tv = tversky_loss(0.3, 0.7, 1.0, reduction)(logits, target).item()
        assert tv == pytest.approx(direct_overlap(logits, target, 0.3, 0.7, 1.0, per_image), rel=1e-6)
        # Tversky with alpha = beta = 0.5 is Dice
        assert tversky_loss(0.5, 0.5, 0.5, reduction)(logits, target).item() == pytest.approx(
            dice_loss(1.0, reduction)(logits, target).item(), rel=1e-9)


def test_per_image_dice_charges_predictions_on_empty_images():
    target = torch.zeros(2, 1, 8, 8)
    quiet = torch.full((2, 1, 8, 8), -20.0)
    loud = torch.full((2, 1, 8, 8), 20.0)
    assert dice_loss()(quiet, target).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss()(loud, target).item() > 0.95
    assert torch.isfinite(dice_loss(reduction="batch")(quiet, target))


def brute_force_lovasz(errors: np.ndarray, labels: np.ndarray) -> float:
    """Lovasz extension of the Jaccard loss, from its definition, with Delta recomputed
    from scratch for every prefix set of the errors sorted in decreasing order."""
    def delta(wrong: set) -> float:
        pred = labels.copy()
        for i in wrong:
            pred[i] = 1 - pred[i]
        inter = np.sum((pred == 1) & (labels == 1))
        union = np.sum((pred == 1) | (labels == 1))
        return 1.0 - inter / union if union else 0.0

    m = np.maximum(errors, 0)
    order = np.argsort(-m, kind="stable")
    total, previous, chosen = 0.0, 0.0, set()
    for i in order:
        chosen.add(int(i))
        current = delta(chosen)
        total += m[i] * (current - previous)
        previous = current
    return total


def test_lovasz_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        logits = rng.normal(0, 2, n)
        labels = (rng.random(n) < 0.5).astype(np.float64)
        if labels.sum() == 0:
            labels[0] = 1
        ours = LovaszHingeLoss(per_image=False)(torch.tensor(logits).view(1, 1, 1, n), torch.tensor(labels).view(1, 1, 1, n))
        errors = 1 - logits * (2 * labels - 1)
        assert ours.item() == pytest.approx(brute_force_lovasz(errors, labels), abs=1e-5)


def test_lovasz_at_unit_margin_is_a_multiple_of_one_minus_iou():
    """Logits +1 on a predicted set and -1 elsewhere: every right pixel has hinge 0, every
    wrong one hinge 2, so the loss is exactly 2 * (1 - IoU(prediction, truth))."""
    rng = np.random.default_rng(1)
    for _ in range(10):
        truth = (rng.random((1, 1, 6, 7)) < 0.4).astype(np.float64)
        truth.flat[0] = 1
        pred = (rng.random(truth.shape) < 0.5).astype(np.float64)
        iou = np.sum(pred * truth) / np.sum(np.maximum(pred, truth))
        loss = LovaszHingeLoss(per_image=True)(torch.tensor(2 * pred - 1), torch.tensor(truth)).item()
        assert loss == pytest.approx(2 * (1 - iou), abs=1e-6)
        # with wrong pixels at margin 0 (hinge 1) it is exactly 1 - IoU
        logits = np.where(pred == truth, 2 * truth - 1, 0.0)
        assert LovaszHingeLoss()(torch.tensor(logits), torch.tensor(truth)).item() == pytest.approx(1 - iou, abs=1e-6)


def test_symmetric_lovasz_gives_empty_images_a_signal():
    target = torch.zeros(1, 1, 4, 4)
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)
    LovaszHingeLoss(symmetric=True)(logits, target).backward()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("fill", [0.0, 1.0, None])
def test_gradients_finite_everywhere(name, fill):
    logits, target = random_pair(3)
    if fill is not None:
        target = torch.full_like(target, fill)
    logits = logits.float().requires_grad_(True)
    loss = LOSSES[name]()(logits, target.long())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_parse_sums_and_weights():
    logits, target = random_pair(4)
    combo = parse_loss("bce:0.5,dice:2")
    expected = 0.5 * BCELoss()(logits, target) + 2 * dice_loss()(logits, target)
    assert combo(logits, target).item() == pytest.approx(expected.item())
    assert parse_loss("bce+focal").names == ["bce", "focal"]
    mapping = parse_loss({"bce": 1, "focal": {"weight": 2, "gamma": 3.0}})
    assert mapping.weights == [1.0, 2.0] and mapping.terms[1].gamma == 3.0
    for bad in ("bce+nope", "bce:x", "", {"focal": {"nope": 1}}):
        with pytest.raises(BuildsegError):
            parse_loss(bad)


def test_the_notes_shape_error_is_explained():
    loss = parse_loss("bce")
    with pytest.raises(BuildsegError) as info:
        loss(torch.zeros(1, 1, 224, 224), torch.zeros(8, 224, 224))
    message = str(info.value)
    assert "(1, 1, 224, 224)" in message and "(8, 1, 224, 224)" in message and "expected" in message


def test_deep_supervision_loss_upsamples_aux_heads():
    target = (torch.rand(2, 32, 32) > 0.5).float()
    outputs = [torch.randn(2, 1, 32, 32, requires_grad=True), torch.randn(2, 1, 16, 16, requires_grad=True),
               torch.randn(2, 1, 8, 8, requires_grad=True)]
    loss = DeepSupervisionLoss(parse_loss("bce+dice"))
    for tgt in (target, target[:, None]):
        value = loss(outputs, tgt)
        value.backward()
        assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
    assert len(loss.head_values) == 3
    with pytest.raises(BuildsegError):
        DeepSupervisionLoss(parse_loss("bce"), [1.0])(outputs, target)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_trains_a_tiny_model_fp32_and_bf16(name):
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16)
    y = (x[:, :1] > 0.5).float()
    for dtype in (None, torch.bfloat16):
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        loss_fn = LOSSES[name]()
        for _ in range(5):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                out = net(x)
            loss = loss_fn(out, y)
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
