import torch

from dtm_ops.projection import Projection


def test_pca_recovers_known_axes_and_output_is_unit_norm():
    g = torch.Generator().manual_seed(0)
    # Data spread along e0 (sd 5) and e1 (sd 2), little elsewhere.
    x = torch.randn(4000, 6, generator=g) * torch.tensor([5.0, 2.0, 0.1, 0.1, 0.1, 0.1])
    p = Projection.fit(x, 2)
    comps = p.components.abs()
    assert comps[0, 0] > 0.99 and comps[1, 1] > 0.99
    feats = torch.randn(2, 6, 3, 4, generator=g)
    y = p(feats)
    assert y.shape == (2, 2, 3, 4)
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 3, 4))
    # Deterministic: same fit, same digest.
    assert Projection.fit(x, 2).digest == p.digest
