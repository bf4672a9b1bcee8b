#!/usr/bin/env bash
# LibTorch for `--features tch` (Burn's LibTorch backend), from PyPI's torch 2.9.0 wheel —
# the version torch-sys 0.22 builds against — so nothing is fetched beyond the package
# registries. Idempotent; prints the environment to use on stdout (`eval` it), progress on
# stderr.
#
#   eval "$(scripts/libtorch.sh)"           headers and libraries of the wheel alone
#                                           (~0.9 GB download): enough for
#                                           `cargo check --features tch`
#   eval "$(scripts/libtorch.sh --cuda)"    a virtualenv with torch 2.9.0 and the CUDA
#                                           libraries it depends on (~3 GB): enough to
#                                           build and run on an NVIDIA GPU
#
# DIR defaults to ~/.cache/ieu-bench/libtorch-2.9.0 (env IEU_LIBTORCH_DIR).
set -euo pipefail
VERSION=2.9.0
DIR=${IEU_LIBTORCH_DIR:-$HOME/.cache/ieu-bench/libtorch-$VERSION}
CUDA=0
[[ ${1:-} == --cuda ]] && CUDA=1
mkdir -p "$DIR"
say() { echo "== libtorch: $*" >&2; }

python=$(command -v python3 || true)
[[ -n $python ]] || { echo "libtorch.sh: python3 is needed to fetch torch from PyPI" >&2; exit 1; }

if [[ $CUDA == 1 ]]; then
  venv="$DIR/venv"
  if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$VERSION')" 2>/dev/null; then
    say "installing torch==$VERSION with its CUDA libraries into $venv"
    "$python" -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet "torch==$VERSION" >&2
  fi
  lib=$("$venv/bin/python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
  say "torch $VERSION in $venv"
  echo "export VIRTUAL_ENV='$venv' PATH='$venv/bin':\"\$PATH\" LIBTORCH_USE_PYTORCH=1"
  echo "export LD_LIBRARY_PATH='$lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
  exit 0
fi

root="$DIR/wheel/torch"
if [[ ! -f "$DIR/wheel/.complete" ]]; then
  say "downloading the torch==$VERSION wheel (no dependencies) into $DIR"
  if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "libtorch.sh: pip is needed (Debian: apt-get install python3-pip)" >&2
    exit 1
  fi
  "$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux_2_28_x86_64 "torch==$VERSION" -d "$DIR" >&2
  wheel=$(ls "$DIR"/torch-"$VERSION"-*.whl | head -1)
  say "extracting include/ and lib/ from $(basename "$wheel")"
  rm -rf "$DIR/wheel"
  "$python" - "$wheel" "$DIR/wheel" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    z.extractall(out, [n for n in z.namelist()
                       if n.startswith(("torch/include/", "torch/lib/")) or n == "torch/version.py"])
EOF
  rm -f "$wheel"
  touch "$DIR/wheel/.complete"
fi
say "LibTorch $VERSION headers and libraries in $root"
echo "export LIBTORCH='$root' LIBTORCH_CXX11_ABI=1"
echo "export LD_LIBRARY_PATH='$root/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
