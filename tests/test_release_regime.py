"""Training as the release trains (method file §2–§3): one training step against a literal restatement of the
release's model, the frozen backbone's stochastic layers, the adapters' ε and dropouts, the inits."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models.vision_transformer import VisionTransformer

from sa2vp.models import SA2VPSwin, SA2VPViT, build_model, create_backbone, sa2vp_loss
from sa2vp.models.backbones import BackboneError, file_sha256, freeze, set_stochastic_layers
from sa2vp.models.cross_block import RELEASE_NORM_EPS
from sa2vp.models.sa2vp_swin import _project
from sa2vp.settings import BackboneSettings, SA2VPSettings, SettingsError, load_settings
from tests.release_reference import from_sa2vp, trainable_pairs

GRID = (4, 4)
LAMBDA = 0.8


def vit12(dropout: float) -> VisionTransformer:
    """A tiny 12-layer ViT (the release's layer schedule applies unchanged), with the release's stochastic
    layers at `dropout`."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=0)
    set_stochastic_layers(vit, dropout=dropout, drop_path=0.0)
    return freeze(vit)


def model_and_release(dropout: float) -> tuple[SA2VPViT, torch.nn.Module]:
    model = SA2VPViT(vit12(dropout), num_classes=5, settings=SA2VPSettings(dropout=dropout, gamma=0.7, lam=LAMBDA))
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere, so no term can hide behind a zero
        for param in model.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    model.train()
    return model, from_sa2vp(model, dropout).train()


def test_one_training_step_gives_the_release_gradients_with_dropout_off():
    model, release = model_and_release(dropout=0.0)
    assert sorted(model.to_prompt) == [0, 4, 8] and sorted(model.deep) == [4, 8]
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 3, 4])
    ours = model(images)
    base, prompt = release(images)
    torch.testing.assert_close((ours.base, ours.prompt), (base, prompt), rtol=0, atol=1e-5)
    sa2vp_loss(ours, labels, LAMBDA)[0].backward()
    (LAMBDA * F.cross_entropy(base, labels) + (1 - LAMBDA) * F.cross_entropy(prompt, labels)).backward()
    theirs = dict(release.named_parameters())
    pairs = trainable_pairs(model)
    assert set(pairs) == {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            reference = theirs[pairs[name]].grad
            assert param.grad is not None and param.grad.abs().max() > 0, name
            assert (param.grad - reference).abs().max() <= 1e-5, name


def dropout_elements(model: torch.nn.Module, images: torch.Tensor, roles: dict[torch.nn.Module, str]) -> Counter:
    """Elements passed through an active dropout (training, p > 0), summed per role of the dropout module."""
    seen: Counter = Counter()
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, role=role: seen.update(
                {(role, m.p): args[0].numel()} if m.training and m.p > 0 else {}
            )
        )
        for module, role in roles.items()
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return seen


def test_with_dropout_on_the_same_layers_are_stochastic_over_the_same_elements():
    model, release = model_and_release(dropout=0.1)
    vit = model.backbone
    ours = {vit.pos_drop: "embedding"}
    theirs = {release.dropout: "embedding"}
    for i, block in enumerate(vit.blocks):
        ours |= {
            block.mlp.drop1: f"mlp {i}",
            block.mlp.drop2: f"mlp {i}",
            block.attn.proj_drop: f"attention {i}",
            block.attn.attn_drop: f"attention {i}",
            model.cross[i].drop: f"cross {i}",
            model.cross[i].adapter.drop: f"cross {i}",
        }
        layer, cross = release.layer[i], release.cross_attn[i]
        theirs |= {
            layer.ffn.dropout: f"mlp {i}",
            layer.attn.attn_dropout: f"attention {i}",
            layer.attn.proj_dropout: f"attention {i}",
            cross.attn.to_drop: f"cross {i}",
            cross.ffn.dropout: f"cross {i}",
        }
    images = torch.randn(3, 3, 16, 16)
    counted = dropout_elements(model, images, ours)
    assert counted == dropout_elements(release, images, theirs)
    # Every stochastic layer the release has: both embeddings, every MLP (the deep maps' too), every cross
    # block (attention output, adapter twice); attention dropout 0.
    tokens, dim = 1 + GRID[0] * GRID[1], 32
    assert counted[("embedding", 0.1)] == 2 * 3 * tokens * dim
    assert counted[("mlp 4", 0.1)] == 3 * 3 * tokens * (4 * dim + dim)  # base, prompt, deep map: per image
    assert counted[("mlp 5", 0.1)] == 2 * 3 * tokens * (4 * dim + dim)
    assert not any(role.startswith("attention") for role, _ in counted)


