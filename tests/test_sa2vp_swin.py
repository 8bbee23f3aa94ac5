"""SA²VP on Swin (method file §3): local attention on Swin grids, the release's exact parameter count,
gradient flow, the §3 pseudocode, settings validation, and a short training run on digits."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from timm.models.swin_transformer import SwinTransformer, SwinTransformerStage

from sa2vp.models import BackboneError, SA2VPOutput, SA2VPSwin, build_model, parameter_summary
from sa2vp.models.backbones import freeze
from sa2vp.models.local_attention import spatial_cross_attention
from sa2vp.models.sa2vp_swin import release_blocks, resolve_cross_blocks, stage_grid
from sa2vp.settings import SA2VPSettings, SettingsError, load_settings
from tests.reference import naive_cross_attention, naive_sa2vp_swin_forward
from tests.test_sa2vp_vit import assert_only_sa2vp_parameters_have_gradients

# A Swin small enough for naive references: grids 16×24 → 8×12 → 4×6 → 2×3, window 4 (the 4×6 stage pads
# its width to 8 and shifts by 2 in odd blocks, so timm's padding and shift paths both run).
TINY_SWIN = dict(patch_size=2, embed_dim=16, depths=(1, 1, 3, 1), num_heads=(1, 2, 2, 4), window_size=4)
TINY_IMAGES = (32, 48)
SWIN_RELEASE = dict(prompt_rank=8, adapter_dim=8, gamma=0.5)


def tiny_swin(seed=0, **overrides) -> SwinTransformer:
    torch.manual_seed(seed)
    # timm's Swin defaults to drop-path 0.1; the references here compare deterministic forwards.
    swin = SwinTransformer(img_size=TINY_IMAGES, num_classes=0, drop_path_rate=0.0, **{**TINY_SWIN, **overrides})
    freeze(swin)
    return swin


def tiny_sa2vp_swin(seed=0, **settings) -> SA2VPSwin:
    settings = {**SWIN_RELEASE, "dropout": 0.0, **settings}
    model = SA2VPSwin(tiny_swin(seed), num_classes=5, settings=SA2VPSettings(**settings))
    torch.manual_seed(seed + 1)
    # Non-trivial values everywhere, so no term of the forward pass can hide behind a zero.
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def swin_grids(img_size) -> list[tuple[int, int]]:
    """The stage grids timm's Swin-B builds for `img_size` (meta device: shapes only)."""
    with torch.device("meta"):
        swin = timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0, img_size=img_size)
    assert isinstance(swin, SwinTransformer)
    return [stage_grid(stage) for stage in swin.layers if isinstance(stage, SwinTransformerStage)]


# Swin-B's 224² stages minus the 56×56 one (slow for the naive loop; it is the same code path as 28×28),
# and the non-square grids of a 224×160 input.
GRIDS = swin_grids(224)[1:] + swin_grids((224, 160))[2:]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize(
    "window, head_mode, border", [(3, "multi", "clip"), (5, "single", "zero"), (1, "multi", "clip")]
)
def test_fast_local_attention_matches_the_reference_on_swin_stage_grids(grid, window, head_mode, border):
    assert GRIDS == [(28, 28), (14, 14), (7, 7), (14, 10), (7, 5)]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, grid[0] * grid[1], 4, generator=generator) for _ in range(3))
    upstream = torch.randn(1, grid[0] * grid[1], 8, generator=generator)
    kwargs = dict(grid=grid, window=window, num_prefix=0, border=border, head_mode=head_mode)
    results = []
    for attention in (spatial_cross_attention, naive_cross_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, **kwargs)
        (out * upstream).sum().backward()
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    (fast, fast_grads), (ref, ref_grads) = results
    assert (fast - ref).abs().max() <= 1e-5
    for name, fast_grad, ref_grad in zip("qkv", fast_grads, ref_grads, strict=True):
        assert (fast_grad - ref_grad).abs().max() <= 1e-5, f"gradient of {name}"


