"""Training that diverges stops before any pruning acts on it.

`NonFiniteGuard` remembers a plain model's weights and optimizer state at
each check that found them finite, and `fail` puts them back and raises a
`FloatingPointError` that says what to do. (A DKDPModel's training step
never applies a NaN/Inf step, so there is nothing to put back.)
"""

import numpy as np
from keras import ops


class NonFiniteGuard:
    """The last finite weights of `model` (`keep`), restored by `fail`."""

    def __init__(self, model, restores):
        self.model = model
        self.restores = restores  # False for a DKDPModel
        self.good = None

    def _variables(self):
        optimizer = getattr(self.model, "optimizer", None)
        return list(self.model.weights) + list(getattr(optimizer, "variables", []))

    def keep(self, step):
        """Remember the weights and optimizer state, checked finite."""
        if self.restores:
            self.good = (step, [np.array(ops.convert_to_numpy(v)) for v in self._variables()])

    def check_loss(self, logs, step):
        if logs and "loss" in logs:
            value = float(ops.convert_to_numpy(logs["loss"]))
            if not np.isfinite(value):
                self.fail(f"The training loss became {value} at step {step}.")

    def check_kernels(self, bad_layer, step):
        """Fail if `bad_layer` (the name of a layer whose kernel holds
        NaN/Inf, or None) is given."""
        if bad_layer is not None:
            self.fail(f"The kernel of layer '{bad_layer}' holds NaN or Inf after "
                      f"step {step}: training diverged.")

    def fail(self, what):
        """Raise for NaN/Inf found in training; a plain model gets back the
        weights of the last check that found them finite."""
        restored = ""
        if self.good is not None:
            step, values = self.good
            for var, value in zip(self._variables(), values):
                var.assign(value)
            restored = ("; weights and optimizer state are back to those after "
                        f"step {step}, the last check that found them finite")
        raise FloatingPointError(
            f"{what} DKDPCallback stopped training before any pruning step "
            f"acted on it (masks are as they were{restored}). Lower the "
            "learning rate, check the data for NaN/Inf, or clip gradients "
            "(optimizer clipnorm=1.0); DKDPModel(on_nonfinite='skip') skips "
            "such steps instead."
        )
