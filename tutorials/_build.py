"""Build the tutorial notebooks from the cell sources in this file.

    python tutorials/_build.py            # write the four .ipynb, no outputs
    python tutorials/_build.py --execute  # also run each one in full mode
                                          # (a few minutes each on a CPU) and
                                          # keep the outputs, for GitHub
    python tutorials/_build.py --execute 01  # only the notebooks named so
    python tutorials/_build.py --prose    # Markdown edits only: keep outputs

The notebooks are generated so that their shared cells (install, setup,
data) stay identical; edit the sources here, not the .ipynb files. Executed
notebooks run in a temporary directory, so the files they write (.tflite,
plots) do not land in the repository.
"""

import argparse
import pathlib
import sys
import tempfile
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
COLAB = ("https://colab.research.google.com/github/dkdp-keras/dkdp-keras/"
         "blob/main/tutorials/{name}.ipynb")
BADGE = ("[![Open In Colab](https://colab.research.google.com/assets/"
         "colab-badge.svg)]({url})")
PACKAGE = "git+https://github.com/dkdp-keras/dkdp-keras"


def md(text):
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text):
    return new_code_cell(textwrap.dedent(text).strip())


def header(name, title, intro):
    badge = BADGE.format(url=COLAB.format(name=name))
    return [md(f"# {title}\n\n{badge}\n\n" + textwrap.dedent(intro).strip())]


INSTALL = code(f"""
    # On Colab, install dkdp-keras first; anywhere else this cell does nothing.
    import sys

    IN_COLAB = "google.colab" in sys.modules
    if IN_COLAB:
        import subprocess

        subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                        "{PACKAGE}"], check=True)
    """)


def setup(out_dir, extra_imports=""):
    imports = textwrap.dedent(extra_imports).strip()
    imports = imports + "\n" if imports else ""
    return code(f"""
    import os
    import pathlib
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # quieter TensorFlow
    import keras
    import matplotlib.pyplot as plt
    import numpy as np
    import tensorflow as tf
    from IPython.display import Image, Markdown, display

    import dkdp_keras as dkdp
    {imports}
    # Keras warns that fit's shuffle=True does not apply to a tf.data pipeline;
    # ours shuffles itself.
    warnings.filterwarnings("ignore", message="`shuffle=True` was passed")

    tf.get_logger().setLevel("ERROR")
    QUICK = os.environ.get("DKDP_TUTORIAL_QUICK") == "1"  # small smoke-test run
    keras.utils.set_random_seed(0)
    OUT = pathlib.Path("{out_dir}")  # files this notebook writes
    OUT.mkdir(exist_ok=True)
    print(f"dkdp-keras {{dkdp.__version__}}, Keras {{keras.__version__}}, "
          f"TensorFlow {{tf.__version__}}; quick mode: {{QUICK}}")
    """)


HELPERS = code("""
    CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    BATCH = 64
    LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


    def pipeline(x, y, batch_size=BATCH, seed=0):
        \"\"\"One shuffled, repeated tf.data pipeline; fit draws steps_per_epoch
        batches from it each epoch.\"\"\"
        ds = tf.data.Dataset.from_tensor_slices((x, y))
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
        return ds.batch(batch_size).repeat().prefetch(tf.data.AUTOTUNE)


    def accuracy(model, x, y):
        \"\"\"Top-1 accuracy of a Keras model that outputs logits.\"\"\"
        logits = model.predict(x, batch_size=512, verbose=0)
        return float(np.mean(logits.argmax(-1) == y))


    def table(rows, headers):
        \"\"\"Show a list of rows as a Markdown table.\"\"\"
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
        display(Markdown("\\n".join(lines)))
    """)

PIPELINE_NOTE = """
    `fit` reads one shuffled `tf.data` pipeline that repeats forever, with
    `steps_per_epoch` saying where an epoch ends. With numpy arrays Keras
    builds a new input iterator every epoch, and with this TensorFlow the
    first step after it can stall for seconds.
    """

DATA = code("""
    (x_train, y_train), (x_test, y_test) = dkdp.datasets.load(
        "fashion_mnist", as_numpy=True, download=IN_COLAB)
    (x_train, y_train), (x_val, y_val) = dkdp.datasets.validation_split(x_train, y_train)
    """)


