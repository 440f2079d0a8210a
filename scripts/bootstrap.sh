#!/usr/bin/env bash
# Create .venv and install ddps with its pinned stack (quick when done already), and make sure the
# Fashion-MNIST photographs are on the machine. Used by `make demo` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.ddps-installed"

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "bootstrap: creating $VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "bootstrap: python3 has no venv module; installing Debian's python3-venv"
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$VENV"
      else
        echo "bootstrap: python3 cannot create a venv; run 'sudo apt-get install python3-venv'" >&2
        exit 1
      fi
    fi
  fi
  echo "bootstrap: installing ddps and its pinned dependencies into $VENV (about 2 minutes the first time)"
  # pip warns about unreachable local indexes on some machines, setuptools about editable installs:
  # keep the rest of their output (errors included; pipefail keeps pip's exit status)
  export PYTHONWARNINGS=ignore
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  "$VENV/bin/python" -m pip install -q -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }
  unset PYTHONWARNINGS
  "$VENV/bin/python" -c "import ddps, torch, segmentation_models_pytorch, albumentations, ray, mlflow"
  touch "$STAMP"
fi

# Fashion-MNIST: $DDPS_FASHION_MNIST if set, else Debian's dataset-fashion-mnist package.
if [ -n "${DDPS_FASHION_MNIST:-}" ]; then
  if [ ! -e "$DDPS_FASHION_MNIST/train-images-idx3-ubyte.gz" ] && [ ! -e "$DDPS_FASHION_MNIST/train-images-idx3-ubyte" ]; then
    echo "bootstrap: DDPS_FASHION_MNIST=$DDPS_FASHION_MNIST holds no train-images-idx3-ubyte(.gz)" >&2
    exit 1
  fi
elif [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing the Debian package dataset-fashion-mnist"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "bootstrap: Fashion-MNIST is missing. Run 'sudo apt-get install dataset-fashion-mnist', or set" \
         "DDPS_FASHION_MNIST to a folder with the four IDX files (train/t10k images/labels)." >&2
    exit 1
  fi
fi
