"""Data sets for training and evaluation: built-in digits (no download) and user ImageFolders."""
from tokenopt.data.clutter import ClutteredDigitsDataset, SizedClutteredDigitsDataset
from tokenopt.data.config import data_config
from tokenopt.data.datasets import BUILTIN, get_dataset
from tokenopt.data.digits import DigitsDataset
from tokenopt.data.imagefolder import ImageFolderDataset
from tokenopt.data.loader import ShardSampler, get_loader

__all__ = ["BUILTIN", "ClutteredDigitsDataset", "DigitsDataset", "ImageFolderDataset", "ShardSampler",
           "SizedClutteredDigitsDataset", "data_config", "get_dataset", "get_loader"]
