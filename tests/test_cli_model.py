"""`sa2vp model summary` end to end, through the installed command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.train_fixtures import invoke_sa2vp

SA2VP = shutil.which("sa2vp", path=str(Path(sys.executable).parent)) or "sa2vp"


def run(*args, cwd, env=None):
    return subprocess.run([SA2VP, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


TINY_VIT = {
    "backbone.name": "vit_tiny_patch16_224",
    "backbone.img_size": 16,
    "backbone.model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2},
}  # 4×4 patch grid, 4 blocks
TINY_SWIN = {
    "backbone.name": "swin_tiny_patch4_window7_224",
    "backbone.img_size": 32,
    "backbone.model_kwargs": {"embed_dim": 16, "depths": [1, 1, 3], "num_heads": [1, 2, 2], "window_size": 4},
}  # stages 8×8, 4×4, 2×2 of 1, 1, 3 blocks
# Off every default, so that a description read from the wrong place shows.
SETTINGS = {
    "backbone.weights": "random",
    "model.sa2vp.window": 1,
    "model.sa2vp.gamma": 0.3,
    "model.sa2vp.lam": 0.6,
    "model.sa2vp.prompt_rank": 4,
    "model.sa2vp.adapter_dim": 8,
    "model.vpt.tokens": 3,
    "model.lora.rank": 4,
    "model.lora.alpha": 2,
    "model.lora.targets": ["qkv", "fc1"],
    "model.adaptformer.dim": 8,
    "model.adaptformer.scale": 0.5,
}
SA2VP_SETTINGS = "window c=1  gamma=0.3  lambda=0.6  rank r=4  adapter t=8"
LORA_SETTINGS = "rank r=4  alpha=2 (updates scaled by 0.5)  dropout=0"
# What each method says of itself after the parameter table: on the tiny ViT, on the tiny Swin (None: refused).
DESCRIPTIONS: dict[str, tuple[list[str], list[str] | None]] = {
    "sa2vp": (
        [SA2VP_SETTINGS, "4 layers: to_prompt=[0, 1, 3]  deep=[1, 3]  grid=4x4"],
        [SA2VP_SETTINGS, "prompt map 8x8 through all 3 stages", "cross stage 2 (3 blocks): to_prompt=[0, 1]  grid=2x2"],
    ),
    "linear": (
        ["linear probe: the head on the frozen backbone's 32-d pooled feature"],
        ["linear probe: the head on the frozen backbone's 64-d pooled feature"],
    ),
    "full": (["full fine-tuning: every backbone weight and the head train"],) * 2,
    "vpt-shallow": (["shallow: p=3 prompt tokens, at the input only"], None),
    "vpt-deep": (["deep: p=3 prompt tokens, a new set before each of 4 layers"], None),
    "lora": (
        [LORA_SETTINGS, "targets qkv, fc1: 8 nn.Linear layers"],
        [LORA_SETTINGS, "targets qkv, fc1: 10 nn.Linear layers"],
    ),
    "adaptformer": (
        ["adapter dim=8  scale s=0.5  dropout=0.1, beside the MLP of each of 4 blocks"],
        ["adapter dim=8  scale s=0.5  dropout=0.1, beside the MLP of each of 5 blocks"],
    ),
}


def summary(project: Path, backbone: dict[str, Any], method: str) -> Any:
    settings = {**backbone, **SETTINGS, "model.method": method}
    overrides = [part for key, value in settings.items() for part in ("--set", f"{key}={json.dumps(value)}")]
    return invoke_sa2vp(project, "model", "summary", *overrides, "--num-classes", "10", check=False)


@pytest.mark.parametrize("method", list(DESCRIPTIONS))
@pytest.mark.parametrize("backbone", ["vit", "swin"])
def test_summary_describes_every_method_on_every_backbone(tmp_path: Path, method: str, backbone: str) -> None:
    vit, swin = DESCRIPTIONS[method]
    expected = vit if backbone == "vit" else swin
    result = summary(tmp_path, TINY_VIT if backbone == "vit" else TINY_SWIN, method)
    if expected is None:  # VPT inserts tokens into a ViT's sequence: a one-line refusal, no traceback
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == (
            f"error: backbone.name='swin_tiny_patch4_window7_224': model.method={method}: vpt-* supports ViT "
            "backbones (timm VisionTransformer, vit_*), got a SwinTransformer; use lora, adaptformer, full, linear "
            "or sa2vp on it"
        )
        return
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    lines = result.stdout.splitlines()
    assert method in lines[0] and "total (head excluded)" in result.stdout
    frozen = "│ backbone " if method == "full" else "│ frozen backbone "
    assert any(line.startswith(frozen) for line in lines), result.stdout
    assert lines[-len(expected) :] == expected


def test_bad_setting_is_one_line_exit_2_no_traceback(tmp_path):
    result = run("model", "summary", "--set", "model.sa2vp.window=4", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --set model.sa2vp.window: must be an odd integer >= 1 (3, 5, 7, …) or 'global' (got 4)"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_unreachable_hub_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run("model", "summary", "--set", "backbone.name=vit_tiny_patch16_224.augreg_in21k", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "backbone.weights=hub: could not fetch pretrained weights" in result.stderr
    assert "Traceback" not in result.stderr
