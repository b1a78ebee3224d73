"""TFLite/LiteRT export: parity with Keras, quantisation, sizes, errors."""

import pathlib

import keras
import numpy as np
import pytest

import dkdp_keras as dkdp
from tests.conftest import small_cnn


#: pytest-xdist: this module's tests share the module fixture `trained`;
#: one worker runs them all, so the fixture is built once.
pytestmark = pytest.mark.xdist_group("test_export")


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on a separable task, so that top-1 decisions have
    margins that survive quantisation."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((512, 8, 8, 2)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > x[:, 4:].mean(axis=(1, 2, 3))).astype("int64")
    y = y + 2 * (x[..., 0].mean(axis=(1, 2)) > x[..., 1].mean(axis=(1, 2)))
    model = dkdp.prunable(small_cnn(), learnable_mask=True)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x, y % 3, epochs=8, batch_size=32, verbose=0)
    for layer in dkdp.masked_layers(model)[:-1]:
        mask = (rng.random(layer.kernel.shape) > 0.5).astype("float32")
        layer.kernel_mask.assign(mask)
    return model, x, y % 3


def test_float32_file_matches_keras(trained, tmp_path):
    model, x, y = trained
    report = dkdp.export_tflite(model, tmp_path / "m.tflite", check_data=(x[:100], y[:100]))
    assert report.prepared == "compacted" and report.quantize == "none"
    assert report.max_abs_diff <= 1e-4 and report.top1_agreement == 1.0
    assert report.bytes == (tmp_path / "m.tflite").stat().st_size
    assert 0 < report.gzip_bytes < report.bytes  # half the weights are zeros
    assert report.latency_ms > 0 and report.check_examples == 100
    keras_acc = np.mean(model.predict(x[:100], verbose=0).argmax(-1) == y[:100])
    assert report.accuracy == pytest.approx(keras_acc)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_fixed_batch_file_has_static_shapes(trained, tmp_path, quantize):
    from ai_edge_litert.interpreter import Interpreter

    model, x, y = trained
    args = dict(quantize=quantize, representative_data=x[:64], check_data=(x[:100], y[:100]))
    dynamic = dkdp.export_tflite(model, tmp_path / "dynamic.tflite", **args)
    fixed = dkdp.export_tflite(model, tmp_path / "fixed.tflite", fixed_batch=True, **args)
    signatures = []
    for path in (dynamic.path, fixed.path):
        detail = Interpreter(model_path=path).get_input_details()[0]
        signatures.append(list(detail["shape_signature"]))
    assert signatures == [[-1, 8, 8, 2], [1, 8, 8, 2]]
    assert fixed.bytes < dynamic.bytes  # Flatten's run-time shape ops are gone
    assert fixed.accuracy == dynamic.accuracy
    assert fixed.top1_agreement >= 0.99 and fixed.max_abs_diff <= dynamic.max_abs_diff + 1e-4
    with pytest.raises(TypeError, match="fixed_batch must be True or False"):
        dkdp.export_tflite(model, tmp_path / "m.tflite", fixed_batch=1)


@pytest.mark.parametrize("quantize", ["dynamic", "float16", "int8"])
def test_quantized_files_agree_and_are_smaller(trained, tmp_path, quantize):
    model, x, y = trained
    dense = dkdp.export_tflite(model, tmp_path / "f32.tflite", check_data=x[:64])
    report = dkdp.export_tflite(model, tmp_path / f"{quantize}.tflite", quantize=quantize,
                                representative_data=x[:200], check_data=x[200:400])
    assert report.top1_agreement >= 0.99
    assert report.bytes < dense.bytes


def test_full_int8_inputs_and_outputs(trained, tmp_path):
    model, x, _ = trained
    report = dkdp.export_tflite(model, tmp_path / "i8.tflite", quantize="int8", int8_io=True,
                                representative_data=x[:200], check_data=x[200:400])
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=report.path)
    assert interp.get_input_details()[0]["dtype"] == np.int8
    assert interp.get_output_details()[0]["dtype"] == np.int8
    assert report.top1_agreement >= 0.99


def test_dkdp_model_exports_its_student(tmp_path):
    model = dkdp.DKDPModel(small_cnn())
    report = dkdp.export_tflite(model, tmp_path / "s.tflite")
    assert report.prepared == "as is" and report.max_abs_diff <= 1e-4


