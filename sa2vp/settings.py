"""The one schema of the experiment's settings.

Every setting is defined here, once, with its default and its validation. params.yaml is an instance of
`Settings`; `SA2VP_…` environment variables (nested keys joined by `__`, e.g. `SA2VP_MODEL__SA2VP__GAMMA=0.5`) and
command-line overrides (`model.sa2vp.gamma=0.5`) are applied on top by `load_settings`. No other module keeps a
second list of defaults. An invalid value is refused with its source named: `--set model.sa2vp.gamma: …`,
`environment SA2VP_MODEL__SA2VP__GAMMA: …`, `params.yaml: model.sa2vp.gamma: …`.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting has a value that is not allowed; the message names the setting and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are typos, and a typo silently ignored is a wrong experiment.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PretrainSettings(_Section):
    """Offline pretraining of the backbone on a generated source task that never sees the target data."""

    seed: int = Field(0, ge=0, description="Seed of the generated images and of the pretraining run.")
    classes: int = Field(
        100, ge=2, description="Glyph classes of the source task (random stroke compositions, fixed by the seed)."
    )
    max_strokes: int = Field(3, ge=1, description="Most strokes (lines, arcs, curves, corners) in one glyph class.")
    images_per_class: int = Field(
        512, ge=1, description="Training images rendered per class and epoch (random deformations of its glyph)."
    )
    eval_images_per_class: int = Field(
        10, ge=1, description="Held-out images per class for the reported source-task accuracy."
    )
    epochs: int = Field(1, ge=1, description="Epochs; each renders new images.")
    batch_size: int = Field(32, ge=1, description="Images per optimiser step.")
    lr: float = Field(
        2e-3, gt=0.0, description="Peak learning rate of AdamW, held from the end of the warm-up to the cool-down."
    )
    weight_decay: float = Field(0.05, ge=0.0, description="AdamW weight decay, on weights of >= 2 dimensions only.")
    warmup_epochs: float = Field(0.05, ge=0.0, description="Linear warm-up from 0 to `lr`, in epochs.")
    cooldown: float = Field(
        0.3, gt=0.0, le=1.0, description="Fraction of the steps, at the end, over which `lr` decays linearly to 0."
    )
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="Label smoothing of the source-task cross-entropy.")
    patch_drop: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Fraction of patch tokens dropped at random from each image while pretraining (timm's "
        "patch_drop_rate; ViTs only, 0 for other architectures): about halves a step's cost for as much learnt "
        "per step. The materialised backbone keeps every token.",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of torch while pretraining (restored afterwards); default: torch's own (the core "
        "count). A fixed count makes the weights independent of the machine's cores (float sums depend on how "
        "work is split), and 1 keeps a long run on a small shared machine from stalling: two multi-threaded "
        "processes on 2 cores slow each other down many times over.",
    )

    @model_validator(mode="after")
    def _warmup_within_training(self) -> PretrainSettings:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be < epochs (got {self.warmup_epochs} >= {self.epochs})")
        return self


class BackboneSettings(_Section):
    """The frozen backbone."""

    name: str = Field(
        "vit_base_patch16_224.orig_in21k",
        description="timm model name, optionally with a pretrained tag (`vit_base_patch16_224.orig_in21k`).",
    )
    weights: str = Field(
        "hub",
        description="`hub` (timm's pretrained weights, downloaded), `random` (random init), "
        "or a path to a weights file (.safetensors, or Google's original .npz).",
    )
    img_size: int | None = Field(
        None,
        ge=8,
        description="Input resolution; default: the pretrained configuration's. Belongs to `name` (see model_kwargs).",
    )
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for `timm.create_model` that change the architecture "
        "(patch_size, embed_dim, depth, num_heads, …), e.g. for a small ViT on small images. With img_size, a "
        "weights file and sha256, it belongs to `name`: when an override (--set, SA2VP_*) changes backbone.name, "
        "the params file's model_kwargs and img_size are left out unless the override gives one of them, and its "
        "weights file and sha256 unless given — switching the backbone is one --set; a notice says what was left "
        "out.",
    )
    origin: Literal["hub", "synthetic"] = Field(
        "hub",
        description="Where `sa2vp backbone materialise` gets the weights file it writes: `hub` downloads the "
        "timm checkpoint of `name`; `synthetic` pretrains `name` on a generated source task (offline).",
    )
    pretrain: PretrainSettings = Field(
        default_factory=lambda: PretrainSettings(),
        description="The generated source task and its training (origin: synthetic).",
    )
    sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the weights file (lower-case hex): a file that hashes otherwise is refused. "
        "Pins the exact weights an experiment was run on (the offline default pins its committed backbone).",
    )
    dropout: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Dropout of the backbone's own layers, active only while the backbone is in training mode "
        "(model.backbone_dropout): ViT — on the embeddings of every pathway and after both layers of every MLP "
        "(attention dropout stays 0). Default: the release's, 0.1 for ViT, 0 for Swin.",
    )
    drop_path: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Stochastic depth of the backbone's blocks, rising linearly to this rate over the blocks, "
        "active only while the backbone is in training mode (model.backbone_dropout). Default: the release's, "
        "0.2 for Swin, 0 for ViT.",
    )

    @model_validator(mode="after")
    def _hash_of_a_file(self) -> BackboneSettings:
        if self.sha256 is not None and self.weights in ("hub", "random"):
            raise ValueError(f"sha256 pins a weights file; backbone.weights is {self.weights!r} (set sha256: null)")
        return self


class VPTSettings(_Section):
    """Visual prompt tuning (Jia et al. 2022), methods `vpt-shallow` and `vpt-deep`."""

    tokens: int = Field(
        10,
        ge=1,
        description="p: learned prompt tokens inserted after the class (and register) tokens; vpt-deep "
        "learns a new set of p for every layer.",
    )
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the prompt tokens (training only; VPT: 0.1).")


class LoRASettings(_Section):
    """LoRA (Hu et al. 2022) through the peft library, method `lora`."""

    rank: int = Field(8, ge=1, description="r: rank of the low-rank update B·A of each targeted projection.")
    alpha: float = Field(8.0, gt=0.0, description="α: the update is scaled by α / r.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input (training only).")
    targets: list[str] = Field(
        default_factory=lambda: ["qkv"],
        min_length=1,
        description="Names (last part of the module path) of the backbone's nn.Linear layers to adapt: `qkv` is "
        "timm's fused attention input projection (ViT and Swin); `proj`, `fc1`, `fc2` are the others.",
    )


class AdaptFormerSettings(_Section):
    """AdaptFormer (Chen et al. 2022), method `adaptformer`: a bottleneck adapter beside every block's MLP."""

    dim: int = Field(64, ge=1, description="Bottleneck width of the adapters (release: 64).")
    scale: float = Field(0.1, gt=0.0, description="s: the adapter's output is scaled by s (release: 0.1).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout inside the adapter's bottleneck (release: 0.1).")


