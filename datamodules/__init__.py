"""Data for oct3d: Kinetics-layout video and ImageNet-layout image LightningDataModules.

* :class:`KineticsDataModule`: video clips from the official Kinetics layout or a path-label list,
  decoded with PyAV, decord or torchcodec (:mod:`datamodules.video`, :mod:`datamodules.decoders`),
  augmented with torchvision v2 (:mod:`datamodules.transforms`), robust to unreadable videos.
* :class:`DataErrorReport`: Lightning callback printing the unreadable videos once per epoch.
* :class:`ImageNetDataModule`: ImageFolder-layout images with the standard ImageNet recipe.
* :mod:`datamodules.synthetic`: a synthetic Kinetics-format dataset that only motion tells apart.
* :class:`VolumeSegmentationDataModule`: NIfTI volumes in the Medical Segmentation Decathlon layout
  (:mod:`datamodules.volume`; needs MONAI and nibabel, the ``medical`` extra, so it is imported on first use).
"""

from .decoders import available_decoders
from .imagenet import ImageNetDataModule
from .kinetics import KineticsDataModule, VideoClipDataset, VideoSample
from .reporting import DataErrorReport, format_failures
from .synthetic import make_synthetic_kinetics
from .transforms import VideoEvalTransform, VideoTrainTransform
from .video import VideoDecodeError, VideoInfo, open_video, probe, read_clip, read_video

__all__ = [
    "DataErrorReport",
    "ImageNetDataModule",
    "KineticsDataModule",
    "VideoClipDataset",
    "VideoDecodeError",
    "VideoEvalTransform",
    "VideoInfo",
    "VideoSample",
    "VideoTrainTransform",
    "available_decoders",
    "VolumeSegmentationDataModule",
    "format_failures",
    "make_synthetic_kinetics",
    "open_video",
    "probe",
    "read_clip",
    "read_video",
]


def __getattr__(name: str):
    # Imported on first use: video and image users need not install MONAI and nibabel.
    if name == "VolumeSegmentationDataModule":
        from .volume import VolumeSegmentationDataModule

        return VolumeSegmentationDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
