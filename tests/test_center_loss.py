"""Tests for training.center_loss against an independent dense reference of the paper's Eq. 2-4, on one process:
the equations, module behaviour, input validation and AMP (DDP and joint training: test_center_loss_training.py)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from center_loss_support import make_case, make_loss, ref_loss_grad, ref_update
from torch import nn

from training.center_loss import CenterLoss

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `bench` is a top-level folder, not an installed package
    sys.path.insert(0, str(_ROOT))

from bench.reference_losses import ArticleCenterLoss  # noqa: E402

SCALE = 65536.0


CASES = {
    "repeated_and_absent": (12, 7, 5, [0, 1, 1, 1, 4, 4, 0, 1, 4, 4, 4, 1]),  # 2, 3, 5, 6 absent
    "batch_of_one": (1, 5, 3, [3]),
    "one_class": (4, 1, 3, [0, 0, 0, 0]),
    "random": (32, 10, 8, None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_paper_equations(case: str, dtype: torch.dtype) -> None:
    b, c, d, labels = CASES[case]
    x, y, c0 = make_case(b, c, d, labels, dtype)
    alpha = 0.3
    cl = make_loss(c0, alpha=alpha)
    xr = x.clone().requires_grad_()
    loss = cl(xr, y)  # train mode: applies Eq. 4 after computing the loss
    loss.backward()  # must still work (and use the OLD centers) after the in-place update

    ref_l, ref_g = ref_loss_grad(x.numpy(), y.numpy(), c0.numpy())
    assert loss.dtype == torch.promote_types(dtype, torch.float32)
    assert loss.item() == pytest.approx(ref_l, rel=1e-5)
    assert xr.grad is not None and xr.grad.dtype == dtype
    np.testing.assert_allclose(xr.grad.double().numpy(), ref_g, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        cl.centers.double().numpy(), ref_update(x.numpy(), y.numpy(), c0.numpy(), alpha), rtol=1e-5, atol=1e-6
    )
    absent = sorted(set(range(c)) - set(y.tolist()))
    assert torch.equal(cl.centers[absent], c0[absent])
    assert cl.centers.dtype == torch.float32


def test_consecutive_steps_chain_eq4() -> None:
    x, y, c0 = make_case(16, 6, 4, None, torch.float32)
    x2, y2, _ = make_case(9, 6, 4, None, torch.float32, seed=1)
    cl = make_loss(c0)
    cl(x, y)
    cl(x2, y2)
    expected = ref_update(x2.numpy(), y2.numpy(), ref_update(x.numpy(), y.numpy(), c0.numpy(), 0.5), 0.5)
    np.testing.assert_allclose(cl.centers.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_non_contiguous_features_and_fp64_gradcheck() -> None:
    x, y, c0 = make_case(6, 4, 5, None, torch.float64)
    xt = x.t().contiguous().t().requires_grad_()  # same values, column-major strides
    cl = make_loss(c0)
    loss = cl(xt, y)
    loss.backward()
    ref_l, ref_g = ref_loss_grad(x.numpy(), y.numpy(), c0.numpy())
    assert loss.item() == pytest.approx(ref_l, rel=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), ref_g, rtol=1e-12)
    cl.eval()  # gradcheck calls forward many times: keep the centers fixed
    assert torch.autograd.gradcheck(lambda f: cl(f, y), (x.clone().requires_grad_(),))


def test_default_init_is_zero_and_first_step_moves_toward_class_mean() -> None:
    cl = CenterLoss(3, 2)
    assert torch.equal(cl.centers, torch.zeros(3, 2))
    x = torch.tensor([[2.0, 0.0], [4.0, 2.0], [9.0, 9.0]])
    cl(x, torch.tensor([1, 1, 2]))
    # c_j = α·n/(1+n)·mean(x_j)
    assert torch.allclose(cl.centers[1], 0.5 * 2 / 3 * torch.tensor([3.0, 1.0]))
    assert torch.allclose(cl.centers[2], 0.5 * 1 / 2 * torch.tensor([9.0, 9.0]))
    assert torch.equal(cl.centers[0], torch.zeros(2))


# ---------------------------------------------------------------- module behaviour
def test_eval_mode_never_changes_centers() -> None:
    x, y, c0 = make_case(8, 4, 3, None, torch.float32)
    cl = make_loss(c0).eval()
    loss = cl(x.requires_grad_(), y)
    loss.backward()
    assert torch.equal(cl.centers, c0)
    assert loss.item() == pytest.approx(ref_loss_grad(x.detach().numpy(), y.numpy(), c0.numpy())[0], rel=1e-5)


def test_centers_are_a_buffer_not_a_parameter_and_state_dict_round_trips() -> None:
    x, y, c0 = make_case(8, 4, 3, None, torch.float32)
    cl = make_loss(c0)
    assert list(cl.parameters()) == []
    assert not isinstance(cl.centers, nn.Parameter) and not cl.centers.requires_grad
    xr = x.clone().requires_grad_()
    cl(xr, y).backward()
    assert cl.centers.grad is None and cl.centers.grad_fn is None
    buf = io.BytesIO()
    torch.save(cl.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state) == {"centers"}
    restored = CenterLoss(4, 3)
    restored.load_state_dict(state)
    assert torch.equal(restored.centers, cl.centers) and not torch.equal(restored.centers, c0)


def test_auto_update_false_and_explicit_update_centers() -> None:
    x, y, c0 = make_case(10, 5, 3, None, torch.float32)
    cl = make_loss(c0, auto_update=False)
    xr = x.clone().requires_grad_()
    cl(xr, y).backward()
    assert torch.equal(cl.centers, c0)
    cl.update_centers(xr, y)  # features requiring grad: must detach, record nothing
    assert cl.centers.grad_fn is None and not cl.centers.requires_grad
    np.testing.assert_allclose(
        cl.centers.numpy(), ref_update(x.numpy(), y.numpy(), c0.numpy(), 0.5), rtol=1e-5, atol=1e-6
    )
    cl2 = make_loss(c0, auto_update=False).eval()
    with torch.no_grad():
        cl2.update_centers(x, y)  # explicit update works in eval mode and under no_grad
    assert torch.equal(cl2.centers, cl.centers)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("features", "labels", "exc", "match"),
    [
        (torch.randn(4), torch.zeros(4, dtype=torch.long), ValueError, "shape"),
        (torch.randn(4, 3, 1), torch.zeros(4, dtype=torch.long), ValueError, "shape"),
        (torch.randn(4, 5), torch.zeros(4, dtype=torch.long), ValueError, "shape"),
        (torch.randn(4, 3), torch.zeros(4), TypeError, "integer"),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.bool), TypeError, "integer"),
        (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), ValueError, "1-D"),
        (torch.randn(4, 3), torch.tensor([0, 1, 6, 2]), ValueError, r"\[0, 6\)"),
        (torch.randn(4, 3), torch.tensor([0, -1, 2, 2]), ValueError, r"\[0, 6\)"),
        (torch.randn(4, 3), torch.zeros(3, dtype=torch.long), ValueError, "mismatch"),
        (torch.randn(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "empty"),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating"),
    ],
)
def test_input_validation(features: torch.Tensor, labels: torch.Tensor, exc: type, match: str) -> None:
    cl = CenterLoss(6, 3)
    with pytest.raises(exc, match=match):
        cl(features, labels)
    with pytest.raises(exc, match=match):
        cl.update_centers(features, labels)
    assert torch.equal(cl.centers, torch.zeros(6, 3))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_classes=0, feat_dim=2),
        dict(num_classes=3, feat_dim=0),
        dict(num_classes=3, feat_dim=2, alpha=0.0),
        dict(num_classes=3, feat_dim=2, alpha=1.5),
        dict(num_classes=3, feat_dim=2, alpha=-0.5),
    ],
)
def test_constructor_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CenterLoss(**kwargs)


def test_int32_labels_and_alpha_one_accepted() -> None:
    x, y, c0 = make_case(6, 4, 2, None, torch.float32)
    cl = make_loss(c0, alpha=1.0)
    cl(x, y.to(torch.int32))
    np.testing.assert_allclose(
        cl.centers.numpy(), ref_update(x.numpy(), y.numpy(), c0.numpy(), 1.0), rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- AMP
def test_bf16_autocast_adds_no_error_of_its_own() -> None:
    """Our op upcasts exactly, so on the same (bf16-representable) inputs it equals fp32 bit for bit;
    only the bf16 rounding of the returned feature gradient differs (≤ 2^-8 relative)."""
    x, y, c0 = make_case(16, 6, 8, None, torch.float32)
    xb = x.to(torch.bfloat16).requires_grad_()
    xf = xb.detach().float().requires_grad_()
    cl_b, cl_f = make_loss(c0), make_loss(c0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_b = cl_b(xb, y)
    loss_f = cl_f(xf, y)
    assert loss_b.dtype == torch.float32
    assert loss_b.item() == loss_f.item()
    (loss_b * 7.0).backward()
    (loss_f * 7.0).backward()
    torch.testing.assert_close(xb.grad.float(), xf.grad, rtol=2**-8, atol=1e-6)
    assert torch.equal(cl_b.centers, cl_f.centers)


def test_bf16_model_under_autocast_close_to_fp32() -> None:
    """End to end with a bf16 Linear: the only difference is the model's bf16 features (8-bit mantissa,
    unit roundoff 2^-9, ~4e-3 after a K=16 matmul); the squared distance at most doubles that relative
    error, hence rtol 2e-2 for the loss and 2e-2 (absolute, centers ~N(0,1)) for the center update."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(32, 16)
    y = torch.randint(0, 6, (32,))
    c0 = torch.randn(6, 8)
    cl_b, cl_f = make_loss(c0), make_loss(c0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_b = cl_b(lin(x), y)
    loss_f = cl_f(lin(x), y)
    assert loss_b.dtype == torch.float32
    assert loss_b.item() == pytest.approx(loss_f.item(), rel=2e-2)
    torch.testing.assert_close(cl_b.centers, cl_f.centers, rtol=0, atol=2e-2)


def _grad_scaler() -> torch.amp.GradScaler | None:
    try:
        return torch.amp.GradScaler("cpu", init_scale=SCALE)
    except (AttributeError, TypeError, RuntimeError):  # torch without a CPU GradScaler: emulate
        return None


def _scaled_step(loss: torch.Tensor, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    """scaler.scale(loss).backward(); scaler.step(opt) — or the same by hand."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == SCALE  # no inf/nan: the step was not skipped
        return
    (loss * SCALE).backward()
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                p.grad.div_(SCALE)
    opt.step()


def test_grad_scaler_center_update_is_eq4_and_unscaled_grad_is_eq3() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(24, 16)
    y = torch.randint(0, 6, (24,))
    c0 = torch.randn(6, 8)
    cl = make_loss(c0)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = lin(x)
        feats.retain_grad()
        loss = 0.003 * cl(feats, y)  # λ must not affect the center step either
    _scaled_step(loss, opt, _grad_scaler())
    f = feats.detach().float().numpy()
    _, ref_g = ref_loss_grad(f, y.numpy(), c0.numpy())
    # feats.grad holds SCALE·λ·Eq.3 rounded to bf16 (2^-8 relative)
    np.testing.assert_allclose(feats.grad.float().numpy() / SCALE / 0.003, ref_g, rtol=2**-7, atol=1e-7)
    np.testing.assert_allclose(cl.centers.numpy(), ref_update(f, y.numpy(), c0.numpy(), 0.5), rtol=1e-5, atol=1e-6)


def test_article_function_center_step_is_shrunk_by_the_loss_scale() -> None:
    """Documents the bug we avoid: CenterlossFunc ignores grad_output for the centers, so a GradScaler's
    unscale_ divides an *unscaled* gradient by the scale: the center step is Eq. 4 / 65536."""
    x, y, _ = make_case(20, 5, 4, None, torch.float32)
    alpha = 0.5
    zeros = torch.zeros(5, 4)  # zero start: the step is the new value, no cancellation in c0 + step
    eq4_step = ref_update(x.numpy(), y.numpy(), zeros.numpy(), alpha)

    art = ArticleCenterLoss(5, 4)
    opt = torch.optim.SGD([art.centers], lr=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = art(x.clone().requires_grad_(), y)
    _scaled_step(loss, opt, _grad_scaler())
    np.testing.assert_allclose(art.centers.detach().numpy() * SCALE, eq4_step, rtol=1e-4, atol=1e-6)
    assert np.abs(eq4_step).max() > 0.1  # the expected step is not trivially zero

    # ... while without a scaler the same Function is exactly Eq. 4 (so the factor is the scaler's),
    art2 = ArticleCenterLoss(5, 4)
    opt2 = torch.optim.SGD([art2.centers], lr=alpha)
    art2(x, y).backward()
    opt2.step()
    np.testing.assert_allclose(art2.centers.detach().numpy(), eq4_step, rtol=1e-5, atol=1e-6)

    # ... and ours under the same scaler is Eq. 4.
    cl = make_loss(zeros)
    feats = nn.Parameter(x.clone())  # stands in for the embedding's parameters
    opt3 = torch.optim.SGD([feats], lr=alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss3 = cl(feats, y)
    _scaled_step(loss3, opt3, _grad_scaler())
    np.testing.assert_allclose(cl.centers.numpy(), eq4_step, rtol=1e-5, atol=1e-6)