class SA2VPSettings(_Section):
    """The `model.sa2vp:` section: SA²VP's own settings, on ViT (method file §2) and Swin (§3).

    Defaults are the authors' ViT release. The Swin release's values that differ (γ = 0.5, r = t = 8) are not
    switched by the backbone: set them.
    """

    window: int | Literal["global"] = Field(
        3, description="Window c of the spatially-aligned cross attention: odd ≥ 1, or `global` (ablation)."
    )
    gamma: float = Field(
        0.1, ge=0.0, description="γ: weight of the fused cross-attention output (release: ViT 0.1, Swin 0.5)."
    )
    lam: float = Field(0.8, ge=0.0, le=1.0, description="λ: loss = λ·CE(base) + (1−λ)·CE(prompt).")
    prompt_rank: int = Field(16, ge=1, description="r: rank of the low-rank prompt maps (release: ViT 16, Swin 8).")
    adapter_dim: int = Field(
        16, ge=1, description="t: bottleneck width of the prompt adapters (release: ViT 16, Swin 8)."
    )
    adapter_act: Literal["gelu", "relu"] = Field("gelu", description="Adapter activation (release: gelu).")
    to_prompt_layers: list[int] | None = Field(
        None,
        description="Layers where the prompt pathway queries the base; the others let the base query the "
        "prompt. Default: the release's {0, 4, 8} for depth 12, same relative positions otherwise. "
        "Swin: block indices within each cross stage; default {0, 6, 12} for 18 blocks, scaled likewise.",
    )
    deep_layers: list[int] | None = Field(
        None,
        description="Layers where a new prompt map is fused in (deep mode); [] = shallow. "
        "Default: the release's {4, 8} for depth 12, same relative positions otherwise. "
        "Swin has no deep prompts (release): null or [] only.",
    )
    cross_stages: list[int] | None = Field(
        None,
        description="Swin only: stages whose blocks have cross attention (0-based; the prompt map runs through "
        "every stage). Default: the release's third stage (index 2). Must be null for a ViT.",
    )
    head_mode: Literal["multi", "single"] = Field(
        "multi", description="`multi`: the backbone's heads; `single`: one head over all channels."
    )
    border: Literal["clip", "zero"] = Field(
        "clip", description="Window positions outside the grid: `clip` (dropped) or `zero` (zero keys)."
    )
    dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Dropout of SA²VP's own layers in training: on the cross attention's output, and inside every "
        "adapter after the activation and after W_up (release: 0.1).",
    )
    prompt_adapter: bool = Field(
        True,
        description="Pass what one pathway reads from the other through the prompt adapter (§2, Cross_i). false: "
        "the ablation `w/o prompt adapter` (paper Tab. 5): Cross_i returns the attended output A itself (after "
        "the frozen W_o and dropout), without the residual h — the block already carries h, adding it again would "
        "scale it by 1 + γ — and no adapter parameters exist.",
    )

    @field_validator("window", mode="before")
    @classmethod
    def _odd_window(cls, value: object) -> int | str:
        if value == "global":
            return "global"
        try:
            size = int(str(value)) if not isinstance(value, bool) else None
        except ValueError:
            size = None
        if size is None or size < 1 or size % 2 == 0:
            raise ValueError("must be an odd integer >= 1 (3, 5, 7, …) or 'global'")
        return size

    @field_validator("to_prompt_layers", "deep_layers")
    @classmethod
    def _non_negative_unique(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(i < 0 for i in value):
            raise ValueError("layer indices must be >= 0")
        return sorted(set(value))

    @field_validator("cross_stages")
    @classmethod
    def _some_stages(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        # Without a cross stage the pathways never meet: the prompt would not touch the prediction.
        if not value or any(i < 0 for i in value):
            raise ValueError("must list at least one stage index >= 0, or be null (the release's stage 2)")
        return sorted(set(value))

    @property
    def window_size(self) -> int | None:
        """The window c, or None for the global variant."""
        return None if self.window == "global" else int(self.window)


class ModelSettings(_Section):
    """The `model:` section: the adaptation method, the backbone's own dropout in training, and each method's
    settings in a sub-section of its own (read by that method only)."""

    method: Literal["sa2vp", "linear", "full", "vpt-shallow", "vpt-deep", "lora", "adaptformer"] = Field(
        "sa2vp",
        description="Adaptation method: `sa2vp` (model.sa2vp); or a baseline — `linear` (linear probe on the frozen "
        "backbone's pooled feature), `full` (fine-tune every backbone weight), `vpt-shallow` / `vpt-deep` (prompt "
        "tokens at the input / at every layer, ViT only; model.vpt), `lora` (model.lora), `adaptformer` "
        "(model.adaptformer).",
    )
    backbone_dropout: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The backbone's own dropout and drop-path (rates: backbone.dropout, backbone.drop_path) while "
        "training, for every method; frozen means no gradient, not no dropout. `on`: active in training (the "
        "SA²VP release trains its whole model in train mode); `off`: the backbone always in eval mode; `auto`: "
        "each method's reference code — on for sa2vp, vpt-* and full, off for linear, lora and adaptformer (VPT's "
        "code freezes the encoder in eval mode for linear probing and adapters).",
    )
    sa2vp: SA2VPSettings = Field(default_factory=lambda: SA2VPSettings(), description="Settings of `sa2vp` only.")
    vpt: VPTSettings = Field(
        default_factory=lambda: VPTSettings(), description="Settings of `vpt-shallow` and `vpt-deep` only."
    )
    lora: LoRASettings = Field(default_factory=lambda: LoRASettings(), description="Settings of `lora` only.")
    adaptformer: AdaptFormerSettings = Field(
        default_factory=lambda: AdaptFormerSettings(), description="Settings of `adaptformer` only."
    )


class DataSettings(_Section):
    """The dataset, its split protocol and where its files live (sa2vp.data; method file §4 and §6)."""

    dataset: str = Field(
        "digits",
        min_length=1,
        description="Registry name (`sa2vp data list`: vtab-svhn, fgvc-cub200, hta-cifar10, digits, …), an alias "
        "(a bare VTAB-1k task name such as `svhn` means the VTAB-1k task), or `folder:<path>` for an image folder "
        "with one sub-folder per class.",
    )
    protocol: Literal["vtab1k", "fgvc", "hta", "holdout"] | None = Field(
        None,
        description="Split protocol: `vtab1k` (the archive's train800/val200/train800val200/test lists), `fgvc` "
        "(VPT's train/val/test json), `hta` (seeded hold-out of the official train split + official test), "
        "`holdout` (seeded stratified train/val/test of all images). Default: the dataset's (registry).",
    )
    seed: int = Field(42, ge=0, description="Seed of the seeded hold-outs (protocols hta and holdout).")
    root: Path = Field(Path("data"), description="Folder for downloads, extracted datasets and split files.")
    source: Path | None = Field(
        None,
        description="A local copy to use instead of downloading: the vtab-1k.zip archive or its extracted folder "
        "(VTAB-1k), or the image archive of an FGVC set (required for NABirds, which has no public URL).",
    )
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="hta and holdout: fraction of each class held out for validation."
    )
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="holdout: fraction of each class held out for test.")
    transform: Literal["vtab", "fgvc"] | None = Field(
        None,
        description="`vtab`: resize to the input size, no augmentation; `fgvc`: resize to 256/224 of it, then "
        "random crop + horizontal flip for training, centre crop for evaluation. Default: the dataset's (registry).",
    )
    skip_corrupt: bool = Field(
        False,
        description="Decode every image during prepare and leave unreadable ones out of the splits (listed in the "
        "manifest). Otherwise an unreadable image is an error naming the file.",
    )
    verify_checksums: bool = Field(
        True, description="Check downloaded and in-place files against the publishers' checksums where known."
    )
    render_size: int = Field(
        224,
        ge=8,
        description="digits, shapes-count, shapes-loc: side in pixels of the images written by prepare "
        "(the backbone's input size).",
    )

    @field_validator("test_fraction")
    @classmethod
    def _room_for_training(cls, value: float, info: Any) -> float:
        val_fraction = info.data.get("val_fraction")
        if val_fraction is not None and val_fraction + value >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be < 1 (got {val_fraction} + {value})")
        return value