def test_a_failed_strict_check_raises_with_the_figures_and_keeps_the_file_aside(trained, tmp_path):
    model, x, _ = trained
    with pytest.raises(ValueError, match=r"agrees with Keras on the top-1 class for .* \(required 101.0%\)"):
        dkdp.export_tflite(model, tmp_path / "q.tflite", quantize="dynamic",
                           check_data=x[:32], min_top1_agreement=1.01, strict=True)
    assert not (tmp_path / "q.tflite").exists()
    assert (tmp_path / "q.failed-check.tflite").stat().st_size > 0
    with pytest.raises(ValueError, match=r"float32 TFLite model differs from Keras by up to"):
        dkdp.export_tflite(model, tmp_path / "f.tflite", check_data=x[:32], max_abs_diff=0.0,
                           strict=True)
    assert not (tmp_path / "f.tflite").exists()
    assert (tmp_path / "f.failed-check.tflite").stat().st_size > 0


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(path="model.h5"), ValueError, r"must end in .tflite.*'model.tflite'"),
        (dict(path="/nonexistent/dir/m.tflite"), FileNotFoundError, "does not exist"),
        (dict(quantize="int4"), ValueError, "quantize must be one of"),
        (dict(quantize="int8"), ValueError, "needs representative_data"),
        (dict(int8_io=True), ValueError, "int8_io=True needs quantize='int8'"),
        (dict(check_data=np.zeros((2, 5, 5, 2), "float32")), ValueError,
         r"check_data has examples of shape \(5, 5, 2\), the model takes \(8, 8, 2\)"),
    ],
)
def test_bad_input_fails_before_conversion(tmp_path, kwargs, error, text):
    kwargs.setdefault("path", tmp_path / "m.tflite")
    with pytest.raises(error, match=text):
        dkdp.export_tflite(small_cnn(), **kwargs)
    with pytest.raises(TypeError, match="must be a keras.Model"):
        dkdp.export_tflite("model.keras", tmp_path / "m.tflite")


def test_sparse_encoding_shrinks_an_unstructured_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    layers = dkdp.masked_layers(model)
    scores = [dkdp.importance.Magnitude().score(l, "weight") for l in layers]
    result = dkdp.thresholds.compute_masks(layers, scores, 0.9, normalize="none")
    dkdp.thresholds.apply_masks(layers, result.masks)
    x = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    plain = dkdp.export_tflite(model, tmp_path / "plain.tflite", check_data=x, latency_runs=5)
    sparse = dkdp.export_tflite(model, tmp_path / "sparse.tflite", sparsity=True,
                                check_data=x, latency_runs=5)
    assert sparse.bytes < 0.5 * plain.bytes
    assert sparse.max_abs_diff <= 1e-4


def test_align_one_writes_no_zero_channels(tmp_path):
    # 19 live units of LeNet's first 300: compacted to 32 (13 zero units, for
    # XNNPACK) by default, to 19 with align=1, which is what a size budget counts.
    keras.utils.set_random_seed(0)
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    first = dkdp.masked_layers(model)[0]
    mask = first.kernel_mask.numpy()
    mask[:, 19:] = 0.0
    first.kernel_mask.assign(mask)
    x = np.random.default_rng(0).random((16, 28, 28, 1)).astype("float32")
    out = model(x).numpy()
    assert np.ptp(out, axis=0).max() > 1e-3 * np.abs(out).max()  # depends on x
    aligned = dkdp.export_tflite(model, tmp_path / "a16.tflite", check_data=x, latency_runs=5)
    exact = dkdp.export_tflite(model, tmp_path / "a1.tflite", check_data=x, latency_runs=5,
                               align=1)
    assert aligned.check_passed and exact.check_passed
    # 13 units fewer: their 784 input weights, bias and 100 output weights,
    # 4 bytes each (the flatbuffer's padding moves a few bytes)
    assert aligned.bytes - exact.bytes == pytest.approx(13 * (784 + 1 + 100) * 4, rel=0.01)
    with pytest.raises(ValueError, match="align"):  # before conversion, masked or not
        dkdp.export_tflite(dkdp.zoo.lenet_300_100(), tmp_path / "x.tflite", align=0)


def test_sparse_int8_that_litert_cannot_run_is_explained_and_removed(tmp_path):
    # The converter writes sparse int8 kernels that XNNPACK, LiteRT's default
    # CPU delegate, refuses: the error says so and what to do instead.
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(4)])
    kernel = model.layers[0].kernel.numpy()
    kernel[rng.random(kernel.shape) < 0.9] = 0.0
    model.layers[0].kernel.assign(kernel)
    x = rng.random((32, 64)).astype("float32")
    path = tmp_path / "sparse-int8.tflite"
    with pytest.raises(RuntimeError, match="could not run.*export with sparsity=False"):
        dkdp.export_tflite(model, path, quantize="int8", representative_data=x, sparsity=True)
    assert not path.exists()
    dense = dkdp.export_tflite(model, path, quantize="int8", representative_data=x)
    assert dense.top1_agreement >= 0.99


