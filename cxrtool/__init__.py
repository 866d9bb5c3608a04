"""cxrtool: chest X-ray AI from the command line.

Import-light: ``import cxrtool`` does not import torch; it only makes sure that torchvision
(which timm, grad-cam and torchxrayvision import) works whenever and by whomever it is first
imported (see :mod:`cxrtool._compat`). The Python API mirrors the CLI::

    from cxrtool.predict import predict
    from cxrtool.train import load_config, train
    from cxrtool.evaluate import evaluate

    predict(["study/"], model="runs/demo/model.safetensors")
"""

from __future__ import annotations

from cxrtool._compat import install_import_hook

__version__ = "0.1.0"

install_import_hook()

__all__ = ["__version__"]
