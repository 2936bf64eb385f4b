"""The bag datamodule keeps features in the file's dtype and does not copy a lone bag."""

from __future__ import annotations

import numpy as np
import pytest
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


# --- what a training epoch is (data.module.sampler) -------------------------------------------


def _module(tmp_path, n_slides: int = 3, n_tiles: int = 50, **kw):
    from her2lab.data.bags import BagDataModule, BagRecord

    rng = np.random.default_rng(0)
    recs = [BagRecord(f"s{i}", str(write_trident(tmp_path / f"s{i}.h5", rng.standard_normal((n_tiles, 8)).astype(np.float32))),
                      i % 2) for i in range(n_slides)]
    dm = BagDataModule({"train": recs, "test": recs}, embed_dim=8, **kw)
    dm.setup()
    return dm


def test_one_pass_visits_every_training_slide_once_an_epoch(tmp_path):
    dm = _module(tmp_path, n_slides=5, bag_size=10, batch_size=2)
    seen = [i for batch in dm.train_dataloader() for i in batch[3].tolist()]
    assert sorted(seen) == [0, 1, 2, 3, 4]


def test_with_replacement_draws_iterations_times_batch_bags_each_its_own_sub_bag(tmp_path):
    dm = _module(tmp_path, bag_size=10, batch_size=4, sampler={"kind": "with_replacement", "iterations": 5})
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and all(len(b[3]) == 4 for b in batches)  # 5 iterations × 4 bags
    drawn = np.concatenate([b[3].numpy() for b in batches])
    assert len(drawn) == 20 and len(set(drawn.tolist())) == 3  # 20 draws of 3 slides: with replacement
    full = dm.datasets["train"].cache
    bags = [(int(i), b[0][k].numpy()) for b in batches for k, i in enumerate(b[3])]
    s, first = next((i, f) for i, f in bags if (drawn == i).sum() > 1)
    again = [f for i, f in bags if i == s][1]
    assert first.shape == (10, 8) and not np.array_equal(first, again)  # a slide drawn twice: two sub-bags
    rows = {r.tobytes() for r in full[s]}
    assert all(r.tobytes() in rows for r in again)  # …both of its own tiles
    # deterministic in (seed, epoch): the same draws again, other draws next epoch
    again_drawn = np.concatenate([b[3].numpy() for b in dm.train_dataloader()])
    assert np.array_equal(drawn, again_drawn)
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != drawn.tolist()


def test_with_replacement_under_ddp_gives_each_rank_its_iterations(tmp_path):
    from her2lab.data.bags import BagSampler

    ds = _module(tmp_path, bag_size=10, batch_size=4).datasets["train"]
    ranks = [list(BagSampler(ds, shuffle=True, seed=1, rank=r, world=2, draws=12)) for r in range(2)]
    assert [len(r) for r in ranks] == [12, 12]
    assert sorted(d for r in ranks for _, d in r) == list(range(24))  # every draw once, over both ranks


@pytest.mark.parametrize("sampler, match", [
    ({"kind": "bootstrap"}, "sampler.kind='bootstrap'"),
    ({"kind": "with_replacement"}, "iterations=None"),
    ({"kind": "with_replacement", "iterations": 0}, "iterations=0"),
])
def test_a_wrong_sampler_is_a_one_line_error(tmp_path, sampler, match):
    from her2lab.errors import Her2labError

    with pytest.raises(Her2labError, match=match):
        _module(tmp_path, sampler=sampler)


# --- test slides as the mean of random bags (eval.bag_sampling) ------------------------------