class TrainSettings(_Section):
    """The training engine; defaults are the release's recipe (method file §4)."""

    epochs: int = Field(100, ge=1, description="Training epochs.")
    batch_size: int = Field(64, ge=1, description="Images per optimiser step (before accumulation).")
    accumulate: int = Field(1, ge=1, description="Batches whose gradients are summed per optimiser step.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate of AdamW (after warm-up).")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay, on weights of >= 2 dimensions only.")
    warmup_epochs: float = Field(10, ge=0.0, description="Linear warm-up from 0 to `lr`, in epochs.")
    min_lr: float = Field(1e-7, ge=0.0, description="The per-step cosine schedule ends at this learning rate.")
    seed: int = Field(42, ge=0, description="Seed of initialisation, shuffling, dropout and augmentation.")
    device: str = Field(
        "auto",
        description="`auto` (CUDA when present, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="`auto`: bf16 autocast on CUDA when supported, else fp16 with a gradient scaler; fp32 on CPU.",
    )
    cpu_numerics: Literal["native", "portable"] = Field(
        "native",
        description="On the CPU: `native` computes with this machine's fastest kernels and all its cores (the "
        "last bits of weights and logits differ between machines); `portable` pins torch's CPU libraries (ATen's "
        "AVX2 kernels, MKL's reproducible AVX2 branch, oneDNN off) and the thread count, so that every Intel "
        "x86-64 CPU with AVX2 gives the same bytes for a given torch build and `cpu_threads` — not guaranteed on "
        "AMD, where MKL keeps its own code (benchmarks/CPU_REPRODUCIBILITY.md). No effect on a GPU.",
    )
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile the model's forward (and so its backward) for training and evaluation: "
        "`default` fuses its operations (true means default); `reduce-overhead` also replays each step as a CUDA "
        "graph on a GPU, removing the per-operation launch cost (on the CPU it is `default`); `max-autotune` also "
        "searches the fastest kernels (longer compilation). The first step compiles (about a minute, each new "
        "batch shape and the evaluation once more); the time is logged (MLflow metric compile_seconds). Results "
        "differ from `off` in the last bits (fused arithmetic, another dropout random stream): `off` is the "
        "reproducible default.",
    )
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="Threads torch computes with on the CPU. Unset: one per core under `native`, 2 under `portable` "
        "(whose bytes depend on the count, so every machine must use the same one).",
    )
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    train_split: Literal["train", "trainval"] = Field(
        "train", description="Split to train on: `train` (tuning) or `trainval` (final run, protocol §4)."
    )
    val_split: Literal["val"] | None = Field(
        "val",
        description="Split validated every epoch, whose best epoch is kept; null trains without validation and "
        "keeps the last epoch (required with train_split=trainval, which contains val).",
    )
    test_split: Literal["test"] | None = Field(
        "test", description="Split evaluated once at the end with the kept weights; null skips it (tuning trials)."
    )
    eval_batch_size: int = Field(256, ge=1, description="Images per batch when evaluating.")
    output: Path = Field(Path("runs/train"), description="Folder for checkpoints and the final artifact.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is None:
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value: Any) -> Any:
        """YAML's booleans as the switch they read as: false → off, true → default."""
        return ("default" if value else "off") if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _no_validation_on_training_images(self) -> TrainSettings:
        if self.val_split is not None and self.train_split == "trainval":
            raise ValueError("val_split must be null when train_split is trainval (trainval contains val)")
        return self


