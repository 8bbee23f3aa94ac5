"""The baseline methods of paper Tab. 1 (linear, full, VPT-shallow/deep, LoRA, AdaptFormer) and SA²VP's
"w/o prompt adapter" ablation: which parameters train, zero-initialised starts, VPT's prompt replacement, exact
ViT-B/16 parameter counts derived by hand, artifact round trips, and one real epoch per method."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sa2vp.data import read_split, split_dir
from sa2vp.engine import evaluate, fit, load_artifact
from sa2vp.engine.artifact import FORMAT, ArtifactRecord, build_seeded, save_artifact
from sa2vp.models import METHODS, BackboneError, build_model, parameter_summary, search_space
from sa2vp.models.backbones import data_config, freeze, weights_digest
from sa2vp.models.cross_block import SpatialCrossBlock
from sa2vp.models.methods.linear import LinearProbe
from sa2vp.settings import (
    Choice,
    ModelSettings,
    SA2VPSettings,
    Settings,
    SettingsError,
    flatten_settings,
    load_settings,
)
from tests.train_fixtures import TINY_PARAMS, digits_root, project, tiny_settings  # noqa: F401  (fixtures)

NUM_CLASSES = 5
TINY_VIT = {
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.weights": "random",
    "backbone.img_size": 16,
    "backbone.model_kwargs": TINY_PARAMS["backbone"]["model_kwargs"],
}  # 4×4 grid, d = 32, 2 blocks
TINY_SWIN = {
    "backbone.name": "swin_tiny_patch4_window7_224",
    "backbone.weights": "random",
    "backbone.img_size": 32,
    "backbone.model_kwargs": {"embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2], "window_size": 4},
}
BASELINES = ["linear", "full", "vpt-shallow", "vpt-deep", "lora", "adaptformer"]
ALL = ["sa2vp", *BASELINES]


def tiny(method: str, backbone: dict[str, Any] = TINY_VIT, **overrides: Any) -> Settings:
    return load_settings(None, {**backbone, "model.method": method, **overrides})


def build(method: str, backbone: dict[str, Any] = TINY_VIT, seed: int = 0, **overrides: Any):
    return build_seeded(
        load_settings(None, {**backbone, "model.method": method, "train.seed": seed, **overrides}), NUM_CLASSES
    )


def batch(backbone: dict[str, Any] = TINY_VIT, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = backbone["backbone.img_size"]
    images = torch.randn(size, 3, side, side, generator=generator)
    return images, torch.arange(size) % NUM_CLASSES


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every trainable tensor off its initial value (zero-initialised ones included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


# --- registry, settings, search spaces -----------------------------------------------------------------------


def test_the_registry_and_the_settings_schema_list_the_same_methods():
    assert set(METHODS) == set(get_args(ModelSettings.model_fields["method"].annotation)) == set(ALL)
    assert set(search_space("sa2vp")) == {"model.sa2vp.gamma", "model.sa2vp.lam", "model.sa2vp.window", "train.lr"}


@pytest.mark.parametrize("method", ALL)
def test_every_method_tunes_its_learning_rate(method):
    # A fair comparison tunes every method's step size, each over its own space.
    assert "train.lr" in search_space(method)


@pytest.mark.parametrize("method", ALL)
def test_every_search_space_applies_through_dotted_keys_as_tuning_does(method):
    space = search_space(method)
    assert space, f"{method} has nothing to tune"
    chosen = {key: dim.choices[-1] if isinstance(dim, Choice) else dim.high for key, dim in space.items()}
    base = tiny(method)
    # What tuning's objective does: the flattened settings, then the trial's choices, as dotted overrides.
    trial = load_settings(None, {**flatten_settings(base), **chosen})
    flat = flatten_settings(trial)
    assert {key: flat[key] for key in chosen} == chosen
    assert trial.model.method == method


def test_nested_method_settings_come_from_overrides_environment_and_files(tmp_path, monkeypatch):
    assert tiny("vpt-deep", **{"model.vpt.tokens": 50}).model.vpt.tokens == 50
    monkeypatch.setenv("SA2VP_MODEL__LORA__RANK", "16")
    params = tmp_path / "params.yaml"
    params.write_text("model:\n  method: adaptformer\n  adaptformer:\n    dim: 8\n    scale: 0.5\n")
    settings = load_settings(params, {"model.adaptformer.scale": 0.25})
    assert (settings.model.lora.rank, settings.model.adaptformer.dim, settings.model.adaptformer.scale) == (16, 8, 0.25)
    defaults = ModelSettings()
    assert (defaults.vpt.tokens, defaults.vpt.dropout, defaults.sa2vp.prompt_adapter) == (10, 0.1, True)
    assert (defaults.lora.rank, defaults.lora.alpha, defaults.lora.dropout, defaults.lora.targets) == (
        8,
        8,
        0.0,
        ["qkv"],
    )
    assert (defaults.adaptformer.dim, defaults.adaptformer.scale, defaults.adaptformer.dropout) == (64, 0.1, 0.1)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        (
            "model.method",
            "vpt",
            "model.method: Input should be 'sa2vp', 'linear', 'full', 'vpt-shallow', 'vpt-deep', "
            "'lora' or 'adaptformer'",
        ),
        ("model.vpt.tokens", 0, "model.vpt.tokens: Input should be greater than or equal to 1"),
        ("model.vpt.token", 5, "model.vpt.token: unknown setting"),
        ("model.lora.rank", 0, "model.lora.rank: Input should be greater than or equal to 1"),
        ("model.lora.targets", [], "model.lora.targets: List should have at least 1 item"),
        ("model.adaptformer.dropout", 1.0, "model.adaptformer.dropout: Input should be less than 1"),
        ("model.sa2vp.prompt_adapter", "maybe", "model.sa2vp.prompt_adapter: Input should be a valid boolean"),
    ],
)
def test_invalid_method_settings_name_the_key(key, value, expected):
    with pytest.raises(SettingsError) as error:
        load_settings(None, {key: value})
    assert expected in str(error.value)


def test_build_errors_name_the_setting_and_what_is_allowed():
    with pytest.raises(BackboneError, match=r"backbone.name='swin_tiny.*vpt-\* supports ViT backbones"):
        build_model(tiny("vpt-deep", TINY_SWIN), NUM_CLASSES)
    with pytest.raises(
        SettingsError, match="model.lora.targets: 'query' names no nn.Linear .* allowed: fc1, fc2, proj, qkv"
    ):
        build_model(tiny("lora", **{"model.lora.targets": ["qkv", "query"]}), NUM_CLASSES)


def test_no_model_module_imports_peft_at_import_time():
    """peft imports transformers (seconds): only LoRA's build may import it, so `sa2vp --help` stays fast."""
    import sa2vp.models

    for path in Path(sa2vp.models.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only, not inside functions
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m and m.split(".")[0] in ("peft", "transformers") for m in modules), path


