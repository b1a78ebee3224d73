"""dkdp_keras: Dynamic Knowledge Distillation and Pruning for Keras 3.

Models shrink while they train: importance criteria score weights, units and
layers, threshold policies prune the teacher, and a smaller student is
distilled from it in the same training step.
"""

from dkdp_keras import continual, datasets, importance, report, thresholds, zoo
from dkdp_keras._version import __version__
from dkdp_keras.budget import Budget, count_macs, count_params
from dkdp_keras.callbacks import DKDPCallback, StudentRefresh
from dkdp_keras.compaction import compact
from dkdp_keras.export import ExportReport, export_tflite
from dkdp_keras.latency import LatencyFit, fit_latency
from dkdp_keras.layers import (
    MaskedConv1D,
    MaskedConv2D,
    MaskedConv3D,
    MaskedDense,
    MaskedDepthwiseConv1D,
    MaskedDepthwiseConv2D,
)
from dkdp_keras.model import DKDPModel
from dkdp_keras.prunable import (
    masked_layers,
    prunable,
    sparsity,
    strip,
    sync_batchnorm,
)

__all__ = [
    "Budget",
    "DKDPCallback",
    "DKDPModel",
    "ExportReport",
    "LatencyFit",
    "MaskedConv1D",
    "MaskedConv2D",
    "MaskedConv3D",
    "MaskedDense",
    "MaskedDepthwiseConv1D",
    "MaskedDepthwiseConv2D",
    "StudentRefresh",
    "__version__",
    "compact",
    "continual",
    "count_macs",
    "count_params",
    "datasets",
    "export_tflite",
    "fit_latency",
    "importance",
    "masked_layers",
    "prunable",
    "report",
    "sparsity",
    "strip",
    "sync_batchnorm",
    "thresholds",
    "zoo",
]
