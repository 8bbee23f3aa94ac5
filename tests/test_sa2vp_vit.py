"""SA²VP on ViT: exact parameter counts, gradient flow, the γ = 0 identity and the §2 pseudocode."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from sa2vp.models import AdaptedModel, SA2VPOutput, SA2VPViT, parameter_summary, sa2vp_loss
from sa2vp.models.backbones import BackboneError, freeze
from sa2vp.models.sa2vp_vit import release_layers
from sa2vp.settings import SA2VPSettings
from tests.reference import naive_sa2vp_forward


def tiny_vit(img_size=(32, 48), depth=4, seed=0) -> VisionTransformer:
    torch.manual_seed(seed)
    vit = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=32, depth=depth, num_heads=2, num_classes=0)
    freeze(vit)
    return vit


def tiny_sa2vp(seed=0, depth=4, **settings) -> SA2VPViT:
    settings.setdefault("dropout", 0.0)
    model = SA2VPViT(tiny_vit(depth=depth, seed=seed), num_classes=5, settings=SA2VPSettings(**settings))
    torch.manual_seed(seed + 1)
    # Non-trivial values everywhere, so no term of the forward pass can hide behind a zero.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def vit_b16() -> VisionTransformer:
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    assert isinstance(vit, VisionTransformer)
    freeze(vit)
    return vit


def test_vit_b16_release_configuration_has_exactly_372912_trainable_parameters(vit_b16):
    model = SA2VPViT(vit_b16, 100, SA2VPSettings(prompt_rank=16, adapter_dim=16, deep_layers=[4, 8]))
    summary = parameter_summary(model)
    assert summary.backbone == 85_798_656
    assert summary.trainable == 372_912
    assert summary.groups == {
        "prompt_map": 3_152 + 13_056,
        "deep_maps": 6_304 + 26_112,
        "deep_scales": 1_536,
        "cross": 12 * 26_896,
    }
    assert summary.head == 768 * 100 + 100


@pytest.mark.parametrize("rank, percent", [(8, 0.235), (16, 0.433), (32, 0.826), (64, 1.60)])
def test_vit_b16_parameter_share_matches_the_release_printout(vit_b16, rank, percent):
    model = SA2VPViT(vit_b16, 10, SA2VPSettings(prompt_rank=rank, adapter_dim=rank))
    n = parameter_summary(model).trainable
    assert round(100 * n / (85_798_656 + n), 3 if percent < 1 else 2) == percent  # the release prints n/(N+n)


def test_gradients_reach_every_sa2vp_parameter_and_no_backbone_parameter():
    model = tiny_sa2vp(window=3).train()
    images, labels = torch.randn(3, 3, 32, 48), torch.tensor([0, 3, 4])
    loss, _, _ = sa2vp_loss(model(images), labels, lam=0.8)
    loss.backward()
    assert_only_sa2vp_parameters_have_gradients(model)


def assert_only_sa2vp_parameters_have_gradients(model: AdaptedModel) -> None:
    """After a backward pass: a non-zero gradient on every trainable tensor, none on the frozen backbone."""
    for name, param in model.backbone.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    for name, param in trainable.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"


def test_with_gamma_zero_base_logits_are_the_frozen_backbone_through_the_head():
    model = tiny_sa2vp(gamma=0.0).eval()
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        expected = model.head(model.backbone.forward_head(model.backbone.forward_features(images), pre_logits=True))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        dict(window=3),
        dict(window=1, head_mode="single", border="zero"),
        dict(window=5, deep_layers=[1, 2, 3], to_prompt_layers=[1, 3], gamma=1.5),
        dict(window="global", deep_layers=[]),
    ],
    ids=["release", "c1-single-zero", "custom-layers", "global-shallow"],
)
def test_forward_matches_the_method_pseudocode(settings):
    model = tiny_sa2vp(**settings).train()
    images = torch.randn(2, 3, 32, 48)
    out = model(images)
    ref_base, ref_prompt = naive_sa2vp_forward(model, images)
    assert (out.base - ref_base).abs().max() <= 1e-5
    assert (out.prompt - ref_prompt).abs().max() <= 1e-5
    assert (out.base - out.prompt).abs().max() > 1e-3  # the pathways really differ


def test_train_mode_returns_both_pathways_and_eval_mode_the_base_logits():
    model = tiny_sa2vp()
    images = torch.randn(2, 3, 32, 48)
    out = model.train()(images)
    assert isinstance(out, SA2VPOutput) and out.base.shape == out.prompt.shape == (2, 5)
    assert model.backbone.training, "the release trains its frozen backbone in train mode (its dropout acts)"
    model.backbone_dropout = False
    assert not model.train().backbone.training, "backbone_dropout off: the backbone stays in eval mode"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), model.train()(images).base)


def test_loss_weights_the_two_pathways_with_lambda():
    output = SA2VPOutput(torch.randn(4, 3), torch.randn(4, 3))
    target = torch.tensor([0, 1, 2, 1])
    base, prompt = F.cross_entropy(output.base, target), F.cross_entropy(output.prompt, target)
    total, base_loss, prompt_loss = sa2vp_loss(output, target, lam=0.8)
    torch.testing.assert_close(total, 0.8 * base + 0.2 * prompt)
    torch.testing.assert_close((base_loss, prompt_loss), (base, prompt))
    torch.testing.assert_close(sa2vp_loss(output, target, lam=1.0)[0], base)


@pytest.mark.parametrize(
    "depth, to_prompt, deep",
    [(12, [0, 4, 8], [4, 8]), (24, [0, 8, 16], [8, 16]), (6, [0, 2, 4], [2, 4]), (4, [0, 1, 3], [1, 3])],
)
def test_default_layer_sets_follow_the_release_positions(depth, to_prompt, deep):
    model = tiny_sa2vp(depth=depth)
    assert sorted(model.to_prompt) == to_prompt and sorted(model.deep) == deep
    assert release_layers((0, 4, 8), 12) == [0, 4, 8]


def test_works_on_any_vit_size_and_patch():
    vit = freeze(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=64, patch_size=16))
    model = SA2VPViT(vit, 7, SA2VPSettings()).eval()
    assert model.grid == (4, 4)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_rejects_a_backbone_that_is_not_a_vit():
    resnet = timm.create_model("resnet18", pretrained=False, num_classes=0)
    with pytest.raises(BackboneError, match="VisionTransformer"):
        SA2VPViT(resnet, 10, SA2VPSettings())