def test_latencies_of_several_files_are_measured_interleaved(monkeypatch):
    """Each file gets its warm-up, then `runs` timed invocations spread over
    rounds that visit every file in turn (a machine whose speed drifts
    during the pass slows every file alike); each figure is the median of
    that file's own invocations."""
    from dkdp_keras import export, litert

    calls = []
    now = [0.0]  # a fake clock: each invocation lasts its file's cost (s)

    class FakeInterpreter:
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def get_input_details(self):
            return [{"shape": np.array([1, 4]), "index": 0, "dtype": np.float32}]

        def resize_tensor_input(self, index, shape):
            pass

        def allocate_tensors(self):
            pass

        def set_tensor(self, index, value):
            pass

        def invoke(self):
            calls.append(self.name)
            now[0] += self.cost

    costs = {"a.tflite": 1, "b.tflite": 3}
    monkeypatch.setattr(litert, "interpreter", lambda path: FakeInterpreter(path, costs[path]))
    monkeypatch.setattr(litert.time, "perf_counter", lambda: now[0])
    medians = export.measure_tflite_latencies_ms(["a.tflite", "b.tflite"], runs=7,
                                                 warmup=2, rounds=3)
    assert medians == [1000.0, 3000.0]
    timed = calls[4:]  # after the two files' warm-ups
    assert calls[:4] == ["a.tflite"] * 2 + ["b.tflite"] * 2
    # 7 runs in 3 rounds: 3, 2, 2 per file, the files taking turns.
    assert timed == (["a.tflite"] * 3 + ["b.tflite"] * 3 + ["a.tflite"] * 2
                     + ["b.tflite"] * 2 + ["a.tflite"] * 2 + ["b.tflite"] * 2)
    assert export.measure_tflite_latency_ms("a.tflite", runs=5, warmup=1) == 1000.0


def _linear_classifier():
    """6 inputs -> 3 logits whose arg-max is the arg-max of x[:, :3]: an
    output that depends on the input, so an accuracy figure means something."""
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)], name="linear")
    kernel = np.zeros((6, 3), "float32")
    kernel[:3, :3] = np.eye(3)
    model.layers[0].set_weights([kernel, np.zeros(3, "float32")])
    return model


def test_reported_accuracy_is_the_true_one_for_every_label_layout(tmp_path):
    model = _linear_classifier()
    rng = np.random.default_rng(1)
    x = rng.random((64, 6)).astype("float32")
    truth = x[:, :3].argmax(-1)
    flip = rng.random(64) < 0.25
    y = np.where(flip, (truth + 1) % 3, truth)
    expected = float(np.mean(truth == y))
    assert 0.3 < expected < 1.0
    for labels in (y, y[:, None], np.eye(3)[y]):  # (n,), (n, 1), one-hot (n, 3)
        report = dkdp.export_tflite(model, tmp_path / "m.tflite", check_data=(x, labels),
                                    latency_runs=1)
        assert report.accuracy == pytest.approx(expected), labels.shape


