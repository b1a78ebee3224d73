"""What `dkdp` refuses before it trains, each in one line that names the
bad value: the files and directories a user names, the dataset, the model,
the settings of a run, and a resume that would change them. Shared by `dkdp_keras.pipeline` (what `dkdp run`
does) and the CLI's other commands; TensorFlow is imported only once the
cheap checks have passed."""

import json
import math
import numbers
import os
import pathlib
import re
import tempfile
import zipfile

DATASETS = ("fashion_mnist", "mnist", "cifar10", "digits")
MODELS = ("reference_cnn", "lenet_300_100")
QUANTIZE = ("none", "dynamic", "float16", "int8")
GRANULARITY = ("weight", "unit")
#: The options of `dkdp run` that OUT/settings.json keeps for --resume.
SETTINGS = ("dataset", "model", "max_params", "max_bytes", "max_macs",
            "max_latency_ms", "importance", "granularity", "lambda_kd",
            "temperature", "epochs", "batch_size", "quantize", "seed", "quick",
            "no_dense")
IMPORTANCE = ("magnitude", "gradient", "gradient_magnitude", "taylor", "activation",
              "activation_frequency", "learned_mask")


class PipelineError(ValueError):
    """Bad input to `dkdp run` or `dkdp_keras.pipeline.run`: a message of one
    line that names the bad value (the CLI prints it and exits with status 2)."""


def _check_keras_file(path):
    """`path` is a .keras archive (a zip with config.json), checked without
    TensorFlow: Keras reports an empty or corrupt file as "File not found"."""
    if not os.path.isfile(path):
        raise PipelineError(f"no model file at {path!r}")
    try:
        size = os.path.getsize(path)
        if size == 0:
            problem = "it is empty (0 bytes)"
        elif not zipfile.is_zipfile(path):
            problem = f"it is corrupt ({size:,} bytes, not a zip archive)"
        else:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
            problem = None if "config.json" in names else "it is a zip without config.json"
    except (OSError, zipfile.BadZipFile) as error:
        problem = f"it cannot be read ({_first_line(error)})"
    if problem:
        raise PipelineError(
            f"{path!r} is not a readable .keras archive: {problem}; save the model "
            "again with model.save('NAME.keras')"
        )


def _load_keras(path):
    _check_keras_file(path)
    import keras

    import dkdp_keras  # noqa: F401  (registers the masked layers)

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # unreadable, not a .keras file, ...
        raise PipelineError(
            f"cannot read {path!r} as a Keras model: {_first_line(error)}"
        ) from None


def _check_out_dir(flag, path):
    """`path` is, or can be made, a directory this process writes in.
    Checked with a probe directory, created and removed at once, in `path`
    or its nearest existing parent: os.access alone says yes to root for
    places such as /sys and /proc, where nobody can create a directory."""
    out = pathlib.Path(path)
    try:
        if out.exists() and not out.is_dir():
            raise PipelineError(
                f"{flag} {path} is a file, not a directory: choose a directory "
                "(it is created if missing)"
            )
        existing = out.absolute()
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise PipelineError(
                f"{flag} {path} is inside {existing}, which is a file: choose a "
                "directory path"
            )
        _probe(existing, flag, path)
    except OSError as error:  # e.g. a parent that cannot be listed
        raise PipelineError(f"{flag} {path} cannot be used: {_first_line(error)}") from None


def _probe(directory, flag, path):
    """PipelineError unless a directory can be created (and removed) in `directory`."""
    if pathlib.Path(path).absolute() == directory:
        lead = f"{flag} {path} is not writable"
    else:
        lead = f"{flag} {path} cannot be created there: {directory} is not writable"
    reason = "permission denied"
    writable = os.access(directory, os.W_OK | os.X_OK)
    if writable:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".dkdp-probe-", dir=directory))
        except OSError as error:
            writable, reason = False, error.strerror or _first_line(error)
    if not writable:
        raise PipelineError(f"{lead} ({reason}): choose a directory you can write to")


