"""The bag datamodule keeps features in the file's dtype and does not copy a lone bag."""

from __future__ import annotations

import numpy as np
import torch

from tests.helpers import mil_nets, write_trident


def test_the_bag_cache_keeps_float16_and_a_lone_test_bag_is_not_copied(tmp_path):
    from her2lab.data.bags import BagDataModule, BagRecord
    from her2lab.lit.mil_module import MILModule

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 24)).astype(np.float16)
    recs = [BagRecord("big", str(write_trident(tmp_path / "big.h5", x)), 2)]
    dm = BagDataModule({"train": recs, "test": recs}, embed_dim=24, bag_size=100, batch_size=1)
    dm.setup()
    assert dm.datasets["test"].cache[0].dtype == np.float16  # 2 bytes a value, as in the file
    batch = next(iter(dm.test_dataloader()))
    feats, mask = batch[0], batch[1]
    assert feats.dtype == torch.float16 and feats.shape == (1, 3000, 24) and mask.all()
    assert feats.data_ptr() == dm.datasets["test"].cache[0].__array_interface__["data"][0]  # a view, not a copy
    sub = next(iter(dm.train_dataloader()))[0]
    assert sub.shape == (1, 100, 24) and sub.dtype == torch.float16
    net = mil_nets()[0].eval()
    module = MILModule(net, 4, optimizer=torch.optim.Adam, chunk=256).eval()
    with torch.no_grad():
        logits, _, _ = module.logits_of(batch)
        ref, _ = net(torch.from_numpy(x.astype(np.float32))[None])
    assert torch.allclose(logits, ref, atol=1e-5)
