"""Probe: does any TFLite/LiteRT runtime on this machine run XNNPACK's sparse
(NCHW / SpMM) kernels for a 90%-sparse float32 MobileNetV2? (Issue 23; the
findings are in benchmarks/RESULTS.md, "Sparse inference".)

Usage:
  python probe.py build          # build + convert models into ./models
  python probe.py inspect        # sizes, op lists, sparse tensors
  python probe.py bench [ENV]    # latency, dense vs sparse alternating, 1 thread
  python probe.py xnnctypes SO   # call XNNPACK's NCHW conv API directly via ctypes
Writes its files under $PROBE_DIR (default benchmarks/work/sparse_probe).
`bench tflite_runtime` and `xnnctypes` need a venv with tflite-runtime 2.14
(numpy<2) at $PROBE_DIR/venv14; `patchavx` clears the AVX bit of XNNPACK's
hardware config in this process's memory (an experiment, never for use).
"""
import collections
import ctypes
import os
import statistics
import sys
import time

HERE = os.environ.get("PROBE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                 "work", "sparse_probe"))
MODELS = os.path.join(HERE, "models")
os.makedirs(MODELS, exist_ok=True)
SPARSITY = float(os.environ.get("PROBE_SPARSITY", "0.9"))


# --------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------
def _prune_1x1(model, sparsity, np):
    n_layers = 0
    zeros = total = 0
    for layer in model.layers:
        if layer.__class__.__name__ == "Conv2D":
            k = layer.kernel.numpy()
            if k.shape[0] == 1 and k.shape[1] == 1:
                thr = np.quantile(np.abs(k), sparsity)
                # zero the smallest 90%; rescale survivors so activations do not
                # vanish (keeps outputs informative for bitwise path comparison)
                k = np.where(np.abs(k) <= thr, 0.0, k / np.sqrt(1 - sparsity)).astype(np.float32)
                layer.kernel.assign(k)
                n_layers += 1
                zeros += int((k == 0).sum())
                total += k.size
    return n_layers, zeros / max(total, 1)


def _control_net(keras):
    """A net shaped exactly like XNNPACK's sparse-inference contract:
    3x3 stride-2 conv on 3 channels with symmetric padding 1 (explicit
    ZeroPadding2D + VALID so XNNPACK fuses the PAD and sees pad=1 on every
    side), then 1x1 convs / stride-1 SAME depthwise convs, ending at a MEAN."""
    L = keras.layers
    inp = keras.Input((96, 96, 3))
    x = L.ZeroPadding2D(1)(inp)
    x = L.Conv2D(32, 3, strides=2, padding="valid", activation="relu")(x)
    x = L.Conv2D(128, 1, activation="relu")(x)
    for _ in range(3):
        x = L.DepthwiseConv2D(3, padding="same", activation="relu")(x)
        x = L.Conv2D(128, 1, activation="relu")(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10)(x)
    return keras.Model(inp, out, name="xnn_contract_net")


def _make_div(v, d=8):
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


def _mnv2_sym(keras, alpha=0.35, classes=10):
    """MobileNetV2 (same blocks/widths as keras.applications) but every stride-2
    layer uses an explicit symmetric ZeroPadding2D(1) + VALID instead of
    TF-SAME / correct_pad's asymmetric (0,1) padding."""
    L = keras.layers
    inp = keras.Input((96, 96, 3))

    def cbr(x, f, k, s=1, act=True):
        if s == 2:
            x = L.ZeroPadding2D(1)(x)
        x = L.Conv2D(f, k, strides=s, padding="valid" if s == 2 else "same", use_bias=False)(x)
        x = L.BatchNormalization()(x)
        return L.ReLU(6.0)(x) if act else x

    x = cbr(inp, _make_div(32 * alpha), 3, 2)
    cin = x.shape[-1]
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]:
        cout = _make_div(int(c * alpha))
        for i in range(n):
            st = s if i == 0 else 1
            y = cbr(x, cin * t, 1) if t != 1 else x
            if st == 2:
                y = L.ZeroPadding2D(1)(y)
            y = L.DepthwiseConv2D(3, strides=st, padding="valid" if st == 2 else "same",
                                  use_bias=False)(y)
            y = L.ReLU(6.0)(L.BatchNormalization()(y))
            y = cbr(y, cout, 1, act=False)
            x = L.Add()([x, y]) if (st == 1 and cin == cout) else y
            cin = cout
    x = cbr(x, 1280, 1)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(classes)(x)
    return keras.Model(inp, out, name="mnv2_sym")