# --------------------------------------------------------------------- 01
def quickstart():
    name = "01_quickstart"
    return name, header(name, "Quickstart: a smaller Fashion-MNIST classifier in one `fit`", """
        dkdp-keras makes a model smaller *while* it trains. In one `model.fit`
        it scores how important each neuron and filter of the teacher is,
        prunes the least important ones until the model fits a resource
        budget, and distils the teacher into a smaller student, with the
        objective L_DKDP = L(M_t(x), y) + λ·L_KD(M_t(x), M_s(x)).

        In this notebook you will:

        1. train a CNN on Fashion-MNIST with `DKDPModel` and `DKDPCallback`,
           under a budget of 10% of its parameters;
        2. compare the teacher and the student in accuracy and size;
        3. export the pruned model to an int8 TFLite file, run it in the
           LiteRT interpreter and classify a few test images.

        It runs on a CPU in about five minutes (no GPU needed). Setting the
        environment variable `DKDP_TUTORIAL_QUICK=1` runs the same cells on a
        small subset in well under a minute: the test suite does that.
        """) + [
        INSTALL,
        md("## Setup"),
        setup("tutorial_01"),
        HELPERS,
        md("""
            ## Data

            Fashion-MNIST: 28×28 grey images of ten kinds of clothing.
            `dkdp.datasets.load` reads the original files offline (on Colab it
            downloads them); the last 5,000 training images validate. To keep
            the CPU time modest we train on 20,000 images.
            """),
        DATA,
        code("""
            n_train, n_val, n_test = (3000, 1000, 1000) if QUICK else (20000, 5000, 10000)
            x_train, y_train = x_train[:n_train], y_train[:n_train]
            x_val, y_val = x_val[:n_val], y_val[:n_val]
            x_test, y_test = x_test[:n_test], y_test[:n_test]
            print(f"train {x_train.shape}, validation {x_val.shape}, test {x_test.shape}")

            fig, axes = plt.subplots(1, 10, figsize=(12, 1.7))
            for label, ax in enumerate(axes):
                ax.imshow(x_train[np.flatnonzero(y_train == label)[0], ..., 0], cmap="gray_r")
                ax.set_title(CLASSES[label], fontsize=8)
                ax.axis("off")
            plt.show()
            """),
        md(PIPELINE_NOTE),
        code("""
            EPOCHS = 2 if QUICK else 8
            train_ds = pipeline(x_train, y_train)
            steps_per_epoch = len(x_train) // BATCH
            print(f"{EPOCHS} epochs of {steps_per_epoch} steps of {BATCH} images")
            """),
        md("""
            ## Teacher, student and the DKDP model

            The teacher is the reference CNN of the library's benchmark (two
            convolution blocks, a Dense(256) layer and the output layer). Any
            Sequential or Functional Keras model works the same way.

            `DKDPModel` wraps it: it makes the teacher *prunable* (each Dense and
            Conv layer computes with `kernel × mask`), builds a student (by default
            a narrower copy: every layer but the output at `student_width` of its
            width) and trains both in one step. One forward pass of the teacher serves its own loss and
            the student's distillation target; each has its own optimizer.
            """),
        code("""
            teacher = dkdp.zoo.reference_cnn()
            dense_params = teacher.count_params()
            dense_macs = dkdp.count_macs(teacher)
            print(f"teacher: {dense_params:,} parameters, {dense_macs:,} multiply-accumulates per image")

            model = dkdp.DKDPModel(teacher, student="auto", lambda_kd=1.0, temperature=4.0)
            model.compile(teacher_optimizer=keras.optimizers.Adam(1e-3),
                          student_optimizer=keras.optimizers.Adam(1e-3),
                          loss=LOSS, metrics=["accuracy"])
            print(f"student (width {model.student_width:g}): {model.student.count_params():,} parameters")
            """),
        md("""
            ## A budget, and the callback that meets it

            `DKDPCallback` prunes the teacher during `fit`. Here it scores whole
            units (neurons and filters) with the first-order **Taylor** criterion,
            |Σ w·∂L/∂w|², from gradients the training step already computes, and
            lets an **adaptive** threshold decide how much to prune:

            * after a warm-up epoch it raises the sparsity step by step toward the
              budget, at each epoch end;
            * if the teacher's validation accuracy falls more than `tolerance`
              below its best, it restores the last good masks and takes smaller
              steps;
            * it meets the budget by 75% of the epochs, leaving the last epochs to
              recover;
            * at the end the teacher takes the mean of its weights over the epochs
              that trained with the final masks (the callback's `average`, on by
              default), or, with fewer than three such epochs, the teacher of the
              best validation epoch within the budget (`restore_best`).

            The budget is 10% of the teacher's parameters, counted as the model
            will be deployed: removed units gone, and with them the inputs they
            fed to the next layer.
            """),
        code("""
            BUDGET = dkdp.Budget(max_params=dense_params // 10)
            callback = dkdp.DKDPCallback(
                importance=dkdp.importance.Taylor(),
                granularity="unit",
                threshold=dkdp.thresholds.Adaptive(budget=BUDGET, tolerance=0.01),
                verbose=1,  # one line per pruning event
            )


            def one_line(epoch, logs):
                print(f"epoch {epoch + 1}: val accuracy teacher {logs['val_teacher_accuracy']:.3f}, "
                      f"student {logs['val_student_accuracy']:.3f} | sparsity {logs['sparsity']:.2f}, "
                      f"kept params {int(logs['kept_params']):,}, budget usage {logs['budget_usage']:.2f}")


            history = model.fit(
                train_ds, steps_per_epoch=steps_per_epoch, epochs=EPOCHS,
                validation_data=(x_val, y_val), verbose=0,
                callbacks=[callback, keras.callbacks.LambdaCallback(on_epoch_end=one_line)])
            """),
        md("""
            The callback added `tau`, `sparsity`, `kept_params`, `kept_macs` and
            `budget_usage` (measure / limit; at most 1 means within budget) to the
            epoch logs, so they are in `history` like any metric.
            """),
        code("""
            h = history.history
            epochs = np.arange(1, len(h["loss"]) + 1)
            fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.2))
            left.plot(epochs, h["val_teacher_accuracy"], "o-", label="teacher")
            left.plot(epochs, h["val_student_accuracy"], "s-", label="student")
            left.set(xlabel="epoch", ylabel="validation accuracy", title="Accuracy")
            left.legend()
            right.plot(epochs, h["kept_params"], "o-", label="teacher (deployed)")
            right.axhline(BUDGET.max_params, color="tab:red", ls="--", label="budget")
            right.set(xlabel="epoch", ylabel="parameters", yscale="log", title="Size")
            right.legend()
            fig.tight_layout()
            plt.show()
            """),
        md("""
            ## Teacher and student on the test set

            `model.compact_teacher()` returns the pruned teacher as a plain Keras
            model in which the removed units are gone for real: smaller weight
            matrices, same outputs. The student is a separate, narrower network
            that learnt only from the teacher's softened outputs (`lambda_kd`; its
            own label loss is off by default).
            """),
        code("""
            small = model.compact_teacher()
            rows = [
                ("teacher before training (dense)", f"{dense_params:,}", f"{dense_macs:,}", "-"),
                ("pruned teacher, compacted", f"{small.count_params():,}",
                 f"{dkdp.count_macs(small):,}", f"{accuracy(small, x_test, y_test):.2%}"),
                (f"student (width {model.student_width:g})", f"{model.student.count_params():,}",
                 f"{dkdp.count_macs(model.student):,}",
                 f"{accuracy(model.student, x_test, y_test):.2%}"),
            ]
            table(rows, ["model", "parameters", "MACs per image", "test accuracy"])
            print(f"budget: {BUDGET.max_params:,} parameters; met: {BUDGET.is_met(model.teacher)}")
            """),
        md("""
            The budget holds the teacher: pruning chose which of its units to
            keep. The student's shape was fixed when it was built; it is not
            pruned, and it learnt from the teacher's outputs alone. To make a
            student of exactly the budget's size, pass your own `student=` network
            (notebook 04 does), or rebuild it from the pruned teacher during
            training with
            `DKDPCallback(student_refresh=dkdp.StudentRefresh(shrink=2.0,
            strategy="compact_teacher"))`.

            Which layers lost what? `dkdp.report.importance_summary` tells per
            layer (notebook 02 looks at it closely):
            """),
        code("""
            summary = dkdp.report.importance_summary(model, criterion="magnitude")
            display(Markdown(summary.markdown))
            """),
        md("""
            ## Export to TFLite / LiteRT

            `export_tflite` compacts a masked model, converts it, then runs the file
            in the LiteRT interpreter against Keras on the check data: it raises if
            the int8 file disagrees with Keras on the top-1 class for more than 1%
            of the inputs. Full-integer quantisation needs a few hundred typical
            inputs to calibrate its ranges.
            """),
        code("""
            # The quick smoke run trains for seconds: its near-tied logits let int8
            # rounding flip a few more top-1 classes, so it allows 5% instead of 1%.
            MIN_AGREEMENT = 0.95 if QUICK else 0.99
            report = dkdp.export_tflite(
                small, OUT / "fashion_cnn_int8.tflite", quantize="int8",
                representative_data=x_train[:500], check_data=(x_test, y_test),
                min_top1_agreement=MIN_AGREEMENT)
            print(f"{report.path}: {report.bytes / 1024:.1f} KiB "
                  f"(the dense float32 weights alone are {dense_params * 4 / 1024:.0f} KiB)")
            print(f"TFLite accuracy {report.accuracy:.2%}, top-1 agreement with Keras "
                  f"{report.top1_agreement:.2%} on {report.check_examples} images, "
                  f"batch-1 latency {report.latency_ms:.3f} ms on one CPU thread")
            """),
        md("""
            ## Classify images with the LiteRT interpreter

            This is what an app does with the file. The int8 model takes float32
            images in [0, 1] and returns logits (the quantisation happens inside
            the file; notebook 03 shows an int8-in, int8-out file for
            microcontrollers).
            """),
        code("""
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=report.path)
            interpreter.allocate_tensors()
            inp = interpreter.get_input_details()[0]
            out = interpreter.get_output_details()[0]
            print("input", inp["shape"], inp["dtype"].__name__, "| output", out["shape"], out["dtype"].__name__)


            def classify(image):
                interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
                interpreter.invoke()
                logits = interpreter.get_tensor(out["index"])[0]
                probs = np.exp(logits - logits.max())
                return int(logits.argmax()), float(probs.max() / probs.sum())


            fig, axes = plt.subplots(2, 8, figsize=(12, 4.4))
            for i, ax in enumerate(axes.flat):
                label, confidence = classify(x_test[i])
                ax.imshow(x_test[i, ..., 0], cmap="gray_r")
                ax.set_title(f"{CLASSES[label]}\\n{confidence:.0%}", fontsize=8,
                             color="tab:green" if label == y_test[i] else "tab:red")
                ax.axis("off")
            fig.suptitle("LiteRT predictions (green: right, red: wrong)")
            fig.tight_layout()
            plt.show()
            """),
        md("""
            ## Check

            The last cell checks what this notebook claims, so that the test suite
            (which runs every tutorial) fails if a claim stops being true.
            """),
        code("""
            lite = np.array([classify(image)[0] for image in x_test[:300]])
            keras_top1 = small.predict(x_test[:300], verbose=0).argmax(-1)
            assert np.mean(lite == keras_top1) >= MIN_AGREEMENT - 0.02, np.mean(lite == keras_top1)
            assert dkdp.count_params(small) <= BUDGET.max_params
            assert history.history["budget_usage"][-1] <= 1.0
            assert pathlib.Path(report.path).stat().st_size == report.bytes
            assert report.bytes < dense_params  # smaller than one byte per dense weight
            if not QUICK:
                assert accuracy(small, x_test, y_test) > 0.85
            print("all checks passed")
            """),
        md("""
            ## Next

            * [02: importance and interpretability](02_importance_and_interpretability.ipynb):
              the criteria side by side and what they say about the model.
            * [03: budgets and edge export](03_budgets_and_edge_export.ipynb):
              parameters, bytes, MACs and latency; every TFLite format; what to
              copy into an Android, iOS or microcontroller project.
            * [04: continual learning](04_continual_learning.ipynb): new classes
              under the same budget.
            """),
    ]