# --- what trains ---------------------------------------------------------------------------------------------


def intended(method: str, name: str) -> bool:
    """Whether parameter `name` is one `method` trains (the head always is)."""
    if name.startswith("head."):
        return True
    return {
        "linear": False,
        "full": name.startswith("backbone."),
        "vpt-shallow": name == "prompts",
        "vpt-deep": name == "prompts",
        "lora": name.startswith("backbone.") and (".lora_A." in name or ".lora_B." in name),
        "adaptformer": name.startswith("adapters."),
    }[method]


@pytest.mark.parametrize(
    "method, backbone",
    [(m, TINY_VIT) for m in BASELINES] + [(m, TINY_SWIN) for m in BASELINES if not m.startswith("vpt")],  # ViT only
    ids=[f"{m}-vit" for m in BASELINES] + [f"{m}-swin" for m in BASELINES if not m.startswith("vpt")],
)
def test_exactly_the_intended_parameters_train_and_get_gradients(method, backbone):
    model = build(method, backbone).train()
    names = dict(model.named_parameters())
    assert trainable_names(model) == {n for n in names if intended(method, n)}
    images, labels = batch(backbone)
    model.loss(model(images), labels).total.backward()
    for name, param in names.items():
        assert (param.grad is not None) == param.requires_grad, name
    # Zero-initialised up-projections: B of LoRA and W_up of AdaptFormer get a gradient at once, the factor in
    # front of them none yet (exactly zero) — the signature of starting at the frozen backbone.
    zero_at_start = {"lora": ".lora_A.", "adaptformer": ".down."}.get(method)
    for name in trainable_names(model):
        first = names[name].grad
        assert (first.abs().sum() == 0) == (zero_at_start is not None and zero_at_start in name), name
    # After one step every trained tensor gets a gradient.
    torch.optim.SGD(model.trainable_parameters(), lr=0.1).step()
    model.zero_grad()
    model.loss(model(images), labels).total.backward()
    for name in trainable_names(model):
        assert names[name].grad.abs().sum() > 0, f"{name}: no gradient after one step"


