"""Layers a preset's architecture needs that no library ships, named from a config as
``model_kwargs.<x>_layer: her2lab.embed.layers.<Class>``.

- :class:`ConvStem`: CTransPath's patch embedding (Wang et al., Medical Image Analysis 2022):
  the Swin-T's 4×4 patchify convolution replaced by two stride-2 3×3 convolutions with
  BatchNorm and ReLU, then a 1×1 projection. Written for timm's ``SwinTransformer(embed_layer=…)``
  interface, whose blocks take NHWC tokens.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvStem"]


class ConvStem(nn.Module):
    """``(B, 3, H, W)`` → ``(B, H/4, W/4, D)`` (NHWC, as timm's Swin wants) or ``(B, HW/16, D)``.

    Channels go 3 → D/8 → D/4 (3×3, stride 2, BatchNorm, ReLU each) → D (1×1 with bias), then
    ``norm_layer`` over D. Key layout ``proj.{0,1,3,4,6}.*``, ``norm.*`` — CTransPath's.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 4,
                 in_chans: int = 3, embed_dim: int = 96, norm_layer: type[nn.Module] | None = None,
                 output_fmt: str = "NHWC", strict_img_size: bool = True, **factory) -> None:
        super().__init__()
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 4 or embed_dim % 8:
            raise ValueError(f"ConvStem: patch_size must be 4 and embed_dim a multiple of 8 (got {patch_size}, {embed_dim})")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size, self.patch_size = size, (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_fmt, self.strict_img_size = output_fmt, strict_img_size
        dd = {k: v for k, v in factory.items() if k in ("device", "dtype")}
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False, **dd),
                       nn.BatchNorm2d(c_out, **dd), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, 1, **dd))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's hook for a new input size (the stem itself is size-agnostic)."""
        if img_size is not None:
            size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            self.img_size, self.grid_size = size, (size[0] // 4, size[1] // 4)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size and tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ValueError(f"ConvStem: input {tuple(x.shape[-2:])} but the model was built for {self.img_size}")
        x = self.proj(x)  # (B, D, H/4, W/4)
        x = x.permute(0, 2, 3, 1) if self.output_fmt == "NHWC" else x.flatten(2).transpose(1, 2)
        return self.norm(x)
