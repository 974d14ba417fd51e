#!/usr/bin/env bash
# Download, here, the wheels `make gpu-check` needs on the GPU machine, which has Python 3.12 with
# torch, numpy, scipy, matplotlib, tqdm, pandas and pytest, but reaches no package registry.
# They go to .gpu-wheels/ (git-ignored, ~42 MB); carry that folder with the tree, and
# `make gpu-check` installs them there with `pip install --no-index --no-deps --target`.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu-wheels}
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
# papermill, ipykernel, nibabel, MONAI and scikit-image (chapter 5's surfaces) with everything they
# import that the machine lacks (networkx and pillow come with torch and matplotlib)
# (IPython 9.18 needs no decorator: its metadata lists none; pygments comes with pytest)
# (versions as in requirements.txt / .venv; aiohttp is papermill's dependency on Python >= 3.12).
PKGS=(
  nibabel==5.4.2 papermill==2.7.0 nbclient==0.11.0 nbformat==5.11.1 jupyter-client==8.10.0
  jupyter-core==5.9.1 ipykernel==7.4.0 ipython==9.18.1 ipython-pygments-lexers==1.1.1 ipywidgets==8.1.9
  widgetsnbextension==4.0.16 jupyterlab-widgets==3.0.17 comm==0.2.3 debugpy==1.8.22 traitlets==5.16.1
  tornado==6.6.1 pyzmq==27.3.0 psutil==7.2.2 nest-asyncio2==1.7.4 matplotlib-inline==0.2.2 jedi==0.20.1
  parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0 prompt-toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3
  asttokens==3.0.2 executing==2.3.0 pure-eval==0.2.4 platformdirs==4.14.8 fastjsonschema==2.22.3
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  attrs==26.1.0 click==8.5.1 pyyaml==6.0.4 requests==2.34.2 urllib3==2.8.0 idna==3.20
  charset-normalizer==3.5.3 certifi==2026.10.19.post1 entrypoints==0.4.2 tenacity==9.2.1
  aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl
  monai==1.6.1 scikit-image==0.26.0 imageio==2.38.2 tifffile==2026.3.3 lazy-loader==0.6
)
python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
  --python-version "$PY" --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$DEST" "${PKGS[@]}"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