def build():
    import numpy as np
    import keras
    import tensorflow as tf

    os.makedirs(MODELS, exist_ok=True)
    keras.utils.set_random_seed(0)
    nets = {
        "mnv2": lambda: keras.applications.MobileNetV2(
            input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10,
            classifier_activation=None),  # logits: softmax(~0)=0.1 hides diffs
        "ctrl": lambda: _control_net(keras),
        "mnv2sym": lambda: _mnv2_sym(keras),
    }
    only = os.environ.get("PROBE_BUILD")
    if only:
        nets = {k: v for k, v in nets.items() if k in only.split(",")}
    for name, fn in nets.items():
        model = fn()
        n, frac = _prune_1x1(model, SPARSITY, np)
        print(f"[build] {name}: pruned {n} 1x1 Conv2D kernels, zero fraction {frac:.3f}")
        sm = os.path.join(MODELS, f"{name}_savedmodel")
        model.export(sm, format="tf_saved_model", verbose=False)
        for variant in ("dense", "sparse"):
            conv = tf.lite.TFLiteConverter.from_saved_model(sm)
            if variant == "sparse":
                conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
            blob = conv.convert()
            path = os.path.join(MODELS, f"{name}_{variant}.tflite")
            with open(path, "wb") as f:
                f.write(blob)
            print(f"[build] wrote {path} ({len(blob)} bytes)")