class FloatRange(_Section):
    """A continuous search dimension."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = Field(False, description="Sample on a log scale (for scales like γ or a learning rate).")

    @model_validator(mode="after")
    def _ordered(self) -> FloatRange:
        if not self.low < self.high or (self.log and self.low <= 0):
            raise ValueError(f"need low < high (and low > 0 with log: true), got low={self.low}, high={self.high}")
        return self


class IntRange(_Section):
    """An integer search dimension."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"need low < high, got low={self.low}, high={self.high}")
        return self


class Choice(_Section):
    """A categorical search dimension."""

    type: Literal["choice"] = "choice"
    choices: list[Any] = Field(min_length=1)


SearchDimension = Annotated[FloatRange | IntRange | Choice, Field(discriminator="type")]


class TuneSettings(_Section):
    """Optuna tuning on the validation split (`sa2vp tune`, the pipeline's tune stage)."""

    space: dict[str, Any] | None = Field(
        None,
        description="Changes to the method's own search space (SA²VP: γ log-scale, λ, the window c and train.lr), "
        "nested like the settings, so that one `--set` / `dvc exp run -S` changes one thing: "
        "`tune.space.model.sa2vp.gamma.high=2` (a field of a dimension; the rest stays the method's), "
        "`tune.space.model.sa2vp.window.choices=[1,3]`, `tune.space.train.lr.start=0.005` (the first trial's value; "
        "default: the setting's), `tune.space.model.sa2vp.lam=null` (not searched), or a whole new dimension "
        "`tune.space.model.sa2vp.prompt_rank={type: choice, choices: [8, 16]}` (float and int: low, high, log; int: "
        "step). A searched setting that is given a value (params.yaml, --set, SA2VP_*) is pinned — left out of the "
        "search — unless its entry here gives a range or choices; then the value is where its search starts.",
    )
    n_trials: int = Field(
        20,
        ge=1,
        description="The study's trials in all: however many workers share the study (tune.storage a database "
        "URL), they run this many together; a run on a study that has them adds none, a larger value adds the "
        "difference. A failed or killed trial counts; its retries (tune.retries) come on top.",
    )
    timeout: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds.")
    epochs: int | None = Field(None, ge=1, description="Training epochs per trial; default train.epochs.")
    sampler_seed: int = Field(
        42,
        ge=0,
        description="Seed of the TPE sampler: each trial samples with a seed drawn from this and its number, so "
        "a rerun proposes what it proposed before, and workers sharing a study never propose the same.",
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="Stops unpromising trials early on their per-epoch validation accuracy."
    )
    storage: str = Field(
        "runs/tune/optuna.journal",
        description="Optuna storage: a file path (Optuna's journal file, one machine) or a database URL "
        "(sqlite:///…, postgresql://…) that many machines share.",
    )
    study_name: str | None = Field(None, description="Default: <dataset>-<method>-<backbone>.")
    heartbeat_interval: int = Field(
        60,
        ge=1,
        description="Seconds between the heartbeats a worker records for its running trial in a database storage; "
        "the other workers mark a trial failed when its heartbeats stop for tune.grace_period seconds (its worker "
        "was killed or lost). A journal file, one machine, has no heartbeats: a trial whose process has ended is "
        "failed instead.",
    )
    grace_period: int = Field(
        180, ge=1, description="Seconds without a heartbeat after which a running trial counts as dead."
    )
    retries: int = Field(
        0,
        ge=0,
        description="Times a trial whose worker died is run again with the same settings (a new trial, beyond "
        "tune.n_trials); 0: it stays failed.",
    )
    enqueue_defaults: bool = Field(
        True,
        description="Start a new study with each searched setting at its start as the first trial (tuning "
        "never ends below the settings as given).",
    )
    output: Path = Field(Path("runs/tune"), description="Folder for best.yaml and the trials' temporary files.")

    @field_validator("space")
    @classmethod
    def _setting_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        space_entries(value)  # a typo would fail every trial, after the study is already written
        return value

    @model_validator(mode="after")
    def _grace_beyond_heartbeats(self) -> TuneSettings:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period must be > heartbeat_interval, or live trials count as dead (got {self.grace_period} "
                f"<= {self.heartbeat_interval})"
            )
        return self