def test_swin_b_release_configuration_has_exactly_the_hand_derived_trainable_count():
    with torch.device("meta"):  # shapes are all that is counted; no 88M random initialisation
        swin_b = freeze(timm.create_model("swin_base_patch4_window7_224", pretrained=False, num_classes=0))
    model = SA2VPSwin(swin_b, 100, SA2VPSettings(**SWIN_RELEASE))
    summary = parameter_summary(model)

    tokens, rank, embed = 56 * 56, 8, 128  # prompt map at patch-embedding resolution, 128 channels
    prompt_map = tokens * rank + (rank * embed + embed)
    dim, t = 512, 8  # stage 3 (index 2): 18 blocks of dim 512, one adapter each
    adapter = 2 * dim + (dim * t + t) + (t * dim + dim)  # LN'(512), W_down 512→8, W_up 8→512
    assert (prompt_map, adapter) == (26_240, 9_736)
    assert summary.groups == {"prompt_map": prompt_map, "cross": 18 * adapter}
    assert summary.trainable == 201_488
    assert summary.backbone == 86_743_224
    assert summary.head == 1024 * 100 + 100
    assert round(summary.percent_of_backbone, 3) == 0.232
    assert model.to_prompt == {2: frozenset({0, 6, 12})}
    assert [cross.grid for cross in model.cross["2"]] == [(14, 14)] * 18


def test_gradients_reach_every_sa2vp_parameter_and_no_backbone_parameter():
    model = tiny_sa2vp_swin().train()
    images, labels = torch.randn(3, 3, *TINY_IMAGES), torch.tensor([0, 3, 4])
    model.loss(model(images), labels).total.backward()
    assert_only_sa2vp_parameters_have_gradients(model)


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(window=1, head_mode="single", border="zero"),
        dict(to_prompt_layers=[2]),
        dict(window="global", to_prompt_layers=[1]),
        dict(cross_stages=[1, 2], to_prompt_layers=[0], window=5),
    ],
    # "base-first" and "global": the base reads the prompt while it is still one map for the whole batch.
    ids=["release", "c1-single-zero", "base-first", "global", "two-stages"],
)
def test_forward_matches_the_method_pseudocode(settings):
    model = tiny_sa2vp_swin(**settings).train()
    images = torch.randn(2, 3, *TINY_IMAGES)
    out = model(images)
    ref_base, ref_prompt = naive_sa2vp_swin_forward(model, images)
    assert (out.base - ref_base).abs().max() <= 1e-5
    assert (out.prompt - ref_prompt).abs().max() <= 1e-5
    assert (out.base - out.prompt).abs().max() > 1e-3  # the pathways really differ
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), out.base.detach(), rtol=0, atol=1e-5)


def test_with_gamma_zero_base_logits_are_the_frozen_backbone_through_the_head():
    model = tiny_sa2vp_swin(gamma=0.0).eval()
    images = torch.randn(2, 3, *TINY_IMAGES)
    with torch.no_grad():
        expected = model.head(model.backbone.forward_head(model.backbone.forward_features(images), pre_logits=True))
        torch.testing.assert_close(model(images), expected, rtol=0, atol=1e-6)


def test_train_mode_returns_both_pathways_and_the_lambda_weighted_loss():
    model = tiny_sa2vp_swin(lam=0.7).train()
    out = model(torch.randn(2, 3, *TINY_IMAGES))
    assert isinstance(out, SA2VPOutput) and out.base.shape == out.prompt.shape == (2, 5)
    assert model.backbone.training, "the release trains its frozen backbone in train mode (drop-path acts)"
    target = torch.tensor([1, 4])
    terms = model.loss(out, target)
    base, prompt = F.cross_entropy(out.base, target), F.cross_entropy(out.prompt, target)
    torch.testing.assert_close(terms.total, 0.7 * base + 0.3 * prompt)
    assert set(terms.parts) == {"base", "prompt"}