# --------------------------------------------------------------------- 02
def importance():
    name = "02_importance_and_interpretability"
    return name, header(name, "Importance criteria and what they say about a model", """
        Pruning asks one question of every weight, neuron and filter: *how much
        does the model need it?* dkdp-keras answers with pluggable **importance
        criteria**. This notebook trains one CNN and puts six of them side by
        side:

        | criterion | scores a unit by | reads |
        |---|---|---|
        | `Magnitude` | L1 norm of its weights | weights |
        | `GradientMagnitude` | mean \\|∂L/∂w\\| | gradients |
        | `Taylor` | mean (Σ w·∂L/∂w)², the first-order loss change if removed | weights and gradients |
        | `ActivationFrequency` | how often its output is non-zero (1 − APoZ) | activations |
        | `OutputContribution` | how much the output changes when it is removed | calibration data |
        | `LearnedMask` | its trainable gate, pushed down by an L1 penalty | gates |

        We look at how far they agree, which units and layers each keeps, how
        much accuracy each one's choice costs, the plots of the `report` module,
        and finally at what the important units *do*.

        About four minutes on a CPU; `DKDP_TUTORIAL_QUICK=1` runs a small version.
        """) + [
        INSTALL,
        md("## Setup"),
        setup("tutorial_02"),
        HELPERS,
        DATA,
        code("""
            n_train, n_val = (3000, 1000) if QUICK else (15000, 3000)
            x_train, y_train = x_train[:n_train], y_train[:n_train]
            x_val, y_val = x_val[:n_val], y_val[:n_val]
            EPOCHS = 2 if QUICK else 4
            steps_per_epoch = len(x_train) // BATCH
            train_ds = pipeline(x_train, y_train)
            """),
        md("""
            ## One model that keeps every statistic

            `dkdp.prunable` turns a Keras model into a masked copy with the same
            outputs. `track_statistics=True` keeps running means of activations and
            gradients in each masked layer; `learnable_mask=True` gives every unit a
            trainable gate, and `gate_l1` an L1 penalty on those gates (Network
            Slimming). We train it with a plain `fit`: no pruning yet.

            The running means average over all steps since they were last reset
            (`DKDPCallback` resets them after each pruning event). We reset them
            before the last epoch, so that they describe the trained model rather
            than its first steps.
            """),
        code("""
            model = dkdp.prunable(dkdp.zoo.reference_cnn(), track_statistics=True,
                                  learnable_mask=True, gate_l1=1e-4)
            model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
            layers = dkdp.masked_layers(model)
            print("masked layers:", ", ".join(f"{l.name} ({l.num_units} units)" for l in layers))

            model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=EPOCHS - 1, verbose=2)
            for layer in layers:
                layer.reset_statistics()
            model.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=1, verbose=2)
            dense_accuracy = accuracy(model, x_val, y_val)
            print(f"validation accuracy: {dense_accuracy:.2%}")
            """),
        md("""
            A plain `fit` does not keep gradients (a `DKDPModel` folds them in
            during its own training step, for free). For a plain model,
            `collect_gradients` runs the loss on some calibration data and fills
            the gradient statistics that `GradientMagnitude` and `Taylor` read.
            `OutputContribution` removes each unit in turn on a calibration batch
            and measures how much the logits move.
            """),
        code("""
            calibration = (x_val[:128], y_val[:128]) if QUICK else (x_val[:512], y_val[:512])
            dkdp.importance.collect_gradients(model, *calibration, loss=LOSS)

            CRITERIA = {
                "Magnitude": dkdp.importance.Magnitude(),
                "Gradient": dkdp.importance.GradientMagnitude(),
                "Taylor": dkdp.importance.Taylor(),
                "Activation": dkdp.importance.ActivationFrequency(),
                # one forward pass per unit: 362 of them on a small calibration batch
                "Output contribution": dkdp.importance.OutputContribution(x_val[:32 if QUICK else 128]),
                "Learned mask": dkdp.importance.LearnedMask(),
            }
            scores = {}  # criterion -> layer name -> one score per unit
            layer_scores = {}  # criterion -> layer name -> one score for the layer
            for name, criterion in CRITERIA.items():
                criterion.prepare(model)  # OutputContribution measures here
                scores[name] = {l.name: np.asarray(criterion.score(l, "unit")) for l in layers}
                layer_scores[name] = {l.name: float(criterion.score(l, "layer")) for l in layers}
            print({name: [s.shape[0] for s in by_layer.values()] for name, by_layer in scores.items()})
            """),
        md("""
            ## Which layers matter?

            At granularity `"layer"` a criterion gives one number per layer: the
            mean score of its units. Scales differ between criteria, so each column
            is divided by its mean over the layers (1.0 = an average layer).
            """),
        code("""
            names = [l.name for l in layers]
            rows = []
            for layer_name in names:
                row = [layer_name]
                for crit in CRITERIA:
                    values = np.array([layer_scores[crit][n] for n in names])
                    row.append(f"{layer_scores[crit][layer_name] / values.mean():.2f}")
                rows.append(row)
            table(rows, ["layer"] + list(CRITERIA))
            """),
        md("""
            The columns disagree, and not only because the criteria differ: raw
            scores are not comparable across layers. A Dense unit's L1 norm sums
            3,136 weights, a first-layer filter's only 9; Taylor scores are squared
            sums, so they span orders of magnitude. That is why the global
            threshold below compares LAMP-normalised scores, where each layer's
            own distribution decides, rather than raw ones.
            """),
        md("""
            ## Do the criteria agree on which units matter?

            Spearman rank correlation of the unit scores between each pair of
            criteria, in the second convolution (64 filters) and in the Dense(256)
            layer. 1 means the same ranking, 0 unrelated rankings.
            """),
        code("""
            def spearman(a, b):
                ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
                return float(np.corrcoef(ra, rb)[0, 1])


            crit_names = list(CRITERIA)
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for ax, layer in zip(axes, [layers[1], layers[2]]):
                corr = np.array([[spearman(scores[a][layer.name], scores[b][layer.name])
                                  for b in crit_names] for a in crit_names])
                im = ax.imshow(corr, vmin=-1, vmax=1, cmap="coolwarm")
                ax.set_xticks(range(len(crit_names)), crit_names, rotation=40, ha="right", fontsize=8)
                ax.set_yticks(range(len(crit_names)), crit_names, fontsize=8)
                for i in range(len(crit_names)):
                    for j in range(len(crit_names)):
                        ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=7)
                ax.set_title(f"{layer.name} ({layer.num_units} units)")
            fig.colorbar(im, ax=axes, shrink=0.8)
            plt.show()
            """),
        md("""
            ## What each criterion keeps, and what it costs

            The same mechanism `DKDPCallback` uses turns scores into masks:
            `dkdp.thresholds.compute_masks` finds one global threshold τ over
            LAMP-normalised scores so that a target fraction of the weights falls
            below it, and each layer's own score distribution decides how much it
            loses. We prune whole units in one shot, *without* any retraining, and
            measure the validation accuracy left: the criterion whose choice hurts
            least has found the units the model relies on. (The output layer's
            units are never removed.)
            """),
        code("""
            SPARSITIES = [0.3, 0.5, 0.7, 0.8, 0.9]
            output_layer = {layers[-1].name}
            dense_masks = {l.name: np.ones(l.kernel_mask.shape, "float32") for l in layers}


            def masks_for(crit, sparsity):
                return dkdp.thresholds.compute_masks(
                    layers, [scores[crit][l.name] for l in layers], sparsity,
                    granularity="unit", scope="global", normalize="lamp",
                    protect_units=output_layer).masks


            def apply(masks):
                dkdp.thresholds.apply_masks(layers, masks)
                dkdp.sync_batchnorm(model)  # removed filters are zeros after BatchNorm too


            one_shot = {crit: [] for crit in CRITERIA}
            kept_units = {}
            for crit in CRITERIA:
                for s in SPARSITIES:
                    apply(masks_for(crit, s))
                    one_shot[crit].append(accuracy(model, x_val, y_val))
                    if s == 0.9:
                        kept_units[crit] = [int(l.unit_mask().numpy().sum()) for l in layers]
                apply(dense_masks)

            fig, ax = plt.subplots(figsize=(6.5, 3.6))
            for crit, accs in one_shot.items():
                ax.plot(SPARSITIES, accs, "o-", label=crit)
            ax.axhline(dense_accuracy, color="gray", ls=":", label="unpruned")
            ax.set(xlabel="fraction of weights removed (whole units)",
                   ylabel="validation accuracy", title="One-shot unit pruning, no retraining")
            ax.legend(fontsize=8)
            plt.show()

            table([[crit] + [f"{k}/{l.num_units}" for k, l in zip(kept_units[crit], layers)]
                   for crit in CRITERIA], ["kept units at 90%"] + names)
            """),
        md("""
            Up to about 70% of the weights every criterion finds units the model
            can spare (mostly dead units of the Dense layer, see below); beyond
            that they part, and the table (units kept when 90% of the weights go)
            shows where. In this one-shot test, the criteria that measure a unit's
            effect on the output (output contribution) or its weights (magnitude)
            hold up best, and the two gradient-based ones, gradient and Taylor, do
            worst: a unit can have large gradients because it is not doing its
            job yet. Taylor, the default of
            `DKDPCallback`, is built for gradual pruning, where its statistics are
            refreshed between small steps, rather than for a 90% cut at once.

            The correlations above tell a related story: in the Dense layer the
            criteria mostly agree, while in the second convolution the weight
            magnitude is nearly unrelated to the data-driven criteria. The
            BatchNormalization after a convolution rescales each filter's output,
            so a filter's weight norm says little about its effect.

            A caveat on `LearnedMask` here: the convolutions are followed by
            BatchNormalization, which undoes any scaling of its input, so an L1
            penalty can shrink all gates of a convolution together without
            changing the function. Gates say most in layers with no normalisation
            after them (or put the penalty on BatchNorm's γ, as Network Slimming
            does).

            ## The report module

            After a Taylor pruning of 70% of the weights, `importance_summary`
            gives the per-layer table and two plots: what each layer keeps, and the
            distribution of unit scores in each layer (pruned units score 0).
            """),
        code("""
            apply(masks_for("Taylor", 0.7))
            summary = dkdp.report.importance_summary(model, criterion="taylor", out_dir=OUT)
            display(Markdown(summary.markdown))
            for path in summary.plots:
                display(Image(filename=str(path), width=640))
            """),
        md("""
            ## What the kept units do

            Importance scores are also a way to read a model. The first
            convolution's 32 filters are edge and texture detectors; below are its
            8 most and 8 least important by Taylor rank (top two rows, then bottom
            two), each with its response to one test image; red frames mark the
            filters that a 90% cut removes.
            """),
        code("""
            conv1 = layers[0]
            kernels = conv1.kernel.numpy()[:, :, 0, :]  # 3x3 per filter
            rank = np.argsort(np.argsort(-scores["Taylor"][conv1.name]))  # 0 = most important
            mask = masks_for("Taylor", 0.9)[conv1.name]  # which filters a 90% cut removes
            kept = mask.reshape(-1, conv1.num_units).max(axis=0) > 0
            responses = keras.Model(model.inputs, conv1.output).predict(x_val[:1], verbose=0)[0]

            order = np.argsort(rank)
            shown = np.concatenate([order[:8], order[-8:]])  # 8 most, 8 least important
            fig, axes = plt.subplots(4, 8, figsize=(9, 5), dpi=72)
            for slot, f in enumerate(shown):
                row, col = 2 * (slot // 8), slot % 8
                axes[row, col].imshow(kernels[:, :, f], cmap="RdBu_r")
                axes[row + 1, col].imshow(responses[:, :, f], cmap="magma", interpolation="nearest")
                axes[row, col].set_title(f"#{rank[f] + 1}", fontsize=8,
                                         color="black" if kept[f] else "tab:red")
                for ax in (axes[row, col], axes[row + 1, col]):
                    ax.set_xticks([]); ax.set_yticks([])
                    for spine in ax.spines.values():
                        spine.set_color("black" if kept[f] else "tab:red")
                        spine.set_linewidth(0.5 if kept[f] else 2)
            fig.suptitle("conv1: the 8 most and the 8 least important filters (Taylor rank)\\n"
                         "and their response to one image; red: removed when 90% of the weights go", fontsize=10)
            fig.tight_layout()
            plt.show()
            """),
        md("""
            Deeper in, the Dense(256) layer's units combine those features into
            evidence for classes. Here is the mean activation, per class, of its
            12 most and 12 least important units (Taylor, on the unpruned model).
            Important units fire selectively, each mostly for one or a few
            classes: they are the features the output layer reads. The least
            important ones are silent for every class: "dead" ReLU units that no
            image switches on. Every criterion ranks them last, and removing them
            changes nothing; a good part of what pruning removes from this layer
            is of that kind.
            """),
        code("""
            apply(dense_masks)
            fc = layers[2]
            fc_out = keras.Model(model.inputs, fc.output).predict(x_val, batch_size=512, verbose=0)
            per_class = np.stack([fc_out[y_val == c].mean(axis=0) for c in range(10)], axis=1)
            order = np.argsort(-scores["Taylor"][fc.name])
            picked = np.concatenate([order[:12], order[-12:]])

            fig, ax = plt.subplots(figsize=(7, 6))
            im = ax.imshow(per_class[picked], cmap="viridis", aspect="auto", interpolation="nearest")
            ax.set_xticks(range(10), CLASSES, rotation=40, ha="right", fontsize=8)
            ax.set_yticks(range(24), [f"unit {u}" for u in picked], fontsize=7)
            ax.axhline(11.5, color="white", lw=2)
            ax.set_title("mean activation per class: 12 most (top) and 12 least important units",
                         fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
            plt.show()

            dead = int(np.sum(fc_out.max(axis=0) == 0))
            print(f"mean activation: important units {per_class[order[:12]].mean():.3f}, "
                  f"unimportant units {per_class[order[-12:]].mean():.3f}; "
                  f"{dead} of {fc.num_units} units never fire on the validation images")
            """),
        md("""
            ## Check
            """),
        code("""
            for crit in CRITERIA:
                for layer in layers:
                    s = scores[crit][layer.name]
                    assert s.shape == (layer.num_units,) and np.all(np.isfinite(s)), (crit, layer.name)
            # Pruning, then compacting, removes units for real with the same outputs.
            apply(masks_for("Taylor", 0.7))
            small = dkdp.compact(model)
            assert small.count_params() < dkdp.count_params(model, nonzero=False) / 2
            np.testing.assert_allclose(small.predict(x_val[:256], verbose=0),
                                       model.predict(x_val[:256], verbose=0), atol=1e-4)
            assert len(summary.plots) == 2 and all(p.exists() for p in summary.plots)
            print("all checks passed")
            """),
    ]


