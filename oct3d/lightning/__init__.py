"""Lightning training for octave models: classifiers, a volume segmenter, the LR schedule and the ``LightningCLI``."""

from oct3d.lightning.modules import (
    CHECKPOINT_FORMAT_VERSION,
    CHECKPOINT_KEY,
    ImageClassifier,
    OctaveClassifier,
    VideoClassifier,
    WarmupCosine,
)

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "CHECKPOINT_KEY",
    "ImageClassifier",
    "OctaveClassifier",
    "VideoClassifier",
    "WarmupCosine",
    "OctCLI",
    "VolumeSegmenter",
]


def __getattr__(name: str):
    # The CLI pulls in jsonargparse and rich; import it only when asked for.
    if name == "OctCLI":
        from oct3d.lightning.cli import OctCLI

        return OctCLI
    # The segmenter needs MONAI (the `medical` extra); video and image users need not install it.
    if name == "VolumeSegmenter":
        from oct3d.lightning.segmentation import VolumeSegmenter

        return VolumeSegmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