def _check_out_file(flag, path, suffix):
    """`path` names a file (not a directory) with `suffix`, in an existing
    directory this process writes in."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise PipelineError(
            f"{flag} {path} is a directory: give the file to write, for example "
            f"{target / ('model' + suffix)}"
        )
    if target.suffix != suffix:
        raise PipelineError(
            f"{flag} must end in {suffix}, got {path} (for example "
            f"{target.with_suffix(suffix)})"
        )
    parent = target.absolute().parent
    if not parent.is_dir():
        raise PipelineError(
            f"{flag} {path}: its directory {parent} does not exist: create it first"
        )
    _probe(parent, flag, path)


def _data(name, quick):
    from dkdp_keras import datasets

    if not (name in DATASETS or name.endswith(".npz")):
        raise PipelineError(
            f"unknown dataset {name!r}: use one of {', '.join(DATASETS)} or a .npz path"
        )
    try:
        (x, y), (xt, yt) = datasets.load(name, as_numpy=True)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise PipelineError(_first_line(error)) from None
    if len(x) < 10:  # a tenth of the training set validates
        raise PipelineError(
            f"dataset {name!r} has {len(x)} training examples; dkdp run needs at "
            "least 10 (the last tenth validates)"
        )
    (x, y), (xv, yv) = datasets.validation_split(x, y, size=min(5000, len(x) // 10))
    if quick:
        x, y, xv, yv, xt, yt = x[:10000], y[:10000], xv[:2000], yv[:2000], xt[:2000], yt[:2000]
    return (x, y), (xv, yv), (xt, yt)


def _teacher(name, input_shape, classes):
    from dkdp_keras import zoo

    if name in MODELS:
        try:
            return getattr(zoo, name)(input_shape=input_shape, num_classes=classes)
        except ValueError as error:  # e.g. pooling below 1×1
            raise PipelineError(
                f"model {name!r} cannot take inputs of shape {tuple(input_shape)}: "
                f"{_first_line(error)}; use a dataset with larger images or "
                "another --model"
            ) from None
    if name.endswith(".keras"):
        import dkdp_keras as dkdp

        model = _load_keras(name)
        if isinstance(model, dkdp.DKDPModel):
            raise PipelineError(
                f"--model {name!r} is a saved DKDPModel (a teacher with its student), "
                "not a model to compress: pass a plain Keras model, such as the "
                "teacher_compact.keras or student.keras of the same run"
            )
        try:
            inputs, outputs = list(model.inputs), list(model.outputs)
        except (AttributeError, TypeError, ValueError):
            raise PipelineError(
                f"--model {name!r} is a {type(model).__name__} without a graph of "
                "inputs and outputs: dkdp run takes a Sequential or Functional model"
            ) from None
        if len(inputs) != 1 or len(outputs) != 1:
            raise PipelineError(
                f"--model {name!r} has {len(inputs)} input(s) and {len(outputs)} "
                "outputs; dkdp run trains a classifier with one input and one output "
                "(logits, one per class): keep one head, or concatenate the heads"
            )
        if tuple(inputs[0].shape[1:]) != tuple(input_shape):
            raise PipelineError(
                f"model {name!r} takes inputs of shape {tuple(inputs[0].shape[1:])}, "
                f"the dataset has {tuple(input_shape)}"
            )
        out_shape = tuple(outputs[0].shape[1:])
        if len(out_shape) != 1 or out_shape[0] is None or out_shape[0] < classes:
            raise PipelineError(
                f"--model {name!r} outputs shape {out_shape}, but the dataset's labels "
                f"are 0 to {classes - 1}: the model needs one output of shape "
                f"({classes},) or more, the logits of the classes"
            )
        return model
    raise PipelineError(f"unknown model {name!r}: use one of {', '.join(MODELS)} or a .keras path")


def _first_line(error):
    """The informative line of an exception's message, without colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith("Exception encountered")]
    return (useful or lines or [type(error).__name__])[0]


def _check_types(args):
    """What argparse ensures of the options on a command line, for the
    keyword arguments of `pipeline.run`."""
    kinds = [(str, "a string", ("dataset", "model", "out", "importance", "granularity",
                                "quantize")),
             (numbers.Integral, "an integer", ("epochs", "batch_size", "seed")),
             (numbers.Real, "a number", ("max_params", "max_bytes", "max_macs",
                                         "max_latency_ms", "lambda_kd", "temperature")),
             (bool, "True or False", ("quick", "no_dense"))]
    for kind, what, names in kinds:
        for name in names:
            value = getattr(args, name)
            if value is None and (name == "batch_size" or name.startswith("max_")):
                continue
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise PipelineError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")
    for name, choices in (("granularity", GRANULARITY), ("quantize", QUANTIZE)):
        if getattr(args, name) not in choices:
            raise PipelineError(f"--{name} must be one of {', '.join(choices)}, got "
                                f"{getattr(args, name)!r}")