def test_with_dropout_on_every_image_gets_its_own_prompt_pathway():
    model, release = model_and_release(dropout=0.1)
    image = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        for net in (model, release):
            torch.manual_seed(0)
            _, prompt = net(image)
            assert not torch.allclose(prompt[0], prompt[1]), type(net).__name__
        model.eval()
        torch.testing.assert_close(model(image)[0], model(image)[1])


def test_evaluation_is_deterministic_and_the_release_output_without_dropout():
    model, release = model_and_release(dropout=0.1)
    model.eval(), release.eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(images), release(images)[0], rtol=0, atol=1e-5)


# --- the backbone's stochastic layers ------------------------------------------------------------------------


def vit_settings(**overrides) -> BackboneSettings:
    tiny = {
        "name": "vit_tiny_patch16_224",
        "weights": "random",
        "img_size": 16,
        "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2},
    }
    return BackboneSettings(**{**tiny, **overrides})


def swin_settings(**overrides) -> BackboneSettings:
    tiny = {
        "name": "swin_tiny_patch4_window7_224",
        "weights": "random",
        "img_size": 32,
        "model_kwargs": {"embed_dim": 16, "depths": [1, 2, 1], "num_heads": [1, 2, 2], "window_size": 4},
    }
    return BackboneSettings(**{**tiny, **overrides})


def drop_paths(model: torch.nn.Module) -> list[float]:
    rates = []
    for module in model.modules():
        if hasattr(module, "drop_path1"):
            pair = [m.drop_prob if isinstance(m, DropPath) else 0.0 for m in (module.drop_path1, module.drop_path2)]
            assert pair[0] == pair[1]
            rates.append(pair[0])
    return rates


def test_a_vit_backbone_gets_the_release_dropout_on_embeddings_and_mlps_only():
    vit = create_backbone(vit_settings())
    assert vit.pos_drop.p == 0.1
    for block in vit.blocks:
        assert block.mlp.drop1.p == block.mlp.drop2.p == 0.1
        assert block.attn.attn_drop.p == block.attn.proj_drop.p == 0.0
    assert drop_paths(vit) == [0.0, 0.0, 0.0]
    assert not vit.training
    other = create_backbone(vit_settings(dropout=0.0, drop_path=0.3))
    assert other.pos_drop.p == 0.0 and drop_paths(other) == pytest.approx([0.0, 0.15, 0.3])


def test_a_swin_backbone_gets_drop_path_rising_to_0_2():
    swin = create_backbone(swin_settings())
    assert drop_paths(swin) == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2])  # 1 + 2 + 1 blocks
    assert all(m.p == 0.0 for m in swin.modules() if isinstance(m, torch.nn.Dropout))


def test_swin_in_training_draws_drop_path_per_image_for_both_pathways():
    settings = load_settings(
        None, {"backbone": swin_settings().model_dump(), "model.sa2vp.gamma": 0.5, "model.sa2vp.dropout": 0.0}
    )
    model = build_model(settings, num_classes=3).train()
    assert isinstance(model, SA2VPSwin) and model.backbone.training
    image = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    torch.manual_seed(3)
    with torch.no_grad():
        out = model(image)
    assert not torch.allclose(out.prompt[0], out.prompt[1])
    assert not torch.allclose(out.base[0], out.base[1])


# --- ε and initialisations -----------------------------------------------------------------------------------


def test_adapters_normalise_with_the_release_epsilon():
    vit = SA2VPViT(vit12(0.0), 3, SA2VPSettings())
    assert RELEASE_NORM_EPS == 1e-6
    assert all(cross.adapter.norm.eps == 1e-6 for cross in vit.cross)
    swin = build_model(load_settings(None, {"backbone": swin_settings().model_dump()}), 3)
    assert all(cross.adapter.norm.eps == 1e-6 for blocks in swin.cross.values() for cross in blocks)