# Learning rates that take 8 AdamW steps somewhere on the tiny models (full fine-tuning moves every weight).
LEARNING_RATES = {"full": 3e-3, "sa2vp-no-adapter": 3e-3}


@pytest.mark.parametrize("method", [*ALL, "sa2vp-no-adapter"])
def test_training_the_methods_own_parameters_lowers_the_loss(method: str) -> None:
    """A few AdamW steps on a fixed batch; for all but the linear probe the head stays frozen, so only the
    method's own parameters (prompts, LoRA factors, adapters, the backbone) can lower the loss."""
    overrides: dict[str, Any] = {}
    if method.startswith("sa2vp"):
        # Depth 2 scales the release's TO_PROMPT {0, 4, 8} to {0, 1}: the base (what eval predicts with) would
        # never read the prompt. Let it read the prompt at layer 1.
        overrides["model.sa2vp.to_prompt_layers"] = [0]
    if method == "sa2vp-no-adapter":  # the raw attended output moves the base less than an adapter: γ = 1
        overrides.update({"model.sa2vp.prompt_adapter": False, "model.sa2vp.gamma": 1.0})
    model = build(method.removesuffix("-no-adapter"), **overrides)
    if method != "linear":
        # A frozen head of the usual N(0, 0.02) would make every logit ≈ 0 whatever the features: give it scale.
        torch.nn.init.normal_(model.head.weight, std=0.5)
        model.head.requires_grad_(False)
    images, labels = batch(size=16)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=LEARNING_RATES.get(method, 3e-2))

    def eval_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.eval()(images), labels).item()

    before = eval_loss()
    for _ in range(8):
        model.train()
        optimizer.zero_grad()
        model.loss(model(images), labels).total.backward()
        optimizer.step()
    after = eval_loss()
    print(f"{method}: {before:.3f} -> {after:.3f}")
    assert after < 0.95 * before


@pytest.mark.parametrize("method", ALL)
def test_eval_is_deterministic_and_dropout_acts_in_training_only(method):
    dropouts = {
        "model.vpt.dropout": 0.5,
        "model.lora.dropout": 0.5,
        "model.adaptformer.dropout": 0.5,
        "model.sa2vp.dropout": 0.5,
        "model.sa2vp.to_prompt_layers": [0],
    }  # SA²VP: the base reads the prompt at layer 1
    model = build(method, **dropouts)
    perturb(model)  # LoRA's B and AdaptFormer's W_up start at zero, which would hide their dropout
    images, _ = batch()
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(images), model(images))
        model.train()
        # model.backbone_dropout: auto — each method's reference code (method file §2)
        assert model.backbone.training == (method in ("sa2vp", "vpt-shallow", "vpt-deep", "full"))
        if method in ("linear", "full"):
            return  # no dropout of their own (the tiny ViT's drop rates are 0)
        first, second = model(images), model(images)
        first, second = (getattr(out, "base", out) for out in (first, second))
        assert not torch.equal(first, second), "dropout does not act in training mode"


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("setting", ["on", "off"])
def test_every_method_honours_backbone_dropout(method, setting):
    model = build(method, **{"model.backbone_dropout": setting, "model.sa2vp.to_prompt_layers": [0]})
    assert model.train().backbone.training == (setting == "on")
    assert not model.eval().backbone.training
    images, _ = batch()
    model.train()
    with torch.no_grad():  # the backbone's own dropout (0.1 on a ViT by default) alone makes training stochastic
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout) and not any(module is m for m in model.backbone.modules()):
                module.p = 0.0
        first, second = (getattr(out, "base", out) for out in (model(images), model(images)))
    assert torch.equal(first, second) == (setting == "off")


# --- method specifics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "adaptformer"])
@pytest.mark.parametrize("backbone", [TINY_VIT, TINY_SWIN], ids=["vit", "swin"])
def test_zero_initialised_methods_start_exactly_at_the_frozen_backbone(method, backbone):
    model = build(method, backbone).eval()
    probe = build("linear", backbone).eval()  # same seed: the same random backbone weights
    assert isinstance(probe, LinearProbe)
    images, _ = batch(backbone)
    with torch.no_grad():
        assert torch.equal(model(images), model.head(probe.features(images)))
    # Its digest and size are the backbone's own, whatever was injected (peft renames the wrapped weights).
    assert weights_digest(model.backbone, model.backbone_name) == weights_digest(probe.backbone)
    assert parameter_summary(model).backbone == parameter_summary(probe).backbone


