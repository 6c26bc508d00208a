"""Small serialisable Keras layers used by the ensemble artifact."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="cxr")
class LogProb(keras.layers.Layer):
    """log(clip(p, 1e-7, 1)): turns a softmax member's probabilities into logits (up to a constant)."""

    def call(self, inputs):
        """Apply the clipped log."""
        return keras.ops.log(keras.ops.clip(inputs, 1e-7, 1.0))


CUSTOM_OBJECTS = {"LogProb": LogProb}
