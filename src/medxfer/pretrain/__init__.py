"""Stage 1 of transfer learning: make your own source model.

Usage::

    from medxfer import TrainConfig
    from medxfer.pretrain import SSLConfig, pretrain_ssl, pretrain_supervised
    pretrain_supervised(TrainConfig.create(data="data/pneumoniamnist_28.npz", out="runs/src_pneu", image_size=64))
    pretrain_ssl(SSLConfig.create(data="data/pneumoniamnist_28.npz", out="runs/ssl_pneu", method="simclr",
                                  image_size=64))

Both write a source directory (``source.json`` + ``model.safetensors``, the backbone in timm key
space) that every command takes as ``--source DIR`` and ``medxfer sources --dir DIR`` lists.
"""

from medxfer.pretrain.ssl import METHODS, SSLAugment, SSLConfig, SSLOptions, pretrain_ssl
from medxfer.pretrain.supervised import pretrain_supervised, source_from_run

__all__ = ["METHODS", "SSLAugment", "SSLConfig", "SSLOptions", "pretrain_ssl", "pretrain_supervised",
           "source_from_run"]