# The fields an entry of tune.space may give: a dimension's (FloatRange, IntRange, Choice) and the first trial's.
SPACE_FIELDS = ("type", "low", "high", "log", "step", "choices", "start")
SEARCHABLE_SECTIONS = ("model", "train", "backbone")


def space_entries(space: Mapping[str, Any] | None) -> dict[str, dict[str, Any] | None]:
    """tune.space as dotted setting → its entry: a mapping of SPACE_FIELDS, or None (not searched).

    Entries nest by the settings' sections (model: {sa2vp: {gamma: {high: 2}}}); a dotted key
    (model.sa2vp.gamma: …) names the same entry. Raises ValueError naming the first key that is no setting, or
    an entry that is no mapping."""
    leaves = set(setting_keys(sections=False))
    entries: dict[str, dict[str, Any] | None] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for name, entry in node.items():
            key = f"{prefix}{name}"
            if key.split(".", 1)[0] not in SEARCHABLE_SECTIONS:
                raise ValueError(f"key {key!r}: expected a setting under {', '.join(SEARCHABLE_SECTIONS)}")
            if key not in leaves:
                if key not in setting_keys() or not isinstance(entry, Mapping):
                    raise ValueError(f"key {key!r} is not a setting{did_you_mean(key)}")
                walk(entry, key + ".")
            elif entry is None:
                entries[key] = None
            elif not isinstance(entry, Mapping) or not set(entry) <= set(SPACE_FIELDS):
                extra = sorted(set(entry) - set(SPACE_FIELDS)) if isinstance(entry, Mapping) else entry
                raise ValueError(
                    f"{key}: {extra!r} is not a field of a search dimension; expected a mapping of "
                    f"{', '.join(SPACE_FIELDS)}, or null (not searched)"
                )
            else:
                entries[key] = dict(entry)

    walk(space or {}, "")
    return entries


class TrackingSettings(_Section):
    """MLflow tracking."""

    uri: str = Field(
        "sqlite:///mlflow.db",
        description="MLflow tracking URI: a local store (`sqlite:///mlflow.db`, MLflow's default, at the project "
        "root) or a tracking server (`http://host:5000`).",
    )
    experiment: str = Field("sa2vp", min_length=1, description="MLflow experiment the runs are logged to.")
    run_name: str | None = Field(None, description="Name of the run; default: dataset, method and backbone.")
    enabled: bool = Field(True, description="Log to MLflow at all (false: files only).")
    log_model: bool = Field(
        True,
        description="Also log the trained model as an MLflow model (pyfunc, `runs:/<run id>/classifier`: "
        "the Models tab, the registry, `mlflow models serve`); about a second per run.",
    )


