"""`sa2vp explain`: the paper's qualitative figures for trained artifacts — similarity maps (SA²VP, ViT and Swin),
Grad-CAM and t-SNE (every method) — drawn, written, logged to the artifact's MLflow run; the similarity maps
peak where a constructed input puts them; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from sa2vp.data import prepare
from sa2vp.engine import fit, load_artifact
from sa2vp.explain import (
    _cam_tap,
    class_activation_maps,
    explain,
    split_features,
    split_images,
    spread_by_class,
    tsne_figure,
)
from sa2vp.models import SA2VPSwin, SA2VPViT
from sa2vp.models.backbones import freeze
from sa2vp.settings import SA2VPSettings, load_settings
from tests.train_fixtures import TINY_PARAMS, invoke_sa2vp, tiny_settings

SWIN = {
    "backbone.name": "swin_tiny_patch4_window7_224",
    "model.sa2vp.gamma": 0.5,
    "backbone.model_kwargs": {
        "patch_size": 2,
        "embed_dim": 16,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 2, 4],
        "window_size": 2,
    },
}
FIGURES = {"similarity.png", "cam.png", "tsne.png"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SA²VP on the tiny ViT and Swin and a linear probe, briefly trained and tracked in the project's store.

    The figures need trained artifacts, not good ones: digits split 10 % train (three steps an epoch), 80 % val
    (never read here), 10 % test (180 images)."""
    project = tmp_path_factory.mktemp("explain")
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"].update(root=str(project / "data"), val_fraction=0.8, test_fraction=0.1)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    prepare(load_settings(project / "params.yaml").data)
    artifacts = {"project": project}
    for name, overrides in (("vit", {}), ("swin", SWIN), ("linear", {"model.method": "linear"})):
        settings = tiny_settings(
            project,
            **{
                "train.epochs": 1,
                "train.train_split": "train",
                "train.val_split": None,
                "train.output": str(project / "runs" / name),
                **overrides,
            },
        )
        artifacts[name] = fit(settings).artifact
    return artifacts


def _panels(figure) -> int:
    return sum(axes.get_label() == "panel" for axes in figure.axes)


def _invoke(cwd: Path, *args: str, check: bool = True):
    return invoke_sa2vp(cwd, "explain", *args, check=check)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --- the figures ---------------------------------------------------------------------------------------------


def test_sa2vp_vit_figures_have_their_panels_and_are_written_logged_and_reproducible(trained: dict[str, Path]) -> None:
    loaded = load_artifact(trained["vit"])
    explained = explain(loaded, split_images(loaded, "test", 3), points=40)
    assert explained.notes == []
    figures = explained.figures
    assert set(figures) == FIGURES
    # Depth 2: layers 0 and 1 by default; a row per image of [image, layer 0, layer 1]; CAM: images over maps.
    assert _panels(figures["similarity.png"]) == 3 * 3
    assert [a.get_title() for a in figures["similarity.png"].axes[:3]] == ["image and token", "layer 0", "layer 1"]
    assert _panels(figures["cam.png"]) == 2 * 3 and _panels(figures["tsne.png"]) == 1

    done = _invoke(trained["project"], str(trained["vit"]), "--n", "3", "--points", "40")
    folder = trained["vit"].parent / "figures"  # beside the artifact, not in it (a pipeline's output)
    assert sorted(p.name for p in folder.iterdir()) == sorted(FIGURES)
    assert sorted(p.name for p in trained["vit"].iterdir()) == ["model.json", "model.safetensors"]
    width, height = Image.open(folder / "similarity.png").size
    assert (width, height) == tuple(round(120 * s) for s in figures["similarity.png"].get_size_inches())
    run_id = json.loads((trained["vit"] / "model.json").read_text())["training"]["mlflow_run_id"]
    assert f"logged to MLflow run {run_id}" in done.stdout
    client = MlflowClient(f"sqlite:///{trained['project'] / 'mlflow.db'}")
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "figures/explain")}
    assert logged == FIGURES

    again = trained["project"] / "again"
    _invoke(trained["project"], str(trained["vit"]), "--n", "3", "--points", "40", "--out", str(again), "--no-log")
    for name in FIGURES:  # same images, seeded t-SNE, fixed sizes: the same bytes
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def test_sa2vp_swin_figures_take_the_cross_stage(trained: dict[str, Path]) -> None:
    loaded = load_artifact(trained["swin"])
    assert isinstance(loaded.model, SA2VPSwin) and loaded.model.num_layers == 2  # the cross stage's two blocks
    explained = explain(loaded, split_images(loaded, "test", 2), points=30)
    assert set(explained.figures) == FIGURES
    assert _panels(explained.figures["similarity.png"]) == 2 * 3
    assert _panels(explained.figures["cam.png"]) == 2 * 2