@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("registers", [0, 2])
def test_vpt_inserts_prompts_after_the_prefix_and_deep_replaces_them(deep: bool, registers: int) -> None:
    kwargs = {**TINY_VIT["backbone.model_kwargs"], "reg_tokens": registers, "depth": 3}
    overrides: dict[str, Any] = {"backbone.model_kwargs": kwargs, "model.vpt.tokens": 3}
    model = build("vpt-deep" if deep else "vpt-shallow", **overrides).eval()
    perturb(model)
    prefix, patches, p = 1 + registers, 16, 3
    inputs: list[torch.Tensor] = []
    hooks = [block.register_forward_pre_hook(lambda _, args: inputs.append(args[0])) for block in model.backbone.blocks]
    hooks.append(model.backbone.norm.register_forward_pre_hook(lambda _, args: inputs.append(args[0])))
    images, _ = batch()
    with torch.no_grad():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    *blocks, final = inputs
    assert [x.shape[1] for x in blocks] == [prefix + p + patches] * 3  # constant: replaced, never accumulated
    assert final.shape[1] == prefix + patches  # prompts dropped before the final norm and pooling
    prompts = model.prompts.expand(len(blocks), -1, -1) if not deep else model.prompts
    for i, x in enumerate(blocks):
        slots = x[:, prefix : prefix + p]
        fresh = torch.equal(slots, prompts[i].expand_as(slots))
        assert fresh == (i == 0 or deep), f"layer {i}"
    assert model.prompts.shape == ((3 if deep else 1), p, 32)
    # The image tokens entering layer 0 are the backbone's own embedding, untouched by the prompts.
    vit = model.backbone
    with torch.no_grad():
        embedded = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    assert torch.equal(blocks[0][:, :prefix], embedded[:, :prefix])
    assert torch.equal(blocks[0][:, prefix + p :], embedded[:, prefix:])
    assert logits.shape == (8, NUM_CLASSES)