class SuiteSettings(_Section):
    """A benchmark suite (pipelines/<suite>/): every dataset × variant cell tuned, trained and tested alike."""

    name: str = Field("suite", min_length=1, description="Suite name: study names, MLflow run names, the report.")
    datasets: list[str] = Field(default_factory=list, description="Registry names (or folder:<path>) of the suite.")
    variants: list[str] = Field(
        default_factory=list,
        description="The table's rows: a method name (`linear`, `sa2vp`, …: sets model.method), or a name given "
        "settings in `overrides` (an ablation such as `global: {model.sa2vp.window: global}`).",
    )
    seeds: list[int] = Field(
        default_factory=lambda: [42],
        min_length=1,
        description="train.seed of the final runs; the report gives mean ± std over them.",
    )
    tune: bool = Field(
        True,
        description="Tune each cell on its validation split first (the protocol); false: train with the "
        "settings as given (each method's defaults).",
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted settings by registry group (vtab-natural, fgvc, …), dataset or variant, applied in "
        "that order on top of the file's settings — the release's per-group values live here. A named ablation's "
        "settings are pinned (tuning leaves them out of its search); a method's (e.g. `full: {train.lr: 2e-4}`) "
        "are where its search starts, the first trial.",
    )
    output: Path = Field(Path("results"), description="Folder of the cells: <output>/<dataset>/<variant>/.")
    report: Path = Field(Path("report"), description="Folder of the results table (results.md, results.csv).")

    @field_validator("overrides")
    @classmethod
    def _dotted(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for scope, settings in value.items():
            for key in settings:
                if "." not in key or key.split(".", 1)[0] not in {"model", "train", "tune", "backbone", "data"}:
                    raise ValueError(
                        f"{scope}: key {key!r}: expected a dotted setting (model.sa2vp.gamma, train.lr, …)"
                    )
        return value

    @model_validator(mode="after")
    def _known_variants(self) -> SuiteSettings:
        methods = set(get_args(ModelSettings.model_fields["method"].annotation))
        unknown = [v for v in self.variants if v not in methods and v not in self.overrides]
        if unknown:
            raise ValueError(
                f"variants {unknown}: each must be a method ({', '.join(sorted(methods))}) or have "
                "settings under suite.overrides"
            )
        return self


ENV_PREFIX = "SA2VP_"
ENV_DELIMITER = "__"


class Settings(BaseSettings):
    """params.yaml: one section per concern."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, extra="forbid")

    backbone: BackboneSettings = BackboneSettings()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    train: TrainSettings = TrainSettings()
    tune: TuneSettings = TuneSettings()
    tracking: TrackingSettings = TrackingSettings()
    suite: SuiteSettings = SuiteSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit overrides > SA2VP_* environment > params.yaml > defaults above.
        if not _use_environment.get():
            return init_settings, _ParamsFileSource(settings_cls)
        return init_settings, env_settings, _ParamsFileSource(settings_cls)


_params_file: ContextVar[Path | None] = ContextVar("sa2vp_params_file", default=None)
# Dotted keys given as overrides: they replace the file's value outright. (pydantic-settings deep-merges its
# sources, which would otherwise merge an overriding mapping such as backbone.model_kwargs into the file's.)
_overridden: ContextVar[frozenset[str]] = ContextVar("sa2vp_overridden", default=frozenset())
# Off for settings that must not change with the shell they are read in (an artifact's saved settings).
_use_environment: ContextVar[bool] = ContextVar("sa2vp_use_environment", default=True)


class _ParamsFileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _params_file.get()
        data = read_params(path) if path is not None else {}
        for dotted in _overridden.get():
            holder, leaf = dotted_parent(data, dotted)
            if holder is not None:
                holder.pop(leaf, None)
        return data


def read_params(path: Path) -> dict[str, Any]:
    """The mapping in a params.yaml, or a SettingsError naming the file and what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"{path}: settings file not found") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of sections (backbone, model, …), got {type(data).__name__}")
    return data


def read_overrides(path: Path) -> dict[str, Any]:
    """Dotted overrides from a YAML file — a mapping of `section.key: value`, or such a mapping under
    `settings:` (the best.yaml that `sa2vp tune` writes)."""
    data = read_params(path)
    overrides = data.get("settings", data)
    if not isinstance(overrides, dict) or not all(isinstance(k, str) and "." in k for k in overrides):
        raise SettingsError(
            f"{path}: expected a mapping of dotted settings (model.sa2vp.gamma: 0.5), optionally under `settings:`"
        )
    return dict(overrides)


Origin = str | Path
"""Where an override came from, as an error names it: a command-line label (`--set`) or a file's path."""


