"""LiteRT at its lowest: a Keras model to a `.tflite` flatbuffer, the
interpreter, and batch-1 timing. `export` (checked files) and `latency`
(the fitted latency plane) build on it; it imports nothing of the library.
"""

import tempfile
import time

import numpy as np


def interpreter(path):
    """The LiteRT interpreter of the file at `path`, one thread."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=str(path), num_threads=1)


def convert(model, configure=None, fixed_batch=False):
    """`model` as a `.tflite` flatbuffer (bytes): Keras' SavedModel export,
    then `tf.lite.TFLiteConverter`, which `configure(converter)` may set up
    (optimizations, quantization) before it converts. `fixed_batch`: the
    file's batch axis is 1 instead of dynamic."""
    import keras
    import tensorflow as tf

    signature = None
    if fixed_batch:
        signature = [
            keras.InputSpec(shape=(1,) + tuple(t.shape[1:]), dtype=t.dtype)
            for t in model.inputs
        ]
    with tempfile.TemporaryDirectory() as tmp:
        model.export(tmp, format="tf_saved_model", verbose=False,
                     input_signature=signature)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        if configure is not None:
            configure(converter)
        return converter.convert()


def measure_latency_ms(path, runs=100, warmup=10, batch=1):
    """Median wall time of one invocation (one thread) of a `.tflite` file on
    zeros of the input's shape with the given batch size, in ms."""
    return measure_latencies_ms([path], runs, warmup, batch, rounds=1)[0]


def measure_latencies_ms(paths, runs=100, warmup=10, batch=1, rounds=5):
    """`measure_latency_ms` of several files, interleaved: after each file's
    `warmup`, `rounds` rounds each time every file `runs / rounds` times, so
    that a machine whose speed drifts during the measurement slows every
    file alike. Each file's figure is still the median of `runs`
    invocations."""
    runs = int(runs)
    rounds = max(1, min(int(rounds), runs))
    setups = []
    for path in paths:
        interp = interpreter(path)
        inp = interp.get_input_details()[0]
        shape = [batch] + list(inp["shape"][1:])
        interp.resize_tensor_input(inp["index"], shape)
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], np.zeros(shape, dtype=inp["dtype"]))
        for _ in range(warmup):
            interp.invoke()
        setups.append(interp)
    times = [[] for _ in paths]
    for r in range(rounds):
        share = runs // rounds + (1 if r < runs % rounds else 0)
        for interp, record in zip(setups, times):
            for _ in range(share):
                start = time.perf_counter()
                interp.invoke()
                record.append(time.perf_counter() - start)
    return [1000.0 * float(np.median(t)) for t in times]
