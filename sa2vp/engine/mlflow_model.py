"""A trained sa2vp model as an MLflow model (pyfunc flavour), so MLflow's Models tab, its registry and
`mlflow models serve` can use it.

    log_model(client, run_id, artifact_folder)               # beside the run's `model/` artifact
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/{MODEL_NAME}")
    model.predict(pd.DataFrame({"image": [png_bytes, ...]}))  # label + one probability column per class

The MLflow model holds the sa2vp artifact folder (model.json + model.safetensors) and loads it with
`load_artifact`: no pickle at all (the model is "from code": a short script that builds `Sa2vpClassifier`),
the weights read from safetensors, the backbone rebuilt from its recorded weights and checked against their
hash. Its predictions are `sa2vp predict`'s: the same function computes them. `mlflow.pyfunc.load_model(uri,
model_config={"backbone_weights": ..., "device": ...})` overrides the backbone's weights (as `--backbone-weights`)
or the device.

sa2vp itself travels as code (the model's `code/sa2vp`, put first on sys.path where the model is served), so a
served model runs the code that trained it; its dependencies are pinned to the versions installed here.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import importlib.metadata
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, DataType, Schema

import sa2vp
from sa2vp.errors import ArtifactError

MODEL_NAME = "classifier"  # `runs:/<run id>/classifier`; the run's `model/` artifact is the sa2vp folder itself
ARTIFACT_KEY = "sa2vp_artifact"
IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
PROBABILITY_PREFIX = "proba_"  # one column per class, in the artifact's class order: proba_<class name>
# sa2vp's dependencies that serving does not import (the CLI, pipelines, tuning, a dataset's loader); MLflow
# adds its own pinned requirement.
NOT_FOR_SERVING = frozenset({"typer", "rich", "dvc", "optuna", "scipy", "scikit-learn", "mlflow"})
# The model "from code": MLflow runs this file to build the model, instead of unpickling an object.
MODEL_CODE = """\
from mlflow.models import set_model

from sa2vp.engine.mlflow_model import Sa2vpClassifier

set_model(Sa2vpClassifier())
"""


class Sa2vpClassifier(PythonModel):
    """Classifies a batch of encoded image files (a DataFrame column `image` of bytes; base64 text in JSON)."""

    def load_context(self, context: Any) -> None:
        from sa2vp.engine.artifact import load_artifact

        config = context.model_config or {}
        self.device = config.get("device")
        self.loaded = load_artifact(Path(context.artifacts[ARTIFACT_KEY]), config.get("backbone_weights"))

    # pd.DataFrame: a type hint MLflow takes as it is, without inferring a schema from it (the signature says it)
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return probabilities_frame(self.loaded, _image_bytes(model_input), self.device)


def probabilities_frame(loaded: Any, images: list[bytes], device: str | None = None) -> pd.DataFrame:
    """`predict`'s probabilities of every class for each encoded image: `label` (the most likely class) and
    `proba_<class>` columns in the artifact's class order. The images go through `sa2vp predict`'s own code
    path (files, the same decoding, transform, batches and precision), so both give the same numbers."""
    from sa2vp.engine.evaluation import predict

    classes = loaded.classes
    with tempfile.TemporaryDirectory(prefix="sa2vp-pyfunc-") as folder:
        paths = [Path(folder) / f"{index:06d}" for index in range(len(images))]
        for path, content in zip(paths, images, strict=True):
            path.write_bytes(content)
        predictions = predict(loaded, paths, top_k=len(classes), device=device)
    rows = []
    for prediction in predictions:
        by_class = dict(prediction.top)
        rows.append(
            {LABEL_COLUMN: prediction.top[0][0], **{f"{PROBABILITY_PREFIX}{name}": by_class[name] for name in classes}}
        )
    return pd.DataFrame(rows, columns=[LABEL_COLUMN, *(f"{PROBABILITY_PREFIX}{name}" for name in classes)])


def _image_bytes(model_input: Any) -> list[bytes]:
    """The encoded images of a model input: a DataFrame with an `image` column, or a sequence of images; each
    bytes (base64 text is decoded, as MLflow's JSON serving sends binary columns)."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ArtifactError(
                f"model input: expected a column {IMAGE_COLUMN!r} of encoded image files, got "
                f"columns {list(model_input.columns)}"
            )
        values: Iterable[Any] = model_input[IMAGE_COLUMN]
    elif isinstance(model_input, (bytes, bytearray)):
        values = [model_input]
    else:
        values = model_input
    return [_one_image(index, value) for index, value in enumerate(values)]


def _one_image(index: int, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.decodebytes(value.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError):
            pass
    raise ArtifactError(
        f"model input: image {index} is a {type(value).__name__}; expected the bytes of an image "
        "file (base64 text in JSON)"
    )


def signature(classes: Iterable[str]) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec(DataType.string, LABEL_COLUMN),
                *(ColSpec(DataType.double, f"{PROBABILITY_PREFIX}{name}") for name in classes),
            ]
        ),
    )


def input_example(input_size: Iterable[int]) -> pd.DataFrame:
    """One mid-grey PNG of the model's input size: small, and a valid input."""
    from PIL import Image

    _, height, width = input_size
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (128, 128, 128)).save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def requirements() -> list[str]:
    """sa2vp's dependencies that serving imports, pinned to the versions installed here."""
    pinned = []
    for requirement in importlib.metadata.requires("sa2vp") or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].strip()
        for mark in "<>=!~[ ":
            name = name.split(mark)[0]
        if name.lower() not in NOT_FOR_SERVING:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
    return pinned


def log_model(client: Any, run_id: str, artifact: Path, tags: dict[str, str] | None = None) -> str:
    """Log the sa2vp artifact folder `artifact` as the pyfunc model `MODEL_NAME` of run `run_id`, through
    `client` (an MlflowClient); returns the model's URI (`models:/<model id>`)."""
    from mlflow.models import Model

    from sa2vp.engine.artifact import read_record

    _, record = read_record(artifact)
    # Made here, in the run's experiment: Model.log would make it in the global "active" experiment.
    logged = client.create_logged_model(
        client.get_run(run_id).info.experiment_id,
        name=MODEL_NAME,
        source_run_id=run_id,
        tags=tags,
        model_type="image-classifier",
    )
    with tempfile.TemporaryDirectory(prefix="sa2vp-pyfunc-") as folder:
        code = Path(folder) / "sa2vp_classifier.py"
        code.write_text(MODEL_CODE, encoding="utf-8")
        with _global_tracking_uri(client.tracking_uri):
            info = Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(code),
                artifacts={ARTIFACT_KEY: str(artifact)},
                code_paths=[str(Path(sa2vp.__file__).parent)],
                pip_requirements=requirements(),
                signature=signature(record.classes),
                input_example=input_example(record.data_config.input_size),
                metadata={
                    "classes": list(record.classes),
                    "method": record.settings.model.method,
                    "backbone": record.backbone.name,
                },
                model_config={"backbone_weights": None, "device": None},  # what load_model(model_config=) may set
            )
    return info.model_uri


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for a call that reads it (Model.log has no parameter for it);
    sa2vp otherwise uses explicit clients and leaves the global alone. MLflow's own helper restores the
    global but unsets MLFLOW_TRACKING_URI, which the user may have set: that is restored too."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is not None:
            os.environ["MLFLOW_TRACKING_URI"] = variable
