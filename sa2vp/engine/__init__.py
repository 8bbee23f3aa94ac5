"""The training engine: `fit` (train + validate + test + artifact, tracked), `load_artifact` and `evaluate`.

result = fit(settings)                      # trainer.py: AMP, schedule, accumulation, checkpoints, resume
final = fit(final_settings(settings))       # the final run: train+val, no validation, tested once
loaded = load_artifact(result.artifact)     # artifact.py: rebuild the model from the small artifact
metrics = evaluate(loaded, "test")          # evaluation.py: the same metrics, recomputed
"""

from sa2vp.engine.artifact import LoadedArtifact, build_seeded, load_artifact, save_artifact
from sa2vp.engine.evaluation import Prediction, evaluate, predict
from sa2vp.engine.metrics import Metrics, evaluate_model
from sa2vp.engine.trainer import FINAL_RUN, EpochReport, TrainResult, final_settings, fit

__all__ = [
    "FINAL_RUN",
    "EpochReport",
    "LoadedArtifact",
    "Metrics",
    "Prediction",
    "TrainResult",
    "build_seeded",
    "evaluate",
    "evaluate_model",
    "final_settings",
    "fit",
    "load_artifact",
    "predict",
    "save_artifact",
]
