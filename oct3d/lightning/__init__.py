"""Lightning training for octave models: classifiers, the LR schedule and the ``LightningCLI`` subclass."""

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
]


def __getattr__(name: str):
    # The CLI pulls in jsonargparse and rich; import it only when asked for.
    if name == "OctCLI":
        from oct3d.lightning.cli import OctCLI

        return OctCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