# --------------------------------------------------------------------- 03
def budgets():
    name = "03_budgets_and_edge_export"
    return name, header(name, "Budgets and edge export", """
        A phone app cares about file size and latency; a microcontroller about
        bytes of flash and RAM and about multiply-accumulates. This notebook
        shows how to say that to dkdp-keras and what comes out:

        1. the four budget measures: parameters, bytes, MACs, latency;
        2. weight versus unit (structured) pruning, and why only the latter
           shrinks the file and the latency;
        3. the same model pruned under a **bytes** budget and under a
           **latency** budget: different layers give way;
        4. float32, dynamic-range, float16 and full-int8 TFLite files, sized and
           timed;
        5. what to copy into an Android, iOS or microcontroller project.

        Here we prune a model that is already trained, with `dkdp.prunable` and
        `DKDPCallback` on a plain Keras model (notebook 01 shows the full
        `DKDPModel` with a student). About six minutes on a CPU;
        `DKDP_TUTORIAL_QUICK=1` runs a small version.
        """) + [
        INSTALL,
        md("## Setup"),
        setup("tutorial_03"),
        HELPERS,
        DATA,
        code("""
            n_train, n_val, n_test = (3000, 1000, 1000) if QUICK else (15000, 3000, 5000)
            x_train, y_train = x_train[:n_train], y_train[:n_train]
            x_val, y_val = x_val[:n_val], y_val[:n_val]
            x_test, y_test = x_test[:n_test], y_test[:n_test]
            steps_per_epoch = len(x_train) // BATCH
            train_ds = pipeline(x_train, y_train)
            """),
        md("""
            ## A trained model to start from

            Any trained Sequential or Functional model will do; we train the
            reference CNN for a few epochs.
            """),
        code("""
            dense = dkdp.zoo.reference_cnn()
            dense.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
            dense.fit(train_ds, steps_per_epoch=steps_per_epoch, epochs=1 if QUICK else 3, verbose=2)
            dense_accuracy = accuracy(dense, x_test, y_test)
            print(f"dense model: test accuracy {dense_accuracy:.2%}")
            """),
        md("""
            ## Four measures

            A `Budget` limits any of four measures, each counted over the model as
            it will be deployed (removed units gone, zeros not counted):

            * `max_params`: non-zero parameters;
            * `max_bytes`: parameters × `bytes_per_param` (4 float32, 2 float16,
              1 int8): weight storage, before file overhead;
            * `max_macs`: multiply-accumulates per example, the compute;
            * `max_latency_ms`: batch-1 latency, *estimated* as the dense model's
              measured Keras latency × kept MACs / dense MACs.

            A budget whose limits are the dense model's own measures reports any
            model's usage as its fraction of the dense one.
            """),
        code("""
            from dkdp_keras.budget import measure_latency_ms

            dense_params = dkdp.count_params(dense)
            dense_macs = dkdp.count_macs(dense)
            dense_ms = measure_latency_ms(dense)
            REFERENCE = dkdp.Budget(max_params=dense_params, max_bytes=dense_params,
                                    max_macs=dense_macs, bytes_per_param=1)
            table([(f"{dense_params:,}", f"{dense_params / 1024:.0f} KiB", f"{dense_macs:,}",
                    f"{dense_ms:.2f} ms")],
                  ["parameters", "int8 bytes", "MACs per image", "Keras batch-1 latency"])

            fig, axes = plt.subplots(1, 2, figsize=(10, 2.8))
            kernel_layers = [l for l in dense.layers if hasattr(l, "kernel")]


            def layer_macs(layer):  # kernel entries x output positions
                return int(np.prod(layer.kernel.shape)) * int(np.prod(layer.output.shape[1:-1]))


            share_p = [l.count_params() / dense_params for l in kernel_layers]
            share_m = [layer_macs(l) / dense_macs for l in kernel_layers]
            for ax, share, title in ((axes[0], share_p, "share of parameters"),
                                     (axes[1], share_m, "share of MACs")):
                ax.barh([l.name for l in kernel_layers], share)
                ax.set_title(title)
                ax.invert_yaxis()
            fig.tight_layout()
            plt.show()
            """),
        md("""
            The two measures live in different places: nearly all parameters sit in
            the Dense(256) layer after Flatten, nearly all the compute in the
            second convolution. Keep this in mind for section 3.

            ## Weight versus unit pruning

            We prune 80% of the weights twice, ranking by magnitude: once weight by
            weight (unstructured), once whole units (neurons and filters), each
            during one epoch of fine-tuning with a gradual schedule
            (`PolynomialDecay`, Zhu & Gupta 2017). Then both are compacted and
            exported as float32 TFLite files.
            """),
        code("""
            def fine_tune(threshold, epochs, granularity="unit", importance="magnitude",
                          steps=steps_per_epoch, **callback_args):
                \"\"\"A masked copy of the dense model, pruned by DKDPCallback while it trains.\"\"\"
                masked = dkdp.prunable(dense, track_statistics=importance != "magnitude")
                masked.compile(optimizer=keras.optimizers.Adam(5e-4), loss=LOSS, metrics=["accuracy"])
                callback = dkdp.DKDPCallback(importance=importance, granularity=granularity,
                                             threshold=threshold, verbose=0, **callback_args)
                history = masked.fit(train_ds, steps_per_epoch=steps, epochs=epochs,
                                     validation_data=(x_val, y_val), callbacks=[callback], verbose=0)
                return masked, history


            schedule = dkdp.thresholds.PolynomialDecay(0.0, 0.8, begin_step=0,
                                                       end_step=steps_per_epoch // 2)
            pruned = {g: fine_tune(schedule, 1, granularity=g,
                                   frequency=max(1, steps_per_epoch // 4))[0]
                      for g in ("weight", "unit")}

            rows, files = [], {}
            for label, net, sparse in (("dense", dense, False),
                                       ("80% weights", pruned["weight"], False),
                                       ("80% weights, sparse encoding", pruned["weight"], True),
                                       ("80% as whole units", pruned["unit"], False)):
                stem = label.replace(" ", "_").replace("%", "").replace(",", "")
                r = dkdp.export_tflite(net, OUT / f"{stem}.tflite", sparsity=sparse,
                                       check_data=(x_test, y_test), latency_runs=50)
                small = dkdp.compact(net) if net is not dense else dense
                files[label] = r
                rows.append((label, f"{dkdp.sparsity(net):.0%}", f"{small.count_params():,}",
                             f"{r.bytes / 1024:.0f} KiB", f"{r.gzip_bytes / 1024:.0f} KiB",
                             f"{r.latency_ms:.3f} ms", f"{r.accuracy:.2%}"))
            table(rows, ["float32 model", "zeros", "params after compact", "file", "gzipped",
                         "TFLite latency", "accuracy"])
            """),
        md("""
            (The pruned models trained one epoch more than the dense one, which
            is why they can score a little higher.)

            Zeros scattered through a kernel change nothing in a dense file: the
            weight-pruned file is as large and as slow as the dense one. They only
            pay off after compression: gzip, or the converter's sparse encoding
            (`export_tflite(..., sparsity=True)`), which shrinks the file but does
            not by itself make it faster. Removing whole units makes every matrix smaller:
            fewer parameters, a smaller file and a faster model, with no special
            runtime. That is why the budgets below prune units.

            ## A bytes budget and a latency budget

            Two runs from the same trained model, each with the `Adaptive`
            threshold and Taylor importance (gradients from calibration data,
            since a plain model does not collect them while training):

            * **bytes**: at most 100 KB of int8 weights;
            * **latency**: at most a quarter of the dense model's latency.

            `Adaptive` decides at epoch ends; since we start from a trained model,
            each "epoch" here is half a pass over the data, which gives it more
            decision points per pass. It meets the budget by 75% of the epochs
            and fine-tunes in the rest.
            """),
        code("""
            BUDGETS = {
                "bytes <= 100 KB (int8)": dkdp.Budget(max_bytes=100_000, bytes_per_param=1),
                "latency <= 25% of dense": dkdp.Budget(max_latency_ms=0.25 * dense_ms),
            }
            EPOCHS = 1 if QUICK else 4
            runs = {}
            for label, budget in BUDGETS.items():
                masked, history = fine_tune(
                    dkdp.thresholds.Adaptive(budget, tolerance=0.01), EPOCHS, importance="taylor",
                    steps=steps_per_epoch // 2, calibration_data=(x_val[:256], y_val[:256]))
                runs[label] = masked
                print(f"{label}: budget usage per epoch",
                      [round(u, 2) for u in history.history["budget_usage"]])
            """),
        code("""
            rows = []
            for label, masked in {"dense": dense, **runs}.items():
                usage = REFERENCE.usage(masked)
                small = dkdp.compact(masked) if masked is not dense else dense
                own = BUDGETS[label].usage(masked) if label in BUDGETS else {}
                rows.append((label, f"{small.count_params():,} ({usage['params']:.0%})",
                             f"{dkdp.count_macs(small):,} ({usage['macs']:.0%})",
                             ", ".join(f"{k} {v:.2f}" for k, v in own.items()) or "-",
                             f"{accuracy(small, x_test, y_test):.2%}"))
            table(rows, ["model", "params (of dense)", "MACs (of dense)",
                         "usage of its budget", "test accuracy"])

            kernel_names = [l.name for l in dkdp.masked_layers(next(iter(runs.values())))]
            fig, ax = plt.subplots(figsize=(7, 3))
            width = 0.8 / len(runs)
            for i, (label, masked) in enumerate(runs.items()):
                kept = [float(l.unit_mask().numpy().mean()) for l in dkdp.masked_layers(masked)]
                ax.bar(np.arange(len(kept)) + i * width, kept, width, label=label)
            ax.set_xticks(np.arange(len(kernel_names)) + width / 2, kernel_names)
            ax.set(ylabel="fraction of units kept", title="Where each budget cuts")
            ax.legend(fontsize=8)
            plt.show()
            """),
        md("""
            Both budgets empty most of the Dense(256) layer, where the parameters
            are (each filter removed from the second convolution also takes 49 of
            its inputs along). The latency budget also has to remove convolution
            filters, where the compute is, and keeps far fewer of them. One
            criterion, one global threshold: the budget decides where the cut
            falls. A warning under the training cell that a run "ended below its
            best before pruning" means that budget is tight for this little
            fine-tuning: train longer, relax the budget or raise the tolerance.
            (Budgets at unit granularity are met with a margin: by default
            layers of 32 units or more keep a multiple of 8, widths that hardware
            runs efficiently.)

            A word on milliseconds: the budget's latency is the Keras batch-1 time
            of the dense model scaled by MACs, and a Keras call on a CPU is mostly
            Python overhead: the TFLite files below run the same networks many
            times faster. Read `max_latency_ms` as a compute budget relative to
            the dense model, and measure the exported file on the target device.

            ## Four file formats

            The model of the bytes budget, exported four ways. The budget counts
            weights; the int8 file also holds int32 biases, quantisation scales and
            the graph, a few kilobytes more. Each file is run
            in the LiteRT interpreter against Keras; the quantised ones must agree
            with it on the top-1 class for 99% of the test images.
            """),
        code("""
            # The quick smoke run trains for seconds: its near-tied logits let int8
            # rounding flip a few more top-1 classes, so it allows 5% instead of 1%.
            MIN_AGREEMENT = 0.95 if QUICK else 0.99
            chosen = dkdp.compact(runs["bytes <= 100 KB (int8)"])
            formats = {}
            for quantize in ("none", "dynamic", "float16", "int8"):
                formats[quantize] = dkdp.export_tflite(
                    chosen, OUT / f"model_{quantize}.tflite", quantize=quantize,
                    representative_data=x_train[:500], check_data=(x_test, y_test),
                    min_top1_agreement=MIN_AGREEMENT, latency_runs=50)
            table([(q, f"{r.bytes / 1024:.1f} KiB", f"{r.gzip_bytes / 1024:.1f} KiB",
                    f"{r.latency_ms:.3f} ms", f"{r.accuracy:.2%}", f"{r.top1_agreement:.2%}",
                    f"{r.max_abs_diff:.2g}") for q, r in formats.items()],
                  ["quantize", "file", "gzipped", "latency (1 thread)", "accuracy",
                   "top-1 agreement", "max logit diff"])

            fig, (a, b) = plt.subplots(1, 2, figsize=(9, 2.8))
            a.bar(formats.keys(), [r.bytes / 1024 for r in formats.values()], color="tab:blue")
            a.set(ylabel="KiB", title="file size")
            b.bar(formats.keys(), [r.latency_ms for r in formats.values()], color="tab:orange")
            b.set(ylabel="ms", title="batch-1 latency")
            fig.tight_layout()
            plt.show()
            """),
        md("""
            * **float32** (`quantize=None`): exact, the largest file; the
              reference.
            * **dynamic**: int8 weights, float activations; about 4× smaller, no
              calibration data. Good default for phones.
            * **float16**: half-size weights; runs natively on GPUs and NPUs that
              support float16.
            * **int8**: integers throughout (calibrated on 500 training images);
              needed by microcontrollers, Edge TPUs and most NPUs. Its logits
              come in coarse steps (the output scale), so they differ from Keras'
              by more than the other formats' do; the top-1 class is what it
              keeps.

            ## Into a project

            **Android** (LiteRT): put the file in `app/src/main/assets/`, add
            `implementation("com.google.ai.edge.litert:litert:1.4.0")` to Gradle
            and run it:

            ```kotlin
            val interpreter = Interpreter(FileUtil.loadMappedFile(context, "model_int8.tflite"))
            val input = Array(1) { Array(28) { Array(28) { FloatArray(1) } } }  // pixels / 255f
            val logits = Array(1) { FloatArray(10) }
            interpreter.run(input, logits)
            ```

            **iOS**: add the `TensorFlowLiteSwift` pod (LiteRT's Swift API), add
            the file to the app bundle, and call `Interpreter(modelPath:)`,
            `copy(_:toInputAt:)`, `invoke()` and `output(at:)`. Input: 28×28×1
            float32 in [0, 1]; output: 10 logits.

            **Microcontrollers** (LiteRT for Microcontrollers, the former TFLite
            Micro): use a full-int8 file whose input and output are int8 too
            (`int8_io=True`), compiled into the firmware as a C array, and an op
            resolver with exactly the operators the model uses:
            """),
        code("""
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            mcu = dkdp.export_tflite(chosen, OUT / "model_mcu.tflite", quantize="int8",
                                     int8_io=True, representative_data=x_train[:500],
                                     check_data=(x_test, y_test), latency_runs=20,
                                     min_top1_agreement=MIN_AGREEMENT)
            # Without the default XNNPACK delegate, so that the operators are listed as they are.
            interpreter = Interpreter(
                model_path=mcu.path,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
            interpreter.allocate_tensors()
            inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            (in_scale, in_zero), (out_scale, out_zero) = inp["quantization"], out["quantization"]
            # _get_ops_details is LiteRT's (private, long-standing) list of the graph's operators.
            op_names = sorted({op["op_name"] for op in interpreter._get_ops_details()})

            data = pathlib.Path(mcu.path).read_bytes()
            hex_bytes = ",".join(f"0x{b:02x}" for b in data)
            (OUT / "model_data.cc").write_text(
                '#include "model_data.h"\\n'
                f"alignas(16) const unsigned char g_model[] = {{{hex_bytes}}};\\n"
                f"const unsigned int g_model_len = {len(data)};\\n")
            (OUT / "model_data.h").write_text(
                "extern const unsigned char g_model[];\\nextern const unsigned int g_model_len;\\n")

            print(f"model_data.cc: {len(data):,} bytes of flash for the model, "
                  f"accuracy {mcu.accuracy:.2%}")
            print(f"input:  int8 {inp['shape'].tolist()}, q = round(pixel / scale) + zero_point "
                  f"with scale {in_scale:.6g}, zero_point {in_zero}")
            print(f"output: int8 {out['shape'].tolist()}, logit = (q - zero_point) * scale "
                  f"with scale {out_scale:.6g}, zero_point {out_zero}")


            def micro_name(op):  # CONV_2D -> Conv2D, FULLY_CONNECTED -> FullyConnected
                return "".join(w.upper() if w[0].isdigit() else w.capitalize() for w in op.split("_"))


            resolver = "".join(f"  resolver.Add{micro_name(n)}();\\n" for n in op_names)
            print(f"\\nstatic tflite::MicroMutableOpResolver<{len(op_names)}> resolver;\\n{resolver}")
            """),
        md("""
            The `Add...()` names follow the LiteRT operator names; check the
            spelling against `micro_mutable_op_resolver.h`. `SHAPE`,
            `STRIDED_SLICE` and `PACK` compute the Flatten's target shape at run
            time, because the exported signature keeps a variable batch size. The
            tensor arena (RAM for activations)
            is not known from Python: start with about 3× the largest activation
            (here the first convolution's 28×28×channels int8 output) and let
            `RecordingMicroInterpreter` report the exact figure on the device.

            ## Check
            """),
        code("""
            for label, masked in runs.items():
                assert BUDGETS[label].is_met(masked), label
            sizes = {q: r.bytes for q, r in formats.items()}
            assert sizes["int8"] < sizes["float16"] < sizes["none"]
            assert sizes["dynamic"] < sizes["none"] / 2
            assert files["80% as whole units"].bytes < files["80% weights"].bytes / 2
            assert files["80% weights, sparse encoding"].bytes < files["80% weights"].bytes
            assert all(r.top1_agreement >= MIN_AGREEMENT for r in formats.values())
            assert formats["none"].max_abs_diff <= 1e-4
            assert len(data) == mcu.bytes and (OUT / "model_data.cc").stat().st_size > 5 * len(data)
            assert "CONV_2D" in op_names and "FULLY_CONNECTED" in op_names
            print("all checks passed")
            """),
    ]


