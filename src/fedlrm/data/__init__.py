"""Federated image data: sources, client partitions, few-shot sampling, image sets.

`load_federated_data(cfg.data, preprocess, seed)` is the one entry point; see
docs/DESIGN.md section 3 for the protocol it implements.
"""

from fedlrm.data.augment import random_resized_crop_flip
from fedlrm.data.federated import CACHE_LIMIT_BYTES, load_federated_data, one_client_folder
from fedlrm.data.imageset import ClientSplit, Domain, FederatedData, GlobalTest, ImageSet

__all__ = [
    "CACHE_LIMIT_BYTES",
    "ClientSplit",
    "Domain",
    "FederatedData",
    "GlobalTest",
    "ImageSet",
    "load_federated_data",
    "one_client_folder",
    "random_resized_crop_flip",
]
