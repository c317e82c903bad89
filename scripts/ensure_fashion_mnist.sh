#!/usr/bin/env bash
# Make sure Fashion-MNIST's four IDX files are where the fashion-mnist-* tasks look by default
# (/usr/share/datasets/fashion-mnist, Debian's package dataset-fashion-mnist). Installs the package when the
# files are missing, the machine has apt-get and this runs as root; otherwise prints the one command to run.
# Never fails the build: tasks that need the files raise a clear error, and their tests skip.
set -u
dir=/usr/share/datasets/fashion-mnist
have_files() {
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$dir/$f.gz" ] || [ -f "$dir/$f" ] || return 1
  done
}
have_files && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: installing Debian's package dataset-fashion-mnist ..."
  { apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }; } ||
    echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist" >&2
fi
have_files && exit 0
echo "Fashion-MNIST files not found in $dir. To get them, run as root:" >&2
echo "    apt-get update && apt-get install dataset-fashion-mnist" >&2
echo "or point task_options.data_dir at a folder holding the four IDX files (README.md, section 'Two commands')." >&2
exit 0