def test_another_method_gets_cam_and_tsne_and_a_line_for_the_similarity_maps(trained: dict[str, Path]) -> None:
    loaded = load_artifact(trained["linear"])
    explained = explain(loaded, split_images(loaded, "test", 4), points=30)
    assert set(explained.figures) == {"cam.png", "tsne.png"}
    assert explained.notes == ["similarity maps skipped: a linear model has no prompt pathway (they are SA²VP's)"]
    assert _panels(explained.figures["cam.png"]) == 2 * 4

    # Asked for explicitly: one line, exit 2, nothing written.
    done = _invoke(trained["project"], str(trained["linear"]), "--layers", "0", check=False)
    assert done.exit_code == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "similarity maps are SA²VP's" in done.stderr
    assert not (trained["linear"].parent / "figures").exists()


@pytest.mark.parametrize("name", ["vit", "swin", "linear"])
def test_the_cam_tap_leaves_the_prediction_unchanged_and_the_maps_are_normalised(
    trained: dict[str, Path], name: str
) -> None:
    model = load_artifact(trained[name]).model
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(images)
        with _cam_tap(model) as (forward, _):
            tapped = forward(images)
    assert torch.equal(tapped, expected)
    cam = class_activation_maps(model, images)
    assert cam.predicted == expected.argmax(dim=1).tolist()
    assert cam.maps.min() >= 0 and torch.allclose(cam.maps.flatten(1).amax(dim=1), torch.ones(3))


def test_images_are_taken_one_class_after_another() -> None:
    assert spread_by_class([2, 0, 0, 1, 2, 1, 0], 5) == [1, 3, 0, 2, 5]
    assert spread_by_class([1, 1], 5) == [0, 1]


def test_tsne_of_two_artifacts_is_two_panels_logged_to_both_runs(trained: dict[str, Path]) -> None:
    panels = [split_features(load_artifact(trained[name]), "test", 30) for name in ("vit", "linear")]
    figure = tsne_figure(panels, seed=0)
    assert _panels(figure) == 2
    assert [a.get_title().splitlines()[0] for a in figure.axes] == ["SA²VP, window c=3", "linear"]

    out = trained["project"] / "compare"
    done = _invoke(
        trained["project"], "--tsne", str(trained["vit"]), str(trained["linear"]), "--points", "30", "--out", str(out)
    )
    assert _files(out) == ["tsne_comparison.png"]
    client = MlflowClient(f"sqlite:///{trained['project'] / 'mlflow.db'}")
    for name in ("vit", "linear"):
        run_id = json.loads((trained[name] / "model.json").read_text())["training"]["mlflow_run_id"]
        assert "figures/explain/tsne_comparison.png" in {
            a.path for a in client.list_artifacts(run_id, "figures/explain")
        }
        assert f"logged to MLflow run {run_id}" in done.stdout


def test_the_suite_report_adds_the_tsne_of_its_variants(trained: dict[str, Path], tmp_path: Path) -> None:
    from sa2vp.suites import CellResult, cell_dir, write_report

    settings = load_settings(
        None,
        {
            "suite.name": "t",
            "suite.output": str(tmp_path / "results"),
            "suite.report": str(tmp_path / "report"),
            "suite.datasets": ["digits"],
            "suite.variants": ["sa2vp", "linear"],
            "suite.seeds": [0],
            "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment": "suites",
        },
    )
    for variant, name in (("sa2vp", "vit"), ("linear", "linear")):
        folder = cell_dir(settings, "digits", variant)
        shutil.copytree(trained[name], folder / "seed-0" / "model")
        result = CellResult(
            dataset="digits",
            group="toy",
            variant=variant,
            method=variant,
            seeds=[0],
            test_top1=[0.5],
            test_mean_class=[0.5],
            trainable_parameters=1,
            trainable_percent=1.0,
            tuned={},
            val_top1=None,
        )
        (folder / "result.json").write_text(json.dumps(result.as_dict()))
    report = write_report(settings)
    assert (tmp_path / "report" / "tsne_digits.png").is_file()
    client = MlflowClient(settings.tracking.uri)
    assert "suite/tsne_digits.png" in {a.path for a in client.list_artifacts(report.run_id, "suite")}


# --- the similarity maps peak where the input puts them ------------------------------------------------------


def test_vit_similarity_peaks_at_the_prompt_token_made_equal_to_the_image_token() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
    )  # a 4×4 grid
    assert isinstance(backbone, VisionTransformer) and backbone.pos_embed is not None
    model = SA2VPViT(
        backbone.requires_grad_(False), 5, SA2VPSettings(window=3, deep_layers=[], to_prompt_layers=[0], dropout=0.0)
    ).eval()
    images = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        # every frozen block the identity, no positions, no exchange (γ = 0): each pathway's tokens stay its input's
        for name, linear in backbone.blocks.named_modules():
            if name.endswith(("attn.proj", "mlp.fc2")):  # the residual branches' last layers: weight and bias 0
                for parameter in linear.parameters():
                    parameter.zero_()
        backbone.pos_embed.zero_()
        model.gamma = 0.0
        image_token = model.layer_tokens(images)[-1].base[0, 1 + 1 * 4 + 2]  # the patch at row 1, column 2
        # The prompt map U·W + b: every token 0.3·r, and the one at row 2, column 0 also the image token's feature.
        prompt = model.prompt_map
        prompt.tokens.zero_()
        prompt.proj.weight.zero_()
        prompt.proj.bias.zero_()
        prompt.proj.weight[:, 0] = image_token
        prompt.proj.weight[:, 1] = torch.randn(32) * image_token.norm() / 32**0.5
        prompt.tokens[0, :, 1] = 0.3
        prompt.tokens[0, 1 + 2 * 4 + 0, 0] = 1.0
    maps = model.similarity_maps(images, [0, 1], token=(1, 2))
    for values in maps.maps:
        assert values.shape == (1, 4, 4)
        flat = values[0].flatten()
        assert divmod(int(flat.argmax()), 4) == (2, 0)
        assert flat.max() > 0.9 and torch.sort(flat).values[-2] < 0.6
    assert maps.tokens[0].tolist() == [[1, 2]]


def test_swin_similarity_peaks_where_a_hooked_block_puts_the_image_token() -> None:
    torch.manual_seed(0)
    swin = SwinTransformer(
        img_size=(32, 48),
        num_classes=0,
        drop_path_rate=0.0,
        patch_size=2,
        embed_dim=16,
        depths=(1, 1, 3, 1),
        num_heads=(1, 2, 2, 4),
        window_size=4,
    )  # grids 16×24 … 2×3
    freeze(swin)
    model = SA2VPSwin(swin, 5, SA2VPSettings(prompt_rank=8, adapter_dim=8, dropout=0.0)).eval()
    assert model.similarity_grid == (4, 6) and model.num_layers == 3  # cross stage 2
    model.gamma = 0.0  # no exchange after the hooked block: the maps read its outputs as they are
    calls: list[torch.Tensor] = []

    def constructed(module, args, output):
        calls.append(output)
        if len(calls) == 2:  # the prompt pathway (the base runs first): its tokens small, one the image token's
            made = torch.full_like(output, 0.01)
            made[:, 3, 5] = calls[0][0, 0, 1]
            return made
        return None

    blocks = model.backbone.layers[2].blocks
    assert isinstance(blocks, torch.nn.Sequential)
    handle = blocks[1].register_forward_hook(constructed)
    try:
        maps = model.similarity_maps(torch.randn(1, 3, 32, 48), [1], token=(0, 1))
    finally:
        handle.remove()
    values = maps.maps[0][0]
    assert values.shape == (4, 6)
    assert divmod(int(values.argmax()), 6) == (3, 5) and values.max() > 0.999


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere/model"], "nowhere/model: not an sa2vp artifact (no model.json"),
        (["{vit}", "--layers", "0,5"], "--layers: layer 5 is out of range; allowed 0..1 (2 layers)"),
        (["{vit}", "--layers", "a"], "--layers 'a': expected layer indices separated by commas"),
        (["{vit}", "--token", "4,0"], "--token: token (4, 0) is outside the 4×4 token grid"),
        (["{vit}", "missing.png"], "missing.png: no such image file"),
        (["{vit}", "--split", "holdout"], "--split 'holdout': expected one of train, val, trainval, test"),
        (["--tsne", "{vit}", "nowhere/model"], "nowhere/model: not an sa2vp artifact"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    trained: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    args = [arg.format(vit=trained["vit"]) for arg in args]
    out = tmp_path / "out"
    done = _invoke(tmp_path, *args, "--out", str(out), check=False)
    assert done.exit_code == 2, done.output
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert _files(tmp_path) == []


def test_a_missing_store_is_a_line_and_the_figures_are_still_written(trained: dict[str, Path], tmp_path: Path) -> None:
    shutil.copytree(trained["vit"], tmp_path / "model")
    record = json.loads((tmp_path / "model" / "model.json").read_text())
    record["settings"]["tracking"]["uri"] = "sqlite:///elsewhere.db"
    (tmp_path / "model" / "model.json").write_text(json.dumps(record))
    done = _invoke(tmp_path, "model", "--n", "2", "--points", "20")
    assert (
        f"not logged to MLflow: the artifact's tracking.uri 'sqlite:///elsewhere.db' names {tmp_path}/elsewhere.db"
        in done.stdout
    )
    assert not (tmp_path / "elsewhere.db").exists()  # no empty store made
    assert _files(tmp_path / "figures") == sorted(FIGURES)


def test_a_users_image_files_are_explained(trained: dict[str, Path], tmp_path: Path) -> None:
    loaded = load_artifact(trained["vit"])
    batch = split_images(loaded, "test", 2)
    paths = []
    for index, picture in enumerate(batch.pictures(loaded.data_config)):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray((picture * 255).round().astype("uint8")).save(paths[-1])
    _invoke(tmp_path, str(trained["vit"]), *map(str, paths), "--points", "20", "--out", "figs", "--no-log")
    assert _files(tmp_path / "figs") == sorted(FIGURES)
