"""Similarity-preserving knowledge distillation (SP).

Inputs the teacher sees as similar should look similar to the student too, in
the student's own activation space: the student matches the teacher's
batch-wise similarity (Gram) matrices, not its activations, so teacher and
student layers may differ in shape, channels and spatial size.

- `similarity_preserving_loss`: the pure loss for one pair of activations.
- `SimilarityPreserving`: the same as a `keras.distillation.DistillationLoss`,
  for Keras's own `keras.distillation.Distiller`.
- `logit_distillation_loss`: Hinton's logit-distillation (KD) term, pure.
- `Distiller`: a `keras.Model` that trains a student from a frozen teacher
  with the compiled student loss (any Keras loss, `SimLoss` included)
  `+ gamma * sum of SP over layer pairs`, optionally plus Hinton logit
  distillation, running the student once per step, on every Keras backend.
- `find_layer`, `resolution_stages`, `auto_layer_pairs`: how layers are
  found by name and paired automatically (`layer_pairs="auto"`).

Modules: `sp.py` (the SP loss), `kd.py` (the KD loss), `layers.py` (layer
lookup and pairing), `distiller.py` (the `Distiller`).

References:
    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
    https://arxiv.org/abs/1907.09682

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    2015. https://arxiv.org/abs/1503.02531
"""

from keras_simloss.distillation.distiller import (
    Distiller,
    logger,  # noqa: F401  (as in 0.1.0)
)
from keras_simloss.distillation.kd import logit_distillation_loss
from keras_simloss.distillation.layers import (
    auto_layer_pairs,
    find_layer,
    resolution_stages,
)
from keras_simloss.distillation.sp import (
    SimilarityPreserving,
    check_same_batch,
    similarity_preserving_loss,
)

# A saved config names its class's module: the public path, as in 0.1.0.
Distiller.__module__ = SimilarityPreserving.__module__ = __name__

__all__ = [
    "Distiller",
    "SimilarityPreserving",
    "auto_layer_pairs",
    "check_same_batch",
    "find_layer",
    "logit_distillation_loss",
    "resolution_stages",
    "similarity_preserving_loss",
]
