"""Model factory shapes per architecture and input mode; loss terms, ignored label, gradients."""

import numpy as np
import pytest
import torch

from wmloc_utils.networks import ARCHITECTURES, SegLoss, build_model, label_skeleton, skeleton_recall


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("in_channels", [1, 2])
def test_factory_output_shape(name, in_channels):
    if name == "unetr":
        pytest.importorskip("einops", reason="UNETR needs einops")
    over = {"img_size": (32, 32, 32)} if name == "unetr" else {}
    model = build_model(name, in_channels, 3, **over).eval()
    with torch.no_grad():
        out = model(torch.randn(1, in_channels, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_training_step_reaches_every_weight(name):
    if name == "unetr":
        pytest.importorskip("einops", reason="UNETR needs einops")
    model = build_model(name, 2, 2, **({"img_size": (32, 32, 32)} if name == "unetr" else {}))
    loss = SegLoss()(model(torch.randn(2, 2, 32, 32, 32)), torch.randint(0, 2, (2, 1, 32, 32, 32)))
    loss.backward()
    # MONAI's ViT blocks hold cross-attention norms that self-attention never uses
    missed = [k for k, p in model.named_parameters() if p.grad is None and "cross_attn" not in k]
    assert torch.isfinite(loss) and not missed
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_factory_rejects_unknown_name_and_applies_overrides():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("vnet", 1, 2)
    small = sum(p.numel() for p in build_model("unet", 1, 2).parameters())
    big = sum(p.numel() for p in build_model("unet", 1, 2, channels=(32, 64, 128, 256)).parameters())
    assert big > 3 * small
    with pytest.raises(ValueError, match="segresnet .*has no option 'channels'.*init_filters"):
        build_model("segresnet", 1, 2, channels=(32, 64, 128, 256))


def test_multiresunet_blocks_follow_the_paper():
    """Ibtehaz & Rahman 2020: MultiRes widths W/6, W/3, W/2 of W = alpha * U; ResPaths of length 4, 3, 2, 1."""
    from wmloc_utils.multiresunet import multires_widths

    model = build_model("multiresunet", 2, 3, base_filters=32, depth=4, norm="batch")
    assert [len(path) for path in model.res_paths] == [4, 3, 2, 1]
    assert [conv.conv.out_channels for conv in model.encoder[0].convs] == [8, 17, 26]  # W = 1.67 * 32 = 53.4
    assert model.encoder[0].shortcut.conv.kernel_size == (1, 1, 1)
    assert [sum(multires_widths(32 * 2**i, 1.67)) for i in range(5)] == [51, 105, 212, 426, 853]
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    small = build_model("multiresunet", 1, 2, depth=2, dropout=0.2)
    assert sum(isinstance(m, torch.nn.Dropout) for m in small.modules()) == 5  # after every MultiRes block
    small.eval()
    with torch.no_grad():
        assert small(torch.randn(1, 1, 12, 8, 4)).shape == (1, 2, 12, 8, 4)
    with pytest.raises(ValueError, match="multiresunet .*has no option 'channels'.*base_filters"):
        build_model("multiresunet", 1, 2, channels=(8, 16))


def _tube():
    lab = np.zeros((24, 24, 24), np.int16)
    lab[6:18, 10:13, 10:13] = 1  # a thin bar
    lab[4:8, 4:8, 4:8] = 2  # "other pathology"
    return lab


def test_skeleton_inside_class_and_ignores_label():
    lab = _tube()
    sk = label_skeleton(lab, n_classes=2, ignore_label=2)
    assert sk.any() and set(np.unique(sk)) == {0, 1}
    assert np.all(lab[sk == 1] == 1)
    assert (sk == 1).sum() < (lab == 1).sum()


def test_perfect_prediction_skeleton_recall_one_and_zero_term():
    lab = _tube()
    lab[lab == 2] = 0
    target = torch.from_numpy(lab)[None, None].long()
    skel = torch.from_numpy(label_skeleton(lab, 2))[None, None]
    logits = 50.0 * torch.nn.functional.one_hot(target[:, 0], 2).movedim(-1, 1).float()
    assert skeleton_recall(torch.softmax(logits, 1), skel).item() == pytest.approx(1.0, abs=1e-5)
    terms = SegLoss().terms(logits, target, skel)
    assert terms["skeleton"].item() < 1e-5 and terms["dice"].item() < 1e-3 and terms["ce"].item() < 1e-3
    # predicting background everywhere misses the whole skeleton
    assert SegLoss().terms(-logits, target, skel)["skeleton"].item() == pytest.approx(1.0, abs=1e-5)


def test_gradient_flows_through_all_terms():
    lab = _tube()
    target = torch.from_numpy(lab)[None, None].long()
    skel = torch.from_numpy(label_skeleton(lab, 2, ignore_label=2))[None, None]
    logits = torch.randn(1, 2, 24, 24, 24, requires_grad=True)
    for w in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:
        logits.grad = None
        SegLoss(*w, ignore_label=2)(logits, target, skel).backward()
        assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_skeleton_term_of_weight_zero_is_not_computed_and_changes_nothing():
    """Region training switches the skeleton term off (weight 0): it is skipped, with the same loss and gradients."""
    lab = _tube()
    target = torch.from_numpy(lab)[None, None].long()
    skel = torch.from_numpy(label_skeleton(lab, 2, ignore_label=2))[None, None]
    logits = torch.randn(1, 2, 24, 24, 24, requires_grad=True)
    off = SegLoss(1.0, 1.0, 0.0, ignore_label=2)
    terms = off.terms(logits, target, skel)
    assert terms["skeleton"].item() == 0.0  # not computed (a real skeleton term here is far from 0)
    assert SegLoss(1.0, 1.0, 1.0, ignore_label=2).terms(logits, target, skel)["skeleton"].item() > 0.1
    off.total(terms).backward()
    skipped = logits.grad.clone()
    logits.grad = None
    on = SegLoss(1.0, 1.0, 1.0, ignore_label=2).terms(logits, target, skel)
    (on["ce"] + on["dice"]).backward()
    torch.testing.assert_close(skipped, logits.grad, rtol=0, atol=0)
    glob = off.global_terms(logits, target, skel, lambda sums: sums)
    assert glob["skeleton"].item() == 0.0 and glob["dice"].item() == pytest.approx(terms["dice"].item(), abs=1e-6)


def test_label_2_is_ignored_in_the_loss():
    lab = _tube()
    target = torch.from_numpy(lab)[None, None].long()
    skel = torch.from_numpy(label_skeleton(lab, 2, ignore_label=2))[None, None]
    logits = torch.randn(1, 2, 24, 24, 24)
    loss = SegLoss(ignore_label=2)
    base = loss(logits, target, skel)
    changed = logits.clone()
    changed[:, :, 4:8, 4:8, 4:8] = torch.randn(1, 2, 4, 4, 4) * 10  # only inside label 2
    assert loss(changed, target, skel).item() == pytest.approx(base.item(), abs=1e-5)
    # without ignoring, the same change moves the loss
    plain = SegLoss()
    t01 = target.clamp(max=1)
    assert abs(plain(changed, t01, skel).item() - plain(logits, t01, skel).item()) > 1e-3
