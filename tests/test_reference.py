"""reference.py is the spec: check it against first principles and its gradients with gradcheck (float64)."""
import pytest
import torch
from torch.autograd import gradcheck

from sae_fast import reference as R


def _weights(B=5, d=4, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
    return mk(B, d), mk(n, d), mk(n), mk(n, d), mk(d)


def test_pre_activations_formula():
    x, W_enc, b_enc, _, b_dec = _weights()
    p = R.pre_activations(x, W_enc, b_enc, b_dec)
    b, i = 3, 7
    assert torch.allclose(p[b, i], (x[b] - b_dec) @ W_enc[i] + b_enc[i])


def test_topk_ties_go_to_lower_index():
    pre = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5, 0.5]])
    v, i = R.topk(pre, 2)
    assert i.tolist() == [[1, 2], [0, 1]]
    assert v.tolist() == [[3.0, 3.0], [0.5, 0.5]]
    v, i = R.topk(pre, 4)
    assert i.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3]]


def test_topk_relu_and_order():
    pre = torch.tensor([[-1.0, -3.0, 2.0, -0.5]])
    v, i = R.topk(pre, 3)
    assert i.tolist() == [[2, 3, 0]] and v.tolist() == [[2.0, 0.0, 0.0]] and i.dtype == torch.int32


def test_topk_matches_sort_on_random_rows():
    pre = torch.randint(-3, 4, (50, 40)).float()  # many ties
    for k in (1, 5, 40):
        _, i = R.topk(pre, k)
        want = torch.sort(pre, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(i.long(), want)


def test_batch_topk_picks_global_largest():
    pre = torch.tensor([[5.0, 4.0, 0.1], [3.0, -1.0, 2.0]])
    v, i = R.batch_topk(pre, 2)  # B*k = 4 winners: 5, 4, 3, 2
    dense = R.sparse_to_dense(v, i, 3)
    assert dense.tolist() == [[5.0, 4.0, 0.0], [3.0, 0.0, 2.0]]
    # ties: lower flat index wins
    v, i = R.batch_topk(torch.ones(2, 3), 1)
    assert R.sparse_to_dense(v, i, 3).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def test_dense_to_sparse_roundtrip_and_layout():
    f = torch.relu(torch.randn(6, 11))
    f[2] = 0  # a row with nothing active
    v, i = R.dense_to_sparse(f)
    assert torch.equal(R.sparse_to_dense(v, i, 11), f)
    assert v.shape[1] == int((f > 0).sum(-1).max())
    for row_v, row_i in zip(v, i):  # active entries first, ascending latent
        active = row_i[row_v > 0]
        assert torch.equal(active, torch.sort(active).values)


def test_sparse_decode_matches_dense():
    _, _, _, W_dec, b_dec = _weights()
    f = torch.relu(torch.randn(5, 9, dtype=torch.float64))
    v, i = R.dense_to_sparse(f)
    assert torch.allclose(R.sparse_decode(v, i, W_dec, b_dec), f @ W_dec + b_dec)


def test_losses():
    x = torch.randn(8, 3, dtype=torch.float64)
    assert R.fvu(x.mean(0).expand_as(x), x).item() == pytest.approx(1.0)
    assert R.fvu(x, x).item() == 0.0
    assert R.mse(x + 1, x).item() == pytest.approx(3.0)
    W_dec = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    v, i = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0, 1]], dtype=torch.int32)
    assert R.l1_penalty(v, i, W_dec).item() == pytest.approx(1 * 5 + 2 * 2)


@pytest.mark.parametrize("act", ["topk", "batchtopk", "relu"])
def test_gradcheck_encode_decode(act):
    x, W_enc, b_enc, W_dec, b_dec = _weights()

    def f(x, W_enc, b_enc, W_dec, b_dec):
        p = R.pre_activations(x, W_enc, b_enc, b_dec)
        v, i = {"topk": lambda: R.topk(p, 3), "batchtopk": lambda: R.batch_topk(p, 2), "relu": lambda: R.relu(p)}[act]()
        return R.sparse_decode(v, i, W_dec, b_dec)

    assert gradcheck(f, (x, W_enc, b_enc, W_dec, b_dec))


def test_gradcheck_losses():
    x, W_enc, b_enc, W_dec, b_dec = _weights()
    target = torch.randn(5, 4, dtype=torch.float64)
    v = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    i = torch.randint(0, 9, (5, 3), dtype=torch.int32)
    assert gradcheck(lambda a: R.mse(a, target), (x,))
    assert gradcheck(lambda a: R.fvu(a, target), (x,))
    assert gradcheck(lambda v, W: R.l1_penalty(v, i, W), (v, W_dec))
    assert gradcheck(lambda v, W: R.auxk_loss(target, v, i, W), (v, W_dec))


def test_jumprelu_forward_and_estimator():
    pre = torch.tensor([[0.5, 1.02, 0.99, 2.0]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)
    f = R.jumprelu_dense(pre, theta, 0.1)
    assert f.tolist() == [[0.0, 1.02, 0.0, 2.0]]
    f.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 0.0, 1.0]]
    # d f / d theta = -(theta / bw) * rect((p - theta) / bw): only the two entries within 0.05 of theta
    assert theta.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])
    theta.grad = None
    R.l0_step(pre, theta, 0.1).backward()
    assert theta.grad.tolist() == pytest.approx([0.0, -10.0, -10.0, 0.0])


def test_jumprelu_lists_window_entries():
    pre = torch.tensor([[0.5, 1.02, 0.99, 2.0]], dtype=torch.float64)
    v, i = R.jumprelu(pre, torch.ones(4, dtype=torch.float64), 0.1)
    assert sorted(i[0].tolist()) == [1, 2, 3] and R.sparse_to_dense(v, i, 4).tolist() == [[0.0, 1.02, 0.0, 2.0]]


def test_dead_topk_only_picks_dead():
    pre = torch.tensor([[5.0, 1.0, 3.0, 2.0]])
    v, i = R.dead_topk(pre, torch.tensor([False, True, False, True]), 2)
    assert i.tolist() == [[3, 1]] and v.tolist() == [[2.0, 1.0]]