def load_settings(
    params: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    origins: Mapping[str, Origin] | None = None,
) -> Settings:
    """Settings from a params file, the environment and dotted overrides (`{"model.sa2vp.gamma": 0.5}`).

    `origins` says where each override came from (`--set`, a --set-file's path), for the error message.
    Raises SettingsError with one part per invalid key, each naming its source: `--set model.sa2vp.window: …`,
    `environment SA2VP_MODEL__SA2VP__GAMMA: …`, `params.yaml: model.sa2vp.lam: …` (an override without an
    origin: the key).
    """
    environment = environment_settings()
    _check_environment(environment)
    another_backbone = _keys_of_another_backbone(params, overrides or {}, origins or {}, environment)
    sources = _Sources(params, {key: (origins or {}).get(key) for key in overrides or {}}, environment)
    token = _params_file.set(Path(params) if params is not None else None)
    keys = _overridden.set(frozenset(overrides or {}) | another_backbone)
    try:
        return Settings(**_set_all({}, overrides or {}, sources))
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc, sources)) from None
    finally:
        _params_file.reset(token)
        _overridden.reset(keys)


# Backbone settings written for one backbone.name, wrong for another — a ViT's depth is no Swin argument: its
# architecture (one group: an override that gives either describes the new architecture, the file the rest) and
# its weights file and that file's hash (each on its own).
ARCHITECTURE_KEYS = ("model_kwargs", "img_size")
FILE_KEYS = ("weights", "sha256")


def _keys_of_another_backbone(
    params: Path | str | None,
    overrides: Mapping[str, Any],
    origins: Mapping[str, Origin],
    environment: Mapping[str, str],
) -> frozenset[str]:
    """The params file's backbone settings (dotted) to leave out because an override or SA2VP_* variable gives
    another backbone.name: ARCHITECTURE_KEYS unless it gives one of them, FILE_KEYS unless it gives them (a
    weights of `hub` or `random` is no file: it stays). Logs a notice naming them."""
    if params is None or "backbone.name" not in {*overrides, *environment} or "backbone" in {*overrides, *environment}:
        return frozenset()
    section = read_params(Path(params)).get("backbone")
    if not isinstance(section, Mapping):
        return frozenset()
    if "backbone.name" in overrides:
        new, origin = overrides["backbone.name"], origins.get("backbone.name", "override")
    else:
        variable = environment["backbone.name"]
        new, origin = os.environ.get(variable), f"environment {variable}"
    old = section.get("name", BackboneSettings.model_fields["name"].default)
    if new is None or str(new) == str(old):
        return frozenset()
    given = {*overrides, *environment}
    architecture_given = any(f"backbone.{key}" in given for key in ARCHITECTURE_KEYS)
    bound = [
        key
        for key in (*ARCHITECTURE_KEYS, *FILE_KEYS)
        if key in section
        and f"backbone.{key}" not in given
        and not (key in ARCHITECTURE_KEYS and architecture_given)
        and not (key == "weights" and section[key] in ("hub", "random"))
    ]
    if bound:
        log.info(
            "backbone.name=%s (%s) replaces %s's %s: its %s, written for that backbone, are left out (now: "
            "the defaults%s); give them as overrides too to keep them",
            new,
            origin,
            params,
            old,
            ", ".join(f"backbone.{key}" for key in bound),
            ", hub weights" if "weights" in bound else "",
        )
    return frozenset(f"backbone.{key}" for key in bound)