def _check_run_args(args):
    """Everything that can be checked before TensorFlow is imported."""
    _check_types(args)
    if not (args.dataset in DATASETS or args.dataset.endswith(".npz")):
        raise PipelineError(
            f"unknown dataset {args.dataset!r}: use one of {', '.join(DATASETS)} "
            "or a .npz path"
        )
    if args.dataset.endswith(".npz") and not os.path.isfile(args.dataset):
        raise PipelineError(f"No dataset file at {args.dataset}.")
    if args.model not in MODELS and not args.model.endswith(".keras"):
        raise PipelineError(
            f"unknown model {args.model!r}: use one of {', '.join(MODELS)} or a .keras path"
        )
    if args.model.endswith(".keras"):
        _check_keras_file(args.model)
    if args.importance.lower() not in IMPORTANCE:
        raise PipelineError(
            f"Unknown importance criterion {args.importance!r}; known names: "
            f"{', '.join(IMPORTANCE)}"
        )
    if args.epochs < 1:
        raise PipelineError(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise PipelineError(f"--batch-size must be at least 1, got {args.batch_size}")
    for name in ("max_params", "max_bytes", "max_macs", "max_latency_ms"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise PipelineError(f"--{name.replace('_', '-')} must be > 0, got {value:g}")
        if value is not None and not math.isfinite(value):
            raise PipelineError(
                f"--{name.replace('_', '-')} must be a finite number, got {value:g}: "
                "give the budget itself, for example --max-params 60000"
            )
        if value is not None and float(value).is_integer():
            setattr(args, name, int(value))
    if not (math.isfinite(args.lambda_kd) and args.lambda_kd >= 0):
        raise PipelineError(
            f"--lambda-kd must be a finite number >= 0 (the weight of the distillation "
            f"loss; 0 turns it off), got {args.lambda_kd:g}"
        )
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise PipelineError(
            f"--temperature must be a finite number > 0 (the distillation softmax "
            f"temperature; 1 is none, 4 the default), got {args.temperature:g}"
        )
    if not 0 <= args.seed < 2**32:
        raise PipelineError(f"--seed must be in 0 .. 2**32 - 1 (4294967295), got {args.seed}")
    _check_out_dir("--out", args.out)


def _same(name, given, saved):
    if name in ("dataset", "model") and isinstance(given, str) and isinstance(saved, str):
        if given.endswith((".npz", ".keras")):
            return os.path.abspath(given) == os.path.abspath(saved)
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) \
            and not isinstance(given, bool) and not isinstance(saved, bool):
        return float(given) == float(saved)
    return given == saved


def _resume_settings(args, explicit):
    """Take the interrupted run's settings from DIR/settings.json; options
    given with --resume must agree with them."""
    directory = pathlib.Path(args.resume)
    path = directory / "settings.json"
    if not path.is_file():
        raise PipelineError(
            f"nothing to resume in {args.resume!r}: it has no settings.json "
            "(dkdp run --out DIR writes one when it starts)"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise PipelineError(f"cannot read {path}: {error}") from None
    if (directory / "metrics.json").is_file():
        raise PipelineError(
            f"the run in {args.resume!r} has finished (see its report.md); "
            "nothing to resume"
        )
    conflicts = []
    if "out" in explicit and os.path.abspath(args.out) != os.path.abspath(directory):
        conflicts.append(f"--out {args.out} (the run is in {args.resume})")
    for name in SETTINGS:
        if name in explicit and name in saved and not _same(name, getattr(args, name),
                                                            saved[name]):
            flag = "--" + name.replace("_", "-")
            value = "" if isinstance(getattr(args, name), bool) else f" {getattr(args, name)}"
            conflicts.append(f"{flag}{value} (the run has {saved[name]})")
    if conflicts:
        raise PipelineError(
            f"--resume {args.resume} continues with the run's own settings, and "
            f"{'; '.join(conflicts)} would change them: drop "
            f"{'it' if len(conflicts) == 1 else 'them'}, or start a new run with "
            "another --out"
        )
    for name in SETTINGS:
        if name in saved:
            setattr(args, name, saved[name])
    args.out = str(directory)


def _check_not_interrupted(out):
    """A new run must not overwrite an interrupted one."""
    if (out / "settings.json").is_file() and not (out / "metrics.json").is_file():
        raise PipelineError(
            f"{str(out)!r} holds an interrupted run: continue it with "
            f"dkdp run --resume {out}, or choose another --out"
        )
