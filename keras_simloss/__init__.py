"""keras_simloss: class-similarity losses and similarity-preserving distillation.

- `SimLoss`: cross entropy that knows which classes are alike
  (Kobs et al., 2020, https://arxiv.org/abs/2003.03182).
- `keras_simloss.similarity`: builders of class-similarity matrices.
- `keras_simloss.metrics`: metrics of how good the mistakes are.
- `SoftLabelCrossEntropy`: cross entropy against soft labels from a class
  similarity (Bertinetto et al., 2020), the alternative to weigh SimLoss
  against.
- `decode_ordinal`, `OrdinalDecoding`: argmax / median / mean read-outs of
  ordered classes (e.g. ages); `decode_min_risk`, `MinRiskDecoding`: the
  class of least expected cost under any similarity (Karthik et al., 2021).
- `keras_simloss.sharding`: class-sharded training under
  `keras.distribution.ModelParallel` when `C` outgrows one device.
- `Distiller`, `SimilarityPreserving`: similarity-preserving knowledge
  distillation (Tung & Mori, 2019, https://arxiv.org/abs/1907.09682).
"""

from keras_simloss import (
    datasets,
    decoding,
    distillation,
    metrics,
    sharding,
    similarity,
)
from keras_simloss.decoding import (
    MinRiskDecoding,
    OrdinalDecoding,
    decode_min_risk,
    decode_ordinal,
)
from keras_simloss.distillation import (
    Distiller,
    SimilarityPreserving,
    logit_distillation_loss,
    similarity_preserving_loss,
)
from keras_simloss.losses import (
    SimLoss,
    SoftLabelCrossEntropy,
    sim_loss,
    soft_label_cross_entropy,
)
from keras_simloss.metrics import (
    AccuracyWithinK,
    ClassMeanAbsoluteError,
    ClassMeanSquaredError,
    ConfusionMatrix,
    FailedSuperclassAccuracy,
    MistakeSeverity,
    QuadraticWeightedKappa,
    SuperclassAccuracy,
    TopKMistakeSeverity,
)

__version__ = "0.1.0"

__all__ = [
    "AccuracyWithinK",
    "ClassMeanAbsoluteError",
    "ClassMeanSquaredError",
    "ConfusionMatrix",
    "Distiller",
    "FailedSuperclassAccuracy",
    "MinRiskDecoding",
    "MistakeSeverity",
    "OrdinalDecoding",
    "QuadraticWeightedKappa",
    "SimLoss",
    "SimilarityPreserving",
    "SoftLabelCrossEntropy",
    "SuperclassAccuracy",
    "TopKMistakeSeverity",
    "datasets",
    "decode_min_risk",
    "decode_ordinal",
    "decoding",
    "distillation",
    "logit_distillation_loss",
    "metrics",
    "sharding",
    "sim_loss",
    "similarity",
    "similarity_preserving_loss",
    "soft_label_cross_entropy",
]
