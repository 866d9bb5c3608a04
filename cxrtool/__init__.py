"""cxrtool: chest X-ray AI from the command line.

Import-light: ``import cxrtool`` does not import torch. The Python API mirrors the CLI::

    from cxrtool.predict import predict
    from cxrtool.train import load_config, train
    from cxrtool.evaluate import evaluate

    predict(["study/"], model="runs/demo/model.safetensors")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
