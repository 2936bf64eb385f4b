"""Grad-CAM maps for end-to-end image models (pytorch-grad-cam), saved as overlays.

For each test slide the map of the predicted class is computed on the model's (unaugmented)
input image and written as ``gradcam/{slide}_{class}.png`` in the run folder, next to the input.
The target layer is the last stage of a staged timm model (ConvNeXt: ``stages[-1]``) unless one
is named (``gradcam.layer``, a dotted path such as ``stages.3``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from her2lab.errors import Her2labError
from her2lab.slides.thumbnails import save_png

log = logging.getLogger(__name__)


def target_layer(net: nn.Module, layer: str | None = None) -> nn.Module:
    if layer:
        m = net
        for part in layer.split("."):
            try:
                m = m[int(part)] if part.lstrip("-").isdigit() else getattr(m, part)
            except (AttributeError, IndexError, TypeError):
                raise Her2labError(f"gradcam.layer={layer!r}: no such layer in {type(net).__name__}") from None
        return m
    stages = getattr(net, "stages", None) or getattr(net, "layer4", None)
    if stages is None:
        raise Her2labError(f"Grad-CAM: name the layer for {type(net).__name__} (gradcam.layer=…)")
    return stages[-1] if isinstance(stages, nn.Sequential | nn.ModuleList) else stages


def cam_maps(net: nn.Module, x: torch.Tensor, classes: list[int], layer: str | None = None) -> np.ndarray:
    """Grad-CAM (B, H, W) in [0, 1] of ``classes[b]`` for each image of ``x`` (B, 3, H, W)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    was_training = net.training
    net.eval()
    try:
        with GradCAM(model=net, target_layers=[target_layer(net, layer)]) as cam:
            return cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    finally:
        net.train(was_training)


def save_gradcam(module, dataset, outputs: list[dict], class_names: list[str], out_dir: Path,
                 layer: str | None = None, limit: int | None = None) -> list[Path]:
    """Overlays of the predicted class's map for the test slides in ``outputs``."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    net = module.net
    device = next(net.parameters()).device
    for o in sorted(outputs, key=lambda o: o["index"])[:limit]:
        i = o["index"]
        pred = int(np.argmax(o["probs"]))
        x, _, _ = dataset[i]
        with torch.enable_grad():
            cam = cam_maps(net, x[None].to(device), [pred], layer)[0]
        rgb = dataset.image(i).astype(np.float32) / 255.0
        overlay = show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.6)
        path = out_dir / f"{dataset.records[i].slide_id}_{class_names[pred]}.png"
        save_png(path, np.concatenate([(rgb * 255).astype(np.uint8), overlay], axis=1))
        paths.append(path)
    log.info("Grad-CAM overlays of %d test slide(s) → %s", len(paths), out_dir)
    return paths
