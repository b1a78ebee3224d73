#!/bin/sh
# Installs the real Fashion-MNIST files (Debian package dataset-fashion-mnist,
# /usr/share/datasets/fashion-mnist/) that the tests and the offline path of
# dkdp_keras.datasets read. Does nothing when they are already there.
set -e
dir=/usr/share/datasets/fashion-mnist
if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "data.sh: no apt-get here; the Fashion-MNIST tests will be skipped" \
         "and the library falls back to tensorflow-datasets." >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist
