"""MIL nets score huge bags chunk by chunk, in the file's dtype, with the whole-bag result."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers import mil_nets


def test_chunked_forward_equals_the_whole_bag_forward():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((3, 1000, 24)).astype(np.float16))  # (B, N, D) in the file's dtype
    mask = torch.ones(3, 1000, dtype=torch.bool)
    mask[1, 700:] = False  # a shorter bag, padded
    mask[2, 5:] = False  # shorter than one chunk: later chunks are all padding
    for net in mil_nets():
        net.eval()
        with torch.no_grad():
            whole_logits, whole_w = net(x.float(), mask)
            for chunk in (64, 333, 1000, 4096):
                logits, w = net(x, mask, chunk=chunk)
                assert logits.dtype == torch.float32 and w.shape == (3, 1000)
                assert torch.allclose(logits, whole_logits, atol=1e-5), (type(net).__name__, chunk)
                assert torch.allclose(w, whole_w, atol=1e-5) and (w[1, 700:] == 0).all()
                assert torch.allclose(w.sum(1), torch.ones(3), atol=1e-5)
        grads = []  # training on bags longer than a chunk: the same gradients
        for chunk in (None, 333):
            net.zero_grad()
            logits, w = net(x, mask, chunk=chunk)
            (logits.sum() + (w * torch.arange(1000.0)).sum()).backward()
            grads.append(torch.cat([q.grad.flatten() for q in net.parameters() if q.grad is not None]))
        assert torch.allclose(grads[0], grads[1], atol=1e-4 * float(grads[0].abs().max()))
