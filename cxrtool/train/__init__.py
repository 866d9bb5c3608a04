"""Training: the loop, losses, datasets and the torchrun (DDP) set-up."""

from cxrtool.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "train"]


def __getattr__(name: str):
    if name == "train":
        from cxrtool.train.loop import train

        return train
    raise AttributeError(name)
