"""The command line and the Python API as a user meets them: progress in logs and on terminals, `python -m
sa2vp`, `--version`, an example in every help, one spelling of the dataset option, fast offline errors that
name an option the command has, switching the backbone family in one --set, the README's Python running as
written, and outputs checked writable before the work (issue 14; issue 13's follow-up)."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer.main
import yaml
from PIL import Image
from typer.testing import CliRunner

from sa2vp.data.progress import BarProgress, LineProgress, labelled
from sa2vp.settings import load_settings
from sa2vp_cli.main import app
from tests.data_fixtures import make_image_folder
from tests.train_fixtures import TINY_PARAMS, digits_root, invoke_sa2vp  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A ViT small enough to pretrain in a fraction of a second on a generated task of 4 glyph classes.
TINY_PRETRAINING = [
    "--set",
    "backbone.name=vit_tiny_patch16_224",
    "--set",
    "backbone.img_size=16",
    "--set",
    "backbone.weights=random",
    "--set",
    'backbone.model_kwargs={"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}',
    "--set",
    "backbone.origin=synthetic",
    "--set",
    "backbone.pretrain.classes=4",
    "--set",
    "backbone.pretrain.images_per_class=128",
    "--set",
    "backbone.pretrain.batch_size=8",
    "--set",
    "backbone.pretrain.eval_images_per_class=2",
    "--set",
    "backbone.pretrain.threads=1",
]


@pytest.fixture(scope="module")
def small_params(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """TINY_PARAMS on a folder of 3 × 12 images: a training epoch is a few batches, even on a busy CPU."""
    root = tmp_path_factory.mktemp("small-data")
    images = make_image_folder(root / "images", {"a": 12, "b": 12, "c": 12})
    params = yaml.safe_load(yaml.safe_dump(TINY_PARAMS))
    params["data"] = {"dataset": f"folder:{images}", "root": str(root / "data")}
    params["train"].update(batch_size=8, eval_batch_size=8)
    params["tracking"]["enabled"] = False
    return params


@pytest.fixture()
def project(tmp_path: Path, small_params: dict[str, Any]) -> Path:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(small_params), encoding="utf-8")
    return tmp_path


def run_in(folder: Path, *args: str) -> Any:
    """The `sa2vp` app in this process, in `folder` (stderr separate from stdout)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)


def one_error_line(result: Any) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0].removeprefix("error: ")


def leaf_commands() -> list[tuple[list[str], Any]]:
    """(path, click command) of every command of the app that runs something."""
    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
        else:
            found.append((path, command))

    walk(typer.main.get_command(app), [])
    return found


# --- item 4: progress -----------------------------------------------------------------------------------------

PERIODIC = re.compile(
    r"^(?P<what>.+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\S+) "
    r"\((?P<pct>\d+)%, [\d.,]+ \S+/s, eta (\d+ s|\d+ min \d+ s|\d+ h \d+ min|unknown)\)$"
)
FINAL = re.compile(
    r"^(?P<what>.+): (?P<done>[\d,]+)/(?P<total>[\d,]+) (?P<unit>\S+) "
    r"\(100%, [\d.,]+ \S+/s, done in .+\)$"
)


def test_a_log_gets_a_line_every_interval_even_while_a_step_makes_no_progress() -> None:
    stream = io.StringIO()
    reporter = LineProgress(stream, every=0.05)
    with reporter("pretraining", 4, "steps") as advance:
        advance(1)
        time.sleep(0.4)  # one slow step: the timer still reports, the log never goes quiet
        advance(3)
    lines = stream.getvalue().splitlines()
    periodic = [line for line in lines if PERIODIC.match(line)]
    assert len(periodic) >= 3, lines
    first = PERIODIC.match(periodic[0])
    assert first is not None and first["done"] == "1" and first["pct"] == "25"
    assert FINAL.match(lines[-1]) and lines[-1].startswith("pretraining: 4/4 steps (100%"), lines
    # the lines of a step inside a larger one say which one: a tuning trial's epoch
    stream = io.StringIO()
    with labelled(LineProgress(stream), "trial 3")("epoch 1/2", 2, "batches") as advance:
        advance(2)
    assert stream.getvalue().startswith("trial 3 · epoch 1/2: 2/2 batches (100%, "), stream.getvalue()


