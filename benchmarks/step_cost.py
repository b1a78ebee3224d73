"""Forward + backward time of one batch-128 step, each model in isolation.

Shows what a shared DKDP step is made of: the teacher (plain and masked) and
the width-0.5 and width-0.25 students of the reference CNN, each timed as a
tf.function over 5 rounds of 40 steps (median), after one warm-up call.

    python benchmarks/step_cost.py
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import dkdp_keras as dkdp  # noqa: E402


def step_ms(model, x, y, loss):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        return tape.gradient(value, model.trainable_variables)

    step()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(40):
            step()
        rounds.append((time.perf_counter() - start) / 40 * 1000)
    return float(np.median(rounds))


def main():
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((128, 28, 28, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 10, 128))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    models = {
        "teacher (plain)": dkdp.zoo.reference_cnn(),
        "teacher (masked)": dkdp.prunable(dkdp.zoo.reference_cnn()),
        "student width 0.5": dkdp.zoo.reference_cnn(width=0.5),
        "student width 0.25": dkdp.zoo.reference_cnn(width=0.25),
    }
    base = None
    for name, model in models.items():
        ms = step_ms(model, x, y, loss)
        base = base or ms
        print(f"{name:20s} {ms:6.1f} ms/step  {ms / base:.2f} x teacher", flush=True)


if __name__ == "__main__":
    main()
