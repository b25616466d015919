"""Stage 1 of transfer learning: make your own source model.

Usage::

    from medxfer.pretrain import pretrain_supervised, pretrain_ssl, SSLConfig
    pretrain_supervised("data/pneumoniamnist_28.npz", out="runs/src_pneu", init="efficientnet_lite0.in1k")
    pretrain_ssl(SSLConfig(data="data/pneumoniamnist_28.npz", out="runs/ssl_pneu", method="simclr",
                           init="efficientnet_lite0.in1k"))

Both write a source directory (``source.json`` + ``model.safetensors``, the backbone in timm key
space) that every command takes as ``--source DIR`` and ``medxfer sources --dir DIR`` lists.
"""

from medxfer.pretrain.ssl import METHODS, SSLAugment, SSLConfig, pretrain_ssl
from medxfer.pretrain.supervised import pretrain_supervised, source_from_run

__all__ = ["METHODS", "SSLAugment", "SSLConfig", "pretrain_ssl", "pretrain_supervised", "source_from_run"]
