"""What a sparse-format `.tflite` file holds and what it buys on this CPU.

`export_tflite(..., sparsity=True)` asks the converter for its sparse weight
encoding (`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`): zero-heavy constant
tensors are stored compressed, each behind a DENSIFY op. What runs them:

- LiteRT's XNNPACK delegate (the default CPU path) takes the sparse tensors
  and asks XNNPACK for sparse inference. XNNPACK runs its sparse 1x1
  convolution kernels only (a) on CPUs without AVX: ARM phones and boards,
  SSE-only x86 (on x86 with AVX it keeps the dense kernels, which it expects
  to be faster: `xnn_is_chw_compatible_config` in XNNPACK's
  `hardware-config.h`), and (b) in a float32 NHWC subgraph that runs from a
  3x3 stride-2 convolution on 3 channels with explicit padding 1 to a mean
  over the spatial axes, every 1x1 kernel in it at least 2/3 zero, and no
  TensorFlow "same" padding at a stride of 2 (Keras' MobileNetV2 has it).
- Everywhere else the weights are densified when the file is loaded, and
  the file runs at dense speed.

So unstructured sparsity buys file size (and download size) everywhere, and
speed only in that case; structured pruning (`granularity="unit"`, then
`compact`) buys speed on every runtime.
"""

import platform

SPEED_NOTE = (
    "LiteRT loads these weights through DENSIFY ops: XNNPACK runs sparse "
    "kernels only on CPUs without AVX (ARM; SSE-only x86), in a float32 "
    "subgraph from a 3x3 stride-2 convolution with explicit padding 1 to a "
    "spatial mean; elsewhere the file runs at dense speed. Structured pruning "
    "(granularity='unit', then compact) is what makes a model faster.")


def x86_avx(cpuinfo="/proc/cpuinfo", machine=None):
    """True on an x86 CPU with AVX (where XNNPACK keeps dense kernels), False
    on other CPUs, None when the CPU's features cannot be read (not Linux)."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return None


def encoding(flatbuffer):
    """(sparse tensors, DENSIFY ops) in a `.tflite` file's bytes."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(flatbuffer), 0)
    densify = {i for i, code in enumerate(model.operatorCodes or [])
               if max(code.builtinCode, code.deprecatedBuiltinCode)
               == schema.BuiltinOperator.DENSIFY}
    sparse = ops = 0
    for graph in model.subgraphs or []:
        sparse += sum(t.sparsity is not None for t in graph.tensors or [])
        ops += sum(op.opcodeIndex in densify for op in graph.operators or [])
    return sparse, ops


def note(flatbuffer, avx=None):
    """One sentence for an export report: how many weight tensors are stored
    sparse, and whether this CPU (`avx`: `x86_avx()` by default) can run
    them faster."""
    sparse, densify = encoding(flatbuffer)
    if not sparse:
        return ("sparsity=True stored no tensor sparse (the converter encodes "
                "only weights that are mostly zero).")
    avx = x86_avx() if avx is None else avx
    here = {True: "this CPU has AVX, so here it runs at dense speed",
            False: "this CPU has no AVX",
            None: "this CPU's features could not be read"}[avx]
    return (f"{sparse} weight tensors are stored sparse ({densify} DENSIFY ops): "
            f"{SPEED_NOTE} ({here}.)")