# --------------------------------------------------------------------- 04
def continual():
    name = "04_continual_learning"
    return name, header(name, "Continual learning under a fixed budget", """
        A deployed model meets new data. Here it first learns five classes of
        Fashion-MNIST (T-shirt, trouser, pullover, dress, coat), then five new
        ones (sandal, shirt, sneaker, bag, ankle boot), and must stay within the
        same size budget throughout. We watch what it learns and what it
        forgets.

        Three models of the same size:

        * **DKDP teacher**: the reference CNN, pruned to the budget by
          `DKDPCallback` on the first task; on the second task a new callback
          holds the budget while it keeps training.
        * **DKDP student**: a narrow CNN of exactly the budget's size, distilled
          from that teacher throughout (no labels of its own).
        * **plain fine-tuning**: the same narrow CNN trained on labels, first on
          the old classes, then fine-tuned on the new ones: the baseline.

        About six minutes on a CPU; `DKDP_TUTORIAL_QUICK=1` runs a small version.
        """) + [
        INSTALL,
        md("## Setup"),
        setup("tutorial_04"),
        HELPERS,
        md("""
            ## Two tasks

            Task A: classes 0–4. Task B: classes 5–9. One output layer with ten
            logits serves both (class-incremental learning: at test time the
            model is not told which task an image comes from).

            With no old data at all while learning task B, any such model forgets
            task A almost completely (we show it for the baseline below). Real
            systems keep a small **replay** buffer of old examples; every model
            here gets the same 5% of task A's training images mixed into task B.
            """),
        DATA,
        code("""
            OLD, NEW = np.arange(5), np.arange(5, 10)
            n_task, n_val, n_curve = (2000, 500, 500) if QUICK else (10000, 2000, 2000)
            REPLAY = 0.05


            def task(x, y, classes, n):
                keep = np.flatnonzero(np.isin(y, classes))[:n]
                return x[keep], y[keep]


            xa, ya = task(x_train, y_train, OLD, n_task)
            xb, yb = task(x_train, y_train, NEW, n_task)
            xa_val, ya_val = task(x_val, y_val, OLD, n_val)
            xb_val, yb_val = task(x_val, y_val, NEW, n_val)
            xa_test, ya_test = task(x_test, y_test, OLD, 5000)
            xb_test, yb_test = task(x_test, y_test, NEW, 5000)

            n_replay = int(REPLAY * len(xa))
            xb_mix = np.concatenate([xb, xa[:n_replay]])
            yb_mix = np.concatenate([yb, ya[:n_replay]])
            xb_mix_val = np.concatenate([xb_val, xa_val[:int(REPLAY * len(xa_val))]])
            yb_mix_val = np.concatenate([yb_val, ya_val[:int(REPLAY * len(ya_val))]])
            print(f"task A: {len(xa):,} images; task B: {len(xb):,} images + {n_replay} replayed from A")

            EPOCHS_A, EPOCHS_B = (2, 2) if QUICK else (5, 4)
            """),
        md("""
            ## The budget and the three models

            The budget is the size of the narrow CNN (the reference CNN at 30%
            width). The student *is* that network; the baseline is a second copy
            of it.
            """),
        code("""
            WIDTH = 0.3
            BUDGET = dkdp.Budget(max_params=dkdp.zoo.reference_cnn(width=WIDTH).count_params())
            print(f"budget: {BUDGET.max_params:,} parameters "
                  f"(the full reference CNN has {dkdp.zoo.reference_cnn().count_params():,})")

            dkdp_model = dkdp.DKDPModel(
                dkdp.zoo.reference_cnn(),
                student=dkdp.zoo.reference_cnn(width=WIDTH, name="student"),
                lambda_kd=1.0, temperature=4.0)
            dkdp_model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])

            baseline = dkdp.zoo.reference_cnn(width=WIDTH, name="baseline")
            baseline.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])

            MODELS = {"DKDP teacher": lambda: dkdp_model.teacher,
                      "DKDP student": lambda: dkdp_model.student,
                      "plain fine-tuning": lambda: baseline}
            """),
        md("""
            A small callback records each model's accuracy on the old and the new
            classes at every epoch end, on held-out test images.
            """),
        code("""
            class TaskCurves(keras.callbacks.Callback):
                \"\"\"Accuracy on the old and the new classes after each epoch.\"\"\"

                def __init__(self, names, curves):
                    super().__init__()
                    self.names, self.curves = names, curves

                def on_epoch_end(self, epoch, logs=None):
                    for name in self.names:
                        net = MODELS[name]()
                        self.curves[name]["old"].append(accuracy(net, xa_test[:n_curve], ya_test[:n_curve]))
                        self.curves[name]["new"].append(accuracy(net, xb_test[:n_curve], yb_test[:n_curve]))


            curves = {name: {"old": [], "new": []} for name in MODELS}
            """),
        md("""
            ## Task A: learn the old classes, prune to the budget

            The DKDP model trains teacher and student together while the callback
            prunes the teacher's units down to the budget (Taylor importance,
            adaptive threshold). The baseline trains on the same images.
            """),
        code("""
            def dkdp_callback():
                # restore_best=False, average=False: every model ends at its last
                # epoch, as the baseline does (no early stopping on the
                # validation metric, no weight averaging).
                return dkdp.DKDPCallback(
                    importance=dkdp.importance.Taylor(), granularity="unit",
                    threshold=dkdp.thresholds.Adaptive(BUDGET, tolerance=0.01, restore_best=False),
                    average=False, verbose=0)


            steps_a = len(xa) // BATCH
            hist_a = dkdp_model.fit(
                pipeline(xa, ya), steps_per_epoch=steps_a, epochs=EPOCHS_A,
                validation_data=(xa_val, ya_val), verbose=0,
                callbacks=[dkdp_callback(), TaskCurves(["DKDP teacher", "DKDP student"], curves)])
            baseline.fit(pipeline(xa, ya), steps_per_epoch=steps_a, epochs=EPOCHS_A, verbose=0,
                         callbacks=[TaskCurves(["plain fine-tuning"], curves)])
            print("teacher kept params per epoch:", [int(p) for p in hist_a.history["kept_params"]])
            """),
        md("""
            ## Task B: the new classes, same budget

            Training continues on task B (plus the replay buffer). A fresh
            `DKDPCallback` with the same budget watches the teacher at every epoch
            end: it is within budget already, so it prunes nothing, and pruned
            units stay removed (a masked weight gets no gradient). The teacher has
            to learn the new classes with the units it kept.

            For comparison, the baseline is also fine-tuned once *without* replay,
            from a copy of its state after task A.
            """),
        code("""
            no_replay = keras.models.clone_model(baseline)
            no_replay.set_weights(baseline.get_weights())
            no_replay.compile(optimizer=keras.optimizers.Adam(1e-3), loss=LOSS, metrics=["accuracy"])
            after_a = {name: {k: v[-1] for k, v in c.items()} for name, c in curves.items()}

            steps_b = len(xb_mix) // BATCH
            hist_b = dkdp_model.fit(
                pipeline(xb_mix, yb_mix), steps_per_epoch=steps_b, epochs=EPOCHS_B,
                validation_data=(xb_mix_val, yb_mix_val), verbose=0,
                callbacks=[dkdp_callback(), TaskCurves(["DKDP teacher", "DKDP student"], curves)])
            baseline.fit(pipeline(xb_mix, yb_mix), steps_per_epoch=steps_b, epochs=EPOCHS_B,
                         verbose=0, callbacks=[TaskCurves(["plain fine-tuning"], curves)])
            no_replay.fit(pipeline(xb, yb), steps_per_epoch=len(xb) // BATCH, epochs=EPOCHS_B,
                          verbose=0)
            print("teacher budget usage per epoch of task B:",
                  [round(u, 3) for u in hist_b.history["budget_usage"]])
            """),
        md("""
            ## What was learnt and what was forgotten

            Old-class accuracy across both tasks (the dotted line marks the switch
            to task B), and new-class accuracy during task B.
            """),
        code("""
            fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4))
            for name, c in curves.items():
                epochs = np.arange(1, len(c["old"]) + 1)
                a.plot(epochs, c["old"], "o-", label=name)
                b.plot(epochs[EPOCHS_A:], c["new"][EPOCHS_A:], "o-", label=name)
            a.axvline(EPOCHS_A + 0.5, color="gray", ls=":")
            a.set(xlabel="epoch", ylabel="accuracy", title="old classes 0-4", ylim=(0, 1))
            b.set(xlabel="epoch", title="new classes 5-9 (task B)", ylim=(0, 1),
                  xticks=epochs[EPOCHS_A:])
            a.legend(fontsize=8)
            fig.tight_layout()
            plt.show()
            """),
        code("""
            final = {name: get() for name, get in MODELS.items()}
            final["plain fine-tuning, no replay"] = no_replay
            sizes = {"DKDP teacher": dkdp.count_params(dkdp_model.compact_teacher())}


            def old_to_new(net):
                \"\"\"Fraction of old-class images now called one of the new classes.\"\"\"
                return float(np.mean(np.isin(net.predict(xa_test, verbose=0).argmax(-1), NEW)))


            rows, results = [], {}
            for name, net in final.items():
                old = accuracy(net, xa_test, ya_test)
                new = accuracy(net, xb_test, yb_test)
                results[name] = (old, new)
                before = after_a.get(name, after_a["plain fine-tuning"])["old"]
                rows.append((name, f"{sizes.get(name, net.count_params()):,}",
                             f"{before:.1%}", f"{old:.1%}", f"{new:.1%}",
                             f"{(old + new) / 2:.1%}", f"{old_to_new(net):.0%}"))
            table(rows, ["model", "params", "old classes after A", "old classes after B",
                         "new classes after B", "all 10", "old images called new"])
            """),
        code("""
            fig, ax = plt.subplots(figsize=(10, 3))
            width = 0.8 / len(final)
            for i, (name, net) in enumerate(final.items()):
                pred = net.predict(np.concatenate([xa_test, xb_test]), verbose=0).argmax(-1)
                true = np.concatenate([ya_test, yb_test])
                per_class = [np.mean(pred[true == c] == c) for c in range(10)]
                ax.bar(np.arange(10) + i * width, per_class, width, label=name)
            ax.axvline(4.9, color="gray", ls=":")
            ax.set_xticks(np.arange(10) + 0.4, CLASSES, rotation=20, fontsize=8)
            ax.set(ylabel="accuracy", title="per class after task B (left of the line: old classes)")
            ax.legend(fontsize=7, ncol=2)
            plt.show()
            """),
        md("""
            How to read it:

            * **Learnt**: every model learns the new classes well, whatever it
              went through before.
            * **Forgotten**: the old classes pay for it. Without replay they are
              lost entirely: every old image is called one of the new classes,
              since training on task B keeps raising the new classes' logits and
              nothing pushes back. With the 5% replay buffer, plain fine-tuning
              keeps part of them.
            * **DKDP against plain fine-tuning**: at the same size, pruning a
              large network to the budget gives a model that learns task A about
              as well as the narrow CNN does, but it is not protected against
              forgetting. Compare the old-class columns: the DKDP models keep
              fewer of the old classes than plain fine-tuning; in our runs with
              other random seeds they kept between none and about a quarter of
              them, never more than the plain model. The callback holds the
              *size* (the masks stay fixed, so task B has to reuse the units that
              task A chose, here a Dense layer of a few dozen units); nothing in
              the objective asks the teacher to keep its old answers.
            * The student learns only from the teacher's soft outputs, so it
              follows the teacher: it learns what the teacher learns and forgets
              what the teacher forgets.

            To forget less, keep the replay buffer (a larger one helps most), or
            distil from a frozen copy of the task-A model while learning task B
            (Learning without Forgetting, Li & Hoiem 2017); what dkdp-keras
            guarantees is the budget: the pruned teacher compacts to at most the
            budget's parameters after task B as after task A.

            ## Check
            """),
        code("""
            assert sizes["DKDP teacher"] <= BUDGET.max_params
            assert max(hist_b.history["budget_usage"]) <= 1.0
            assert dkdp_model.student.count_params() == baseline.count_params() == BUDGET.max_params
            assert results["plain fine-tuning, no replay"][0] < 0.2  # forgotten without replay
            if not QUICK:
                for name, (old, new) in results.items():
                    assert new > 0.5, (name, new)  # every model learnt the new classes
                assert results["plain fine-tuning, no replay"][0] < results["plain fine-tuning"][0]
            print("all checks passed")
            """),
    ]


