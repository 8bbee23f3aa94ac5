"""Backbone loading: local safetensors and Google .npz files, random init, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from sa2vp.errors import BackboneError
from sa2vp.models.backbones import create_backbone, weights_digest
from sa2vp.pretraining.backbone_file import save_weights
from sa2vp.settings import BackboneSettings, SettingsError

NAME = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source_vit():
    torch.manual_seed(3)
    return timm.create_model(NAME, pretrained=False, num_classes=0, img_size=64).eval()


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


def test_loads_a_safetensors_file_and_freezes(tmp_path, source_vit):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    loaded = create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64))
    _assert_same_weights(loaded, source_vit)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert weights_digest(loaded) == weights_digest(source_vit)


def test_loads_an_original_google_npz_checkpoint(tmp_path, source_vit):
    path = tmp_path / "ViT-Ti_16.npz"
    np.savez(path, **_google_layout(source_vit))
    loaded = create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64))
    _assert_same_weights(loaded, source_vit)


def test_random_init_differs_from_a_loaded_file(source_vit):
    random = create_backbone(BackboneSettings(name=NAME, weights="random", img_size=64))
    assert weights_digest(random) != weights_digest(source_vit)


@pytest.mark.parametrize(
    "weights, message",
    [
        ("model.pth", "pickled checkpoints are not loaded"),
        ("missing.safetensors", "file not found"),
    ],
)
def test_refuses_pickles_and_missing_files(tmp_path, weights, message):
    path = tmp_path / weights
    if path.suffix == ".pth":
        path.write_bytes(b"not loaded")
    with pytest.raises(SettingsError, match=message):
        create_backbone(BackboneSettings(name=NAME, weights=str(path)))


def test_a_file_for_another_architecture_is_a_clear_error(tmp_path, source_vit):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match="does not fit 'vit_small_patch16_224'"):
        create_backbone(BackboneSettings(name="vit_small_patch16_224", weights=str(path), img_size=64))


@pytest.mark.parametrize("rename", [lambda key: f"model.{key}", lambda key: key.replace("blocks.11.", "blocks.x.")])
def test_a_file_whose_names_do_not_match_is_refused_not_loaded_as_partly_random(tmp_path, source_vit, rename):
    # timm loads non-strictly once the classifier is dropped: without the check, these gave a random backbone
    path = tmp_path / "vit.safetensors"
    save_file({rename(k): v.contiguous() for k, v in source_vit.state_dict().items()}, str(path))
    with pytest.raises(BackboneError, match=r"does not hold \d+ of the \d+ weights .*partly random"):
        create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64))


SMALL = {"patch_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2}


def _materialised(tmp_path, **kwargs):
    """A 4-block ViT saved as `sa2vp backbone materialise` saves one: with the timm name and kwargs it records."""
    model = timm.create_model(NAME, pretrained=False, num_classes=0, img_size=64, **SMALL)
    path = tmp_path / "small.safetensors"
    metadata = {"timm_name": NAME, "model_kwargs": json.dumps(SMALL, sort_keys=True), "img_size": "64"}
    save_weights(model, path, metadata)
    return path


def test_a_file_read_with_its_recorded_network_loads_at_another_image_size_and_drop_path(tmp_path):
    path = _materialised(tmp_path)
    create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64, model_kwargs=SMALL))
    resampled = create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=96, model_kwargs=SMALL))
    assert resampled.pos_embed.shape[1] == 1 + 6 * 6  # timm resamples the position embeddings
    # a training knob among model_kwargs (drop-path layers where the file's network has Identity) is no other network
    stochastic = {**SMALL, "drop_path_rate": 0.1}
    create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64, model_kwargs=stochastic))


@pytest.mark.parametrize("change", [{"depth": 2}, {"num_heads": 4}], ids=["fewer-blocks", "other-head-count"])
def test_a_file_is_refused_for_another_network_than_it_records(tmp_path, change):
    # fewer blocks: the file's extra blocks would be dropped; other heads: the same qkv matrices, read as other
    # heads. Both loaded silently before (timm only logged the unexpected keys).
    path = _materialised(tmp_path)
    with pytest.raises(
        BackboneError, match=r"was written for 'vit_tiny_patch16_224' with model_kwargs .*another network"
    ):
        create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64, model_kwargs={**SMALL, **change}))


def test_a_file_without_a_record_whose_weights_a_smaller_network_would_drop_is_refused(tmp_path):
    model = timm.create_model(NAME, pretrained=False, num_classes=0, img_size=64, **SMALL)
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    fewer = {**SMALL, "depth": 2}
    with pytest.raises(BackboneError, match=r"holds 24 weights that .* has no place for .*blocks\.2\."):
        create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64, model_kwargs=fewer))


def test_a_files_classifier_is_not_counted_as_a_weight_left_over(tmp_path, source_vit):
    path = tmp_path / "with-head.safetensors"
    head = {"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)}
    save_file({**{k: v.contiguous() for k, v in source_vit.state_dict().items()}, **head}, str(path))
    _assert_same_weights(create_backbone(BackboneSettings(name=NAME, weights=str(path), img_size=64)), source_vit)


def test_unknown_model_name_suggests_close_ones():
    with pytest.raises(SettingsError, match="did you mean vit_base_patch16_224"):
        create_backbone(BackboneSettings(name="vit_bse_patch16_224", weights="random"))


def _google_layout(vit) -> dict[str, np.ndarray]:
    """A timm ViT's weights in the layout of Google's original ViT .npz checkpoints."""

    def n(t):
        return t.detach().numpy()

    heads, head_dim = vit.blocks[0].attn.num_heads, vit.blocks[0].attn.head_dim
    dim = vit.embed_dim
    w = {
        "embedding/kernel": n(vit.patch_embed.proj.weight).transpose(2, 3, 1, 0),
        "embedding/bias": n(vit.patch_embed.proj.bias),
        "cls": n(vit.cls_token),
        "Transformer/posembed_input/pos_embedding": n(vit.pos_embed),
        "Transformer/encoder_norm/scale": n(vit.norm.weight),
        "Transformer/encoder_norm/bias": n(vit.norm.bias),
    }
    for i, block in enumerate(vit.blocks):
        p = f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = n(block.norm1.weight), n(block.norm1.bias)
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = n(block.norm2.weight), n(block.norm2.bias)
        qkv_w, qkv_b = n(block.attn.qkv.weight), n(block.attn.qkv.bias)
        for j, part in enumerate(("query", "key", "value")):
            rows = slice(j * dim, (j + 1) * dim)
            w[p + f"MultiHeadDotProductAttention_1/{part}/kernel"] = qkv_w[rows].T.reshape(dim, heads, head_dim)
            w[p + f"MultiHeadDotProductAttention_1/{part}/bias"] = qkv_b[rows].reshape(heads, head_dim)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = (
            n(block.attn.proj.weight).reshape(dim, heads, head_dim).transpose(1, 2, 0)
        )
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = n(block.attn.proj.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = n(fc.weight).T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = n(fc.bias)
    return w