@pytest.mark.parametrize("labels,text", [
    (np.zeros(1, "int64"), r"check_data has 64 inputs \(x\) but 1 labels \(y\)"),
    (np.zeros(10, "int64"), r"check_data has 64 inputs \(x\) but 10 labels \(y\)"),
    (np.int64(0), r"check_data has 64 inputs \(x\) but a single label"),
    (np.zeros((64, 4)),
     r"check_data has labels of shape \(4,\) per example.*output of shape \(3,\)"),
])
def test_check_labels_must_match_the_inputs_before_conversion(tmp_path, monkeypatch, labels, text):
    from dkdp_keras import export

    def no_conversion(*args):
        raise AssertionError("converted before checking the labels")

    monkeypatch.setattr(export, "_convert", no_conversion)
    x = np.zeros((64, 6), "float32")
    with pytest.raises(ValueError, match=text):
        dkdp.export_tflite(_linear_classifier(), tmp_path / "m.tflite", check_data=(x, labels))
    with pytest.raises(ValueError, match=r"representative_data has 64 inputs \(x\) but 3 labels"):
        dkdp.export_tflite(_linear_classifier(), tmp_path / "m.tflite", quantize="int8",
                           representative_data=(x, np.zeros(3)))
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_check_leaves_nothing_at_the_path(tmp_path, monkeypatch):
    from dkdp_keras import export

    def interrupted(path, x):
        assert pathlib.Path(path).exists() and pathlib.Path(path) != tmp_path / "m.tflite"
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dkdp.export_tflite(_linear_classifier(), tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []  # no file, no stray temporary one


def test_a_failed_strict_check_leaves_an_earlier_file_untouched(tmp_path, monkeypatch):
    from dkdp_keras import export

    path = tmp_path / "m.tflite"
    path.write_bytes(b"an earlier export")
    monkeypatch.setattr(export, "_run", lambda path, x: np.full((len(x), 3), 1e3, "float32"))
    with pytest.raises(ValueError, match="differs from Keras"):
        dkdp.export_tflite(_linear_classifier(), path, strict=True)
    assert path.read_bytes() == b"an earlier export"
    (tmp_path / "m.failed-check.tflite").unlink()  # kept for inspection

    def interrupted(path, x):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dkdp.export_tflite(_linear_classifier(), path)
    assert path.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
    monkeypatch.undo()
    report = dkdp.export_tflite(_linear_classifier(), path, latency_runs=1)
    assert path.stat().st_size == report.bytes  # a passing check replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]


def test_a_directory_is_refused_with_the_fix(tmp_path):
    (tmp_path / "out.tflite").mkdir()
    for path, shown in [(tmp_path / "out.tflite", "out.tflite"),
                        (str(tmp_path / "new") + "/", "new/"),
                        (str(tmp_path / "out.tflite") + "/", "out.tflite/"),
                        (tmp_path, tmp_path.name)]:
        with pytest.raises(IsADirectoryError,
                           match=rf"path must be a file, but .*{shown}' is a directory: "
                                 r"pass a file path such as '.*model.tflite'"):
            dkdp.export_tflite(_linear_classifier(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["out.tflite"]
    assert list((tmp_path / "out.tflite").iterdir()) == []


def test_a_sparse_file_says_what_it_buys_and_runs_the_dense_kernels_on_avx(tmp_path):
    # The converter's sparse encoding makes the file smaller; LiteRT loads it
    # through DENSIFY ops, and on an x86 CPU with AVX XNNPACK keeps its dense
    # kernels: the outputs are then bit for bit those of the dense-format
    # file. The report says so instead of promising speed.
    from dkdp_keras import sparse_format

    keras.utils.set_random_seed(0)
    model = dkdp.prunable(dkdp.zoo.lenet_300_100())
    layers = dkdp.masked_layers(model)
    scores = [dkdp.importance.Magnitude().score(l, "weight") for l in layers]
    dkdp.thresholds.apply_masks(
        layers, dkdp.thresholds.compute_masks(layers, scores, 0.9, normalize="none").masks)
    x = np.random.default_rng(1).random((32, 28, 28, 1)).astype("float32")
    plain = dkdp.export_tflite(model, tmp_path / "plain.tflite", check_data=x, latency_runs=2)
    sparse = dkdp.export_tflite(model, tmp_path / "sparse.tflite", sparsity=True,
                                check_data=x, latency_runs=2)
    assert plain.sparse == ""
    tensors, densify = sparse_format.encoding((tmp_path / "sparse.tflite").read_bytes())
    assert tensors == densify >= 2  # the two large kernels at least
    assert sparse.sparse.startswith(f"{tensors} weight tensors are stored sparse")
    assert "Structured pruning" in sparse.sparse
    assert sparse_format.encoding((tmp_path / "plain.tflite").read_bytes()) == (0, 0)
    if sparse_format.x86_avx():
        assert "here it runs at dense speed" in sparse.sparse
        from dkdp_keras.export import _run

        np.testing.assert_array_equal(_run(tmp_path / "sparse.tflite", x),
                                      _run(tmp_path / "plain.tflite", x))


def test_the_cpu_rule_for_sparse_kernels(tmp_path):
    from dkdp_keras import sparse_format

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    assert sparse_format.x86_avx(info, "x86_64") is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 avx512_fake_not\n")
    assert sparse_format.x86_avx(info, "x86_64") is False
    assert sparse_format.x86_avx(info, "aarch64") is False
    assert sparse_format.x86_avx(tmp_path / "missing", "AMD64") is None
