"""keras_simloss: class-similarity losses and similarity-preserving distillation.

- `SimLoss`: cross entropy that knows which classes are alike
  (Kobs et al., 2020, https://arxiv.org/abs/2003.03182).
- `keras_simloss.similarity`: builders of class-similarity matrices.
- `keras_simloss.metrics`: metrics of how good the mistakes are.
- `decode_ordinal`, `OrdinalDecoding`: argmax / median / mean read-outs of
  ordered classes (e.g. ages).
- `Distiller`, `SimilarityPreserving`: similarity-preserving knowledge
  distillation (Tung & Mori, 2019, https://arxiv.org/abs/1907.09682).
"""

from keras_simloss import datasets, decoding, distillation, metrics, similarity
from keras_simloss.decoding import OrdinalDecoding, decode_ordinal
from keras_simloss.distillation import (
    Distiller,
    SimilarityPreserving,
    logit_distillation_loss,
    similarity_preserving_loss,
)
from keras_simloss.losses import SimLoss, sim_loss
from keras_simloss.metrics import (
    ClassMeanAbsoluteError,
    ClassMeanSquaredError,
    ConfusionMatrix,
    FailedSuperclassAccuracy,
    MistakeSeverity,
    SuperclassAccuracy,
)

__version__ = "0.1.0"

__all__ = [
    "ClassMeanAbsoluteError",
    "ClassMeanSquaredError",
    "ConfusionMatrix",
    "Distiller",
    "FailedSuperclassAccuracy",
    "MistakeSeverity",
    "OrdinalDecoding",
    "SimLoss",
    "SimilarityPreserving",
    "SuperclassAccuracy",
    "datasets",
    "decode_ordinal",
    "decoding",
    "distillation",
    "logit_distillation_loss",
    "metrics",
    "sim_loss",
    "similarity",
    "similarity_preserving_loss",
]