@pytest.mark.parametrize("depth, blocks", [(18, [0, 6, 12]), (6, [0, 2, 4]), (4, [0, 1]), (2, [0]), (1, [])])
def test_default_blocks_follow_the_release_positions_and_the_last_block_feeds_the_base(depth, blocks):
    assert release_blocks(depth) == blocks


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(cross_stages=[4]), r"model.sa2vp.cross_stages: stage index 4 is out of range; allowed 0..3"),
        (
            dict(to_prompt_layers=[0, 3]),
            r"model.sa2vp.to_prompt_layers: block index 3 is out of range; allowed 0..2 "
            r"for cross stage 2 of depth 3",
        ),
        (dict(cross_stages=[0, 2], to_prompt_layers=[1]), r"allowed 0..0 for cross stage 0 of depth 1"),
        (dict(deep_layers=[1]), r"model.sa2vp.deep_layers: \[1\] is not supported on Swin.*allowed: null or \[\]"),
    ],
)
def test_settings_out_of_range_for_the_swin_name_the_key_and_the_allowed_values(settings, message):
    with pytest.raises(SettingsError, match=message):
        resolve_cross_blocks(SA2VPSettings(**settings), depths=[1, 1, 3, 1])


def test_settings_defaults_and_schema_validation_of_cross_stages():
    assert SA2VPSettings().cross_stages is None
    assert resolve_cross_blocks(SA2VPSettings(deep_layers=[]), [2, 2, 18, 2]) == {2: frozenset({0, 6, 12})}
    assert resolve_cross_blocks(SA2VPSettings(), [2, 6]) == {1: frozenset({0, 2, 4})}  # fewer than 3 stages
    assert load_settings(None, {"model.sa2vp.cross_stages": [2, 1, 2]}).model.sa2vp.cross_stages == [1, 2]
    for bad in ([], [-1]):
        with pytest.raises(SettingsError, match="model.sa2vp.cross_stages: must list at least one stage index"):
            load_settings(None, {"model.sa2vp.cross_stages": bad})


def test_build_model_dispatches_on_the_backbone_family():
    tiny = {"backbone.weights": "random", "backbone.img_size": 32}
    vit = {**tiny, "backbone.name": "vit_tiny_patch16_224", "backbone.model_kwargs": {"depth": 2, "patch_size": 8}}
    with pytest.raises(SettingsError, match="model.sa2vp.cross_stages: Swin backbones only"):
        build_model(load_settings(None, {**vit, "model.sa2vp.cross_stages": [2]}), 10)
    with pytest.raises(BackboneError, match="VisionTransformer.*SwinTransformer"):
        build_model(load_settings(None, {"backbone.name": "resnet18", "backbone.weights": "random"}), 10)


def digits(size: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8×8 digits, upscaled to size×size RGB in [-1, 1]."""
    data = load_digits()
    images = torch.from_numpy(data.images[:count].astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    return images.contiguous(), torch.from_numpy(data.target[:count]).long()


def test_a_short_training_run_on_digits_lowers_the_loss():
    settings = load_settings(
        None,
        {
            "backbone.name": "swin_tiny_patch4_window7_224",
            "backbone.weights": "random",
            "backbone.img_size": 32,
            "backbone.model_kwargs": {**TINY_SWIN, "depths": [1, 1, 2, 1]},
            **{f"model.sa2vp.{key}": value for key, value in SWIN_RELEASE.items()},
        },
    )
    torch.manual_seed(0)
    model = build_model(settings, num_classes=10)
    assert isinstance(model, SA2VPSwin) and model.to_prompt == {2: frozenset({0})}
    images, labels = digits(32, 320)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for step in range(20):
        batch = slice(32 * (step % 10), 32 * (step % 10 + 1))
        terms = model.loss(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()
        losses.append(terms.total.item())
    assert set(terms.parts) == {"base", "prompt"}
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, f"loss went from {first:.3f} to {last:.3f}"