def test_bag_sampling_averages_the_stated_number_of_random_bags(tmp_path):
    from her2lab.lit.mil_module import MILModule
    from her2lab.models.abmil import AttentionMIL

    dm = _module(tmp_path, n_tiles=30, bag_size=10, test_bags={"n_bags": 7, "bag_size": 5, "seed": 123})
    loader = dm.test_dataloader()
    batches = list(loader)
    assert len(batches) == 3  # one slide a batch
    x, mask, y, _, bags = batches[0]
    assert x.shape == (1, 30, 8) and bags.shape == (1, 7, 5) and mask.all() and y.tolist() == [0]
    assert all(len(set(b.tolist())) == 5 for b in bags[0])  # a bag's tiles without replacement
    torch.manual_seed(0)
    net = AttentionMIL(8, 4, dropout=0.0).eval()
    module = MILModule(net, 4, optimizer=torch.optim.Adam, bags_chunk=3).eval()
    with torch.no_grad():
        logits, _, _ = module.logits_of(batches[0])
        per_bag = torch.stack([net(x[0][b][None])[0][0].softmax(-1) for b in bags[0]])  # 7 bags, one by one
    assert per_bag.shape == (7, 4)
    assert torch.allclose(logits.softmax(-1)[0], per_bag.mean(0), atol=1e-6)
    # the bags depend on the seed and the slide id, not on the order slides are tested in
    ds = loader.dataset
    assert np.array_equal(ds.bags(0, 30), bags[0].numpy())
    ds.records = ds.records[::-1]
    assert np.array_equal(ds.bags(2, 30), bags[0].numpy())
    # a slide with fewer tiles than bag_size: every bag is all its tiles
    assert ds.bags(0, 3).shape == (7, 3)


def test_bag_sampling_averages_ordinal_heads_in_class_probabilities(tmp_path):
    from her2lab.lit.mil_module import MILModule
    from her2lab.models.abmil import AttentionMIL
    from her2lab.models.heads import ordinal_probs

    dm = _module(tmp_path, n_tiles=30, bag_size=10, test_bags={"n_bags": 4, "bag_size": 6, "seed": 0})
    batch = next(iter(dm.test_dataloader()))
    torch.manual_seed(0)
    net = AttentionMIL(8, 4, dropout=0.0, ordinal=True).eval()
    module = MILModule(net, 4, optimizer=torch.optim.Adam).eval()
    with torch.no_grad():
        logits, _, _ = module.logits_of(batch)
        per_bag = torch.cat([ordinal_probs(net(batch[0][0][b][None])[0]) for b in batch[4][0]])
    assert torch.allclose(module.probs(logits)[0], per_bag.mean(0), atol=1e-5)


# --- training on augmented views (extract.augment_views) -------------------------------------


def test_training_draws_one_view_per_tile_per_epoch_and_evaluation_reads_the_plain_features(tmp_path):
    import h5py

    from her2lab.data.bags import BagDataModule, BagRecord

    rng = np.random.default_rng(0)
    plain = rng.standard_normal((30, 4)).astype(np.float32)
    views = np.stack([plain + 10 * (k + 1) for k in range(3)])  # view k = plain + 10(k+1): recognisable
    path = write_trident(tmp_path / "s.h5", plain)
    with h5py.File(path, "a") as f:
        f.create_dataset("views", data=views)
    recs = [BagRecord("s", str(path), 1)]
    dm = BagDataModule({"train": recs, "test": recs}, embed_dim=4, bag_size=12, batch_size=4,
                       sampler={"kind": "with_replacement", "iterations": 2})
    dm.setup()
    test = next(iter(dm.test_dataloader()))[0][0].numpy()
    assert np.array_equal(test, plain)  # evaluation: the un-augmented view

    def epoch(e: int) -> dict[int, int]:
        """tile → view of every tile drawn in epoch ``e`` (8 bags of 12 of the 30 tiles)."""
        sampler = dm.train_dataloader().sampler
        sampler.set_epoch(e)
        chosen: dict[int, set[int]] = {}
        for item in sampler:
            bag = dm.datasets["train"][item][0].numpy()
            for row in bag:
                hits = [(int(t), v) for v in range(3) for t in np.flatnonzero(np.isclose(views[v], row).all(1))]
                assert len(hits) == 1  # always exactly one view of one tile, never the plain features
                tile, view = hits[0]
                chosen.setdefault(tile, set()).add(view)
        assert all(len(v) == 1 for v in chosen.values())  # one view per tile within the epoch
        return {t: v.pop() for t, v in chosen.items()}

    e0, e1 = epoch(0), epoch(1)
    assert e0 == epoch(0)  # deterministic in (seed, epoch)
    both = set(e0) & set(e1)
    assert any(e0[t] != e1[t] for t in both)  # a new draw next epoch
    assert len(set(e0.values())) > 1  # views are drawn per tile, not per slide
