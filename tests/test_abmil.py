import torch

from her2lab.models.abmil import AttentionMIL


def test_padding_changes_nothing_and_attention_sums_to_one():
    torch.manual_seed(0)
    for gated in (True, False):
        m = AttentionMIL(in_dim=32, num_classes=4, gated=gated, dropout=0.0).eval()
        bag = torch.randn(1, 7, 32)
        logits, attn = m(bag)
        padded = torch.cat([bag, torch.randn(1, 5, 32) * 100], dim=1)  # junk padding
        mask = torch.tensor([[True] * 7 + [False] * 5])
        logits_p, attn_p = m(padded, mask)
        assert torch.allclose(logits, logits_p, atol=1e-6)
        assert torch.allclose(attn_p[0, :7], attn[0], atol=1e-6) and (attn_p[0, 7:] == 0).all()
        assert torch.allclose(attn.sum(1), torch.ones(1))


def test_batch_of_bags_equals_one_by_one():
    torch.manual_seed(1)
    m = AttentionMIL(in_dim=16, num_classes=3, hidden_dim=0, dropout=0.0).eval()
    bags = [torch.randn(n, 16) for n in (3, 9, 1)]
    x = torch.zeros(3, 9, 16)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    logits, attn = m(x, mask)
    for i, b in enumerate(bags):
        li, ai = m(b[None])
        assert torch.allclose(logits[i], li[0], atol=1e-6)
        assert torch.allclose(attn[i, : len(b)], ai[0], atol=1e-6)


def test_pooling_baselines_ignore_padding():
    from her2lab.models.pooling import MaxPoolMIL, MeanPoolMIL

    torch.manual_seed(2)
    for cls in (MeanPoolMIL, MaxPoolMIL):
        m = cls(in_dim=8, num_classes=2, dropout=0.0).eval()
        bag = torch.randn(1, 5, 8)
        logits, _ = m(bag)
        padded = torch.cat([bag, torch.full((1, 3, 8), 50.0)], dim=1)
        logits_p, w_p = m(padded, torch.tensor([[True] * 5 + [False] * 3]))
        assert torch.allclose(logits, logits_p, atol=1e-6)
        assert torch.allclose(w_p.sum(1), torch.ones(1)) and (w_p[0, 5:] == 0).all()
