"""`sa2vp model summary` end to end, through the installed command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.train_fixtures import invoke_sa2vp

SA2VP = shutil.which("sa2vp", path=str(Path(sys.executable).parent)) or "sa2vp"


def run(*args, cwd, env=None):
    return subprocess.run([SA2VP, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_summary_prints_the_trainable_parameters(tmp_path):
    # in-process (the same app; the two tests below run the installed script)
    result = invoke_sa2vp(
        tmp_path,
        "model",
        "summary",
        "--set",
        "backbone.name=vit_tiny_patch16_224",
        "--set",
        "backbone.weights=random",
        "--num-classes",
        "10",
    )
    assert "total (head excluded)" in result.stdout and "to_prompt=[0, 4, 8]" in result.stdout


def test_bad_setting_is_one_line_exit_2_no_traceback(tmp_path):
    result = run("model", "summary", "--set", "model.window=4", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: --set model.window: must be an odd integer >= 1 (3, 5, 7, …) or 'global' (got 4)"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_unreachable_hub_is_a_clear_error(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = run("model", "summary", "--set", "backbone.name=vit_tiny_patch16_224.augreg_in21k", cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert "backbone.weights=hub: could not fetch pretrained weights" in result.stderr
    assert "Traceback" not in result.stderr
