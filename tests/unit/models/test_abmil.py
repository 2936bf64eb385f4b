import pytest
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


def test_ordinal_head_probabilities_are_valid_and_ordered():
    from her2lab.models.heads import OrdinalHead, ordinal_loss, ordinal_probs

    torch.manual_seed(2)
    head = OrdinalHead(8, 4)
    with torch.no_grad():
        head.gaps.copy_(torch.tensor([-5.0, 3.0]))  # very uneven gaps: thresholds must still increase
    t = head.thresholds()
    assert (t[1:] > t[:-1]).all()
    cum = head(torch.randn(64, 8) * 10)
    p = ordinal_probs(cum)
    assert p.shape == (64, 4) and (p >= 0).all() and torch.allclose(p.sum(1), torch.ones(64))
    # P(y > k) falls with k for every sample (rank consistency)
    assert (torch.sigmoid(cum)[:, 1:] <= torch.sigmoid(cum)[:, :-1] + 1e-7).all()
    # the loss prefers a score on the right side of the right thresholds
    y = torch.tensor([3, 0])
    good = torch.tensor([[9.0, 9.0, 9.0], [-9.0, -9.0, -9.0]])
    assert ordinal_loss(good, y) < ordinal_loss(-good, y)
    assert torch.allclose(ordinal_loss(good, y, torch.ones(4)), ordinal_loss(good, y))


@pytest.mark.slow  # 150 training steps
def test_ordinal_mil_learns_an_ordered_toy_task():
    from her2lab.models.heads import ordinal_loss, ordinal_probs

    torch.manual_seed(3)
    y = torch.randint(0, 4, (256,))
    x = torch.randn(256, 10, 16)
    x[:, :3, 0] += y[:, None].float() * 2  # three tiles per bag carry the grade
    m = AttentionMIL(in_dim=16, num_classes=4, hidden_dim=32, dropout=0.0, ordinal=True)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        loss = ordinal_loss(m(x)[0], y)
        loss.backward()
        opt.step()
    cum, attn = m(x)
    assert cum.shape == (256, 3) and torch.allclose(attn.sum(1), torch.ones(256))
    acc = (ordinal_probs(cum).argmax(1) == y).float().mean()
    assert acc > 0.9