def test_swin_cross_attention_normalises_with_norm1_parameters_at_epsilon_1e6():
    swin = create_backbone(swin_settings())
    block = swin.layers[2].blocks[0]
    assert block.norm1.eps == 1e-5  # timm's; the release's separate norm differs from it
    with torch.no_grad():
        block.norm1.weight.normal_()
        block.norm1.bias.normal_()
    x = torch.randn(2, 2, 2, block.dim) * 3e-3  # variance near ε: 1e-5 and 1e-6 give clearly different outputs
    release_norm = torch.nn.LayerNorm(block.dim, eps=1e-6)
    release_norm.load_state_dict(block.norm1.state_dict())
    (q,) = _project(block, x, "q")
    with torch.no_grad():
        expected = F.linear(
            release_norm(x.flatten(1, 2)), *(t[: block.dim] for t in (block.attn.qkv.weight, block.attn.qkv.bias))
        )
        timm_norm = F.linear(
            block.norm1(x.flatten(1, 2)), block.attn.qkv.weight[: block.dim], block.attn.qkv.bias[: block.dim]
        )
    heads = block.attn.num_heads
    flat = q.transpose(1, 2).reshape(2, 4, block.dim)
    torch.testing.assert_close(flat, expected, rtol=0, atol=1e-5)
    assert (flat - timm_norm).abs().max() > 1e-2, heads


def xavier_bound(layer: torch.nn.Linear) -> float:
    return math.sqrt(6.0 / (layer.in_features + layer.out_features))


def test_vit_inits_are_the_release_xavier_uniform_with_tiny_normal_biases():
    torch.manual_seed(0)
    model = SA2VPViT(
        freeze(VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)),
        3,
        SA2VPSettings(adapter_dim=32, prompt_rank=32),
    )
    layers = [
        model.prompt_map.proj,
        *(m.proj for m in model.deep_maps.values()),
        *(layer for cross in model.cross for layer in (cross.adapter.down, cross.adapter.up)),
    ]
    for layer in layers:
        bound = xavier_bound(layer)
        assert layer.weight.abs().max() <= bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # uniform: std = bound/√3
        assert 0 < layer.bias.abs().max() < 1e-5
    for cross in model.cross:
        assert torch.equal(cross.adapter.norm.weight, torch.ones(64))
        assert torch.equal(cross.adapter.norm.bias, torch.zeros(64))
    assert model.prompt_map.tokens.std().item() == pytest.approx(0.02, rel=0.15)


def test_swin_inits_are_the_release_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    settings = load_settings(
        None,
        {
            "backbone": swin_settings(
                model_kwargs={"embed_dim": 32, "depths": [1, 1, 2], "num_heads": [1, 2, 4], "window_size": 4}
            ).model_dump(),
            "model.sa2vp.prompt_rank": 32,
            "model.sa2vp.adapter_dim": 32,
        },
    )
    model = build_model(settings, 3)
    layers = [
        model.prompt_map.proj,
        *(
            layer
            for blocks in model.cross.values()
            for cross in blocks
            for layer in (cross.adapter.down, cross.adapter.up)
        ),
    ]
    for layer in layers:
        # trunc_normal_(std=0.02) cuts at ±2 (absolute, as timm's and the release's): in effect N(0, 0.02).
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert abs(layer.weight.mean().item()) < 0.005
        assert torch.equal(layer.bias, torch.zeros_like(layer.bias))


# --- a pinned weights file -----------------------------------------------------------------------------------


def test_a_pinned_weights_file_is_verified(tmp_path: Path):
    from safetensors.torch import save_file

    vit = create_backbone(vit_settings())
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    digest = file_sha256(path)
    pinned = vit_settings(weights=str(path), sha256=digest)
    assert isinstance(create_backbone(pinned), VisionTransformer)
    with pytest.raises(BackboneError, match=r"has SHA-256 [0-9a-f]{64}, but backbone.sha256 pins 0{64}"):
        create_backbone(vit_settings(weights=str(path), sha256="0" * 64))
    with pytest.raises(SettingsError, match="sha256 pins a weights file; backbone.weights is 'hub'"):
        load_settings(None, {"backbone.weights": "hub", "backbone.sha256": digest})
    with pytest.raises(SettingsError, match="backbone.sha256"):
        load_settings(None, {"backbone.weights": str(path), "backbone.sha256": "ABC"})
