"""experiments/train.py (or export_compressors.py) on a machine without tensorflow_datasets: the
local .txt files are read directly (one document per file) instead of through the TFDS builder."""

import os
import runpy
import sys

from lococo_jax import data


def iter_documents(dcfg):
    for p in data._txt_files(dcfg.files):
        yield p.read_text(encoding="utf-8")


try:
    import tensorflow_datasets  # noqa: F401

    missing = bool(os.environ.get("LOCOCO_NO_TFDS"))
except ImportError:
    missing = True
if missing:
    data.iter_documents = iter_documents
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