def test_lora_dropout_inside_the_frozen_backbone_acts_in_training():
    model = build("lora", **{"model.lora.dropout": 0.5})
    model.train()
    dropouts = [m for name, m in model.backbone.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(d.training for d in dropouts) and not model.backbone.blocks[0].attn.qkv.base_layer.training
    model.eval()
    assert not any(d.training for d in dropouts)


def test_prompt_adapter_off_returns_the_attended_output_without_the_residual():
    torch.manual_seed(0)
    grid, dim, heads = (4, 4), 8, 2

    def cross_block(adapter_dim: int | None) -> SpatialCrossBlock:
        return SpatialCrossBlock(
            dim=dim,
            num_heads=heads,
            grid=grid,
            num_prefix=1,
            window=3,
            border="clip",
            head_mode="multi",
            adapter_dim=adapter_dim,
            activation="gelu",
            dropout=0.0,
        ).eval()

    without, with_adapter = cross_block(None), cross_block(4)
    assert without.adapter is None and not list(without.parameters())
    q, k, v = (torch.randn(2, heads, 17, dim // heads) for _ in range(3))
    proj = torch.nn.Linear(dim, dim)
    state = torch.randn(2, 17, dim)
    attended = without(q, k, v, torch.zeros_like(state), proj)
    assert torch.equal(without(q, k, v, state, proj), attended)  # h plays no part
    expected = with_adapter.adapter(attended + state)  # the adapter variant: Adapter(A + h), same A
    assert torch.allclose(with_adapter(q, k, v, state, proj), expected, atol=1e-6)


def test_prompt_adapter_off_on_swin_builds_no_adapters_and_trains():
    model = build("sa2vp", TINY_SWIN, **{"model.sa2vp.prompt_adapter": False}).train()
    assert all(block.adapter is None for blocks in model.cross.values() for block in blocks)
    assert set(parameter_summary(model).groups) == {"prompt_map"}
    images, labels = batch(TINY_SWIN)
    model.loss(model(images), labels).total.backward()
    assert model.prompt_map.tokens.grad.abs().sum() > 0


# --- ViT-B/16 parameter counts, by hand ----------------------------------------------------------------------

L, D, BACKBONE = 12, 768, 85_798_656
EXPECTED_VIT_B = {
    "linear": {},
    "full": {"backbone": BACKBONE},
    "vpt-shallow": {"prompts": 10 * D},  # p = 10 tokens at the input
    "vpt-deep": {"prompts": 10 * D * L},  # p = 10 tokens before every layer
    "lora": {"lora": L * (8 * D + 3 * D * 8)},  # A: r×d, B: 3d×r on the fused qkv (no biases)
    "adaptformer": {"adapters": L * ((D * 64 + 64) + (64 * D + D))},  # down d→64, up 64→d, with biases
    # SA²VP release configuration without the twelve prompt adapters (r = 16, DEEP = {4, 8}, §2's count less the
    # adapters): the prompt map U_0·W_0 + b_0, two deep maps, their scales e_k.
    "sa2vp": {"prompt_map": 197 * 16 + (16 * D + D), "deep_maps": 2 * (197 * 16 + 16 * D + D), "deep_scales": 2 * D},
}


@pytest.mark.parametrize("method", list(EXPECTED_VIT_B))
def test_vit_b16_parameter_counts_match_the_hand_derivation(method):
    with torch.device("meta"):  # shapes are all that is counted
        vit_b = freeze(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0))
    own = SA2VPSettings(prompt_adapter=method != "sa2vp", deep_layers=[4, 8])
    settings = ModelSettings(method=method, sa2vp=own)
    summary = parameter_summary(METHODS[method].build(vit_b, 100, settings))
    assert summary.groups == EXPECTED_VIT_B[method]
    assert summary.backbone == BACKBONE  # the backbone's own parameters, LoRA's factors not among them
    assert summary.head == D * 100 + 100
    assert summary.percent_of_backbone == pytest.approx(100 * sum(EXPECTED_VIT_B[method].values()) / BACKBONE)
    assert (summary.trainable, round(summary.percent_of_backbone, 4)) == {
        "linear": (0, 0.0),
        "full": (85_798_656, 100.0),
        "vpt-shallow": (7_680, 0.009),
        "vpt-deep": (92_160, 0.1074),
        "lora": (294_912, 0.3437),
        "adaptformer": (1_189_632, 1.3865),
        "sa2vp": (50_160, 0.0585),
    }[method]


# --- artifacts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ALL)
def test_the_artifact_round_trip_restores_identical_logits(method, tmp_path):
    settings = tiny(method)
    model = build_seeded(settings, NUM_CLASSES)
    digest = weights_digest(model.backbone, model.backbone_name)  # before training, as the trainer takes it
    perturb(model)  # "trained": every saved tensor differs from what a fresh build starts with
    record = ArtifactRecord.model_validate(
        {
            "format": FORMAT,
            "settings": settings,
            "classes": [str(c) for c in range(NUM_CLASSES)],
            "transform": "vtab",
            "backbone": {"name": settings.backbone.name, "sha256": digest},
            "data_config": data_config(model.backbone),
            "dataset": {"manifest_hash": "sha256:" + "0" * 64},
        }
    )  # the record's required fields
    save_artifact(tmp_path, model, record)
    assert set(load_file(str(tmp_path / "model.safetensors"))) == trainable_names(model)
    loaded = load_artifact(tmp_path).model
    images, _ = batch()
    with torch.no_grad():
        fresh = build_seeded(settings, NUM_CLASSES).eval()(images)
        expected = model.eval()(images)
        assert not torch.equal(fresh, expected)
        assert torch.equal(loaded(images), expected)


# --- one real epoch per method ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [*BASELINES, "sa2vp-no-adapter"])
def test_one_epoch_on_digits_gives_metrics_and_a_reloadable_artifact(method, project):
    extra = {"model.sa2vp.prompt_adapter": False} if method == "sa2vp-no-adapter" else {}
    settings = tiny_settings(
        project,
        **{
            "model.method": method.removesuffix("-no-adapter"),
            "train.epochs": 1,
            "train.warmup_epochs": 0,
            "tracking.enabled": False,
            **extra,
        },
    )
    result = fit(settings)
    assert result.val is not None and result.test is not None
    assert result.test.count == len(read_split(split_dir(settings.data), "test"))  # every test image, once
    metrics = evaluate(load_artifact(result.artifact), "test")
    assert np.array_equal(metrics.confusion, result.test.confusion)
