"""Video clip transforms (torchvision.transforms.v2 functional ops) for training and evaluation.

Input: uint8 frames (T, H, W, 3) as decoded by :mod:`datamodules.video`.
Output: float32 tensor (C, T, H, W), normalized, as video backbones expect.
Random choices use torch's global generator, which DataLoader seeds per worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "TrainAugmentation",
    "VideoEvalTransform",
    "VideoTrainTransform",
    "short_side_resize",
    "short_side_size",
    "spatial_crop_boxes",
    "uniform_temporal_subsample",
]

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor (T, H, W, 3), got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[0] < 1:
        raise ValueError("frames must hold at least one frame")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def uniform_temporal_subsample(frames: torch.Tensor, num_frames: int, dim: int = 0) -> torch.Tensor:
    """Pick ``num_frames`` frames evenly spaced along ``dim`` (first and last included; repeats when too few)."""
    _check_positive("num_frames", num_frames)
    length = frames.shape[dim]
    if length == num_frames:
        return frames
    indices = torch.linspace(0, length - 1, num_frames).round().long()
    return frames.index_select(dim, indices)


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size`` (the long side as torchvision rounds it)."""
    _check_positive("size", size)
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def _resize(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(video.shape[-2:]) == tuple(size):
        return video
    return F.resize(video, list(size), antialias=True)


def short_side_resize(video: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (..., H, W) so that the shorter side is ``size``, keeping the aspect ratio (bilinear, antialiased)."""
    height, width = video.shape[-2:]
    return _resize(video, short_side_size(height, width, size))


def spatial_crop_boxes(height: int, width: int, crop_size: int, num_crops: int) -> list[tuple[int, int]]:
    """Top-left corners of ``num_crops`` square crops spread along the long side (1: center; 3: left/center/right).

    Follows the SlowFast/pytorchvideo multi-crop test protocol: crops slide along the longer side,
    centered on the shorter one.
    """
    _check_positive("num_crops", num_crops)
    top_center = max(height - crop_size, 0) // 2
    left_center = max(width - crop_size, 0) // 2
    if num_crops == 1:
        return [(top_center, left_center)]
    if width >= height:
        lefts = [round(i * max(width - crop_size, 0) / (num_crops - 1)) for i in range(num_crops)]
        return [(top_center, left) for left in lefts]
    tops = [round(i * max(height - crop_size, 0) / (num_crops - 1)) for i in range(num_crops)]
    return [(top, left_center) for top in tops]


def _to_normalized_cthw(
    video_tchw: torch.Tensor, mean: Sequence[float], std: Sequence[float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 (T, C, H, W), any strides -> float32 (C, T, H, W) contiguous, ``(x / 255 - mean) / std``.

    One conversion pass into the output layout (``out`` when given, e.g. a slot of a multi-clip
    tensor), then one multiply and one add per channel: the to_dtype / normalize / permute / contiguous
    sequence made four passes over strided memory.
    """
    frames, channels, height, width = video_tchw.shape
    if out is None:
        out = torch.empty((channels, frames, height, width), dtype=torch.float32)
    out.copy_(video_tchw.permute(1, 0, 2, 3))
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(channels, 1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(channels, 1, 1, 1)
    return out.mul_(scale).add_(shift)


def _frames_tchw(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    # A channels-last view: torchvision's uint8 resize has a fast path for that memory layout.
    return uniform_temporal_subsample(frames, num_frames).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class TrainAugmentation:
    """The random choices of one training clip (see :meth:`VideoTrainTransform.sample`).

    Attributes:
        resized_size: (height, width) after the short-side scale jitter.
        top: crop row in the resized frames.
        left: crop column in the resized frames.
        flip: horizontal flip.
    """

    resized_size: tuple[int, int]
    top: int
    left: int
    flip: bool


class VideoTrainTransform:
    """Training augmentation for a clip.

    Steps: uniform temporal subsample to ``num_frames``, short side resized to a random size in
    [``min_short_side``, ``max_short_side``], random ``crop_size`` square crop, horizontal flip with
    probability ``flip_prob``, scale to [0, 1], normalize with ``mean``/``std``.

    Args:
        num_frames: frames in the output clip.
        crop_size: output height and width.
        min_short_side: smallest short-side size of the scale jitter.
        max_short_side: largest short-side size of the scale jitter.
        flip_prob: probability of a horizontal flip.
        mean: per-channel mean (Kinetics by default).
        std: per-channel standard deviation.
    """

    def __init__(
        self,
        num_frames: int,
        crop_size: int,
        min_short_side: int,
        max_short_side: int,
        flip_prob: float = 0.5,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
    ) -> None:
        _check_positive("num_frames", num_frames)
        _check_positive("crop_size", crop_size)
        _check_positive("min_short_side", min_short_side)
        _check_positive("max_short_side", max_short_side)
        if max_short_side < min_short_side:
            raise ValueError(f"max_short_side ({max_short_side}) must be >= min_short_side ({min_short_side})")
        if min_short_side < crop_size:
            raise ValueError(f"min_short_side ({min_short_side}) must be >= crop_size ({crop_size})")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.num_frames = num_frames
        self.crop_size = crop_size
        self.min_short_side = min_short_side
        self.max_short_side = max_short_side
        self.flip_prob = flip_prob
        self.mean = tuple(mean)
        self.std = tuple(std)

    def sample(self, height: int, width: int) -> TrainAugmentation:
        """Draw the random choices for a clip of ``height x width`` frames (torch's global generator).

        The draws are those of :meth:`__call__`, in the same order: short side, crop row, crop column, flip.
        """
        short_side = int(torch.randint(self.min_short_side, self.max_short_side + 1, ()).item())
        resized = short_side_size(height, width, short_side)
        top = int(torch.randint(0, resized[0] - self.crop_size + 1, ()).item())
        left = int(torch.randint(0, resized[1] - self.crop_size + 1, ()).item())
        flip = bool(torch.rand(()).item() < self.flip_prob)
        return TrainAugmentation(resized, top, left, flip)

    def apply(
        self, frames: torch.Tensor, augmentation: TrainAugmentation, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply drawn choices to uint8 frames (T, H, W, 3), stored or already at ``augmentation.resized_size``.

        Args:
            frames: decoded frames.
            augmentation: from :meth:`sample`.
            out: float32 (C, num_frames, crop_size, crop_size) tensor to write the clip into.

        Returns:
            float32 clip (C, num_frames, crop_size, crop_size) (``out`` when given).
        """
        _check_frames(frames)
        video = _resize(_frames_tchw(frames, self.num_frames), augmentation.resized_size)
        video = F.crop(video, augmentation.top, augmentation.left, self.crop_size, self.crop_size)
        if augmentation.flip:
            video = F.horizontal_flip(video)
        return _to_normalized_cthw(video, self.mean, self.std, out)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """Augment uint8 frames (T, H, W, 3) into a float32 clip (C, num_frames, crop_size, crop_size)."""
        _check_frames(frames)
        return self.apply(frames, self.sample(frames.shape[1], frames.shape[2]))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_frames={self.num_frames}, crop_size={self.crop_size}, "
            f"short_side=[{self.min_short_side}, {self.max_short_side}], flip_prob={self.flip_prob})"
        )


class VideoEvalTransform:
    """Deterministic evaluation transform: short side to ``short_side``, then one of ``num_crops`` square crops.

    With ``num_crops=1`` the crop is centered; with 3 it is left/center/right (top/center/bottom for
    portrait videos), the standard 3-crop test protocol.

    Args:
        num_frames: frames in the output clip.
        crop_size: output height and width.
        short_side: size of the shorter side after resizing.
        num_crops: number of spatial views per clip.
        mean: per-channel mean (Kinetics by default).
        std: per-channel standard deviation.
    """

    def __init__(
        self,
        num_frames: int,
        crop_size: int,
        short_side: int,
        num_crops: int = 1,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
    ) -> None:
        _check_positive("num_frames", num_frames)
        _check_positive("crop_size", crop_size)
        _check_positive("short_side", short_side)
        _check_positive("num_crops", num_crops)
        if short_side < crop_size:
            raise ValueError(f"short_side ({short_side}) must be >= crop_size ({crop_size})")
        self.num_frames = num_frames
        self.crop_size = crop_size
        self.short_side = short_side
        self.num_crops = num_crops
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, frames: torch.Tensor, crop_index: int | None = None) -> torch.Tensor:
        """Transform uint8 frames (T, H, W, 3) into a float32 clip (C, num_frames, crop_size, crop_size).

        Args:
            frames: decoded frames.
            crop_index: which of the ``num_crops`` views, in [0, num_crops); None means the center view.
        """
        return self.crops(frames, [self.num_crops // 2 if crop_index is None else crop_index])[0]

    def crops(self, frames: torch.Tensor, crop_indices: Sequence[int]) -> list[torch.Tensor]:
        """``[self(frames, i) for i in crop_indices]`` with one resize of the frames for all of them."""
        _check_frames(frames)
        for crop_index in crop_indices:
            if not 0 <= crop_index < self.num_crops:
                raise ValueError(f"crop_index must be in [0, {self.num_crops}), got {crop_index}")
        video = _frames_tchw(frames, self.num_frames)
        video = _resize(video, self.resized_size(frames.shape[1], frames.shape[2]))
        height, width = video.shape[-2:]
        boxes = spatial_crop_boxes(height, width, self.crop_size, self.num_crops)
        return [
            _to_normalized_cthw(F.crop(video, *boxes[i], self.crop_size, self.crop_size), self.mean, self.std)
            for i in crop_indices
        ]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) that ``height x width`` frames are resized to before cropping."""
        return short_side_size(height, width, self.short_side)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_frames={self.num_frames}, crop_size={self.crop_size}, "
            f"short_side={self.short_side}, num_crops={self.num_crops})"
        )
