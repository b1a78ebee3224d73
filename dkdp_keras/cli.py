"""The `dkdp` command. Its commands arrive with the CLI issue; until then it
prints what it will do and exits with status 2 for anything else."""

import sys

USAGE = """usage: dkdp COMMAND [options]

Commands (coming in the next releases):
  run       train, prune and distil a model on a dataset; write a report
  export    convert a .keras model to .tflite
  inspect   show the importance and sparsity of a .keras model
  bench     run the benchmark protocol

Today the library API is ready: see README.md.
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if argv[0] in ("--version", "version"):
        from dkdp_keras import __version__

        print(f"dkdp {__version__}")
        return 0
    print(
        f"dkdp: '{argv[0]}' is not available yet in this version; "
        "run 'dkdp --help'.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