def environment_settings(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SA2VP_* variables as dotted key → variable name (`model.sa2vp.gamma` → `SA2VP_MODEL__SA2VP__GAMMA`).

    Matched without regard to case, as pydantic-settings reads them."""
    environ = os.environ if environ is None else environ
    return {
        name[len(ENV_PREFIX) :].lower().replace(ENV_DELIMITER, "."): name
        for name in environ
        if name.upper().startswith(ENV_PREFIX)
    }


@functools.cache
def setting_keys(sections: bool = True) -> tuple[str, ...]:
    """Every valid dotted key (`model.sa2vp.gamma`), with the sections themselves (`model`, `model.vpt`) unless
    `sections` is false."""
    flat = flatten_settings(Settings.model_construct())
    parents = {".".join(key.split(".")[:depth]) for key in flat for depth in range(1, key.count(".") + 1)}
    return tuple(sorted({*flat, *parents})) if sections else tuple(sorted(flat))


def did_you_mean(key: str) -> str:
    """`; did you mean model.sa2vp.gamma?` for a mistyped key, or nothing when no setting is close.

    First the setting of the same section whose own name is closest (`model.gamma`, as SA²VP's settings were
    named before they moved into model.sa2vp, and `model.gama` both mean model.sa2vp.gamma), where one is
    clearly closest; then the closest whole key."""
    keys = setting_keys()
    section, leaf = key.partition(".")[0], key.rpartition(".")[2]
    sections = {k.partition(".")[0] for k in keys}
    if section not in sections:  # a mistyped section (modle.gamma): look in the closest one
        section = next(iter(difflib.get_close_matches(section, sections, n=1, cutoff=0.75)), section)
    in_section = [k for k in keys if k.startswith(section + ".") and k != key]
    for cutoff in (1.0, 0.75):
        leaves = {k.rpartition(".")[2] for k in in_section}
        best = difflib.get_close_matches(leaf, leaves, n=1, cutoff=cutoff)
        named = [k for k in in_section if best and k.rpartition(".")[2] == best[0]]
        if len(named) == 1:
            return f"; did you mean {named[0]}?"
        if named and cutoff == 1.0:  # the same name in several methods' sections (dropout)
            return f"; did you mean one of {', '.join(named)}?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _check_environment(environment: Mapping[str, str]) -> None:
    # pydantic-settings reads only the variables of known sections; a typo in the section would be ignored.
    for key, name in environment.items():
        if key.split(".", 1)[0] not in Settings.model_fields:
            raise SettingsError(
                f"environment {name}: unknown setting {key}{did_you_mean(key)} "
                f"(SA2VP_* variables are settings: SA2VP_<SECTION>__<KEY>)"
            )


@dataclass(frozen=True)
class _Sources:
    """Where the given settings came from; an error is blamed on the first that gave its key (or a key
    above or below it), in the order of precedence: overrides, environment, params file."""

    params: Path | str | None = None
    overrides: Mapping[str, Origin | None] = field(default_factory=dict)
    environment: Mapping[str, str] = field(default_factory=dict)

    def line(self, key: str, message: str, unknown: bool) -> str:
        """`<source> key: message`; for an unknown key, the key as it was given, with a suggestion."""
        for given, origin in self.overrides.items():
            if _related(given, key):
                shown = given if unknown and given.startswith(key + ".") else key
                text = f"{shown}: {message}{did_you_mean(shown) if unknown else ''}"
                if origin is None:
                    return text
                return f"{origin}: {text}" if isinstance(origin, Path) else f"{origin} {text}"
        for given, name in self.environment.items():
            if _related(given, key):
                shown = given if unknown and given.startswith(key + ".") else key
                hint = did_you_mean(shown) if unknown else ""
                return (
                    f"environment {name}: {message}{hint}"
                    if shown == given
                    else f"environment {name}: {shown}: {message}{hint}"
                )
        text = f"{key}: {message}{did_you_mean(key) if unknown else ''}"
        return f"{self.params}: {text}" if self.params is not None else text


def _related(given: str, key: str) -> bool:
    return given == key or given.startswith(key + ".") or key.startswith(given + ".")


def describe_validation_error(exc: ValidationError, sources: _Sources | None = None) -> str:
    """pydantic's errors as `<source> key: message (got value)` parts on one line, `; `-separated."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        unknown = error["type"] == "extra_forbidden"
        if unknown:
            message = "unknown setting"
        got = error.get("input")
        suffix = f" (got {got!r})" if error["type"] != "missing" and not unknown and not isinstance(got, dict) else ""
        lines.append((sources or _Sources()).line(key, message + suffix, unknown))
    return "; ".join(lines)


def flatten_settings(settings: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every setting as `section.key` → JSON value (MLflow params, trial overrides, comparisons). Mappings
    that are settings of their own (backbone.model_kwargs, tune.space) stay whole."""
    flat: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            flat.update(flatten_settings(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = to_jsonable_python(value)
    return flat


def settings_from_dump(dump: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings saved with `model_dump(mode="json")` (an artifact's record), with dotted overrides; the
    environment and params files play no part."""
    tree = _set_all(json.loads(json.dumps(dump)), overrides or {})
    environment = _use_environment.set(False)  # model_validate runs the settings sources too
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    finally:
        _use_environment.reset(environment)


def _set_all(tree: dict[str, Any], dotted: Mapping[str, Any], sources: _Sources | None = None) -> dict[str, Any]:
    """`tree` with every dotted setting of `dotted` set in it, in order; one below a key given a value that is no
    section (`model.sa2vp.gamma` after `model=1`) is a SettingsError naming its source."""
    for key, value in dotted.items():
        try:
            set_dotted(tree, key, value)
        except ValueError as exc:
            raise SettingsError((sources or _Sources()).line(key, str(exc), unknown=False)) from None
    return tree


def dotted_parent(tree: dict[str, Any], key: str, *, create: bool = False) -> tuple[dict[str, Any] | None, str]:
    """The mapping in a nested `tree` that holds a dotted `key`'s last part, and that part: `model.lora.rank` →
    (tree["model"]["lora"], "rank"). A part on the way that is missing or null: None, or with `create` a new
    mapping put there. One that holds another value: None, or with `create` a ValueError (`model.sa2vp.gamma` where
    `model` was given 1 is no setting)."""
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.get(part)
        if not isinstance(child, dict):
            if not create:
                return None, leaf
            if child is not None:
                above = ".".join(parents[: depth + 1])
                raise ValueError(f"{above} is given the value {child!r}, not a section of settings")
            child = node[part] = {}
        node = child
    return node, leaf


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """`tree[a][b][c] = value` for the dotted key `a.b.c`, making the mappings on the way."""
    node, leaf = dotted_parent(tree, key, create=True)
    if node is not None:  # always, with create
        node[leaf] = value