NOTEBOOKS = [quickstart, importance, budgets, continual]


def build(name, cells):
    nb = new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    return nb


#: Lines that TensorFlow's C++ side writes to stderr whatever Python asks;
#: they are dropped from the committed outputs.
NOISE = ("WARNING: All log messages before absl", "I0000 ", "E0000 ", "W0000 ",
         "fully_quantize:", "INFO: Created TensorFlow Lite", "To enable the following")


def _quiet(nb):
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [line for line in out["text"].splitlines(keepends=True)
                         if line.strip() and not line.startswith(NOISE)]
                if not lines:
                    continue
                out["text"] = "".join(lines)
            outputs.append(out)
        cell["outputs"] = outputs
    return nb


def execute(nb, name):
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix=f"dkdp_{name}_") as tmp:
        NotebookClient(nb, timeout=1800, kernel_name="python3", record_timing=False,
                       resources={"metadata": {"path": tmp}}).execute()
    return _quiet(nb)


def refresh_prose(nb, path):
    """`nb` with the outputs of the executed notebook at `path`, when only
    Markdown cells changed; else raise."""
    old = nbformat.read(path, as_version=4)
    same = len(old.cells) == len(nb.cells) and all(
        a.cell_type == b.cell_type and (a.cell_type != "code" or a.source == b.source)
        for a, b in zip(old.cells, nb.cells))
    if not same:
        raise SystemExit(f"{path.name}: code cells changed; run --execute instead.")
    for a, b in zip(old.cells, nb.cells):
        if a.cell_type == "code":
            b.outputs, b.execution_count = a.outputs, a.execution_count
    return nb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--execute", action="store_true",
                      help="run each notebook in full mode and keep its outputs")
    mode.add_argument("--prose", action="store_true",
                      help="update Markdown cells only, keeping the executed outputs")
    parser.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    args = parser.parse_args(argv)
    for make in NOTEBOOKS:
        name, cells = make()
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        nb = build(name, cells)
        if args.prose:
            nb = refresh_prose(nb, HERE / f"{name}.ipynb")
        elif args.execute:
            print(f"executing {name} ...", flush=True)
            nb = execute(nb, name)
        path = HERE / f"{name}.ipynb"
        nbformat.validate(nb)
        nbformat.write(nb, path)
        print(f"wrote {path.relative_to(HERE.parent)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
