#!/usr/bin/env bash
# Create (once) the Python environment described by requirements.lock and link it as .venv.
#
# The environment lives outside the clone, keyed by the lock file's hash
# ($MOESAE_ENV_CACHE, default ~/.cache/moesae/envs/<hash>), so a fresh clone with the same lock
# reuses it and a changed lock builds a new one. Re-running with the environment present installs
# nothing. Only the project itself is (re)linked when the clone moved.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
hash=$(sha256sum requirements.lock | cut -c1-16)
cache=${MOESAE_ENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moesae/envs}
env_dir="$cache/$hash"

if [ ! -f "$env_dir/.complete" ]; then
    echo "[env] building the environment from requirements.lock into $env_dir (first time only, ~5 min)"
    rm -rf "$env_dir"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$env_dir"
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3" "setuptools==84.2.1" "wheel==0.48.0" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    # --no-deps: the lock already lists every package, pinned; nothing else may be resolved.
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    touch "$env_dir/.complete"
fi

# .venv in the clone points at the cached environment.
if [ "$(readlink .venv 2>/dev/null || true)" != "$env_dir" ]; then
    rm -rf .venv
    ln -s "$env_dir" .venv
fi

# The project itself, editable, linked to *this* clone (a few seconds, only when it changed).
src_dir="$(pwd)/src"
if ! grep -qsxF "$src_dir" "$env_dir"/lib/python*/site-packages/__editable__.moesae*.pth 2>/dev/null \
   && ! grep -qsF "$src_dir" "$env_dir"/lib/python*/site-packages/_moesae*.pth 2>/dev/null; then
    echo "[env] linking the moesae package from $src_dir"
    "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . >/dev/null
fi
# Jupyter kernel named after the project, so papermill finds it in a fresh environment.
if [ ! -f "$env_dir/share/jupyter/kernels/moesae/kernel.json" ]; then
    "$env_dir/bin/python" -m ipykernel install --sys-prefix --name moesae --display-name "moesae (.venv)" >/dev/null
fi