# --------------------------------------------------------------------------
# interpreters
# --------------------------------------------------------------------------
def _interp_factory(env):
    """Return {config_name: callable(path)->interpreter}."""
    cfgs = {}
    if env == "main":
        from ai_edge_litert import interpreter as L
        import tensorflow as tf
        R = L.OpResolverType
        cfgs["litert_AUTO(default XNNPACK)"] = lambda p: L.Interpreter(
            model_path=p, num_threads=1)
        cfgs["litert_AUTO+latest_features"] = lambda p: L.Interpreter(
            model_path=p, num_threads=1,
            experimental_default_delegate_latest_features=True)
        cfgs["litert_BUILTIN_WITHOUT_DEFAULT_DELEGATES"] = lambda p: L.Interpreter(
            model_path=p, num_threads=1,
            experimental_op_resolver_type=R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        cfgs["litert_BUILTIN_REF"] = lambda p: L.Interpreter(
            model_path=p, num_threads=1,
            experimental_op_resolver_type=R.BUILTIN_REF)
        TR = tf.lite.experimental.OpResolverType
        cfgs["tf.lite_AUTO(default XNNPACK)"] = lambda p: tf.lite.Interpreter(
            model_path=p, num_threads=1)
        cfgs["tf.lite_BUILTIN_WITHOUT_DEFAULT_DELEGATES"] = lambda p: tf.lite.Interpreter(
            model_path=p, num_threads=1,
            experimental_op_resolver_type=TR.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    elif env == "tflite_runtime":
        # tflite_runtime 2.14 exports TfLiteXNNPack* symbols, so an XNNPACK
        # delegate with explicit runtime_flags can be created via ctypes.
        from tflite_runtime import interpreter as T
        so = ctypes.CDLL(T._interpreter_wrapper.__file__)
        R = T.OpResolverType
        cfgs["tflite_runtime2.14_AUTO(default XNNPACK)"] = lambda p: T.Interpreter(
            model_path=p, num_threads=1)
        cfgs["tflite_runtime2.14_BUILTIN_WITHOUT_DEFAULT_DELEGATES"] = lambda p: T.Interpreter(
            model_path=p, num_threads=1,
            experimental_op_resolver_type=R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)

        class Opts(ctypes.Structure):  # TF 2.14 TfLiteXNNPackDelegateOptions
            _fields_ = [("num_threads", ctypes.c_int32),
                        ("flags", ctypes.c_uint32),
                        ("weights_cache", ctypes.c_void_p),
                        ("handle_variable_ops", ctypes.c_bool),
                        ("_reserved", ctypes.c_uint8 * 64)]  # slack for sret
        so.TfLiteXNNPackDelegateOptionsDefault.restype = Opts
        so.TfLiteXNNPackDelegateCreate.restype = ctypes.c_void_p
        so.TfLiteXNNPackDelegateCreate.argtypes = [ctypes.POINTER(Opts)]

        class _Del:  # duck-types tflite_runtime.interpreter.Delegate
            def __init__(self):
                o = so.TfLiteXNNPackDelegateOptionsDefault()
                o.num_threads = 1
                self.opts = o
                self.ptr = so.TfLiteXNNPackDelegateCreate(ctypes.byref(o))

            def _get_native_delegate_pointer(self):
                return self.ptr

        def explicit(p):
            d = _Del()
            it = T.Interpreter(
                model_path=p, num_threads=1, experimental_delegates=[d],
                experimental_op_resolver_type=R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            it._probe_keep = d
            return it
        cfgs["tflite_runtime2.14_explicit_ctypes_XNNPACK_delegate"] = explicit
    return cfgs


# --------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------
def inspect():
    from ai_edge_litert import interpreter as L
    R = L.OpResolverType
    for name in os.environ.get("PROBE_MODELS", "mnv2,ctrl,mnv2sym").split(","):
        for variant in ("dense", "sparse"):
            p = os.path.join(MODELS, f"{name}_{variant}.tflite")
            it = L.Interpreter(model_path=p, num_threads=1,
                               experimental_op_resolver_type=R.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            ops = collections.Counter(o["op_name"] for o in it._get_ops_details())
            n_sparse = sum(1 for t in it.get_tensor_details()
                           if t.get("sparsity_parameters"))
            it2 = L.Interpreter(model_path=p, num_threads=1)
            it2.allocate_tensors()
            ops2 = collections.Counter(o["op_name"] for o in it2._get_ops_details())
            print(f"[inspect] {name}_{variant}: {os.path.getsize(p)} bytes, "
                  f"sparse-encoded tensors={n_sparse}\n    ops: {dict(ops)}\n"
                  f"    ops after default delegate: {dict(ops2)}")


# --------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------
def _prep(it, np):
    it.allocate_tensors()
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.random.RandomState(0).rand(*d["shape"]).astype(np.float32))
    out = it.get_output_details()[0]["index"]
    return out


def bench(env="main"):
    import numpy as np
    budget = float(os.environ.get("PROBE_BUDGET_S", "4"))  # per config+model
    cfgs = _interp_factory(env)
    only = os.environ.get("PROBE_MODELS", "mnv2,ctrl").split(",")
    for name in only:
        for cname, make in cfgs.items():
            its = {}
            outs = {}
            for variant in ("dense", "sparse"):
                t0 = time.perf_counter()
                it = make(os.path.join(MODELS, f"{name}_{variant}.tflite"))
                oi = _prep(it, np)
                it.invoke()  # first invoke (delegate prepare / densify)
                its[variant] = it
                outs[variant] = (oi, time.perf_counter() - t0)
            # calibrate
            t0 = time.perf_counter()
            for _ in range(3):
                its["dense"].invoke()
            t1 = (time.perf_counter() - t0) / 3
            rounds = 7
            per = max(1, int(budget / 2 / rounds / max(t1, 1e-5)))
            samples = {"dense": [], "sparse": []}
            for _ in range(rounds):
                for variant in ("dense", "sparse"):
                    it = its[variant]
                    t0 = time.perf_counter()
                    for _ in range(per):
                        it.invoke()
                    samples[variant].append((time.perf_counter() - t0) / per * 1e3)
            yd = its["dense"].get_tensor(outs["dense"][0])
            ys = its["sparse"].get_tensor(outs["sparse"][0])
            md, ms = (statistics.median(samples[v]) for v in ("dense", "sparse"))
            print(f"[bench] {name:4s} {cname:55s} dense {md:8.3f} ms  sparse {ms:8.3f} ms  "
                  f"ratio s/d {ms / md:5.3f}  (x{per}x{rounds}; init+1st invoke "
                  f"d {outs['dense'][1]*1e3:.0f} ms s {outs['sparse'][1]*1e3:.0f} ms; "
                  f"max|dy| {float(np.max(np.abs(yd - ys))):.2e})", flush=True)


# --------------------------------------------------------------------------
# direct XNNPACK operator probe via ctypes (tflite_runtime 2.14 exports xnn_*)
# --------------------------------------------------------------------------
def xnnctypes(so_path):
    import numpy as np
    so = ctypes.CDLL(so_path)
    print("[xnn] xnn_initialize ->", so.xnn_initialize(None))
    u32, sz, f32 = ctypes.c_uint32, ctypes.c_size_t, ctypes.c_float
    fn = so.xnn_create_convolution2d_nchw_f32
    fn.restype = ctypes.c_int
    # TF 2.14's bundled XNNPACK: (..., flags, weights_cache, op_out) -- no
    # code_cache argument (found by a segfault writing op_out into that slot).
    fn.argtypes = [u32] * 11 + [sz] * 4 + [ctypes.c_void_p] * 2 + [f32, f32, u32,
                   ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    names = {0: "success", 1: "uninitialized", 2: "invalid_parameter", 3: "invalid_state",
             4: "unsupported_parameter", 5: "unsupported_hardware", 6: "out_of_memory"}
    cin, cout = 64, 64
    k = np.random.RandomState(0).randn(cout, cin).astype(np.float32)
    k[np.abs(k) < np.quantile(np.abs(k), 0.9)] = 0  # 90% zero 1x1 kernel
    b = np.zeros(cout, np.float32)
    op = ctypes.c_void_p()
    st = fn(0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, cin, cout, cin, cout,
            k.ctypes.data, b.ctypes.data, -np.inf, np.inf, 0, None, ctypes.byref(op))
    print(f"[xnn] 1x1 sparse conv (SpMM) NCHW create -> {st} ({names.get(st)})")
    k3 = np.random.RandomState(1).randn(16, 3, 3, 3).astype(np.float32)
    b3 = np.zeros(16, np.float32)
    XNN_FLAG_INPUT_NHWC = 0x00000002
    st = fn(1, 1, 1, 1, 3, 3, 2, 2, 1, 1, 1, 3, 16, 3, 16,
            k3.ctypes.data, b3.ctypes.data, -np.inf, np.inf, XNN_FLAG_INPUT_NHWC,
            None, ctypes.byref(op))
    print(f"[xnn] 3x3s2 HWC->CHW conv create -> {st} ({names.get(st)})")

    # Direct microbenchmark: XNNPACK SpMM (1x1 conv, NCHW, 90% sparse) vs
    # XNNPACK dense GEMM (1x1 conv, NHWC), same weights, 1 thread (NULL pool).
    fnh = so.xnn_create_convolution2d_nhwc_f32
    fnh.restype = ctypes.c_int
    fnh.argtypes = fn.argtypes
    setup_t = [ctypes.c_void_p, sz, sz, sz, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    so.xnn_setup_convolution2d_nchw_f32.argtypes = setup_t
    so.xnn_setup_convolution2d_nhwc_f32.argtypes = setup_t
    so.xnn_run_operator.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    rs = np.random.RandomState(0)
    for cin, cout, hw in [(16, 96, 24), (96, 16, 24), (128, 128, 48), (192, 32, 12), (320, 1280, 3)]:
        w = rs.randn(cout, cin).astype(np.float32)
        w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0
        b = np.zeros(cout, np.float32)
        x = rs.rand(1, hw, hw, cin).astype(np.float32)
        x_chw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        y_n = np.zeros((1, hw, hw, cout), np.float32)
        y_c = np.zeros((1, cout, hw, hw), np.float32)
        op_s, op_d = ctypes.c_void_p(), ctypes.c_void_p()
        st1 = fn(0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, cin, cout, cin, cout, w.ctypes.data,
                 b.ctypes.data, -np.inf, np.inf, 0, None, ctypes.byref(op_s))
        st2 = fnh(0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, cin, cout, cin, cout, w.ctypes.data,
                  b.ctypes.data, -np.inf, np.inf, 0, None, ctypes.byref(op_d))
        st3 = so.xnn_setup_convolution2d_nchw_f32(op_s, 1, hw, hw, x_chw.ctypes.data, y_c.ctypes.data, None)
        st4 = so.xnn_setup_convolution2d_nhwc_f32(op_d, 1, hw, hw, x.ctypes.data, y_n.ctypes.data, None)
        assert (st1, st2, st3, st4) == (0, 0, 0, 0), (st1, st2, st3, st4)
        so.xnn_run_operator(op_s, None); so.xnn_run_operator(op_d, None)
        err = float(np.max(np.abs(y_c.transpose(0, 2, 3, 1) - y_n)))
        t = so.xnn_run_operator
        t0 = time.perf_counter(); [t(op_d, None) for _ in range(20)]
        per = max(5, int(0.15 / max((time.perf_counter() - t0) / 20, 1e-7)))
        sd, ss = [], []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(per):
                t(op_d, None)
            sd.append((time.perf_counter() - t0) / per * 1e6)
            t0 = time.perf_counter()
            for _ in range(per):
                t(op_s, None)
            ss.append((time.perf_counter() - t0) / per * 1e6)
        md, ms = statistics.median(sd), statistics.median(ss)
        print(f"[xnn] 1x1 {cin:4d}->{cout:4d} @{hw:2d}x{hw:<2d}: dense NHWC GEMM {md:8.1f} us | "
              f"sparse NCHW SpMM {ms:8.1f} us | ratio s/d {ms/md:5.2f} | max|dy| {err:.1e}")


# --------------------------------------------------------------------------
# HACK (diagnostic only): clear XNNPACK's in-memory "x86 AVX" arch bit inside
# ai_edge_litert's libpywrap_litert_common.so so that xnn_is_chw_compatible_config()
# returns true, then see whether the sparse model now takes the NCHW/SpMM path.
# --------------------------------------------------------------------------
def _lib_base(libname):
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(libname) and int(parts[2], 16) == 0:
                return int(parts[0].split("-")[0], 16), parts[5]
    raise RuntimeError(libname + " not mapped")


def patchavx():
    import subprocess
    import numpy as np
    from ai_edge_litert import interpreter as L
    budget = float(os.environ.get("PROBE_BUDGET_S", "4"))
    names = os.environ.get("PROBE_MODELS", "ctrl,mnv2").split(",")

    def mk(p):
        it = L.Interpreter(model_path=p, num_threads=1)
        oi = _prep(it, np)
        it.invoke()
        return it, oi

    # 1) before the patch (this also runs xnn_initialize / hardware-config init)
    before = {n: {v: mk(os.path.join(MODELS, f"{n}_{v}.tflite")) for v in ("dense", "sparse")}
              for n in names}
    base, path = _lib_base("libpywrap_litert_common.so")
    sym = subprocess.run(["nm", path], capture_output=True, text=True).stdout
    off = next(int(l.split()[0], 16) for l in sym.splitlines()
               if l.split()[-1] == "hardware_config" and l.split()[1] in "bBdD")
    flags_p = ctypes.c_uint64.from_address(base + off + 8)  # struct: uarch[1], arch_flags
    print(f"[patch] {path} base={base:#x} hardware_config+8 arch_flags={flags_p.value:#x} "
          f"(avx bit 0x10 {'set' if flags_p.value & 0x10 else 'clear'})")
    flags_p.value &= ~0x10
    print(f"[patch] arch_flags now {flags_p.value:#x}")
    # 2) after the patch: fresh interpreters -> fresh XNNPACK runtimes
    after = {n: {v: mk(os.path.join(MODELS, f"{n}_{v}.tflite")) for v in ("dense", "sparse")}
             for n in names}
    for n in names:
        runs = {"dense(before)": before[n]["dense"], "sparse(before)": before[n]["sparse"],
                "dense(after)": after[n]["dense"], "sparse(after)": after[n]["sparse"]}
        t0 = time.perf_counter()
        for _ in range(3):
            runs["dense(before)"][0].invoke()
        t1 = (time.perf_counter() - t0) / 3
        rounds = 7
        per = max(1, int(budget / 4 / rounds / max(t1, 1e-5)))
        samp = {k: [] for k in runs}
        for _ in range(rounds):
            for k, (it, _oi) in runs.items():
                t0 = time.perf_counter()
                for _ in range(per):
                    it.invoke()
                samp[k].append((time.perf_counter() - t0) / per * 1e3)
        ref = runs["dense(before)"][0].get_tensor(runs["dense(before)"][1])
        for k, (it, oi) in runs.items():
            d = float(np.max(np.abs(it.get_tensor(oi) - ref)))
            print(f"[patch] {n:4s} {k:15s} median {statistics.median(samp[k]):8.3f} ms  "
                  f"max|y - y_dense_before| {d:.2e}  (max|y| {float(np.max(np.abs(ref))):.2e})", flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "all"
    if cmd in ("build", "all"):
        build()
    if cmd in ("inspect", "all"):
        inspect()
    if cmd in ("bench", "all"):
        bench(sys.argv[2] if len(sys.argv) > 2 and cmd == "bench" else "main")
    if cmd == "patchavx":
        patchavx()
    if cmd == "xnnctypes":
        xnnctypes(sys.argv[2])
