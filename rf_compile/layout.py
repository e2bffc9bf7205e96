"""Where the video tokens of an attention sequence sit, and how they are ordered.

Every supported video DiT flattens its latent video frame-major after the patch embedding:
token ``f * height * width + h * width + w``. Text tokens may come before the video
(``prefix``, CogVideoX) or after it (``suffix``, HunyuanVideo). A ``VideoLayout`` says how many
of each there are; it knows nothing about heads, batches or patterns.

Under Ulysses context parallelism over per-rank [text, video, text] shards (HunyuanVideo's plan),
the gathered sequence is that layout cut into ``shards`` equal rank chunks laid end to end, each
holding its share of every part: ``placed`` maps the canonical order onto the order the tokens lie in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class VideoLayout:
    """Token layout of one attention sequence.

    Attributes
    ----------
    frames, height, width:
        Size of the latent video grid in tokens (after patching).
    prefix, suffix:
        Number of non-video (text) tokens before and after the video tokens.
    shards:
        Rank chunks the sequence lies in (1: as described). With ``shards = R`` the tokens lie as R
        chunks, chunk ``r`` = [r-th R-th of the prefix, of the video (frame-major), of the suffix]:
        the order Ulysses attention gathers per-rank [video shard, text shard] sequences in.
    """

    frames: int
    height: int
    width: int
    prefix: int = 0
    suffix: int = 0
    shards: int = 1

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layout {name} must be a positive int, got {value!r}")
        for name in ("prefix", "suffix"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"layout {name} must be a non-negative int, got {value!r}")
        R = self.shards
        if not isinstance(R, int) or isinstance(R, bool) or R < 1:
            raise ValueError(f"layout shards must be a positive int, got {R!r}")
        if any(part % R for part in (self.prefix, self.video_tokens, self.suffix)):
            raise ValueError(
                f"layout {self.describe()}: prefix, video tokens and suffix must each split into {R} equal shards"
            )

    @classmethod
    def from_value(cls, value: VideoLayout | Mapping[str, Any] | tuple | list) -> VideoLayout:
        """Build a layout from a user option: a VideoLayout, a dict, or (frames, height, width[, prefix, suffix])."""
        if isinstance(value, VideoLayout):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(
                    f"layout has unknown keys {sorted(unknown)}; accepted keys: "
                    "frames, height, width, prefix, suffix, shards"
                )
            missing = {"frames", "height", "width"} - set(value)
            if missing:
                raise ValueError(f"layout is missing {sorted(missing)}; frames, height, width are required")
            return cls(**value)
        if isinstance(value, (tuple, list)) and 3 <= len(value) <= 5:
            return cls(*value)
        raise ValueError(
            "layout must be a VideoLayout, a dict with keys frames, height, width[, prefix, suffix], "
            f"or a tuple (frames, height, width[, prefix, suffix]); got {value!r}"
        )

    @property
    def frame_tokens(self) -> int:
        """Tokens in one latent frame."""
        return self.height * self.width

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        return self.prefix + self.video_tokens + self.suffix

    @property
    def video_slice(self) -> slice:
        return slice(self.prefix, self.prefix + self.video_tokens)

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ValueError unless this layout describes a sequence of ``seq_len`` tokens."""
        if seq_len != self.seq_len:
            raise ValueError(
                f"layout {self} describes {self.seq_len} tokens "
                f"({self.prefix} + {self.frames}x{self.height}x{self.width} + {self.suffix}) "
                f"but the attention sequence has {seq_len}"
            )

    def describe(self) -> str:
        """Short human form, e.g. ``13x30x45 +226 text first``."""
        text = []
        if self.prefix:
            text.append(f"+{self.prefix} text first")
        if self.suffix:
            text.append(f"+{self.suffix} text last")
        if self.shards > 1:
            text.append(f"in {self.shards} interleaved rank shards")
        return " ".join([f"{self.frames}x{self.height}x{self.width}", *text])

    def placed(self, canonical: torch.Tensor) -> torch.Tensor:
        """Where tokens of the canonical order (prefix, video, suffix) lie in the sequence: same shape.

        The identity unless ``shards > 1``; then canonical token ``c`` of a part (prefix, video or
        suffix) of ``n`` tokens at offset ``c'`` in it lies in rank chunk ``c' // (n / R)``, after
        that chunk's shares of the parts before it.
        """
        if self.shards == 1:
            return canonical
        R, c = self.shards, canonical.long()
        starts = (0, self.prefix, self.prefix + self.video_tokens)
        out = torch.empty_like(c)
        local_start = 0
        for start, size in zip(starts, (self.prefix, self.video_tokens, self.suffix), strict=True):
            inside = (c >= start) & (c < start + size)
            share = max(size // R, 1)
            offset = c - start
            out = torch.where(inside, offset // share * (self.seq_len // R) + local_start + offset % share, out)
            local_start += size // R
        return out.to(canonical.dtype)

    # -- token orders ------------------------------------------------------------------------

    def temporal_order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Permutation putting video tokens spatial-major (position, then frame); text stays put.

        ``order[p]`` is the original index of the token at position ``p`` of the new order.
        """
        video = torch.arange(self.video_tokens, device=device).view(self.frames, self.frame_tokens)
        video = video.t().reshape(-1) + self.prefix
        return torch.cat(
            [
                torch.arange(self.prefix, device=device),
                video,
                torch.arange(self.prefix + self.video_tokens, self.seq_len, device=device),
            ]
        )

    def checkerboard(self, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [video_tokens]: the textural K/V subset, ``h % stride == w % stride`` in every frame.

        Equation 4 of the RainFusion paper; it keeps about ``1 / stride`` of the video tokens.
        """
        h = torch.arange(self.height, device=device).view(-1, 1)
        w = torch.arange(self.width, device=device).view(1, -1)
        keep = (h % stride) == (w % stride)
        return keep.reshape(1, -1).expand(self.frames, -1).reshape(-1)

    def textural_order(self, stride: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
        """K/V order for a textural head: prefix, kept video, suffix, then dropped video.

        Returns the order and the number of leading tokens that are attended.
        """
        keep = self.checkerboard(stride, device)
        video = torch.arange(self.video_tokens, device=device) + self.prefix
        order = torch.cat(
            [
                torch.arange(self.prefix, device=device),
                video[keep],
                torch.arange(self.prefix + self.video_tokens, self.seq_len, device=device),
                video[~keep],
            ]
        )
        return order, self.seq_len - int((~keep).sum())
