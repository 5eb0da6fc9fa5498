"""The PyTorch reference layer (dsmoe_export.modeling.DSMoEMLP) against the spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dsmoe_export.testing.reference import ffn_reference

from dsmoe_export.config import DSMoEConfig, parse_config
from dsmoe_export.modeling import DSMoEMLP
from dsmoe_export.synthetic import TinySpec


def _mlp(n=8, d=32, D=96, seed=0, **moe) -> DSMoEMLP:
    spec = TinySpec(hidden_size=d, intermediate_size=D, dsmoe={"num_experts": n, **moe})
    cfg = parse_config(spec.config_json(), "<test>")
    torch.manual_seed(seed)
    m = DSMoEMLP(cfg).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=d ** -0.5)
    return m.eval()


def _packed(m: DSMoEMLP):
    n = m.moe.num_experts
    g, u, dn = (w.detach().numpy() for w in (m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight))
    B = g.shape[0] // n
    return (m.router.weight.detach().numpy(), g.reshape(n, B, -1), u.reshape(n, B, -1),
            np.stack([dn[:, i * B:(i + 1) * B].T for i in range(n)]))


def test_sum_of_all_blocks_is_the_dense_ffn(rng):
    m = _mlp(n=8)
    x = torch.from_numpy(rng.standard_normal((5, 32)))
    dense = m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
    _, gate, up, down = _packed(m)
    blocks = [(torch.nn.functional.silu(x @ torch.from_numpy(gate[i]).T) * (x @ torch.from_numpy(up[i]).T))
              @ torch.from_numpy(down[i]) for i in range(8)]
    torch.testing.assert_close(sum(blocks), dense, rtol=1e-12, atol=1e-12)
    # tau = 0, binary weights, no rescale: every block active with weight 1 -> exactly the dense FFN
    m0 = _mlp(n=8, threshold=0.0, weighting="binary", rescale=False)
    m0.load_state_dict(m.state_dict())
    torch.testing.assert_close(m0(x), dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("moe", [
    dict(), dict(threshold=0.2), dict(threshold=0.8, weighting="binary"), dict(rescale=False),
    dict(activation="gelu"), dict(activation="gelu_tanh", threshold=0.35),
])
@pytest.mark.parametrize("n", [1, 4, 8])
def test_layer_matches_numpy_reference_with_k0_and_kn_tokens(rng, n, moe):
    m = _mlp(n=n, D=12 * n, **moe)
    x = rng.standard_normal((3, 7, 32))
    rw = m.router.weight.detach().numpy()
    x[0, 0] = 0.0                                   # logits 0 -> s = 0.5: inactive for tau >= 0.5
    x[0, 1] = np.linalg.lstsq(rw, np.full(n, -10.0), rcond=None)[0]  # every logit = -10: k = 0
    x[0, 2] = np.linalg.lstsq(rw, np.full(n, 10.0), rcond=None)[0]  # every logit = 10: k = n
    y = m(torch.from_numpy(x)).detach().numpy()
    want, active = ffn_reference(x, *_packed(m), **_spec_kwargs(m.moe))
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(m.last_active.numpy(), active)
    assert not active[0, 1].any() and (y[0, 1] == 0).all()
    assert active[0, 2].all()


def _spec_kwargs(moe: DSMoEConfig) -> dict:
    return dict(threshold=moe.threshold, rescale=moe.rescale, weighting=moe.weighting, activation=moe.activation)


def test_k0_gives_exact_zeros_without_nan():
    m = _mlp(n=4, threshold=0.99)
    x = torch.zeros(3, 32, dtype=torch.float64)
    y = m(x)
    assert torch.equal(y, torch.zeros_like(y))


@pytest.mark.parametrize("weighting", ["score", "binary"])
def test_straight_through_gradients(rng, weighting):
    m = _mlp(n=8, weighting=weighting).train()
    with torch.no_grad():
        m.router.weight[3] = 0.0
        m.router.weight[3, 0] = -50.0  # x > 0 below, so block 3's logit is < -5 for every token
    x = torch.from_numpy(np.abs(rng.standard_normal((16, 32))) + 0.1)
    y = m(x)
    assert not m.last_active[:, 3].any(), "block 3 is meant to be inactive for every token"
    (y.square().sum() + m.last_gates.mean()).backward()
    # every router row (= column of Y) gets gradient, even the never-active block 3
    assert (m.router.weight.grad.abs().sum(1) > 0).all()
    # the experts of the inactive block get none; active blocks do
    B = 12
    assert torch.count_nonzero(m.gate_proj.weight.grad[3 * B:4 * B]) == 0
    assert torch.count_nonzero(m.down_proj.weight.grad[:, 3 * B:4 * B]) == 0
    assert torch.count_nonzero(m.gate_proj.weight.grad[:3 * B]) > 0
    # forward value in training mode equals eval mode (STE changes only the backward)
    torch.testing.assert_close(y.detach(), m.eval()(x), rtol=1e-12, atol=1e-12)


def test_sparsity_loss_is_mean_gate_and_trains_the_router(rng):
    from dsmoe_export.modeling import DSMoEForCausalLM

    cfg = parse_config(TinySpec(num_hidden_layers=2).config_json(), "<test>")
    torch.manual_seed(0)
    model = DSMoEForCausalLM(cfg).train()
    ids = torch.from_numpy(rng.integers(0, 256, (2, 5)))
    mask = torch.ones(2, 5, dtype=torch.int64)
    pos = torch.arange(5).expand(2, 5)
    model(ids, mask, pos, model.empty_past(2))
    loss = model.sparsity_loss()
    want = np.mean([m.last_gates.detach().numpy().mean() for m in model.mlps])
    assert loss.item() == pytest.approx(want, rel=1e-6)
    loss.backward()
    for m in model.mlps:
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
