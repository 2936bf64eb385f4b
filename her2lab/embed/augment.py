"""Augmented views of tiles for feature-level augmentation (``extract.augment_views``).

The H&E-HER2 study augments every patch on the fly and embeds it again at every training step
(its ``MIL-Attention- KfoldCV -Training.py``, lines 222–227): ``ColorJitter(brightness=0.1,
contrast=0.1, saturation=0.1, hue=0.1)``, ``RandomAffine(degrees=10, translate=(0.1, 0.1),
scale=(0.8, 1.2), shear=10, fillcolor=(245, 245, 245))``, then, after the normalisation,
``RandomApply([AddGaussianNoise(0., 0.1)], p=0.5)`` (its lines 95–104). With a frozen encoder
the affordable equivalent is to embed K augmented views of every tile once, at extraction, and
let training draw one of them per tile per epoch (:mod:`her2lab.data.bags`).

:class:`StudyAugment` is that transform, built from ``torchvision.transforms.v2`` and applied to
each tile on its own (the study's transforms ran on one image at a time, so every tile gets its
own random parameters; a v2 transform given a batch would draw one set for all of it). The
colour jitter and the affine run on PIL images before the normalisation, as in the study, whose
dataset handed PIL images to them (for 96 px tiles PIL's kernels are about 2.8× faster than
torchvision's tensor kernels: 0.83 against 2.3 ms a tile, one thread); the noise runs on the
normalised tensor. Views are reproducible: each batch of tiles draws from its
own seed (:func:`view_seed`).
"""

from __future__ import annotations

import json
import zlib
from contextlib import contextmanager

import numpy as np
import torch

#: The study's parameters (its Training.py lines 222–227), for the features file's ``augment``.
STUDY_AUGMENT = {
    "color_jitter": {"brightness": 0.1, "contrast": 0.1, "saturation": 0.1, "hue": 0.1},
    "random_affine": {"degrees": 10, "translate": [0.1, 0.1], "scale": [0.8, 1.2], "shear": 10, "fill": 245},
    "gaussian_noise": {"std": 0.1, "p": 0.5, "after": "normalisation"},
    "library": "torchvision.transforms.v2",
}


@contextmanager
def _one_thread():
    """Per-tile transforms are tiny: one torch thread each is several times faster than two
    fighting over 96 × 96 px (measured: colour jitter 36 → 2.3 ms a tile on two busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class StudyAugment:
    """The study's training augmentation, one tile at a time.

    ``pixels(uint8 (B, H, W, 3)) → uint8 (B, 3, H, W)``: colour jitter, then random affine (nearest
    neighbour, filled with grey 245 — torchvision's defaults, as in the study). ``noise(x)``:
    Gaussian noise of std ``noise_std`` added to each normalised tile with probability ``noise_p``.
    """

    def __init__(self, params: dict | None = None) -> None:
        from torchvision.transforms import v2

        p = params or STUDY_AUGMENT
        self.params = p
        cj, af, gn = p["color_jitter"], p["random_affine"], p["gaussian_noise"]
        self.transform = v2.Compose([
            v2.ColorJitter(brightness=cj["brightness"], contrast=cj["contrast"], saturation=cj["saturation"], hue=cj["hue"]),
            v2.RandomAffine(degrees=af["degrees"], translate=tuple(af["translate"]), scale=tuple(af["scale"]),
                            shear=af["shear"], fill=af["fill"]),
        ])
        self.noise_std, self.noise_p = float(gn["std"]), float(gn["p"])

    def describe(self) -> str:
        """The transform as JSON, for the features file."""
        return json.dumps(self.params, sort_keys=True)

    def pixels(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the CPU → uint8 (B, 3, H, W), every tile with its own random
        parameters (from torch's global generator: seed it, see :meth:`Embedder.embed_view`)."""
        from PIL import Image

        with _one_thread():
            out = np.stack([np.asarray(self.transform(Image.fromarray(t))) for t in tiles.numpy()])
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalised (B, 3, H, W) + N(0, noise_std²) on a random ``noise_p`` share of the tiles."""
        b = x.shape[0]
        on = (torch.rand(b, generator=generator) < self.noise_p).to(x.dtype).view(b, 1, 1, 1)
        return x + torch.randn(x.shape, generator=generator).to(x) * self.noise_std * on.to(x.device)


def view_seed(seed: int, slide_id: str, first_tile: int, view: int) -> int:
    """The seed of one batch of one view: the same tiles of the same slide get the same view
    whichever other slides ran with them."""
    return int(np.random.SeedSequence([int(seed), zlib.crc32(slide_id.encode()), int(first_tile), int(view)])
               .generate_state(1)[0])