def test_backbone_pretraining_in_a_log_reports_progress_every_interval(tmp_path: Path) -> None:
    # What `dvc repro` of pipelines/backbone runs, with a tiny task; stderr is not a terminal here.
    result = run_in(
        tmp_path, "--log-every", "0.02", "backbone", "materialise", "--out", "b.safetensors", *TINY_PRETRAINING
    )
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.stderr.splitlines()
    steps = [PERIODIC.match(line) for line in lines if line.startswith("pretraining on ")]
    assert sum(match is not None for match in steps) >= 2, lines  # lines while it runs, with count, % and eta
    assert any(
        FINAL.match(line) and line.startswith("pretraining on 1 × 512 generated glyphs: 64/64 steps") for line in lines
    ), lines
    assert (tmp_path / "b.safetensors").is_file()


def test_tune_logs_every_epoch_of_every_trial_with_its_number(project: Path) -> None:
    result = invoke_sa2vp(project, "tune", "--n-trials", "2", "--epochs", "1")
    lines = result.stderr.splitlines()
    for trial in (0, 1):
        assert any(FINAL.match(line) and line.startswith(f"trial {trial} · epoch 1/1: ") for line in lines), lines
        assert any(line.startswith(f"trial {trial} · validating: ") for line in lines), lines


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    from sa2vp_cli.common import progress

    leader, follower = pty.openpty()  # a real terminal device: isatty() is true, as in an interactive shell
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows × 100 columns
    terminal = os.fdopen(follower, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", terminal)
    reporter = progress()
    with reporter("epoch 1/1", 10, "batches") as advance:
        advance(10)
    terminal.flush()
    os.set_blocking(leader, False)
    shown = os.read(leader, 65536).decode("utf-8", "replace")
    terminal.close()
    os.close(leader)
    assert isinstance(reporter, BarProgress)
    # tqdm's bar, drawn in place (\r) and wiped when done (leave=False): the log lines are for logs only
    assert re.search(r"\repoch 1/1: +0%\|.*\| 0/10 ", shown) and shown.endswith("\r"), shown
    assert "done in" not in shown


# --- item 12: the command line's idioms ---------------------------------------------------------------------------


def test_python_m_sa2vp_and_version_without_loading_the_cli_from_the_library(tmp_path: Path) -> None:
    installed = version("sa2vp")
    done = subprocess.run(
        [PYTHON, "-m", "sa2vp", "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == f"sa2vp {installed}", (done.stdout, done.stderr)
    helped = subprocess.run(
        [PYTHON, "-m", "sa2vp", "data", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert helped.returncode == 0 and "prepare" in helped.stdout and "Usage: sa2vp data" in helped.stdout
    light = subprocess.run(
        [
            PYTHON,
            "-c",
            "import sys, sa2vp; print(sa2vp.__version__, 'sa2vp_cli' in sys.modules, 'torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert light.stdout.split() == [installed, "False", "False"], light


def test_every_command_s_help_shows_an_example() -> None:
    commands = leaf_commands()
    assert len(commands) >= 12, [path for path, _ in commands]
    for path, _ in commands:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Example: sa2vp" in result.stdout or "Example: cd " in result.stdout, (path, result.stdout)


def test_the_dataset_option_is_spelled_the_same_in_every_command(tmp_path: Path) -> None:
    spellings = {}
    for path, command in leaf_commands():
        for param in command.params:
            if param.name == "dataset" and param.param_type_name == "option":
                spellings[" ".join(path)] = sorted(param.opts)
    assert spellings == {name: ["--dataset", "-d"] for name in ("data download", "data prepare", "train", "tune")}
    # and -d is the dataset everywhere: data prepare with it, refused the same way by train before any work
    result = run_in(tmp_path, "data", "prepare", "-d", "digits", "--set", "data.render_size=8")
    assert result.exit_code == 0 and "data/splits/digits/holdout-seed42" in result.stdout, result.output
    assert "unknown dataset 'no-such-set'" in one_error_line(
        run_in(tmp_path, "train", "-d", "no-such-set", "--set", "tracking.enabled=false")
    )
    twice = one_error_line(run_in(tmp_path, "data", "prepare", "digits", "-d", "shapes-count"))
    assert twice == "the dataset is given twice, as 'digits' and as --dataset 'shapes-count': give it once"


def test_tune_epochs_is_tune_dot_epochs(tmp_path: Path) -> None:
    message = one_error_line(run_in(tmp_path, "tune", "--epochs", "0"))
    assert message == "command line tune.epochs: Input should be greater than or equal to 1 (got 0)"


def test_a_commands_own_option_reaches_the_settings_as_given(tmp_path: Path) -> None:
    # --dataset, --output, --from, … are passed as values, not as text read back as YAML: an image folder whose
    # name JSON writes as a surrogate pair (an emoji) is the folder prepared, not a name no file system holds.
    images = make_image_folder(tmp_path / "bilder 🖼", {"a": 10, "b": 10})
    result = run_in(tmp_path, "data", "prepare", "--dataset", f"folder:{images}")
    assert result.exit_code == 0, (result.output, result.exception)
    assert "(holdout, 2 classes): train " in result.stdout, result.stdout


def test_a_mistyped_setting_suggests_the_setting_meant(tmp_path: Path) -> None:
    message = one_error_line(run_in(tmp_path, "model", "summary", "--set", "model.gama=0.3"))
    assert message == "--set model.gama: unknown setting; did you mean model.sa2vp.gamma?"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # closed again on leaving: connections to it are refused


def test_a_hub_dataset_without_network_fails_at_once_naming_an_option_the_command_has(tmp_path: Path) -> None:
    # The installed command in a process of its own: huggingface_hub reads HF_ENDPOINT when it is imported.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("HF_", "SA2VP_")) and not k.lower().endswith("_proxy")
    }
    env.update(
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1",
    )
    sa2vp = str(Path(PYTHON).with_name("sa2vp"))
    started = time.monotonic()
    done = subprocess.run(
        [sa2vp, "train", "-d", "svhn", "--set", "tracking.enabled=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr
    assert "Retry" not in done.stderr and "thrown while requesting" not in done.stderr, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]  # the error, and nothing else
    assert line.startswith("error: could not download vtab-1k.zip from hub dataset XiN0919/VTAB-1k: ")
    assert "pass a local copy with --from (data.source)" in line, line
    assert seconds < 60, seconds  # one attempt (the retries alone took 23 s), whatever the start-up takes here
    # every command that may download a dataset has the option the advice names
    for command in (["train"], ["tune"], ["data", "prepare"], ["data", "download"], ["suite", "run"]):
        assert "--from" in CliRunner().invoke(app, [*command, "--help"]).stdout, command


def test_train_says_its_test_result_once(project: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    result = invoke_sa2vp(project, "train", "--epochs", "1")
    record = json.loads((project / "runs/train/model/model.json").read_text())
    accuracy = f"{100 * record['training']['test']['top1']:.2f}"
    said = [
        line for line in [*result.stdout.splitlines(), *caplog.messages] if line.startswith("test") and accuracy in line
    ]
    assert len(said) == 1, said


# --- item 13: switching the backbone family is one --set --------------------------------------------------------


@pytest.fixture()
def offline_default(tmp_path: Path) -> Path:
    """A folder with the repository's params.yaml (the offline default ViT, its file and hash) and its backbone."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "backbones").symlink_to(REPO / "backbones")
    return tmp_path


def spell_out_the_architecture(folder: Path) -> dict[str, Any]:
    """folder/params.yaml's backbone (the registered offline_vit12) rewritten as the timm arguments of the same
    network, as a params file for another architecture gives them; returns the new section."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    architecture = {"patch_size": 2, "embed_dim": 64, "depth": 12, "num_heads": 4}
    params["backbone"].update(name="vit_tiny_patch16_224", img_size=16, model_kwargs=architecture)
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    return dict(params["backbone"])


def test_switching_the_backbone_family_is_one_set(offline_default: Path, caplog: pytest.LogCaptureFixture) -> None:
    def notice() -> str:
        caplog.clear()
        switch = ["--set", "backbone.name=swin_tiny_patch4_window7_224", "--set", "backbone.weights=random"]
        result = run_in(offline_default, "model", "summary", *switch, "--num-classes", "10")
        assert result.exit_code == 0, (result.output, result.exception)
        assert " on swin_tiny_patch4_window7_224 (random" in result.stdout, result.stdout
        assert re.search(r"stage 2\b.*: to_prompt", result.stdout), result.stdout  # SA²VP-Swin's cross stage
        (line,) = [m for m in caplog.messages if m.startswith("backbone.name=swin_tiny_patch4_window7_224 (--set)")]
        return line

    caplog.set_level(logging.INFO)
    # the repository's offline default names its architecture: only its weights file's hash is another backbone's
    said = notice()
    assert "params.yaml's offline_vit12: its backbone.sha256, written for that backbone, are left out" in said, said
    # a file that gives the architecture as timm arguments: those are left out too
    spell_out_the_architecture(offline_default)
    said = notice()
    assert (
        "params.yaml's vit_tiny_patch16_224: its backbone.model_kwargs, backbone.img_size, backbone.sha256, "
        "written for that backbone, are left out" in said
    ), said


def test_only_what_was_not_given_for_the_new_backbone_is_left_out(
    offline_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = offline_default / "params.yaml"
    file = spell_out_the_architecture(offline_default)
    same = load_settings(params, {"backbone.name": file["name"]})  # the same name: nothing changes
    assert same.backbone.model_kwargs == file["model_kwargs"] and same.backbone.sha256 == file["sha256"]
    kwargs = {"embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2], "window_size": 4}
    swin = load_settings(params, {"backbone.name": "swin_tiny_patch4_window7_224", "backbone.model_kwargs": kwargs})
    # the architecture given with the switch: used, with the file's img_size (the override describes the new
    # architecture, the file the rest); the file's weights file and its hash are the old backbone's: left out
    assert (swin.backbone.model_kwargs, swin.backbone.img_size) == (kwargs, file["img_size"])
    assert (swin.backbone.weights, swin.backbone.sha256) == ("hub", None)
    assert swin.backbone.origin == "synthetic" and swin.backbone.pretrain == load_settings(params).backbone.pretrain
    monkeypatch.setenv("SA2VP_BACKBONE__NAME", "vit_small_patch16_224")  # the environment switches it too
    assert load_settings(params).backbone.model_kwargs == {}
    assert load_settings(params, {"backbone.model_kwargs": {"depth": 2}}).backbone.model_kwargs == {"depth": 2}


# --- item 14: the README's Python, and predicting on files and tensors ------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, small_params: dict[str, Any]) -> Path:
    """A tiny trained artifact (random 2-layer ViT at 16 px, one epoch on 3 classes)."""
    from sa2vp.engine import fit

    folder = tmp_path_factory.mktemp("artifact")
    flat = {f"{section}.{key}": value for section, values in small_params.items() for key, value in values.items()}
    flat.update({"train.epochs": 1, "train.output": str(folder / "run")})
    return fit(load_settings(None, flat)).artifact


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_the_readme_python_runs_as_written(
    offline_default: Path,
    artifact: Path,
    digits_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    blocks = python_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 2 and any("sa2vp.predict(" in block for block in blocks)
    # where the README's reader is after `sa2vp train` with the offline default: its data and its artifact
    (offline_default / "data").symlink_to(digits_root)
    shutil.copytree(artifact, offline_default / "runs/train/model")
    monkeypatch.chdir(offline_default)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"<README.md, python block {number}>", "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[0].startswith("data/digits/images/0/") and "[('" in printed[0], printed
    assert namespace["loss"].ndim == 0 and set(namespace["parts"]) == {"base", "prompt"}


def test_predict_reads_a_tensor_as_it_reads_the_file(artifact: Path, digits_root: Path) -> None:
    import sa2vp

    loaded = sa2vp.load_artifact(artifact)
    files = sorted((digits_root / "digits/images").glob("*/*.png"))[:5]
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    from_files = sa2vp.predict(loaded, files, top_k=3)
    from_uint8 = sa2vp.predict(artifact, pixels, top_k=3)  # a path is loaded too
    from_floats = sa2vp.predict(loaded, pixels.float() / 255, top_k=3)
    assert [p.top for p in from_uint8] == [p.top for p in from_files] == [p.top for p in from_floats]
    assert [p.image for p in from_uint8] == list(range(5)) and [p.image for p in from_files] == files
    (single,) = sa2vp.predict(loaded, pixels[0], top_k=3)  # one (3, H, W) image: a batch of one
    # the same classes; probabilities equal up to float rounding (a batch of one takes other matmul kernels)
    assert [label for label, _ in single.top] == [label for label, _ in from_files[0].top]
    assert [p for _, p in single.top] == pytest.approx([p for _, p in from_files[0].top], abs=1e-5)
    with pytest.raises(ValueError, match=r"float pixel values must be in \[0, 1\] \(not normalised"):
        sa2vp.predict(loaded, (pixels.float() / 255 - 0.5) / 0.25)  # already normalised: would be quietly wrong


def test_predict_writes_its_predictions_to_a_file(
    artifact: Path,
    digits_root: Path,
    tmp_path: Path,
) -> None:
    image = next((digits_root / "digits/images/4").glob("*.png"))
    result = run_in(tmp_path, "predict", str(artifact), str(image), "-k", "2", "--output", "out/p.csv")
    assert result.exit_code == 0, (result.output, result.exception)
    rows = (tmp_path / "out/p.csv").read_text().splitlines()
    assert rows[0] == "image,rank,class,probability" and len(rows) == 3 and rows[1].startswith(f"{image},1,")


# --- issue 13 follow-up: outputs checked writable before the work -----------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["evaluate", "missing/model", "--metrics-file", "blocker/m.json"],
            "--metrics-file blocker/m.json: cannot write there (",
        ),
        (
            ["evaluate", "missing/model", "--plots-dir", "blocker/plots"],
            "--plots-dir blocker/plots: cannot write there (",
        ),
        (["evaluate", "missing/model", "--plots-dir", "blocker"], "--plots-dir blocker: cannot write there ("),
        (["evaluate", "missing/model", "--metrics-file", "."], "--metrics-file .: is a folder; name a file"),
        (
            ["predict", "missing/model", "x.png", "--output", "blocker/p.csv"],
            "--output blocker/p.csv: cannot write there (",
        ),
        (
            ["predict", "missing/model", "x.png", "--output", "p.txt"],
            "--output p.txt: expected a .csv or .json file name",
        ),
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    # The artifact does not even exist: the output is checked first, before anything is loaded or computed.
    (tmp_path / "blocker").write_text("a file where a folder is needed")
    message = one_error_line(run_in(tmp_path, *args))
    assert message.startswith(expected), message
    assert "is not a folder" in message or "folder; name" in message or ".csv or .json" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
