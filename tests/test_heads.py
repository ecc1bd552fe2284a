"""The classification heads against their papers' formulas written out in plain Python (loops over rows
and classes, ``math.acos`` for the angle): logits with the margin on the target only, the θ + m > π branch
of ArcFace, and the gradient of the cross-entropy through each head against central finite differences of
the plain-Python loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.heads import ArcFaceHead, CosFaceHead, SoftmaxHead, build_head

Matrix = list[list[float]]


def ref_cosine(x: list[float], w: list[float]) -> float:
    dot = sum(a * b for a, b in zip(x, w, strict=True))
    return dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in w)))


def ref_target(kind: str, cos: float, m: float, easy: bool = False) -> float:
    """The target class's logit before scaling, as each paper states it (ArcFace: via the angle)."""
    if kind == "cosface":
        return cos - m
    theta = math.acos(max(-1.0, min(1.0, cos)))
    if easy:
        return math.cos(theta + m) if cos > 0 else cos
    return math.cos(theta + m) if theta + m <= math.pi else cos - m * math.sin(m)


def ref_logits(kind: str, x: Matrix, w: Matrix, b: list[float] | None, labels: list[int] | None,
               s: float = 1.0, m: float = 0.0, easy: bool = False) -> Matrix:  # fmt: skip
    rows = []
    for i, xi in enumerate(x):
        row = []
        for j, wj in enumerate(w):
            if kind == "softmax":
                row.append(sum(a * c for a, c in zip(xi, wj, strict=True)) + b[j])
                continue
            cos = ref_cosine(xi, wj)
            row.append(s * (ref_target(kind, cos, m, easy) if labels is not None and j == labels[i] else cos))
        rows.append(row)
    return rows


def ref_loss(logits: Matrix, labels: list[int]) -> float:
    """Mean cross-entropy, log-sum-exp written out."""
    total = 0.0
    for row, y in zip(logits, labels, strict=True):
        top = max(row)
        total += top + math.log(sum(math.exp(v - top) for v in row)) - row[y]
    return total / len(labels)


def make_head(kind: str, feat_dim: int, classes: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "softmax":
        return SoftmaxHead(feat_dim, classes).double()
    head = {"cosface": CosFaceHead, "arcface": ArcFaceHead}[kind](feat_dim, classes, **kwargs).double()
    with torch.no_grad():
        head.weight.normal_()  # unit-scale weights: the reference needs no special care with tiny norms
    return head


def batch(feat_dim: int = 5, classes: int = 4, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, feat_dim, generator=gen, dtype=torch.float64), torch.arange(n) % classes


HEAD_CASES = [
    ("softmax", {}),
    ("cosface", {"scale": 64.0, "margin": 0.35}),
    ("cosface", {"scale": 8.0, "margin": 0.2}),
    ("arcface", {"scale": 64.0, "margin": 0.5}),
    ("arcface", {"scale": 10.0, "margin": 0.3, "easy_margin": True}),
]
CASE_IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for kind, kw in HEAD_CASES]


def reference_for(head: torch.nn.Module, kind: str, kwargs: dict, x: torch.Tensor,
                  labels: torch.Tensor | None) -> Matrix:  # fmt: skip
    b = head.bias.tolist() if kind == "softmax" else None
    s, m = kwargs.get("scale", 1.0), kwargs.get("margin", 0.0)
    return ref_logits(kind, x.tolist(), head.weight.tolist(), b, None if labels is None else labels.tolist(),
                      s, m, kwargs.get("easy_margin", False))  # fmt: skip


@pytest.mark.parametrize(("kind", "kwargs"), HEAD_CASES, ids=CASE_IDS)
def test_logits_match_the_formula_with_the_margin_on_the_target_only(kind: str, kwargs: dict) -> None:
    x, labels = batch()
    head = make_head(kind, 5, 4, **kwargs)
    with torch.no_grad():
        got, margin_free = head(x, labels), head(x)
    torch.testing.assert_close(got, torch.tensor(reference_for(head, kind, kwargs, x, labels), dtype=torch.float64))
    torch.testing.assert_close(
        margin_free, torch.tensor(reference_for(head, kind, kwargs, x, None), dtype=torch.float64)
    )
    target = F.one_hot(labels, 4).bool()
    assert torch.equal(got[~target], margin_free[~target])  # non-target logits: no margin
    if kind != "softmax" and kwargs["margin"] > 0:
        # the margin makes the target harder (easy_margin: only where cos θ > 0)
        assert (got[target] <= margin_free[target]).all() and (got[target] < margin_free[target]).any()


def test_arcface_beyond_pi_uses_insightface_fallback_and_stays_monotone() -> None:
    """Targets almost opposite their class weight (θ > π − m) take cos θ − m·sin m, not cos(θ + m)."""
    m, s = 0.5, 64.0
    head = make_head("arcface", 3, 2, scale=s, margin=m)
    w0 = head.weight[0].detach()
    angles = torch.linspace(0.05, math.pi - 0.05, 60, dtype=torch.float64)
    # embeddings at angle θ from w0 in the plane of w0 and a vector orthogonal to it
    u = w0 / w0.norm()
    v = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    v = v - (v @ u) * u
    v = v / v.norm()
    x = torch.cos(angles)[:, None] * u + torch.sin(angles)[:, None] * v
    with torch.no_grad():
        target = head(x, torch.zeros(60, dtype=torch.long))[:, 0] / s
    expected = [ref_target("arcface", math.cos(t), m) for t in angles.tolist()]
    torch.testing.assert_close(target, torch.tensor(expected, dtype=torch.float64))
    beyond = angles > math.pi - m
    assert beyond.any() and (~beyond).any()
    torch.testing.assert_close(target[beyond], torch.cos(angles[beyond]) - m * math.sin(m))
    assert (target[1:] < target[:-1]).all()  # decreasing in θ on both sides of the switch


@pytest.mark.parametrize(("kind", "kwargs"), HEAD_CASES, ids=CASE_IDS)
def test_gradient_matches_finite_differences_of_the_reference_loss(kind: str, kwargs: dict) -> None:
    x, labels = batch(feat_dim=4, classes=3, n=5)
    head = make_head(kind, 4, 3, **kwargs)
    x.requires_grad_(True)
    F.cross_entropy(head(x, labels), labels).backward()
    weight = head.weight.detach().tolist()
    bias = head.bias.tolist() if kind == "softmax" else None
    s, m, easy = kwargs.get("scale", 1.0), kwargs.get("margin", 0.0), kwargs.get("easy_margin", False)

    def loss_at(xs: Matrix, ws: Matrix) -> float:
        return ref_loss(ref_logits(kind, xs, ws, bias, labels.tolist(), s, m, easy), labels.tolist())

    h = 1e-6
    for grad, point, which in ((x.grad, x.detach().tolist(), "x"), (head.weight.grad, weight, "w")):
        numeric = []
        for i in range(len(point)):
            row = []
            for j in range(len(point[0])):
                plus = [r[:] for r in point]
                minus = [r[:] for r in point]
                plus[i][j] += h
                minus[i][j] -= h
                args_plus = (plus, weight) if which == "x" else (x.detach().tolist(), plus)
                args_minus = (minus, weight) if which == "x" else (x.detach().tolist(), minus)
                row.append((loss_at(*args_plus) - loss_at(*args_minus)) / (2 * h))
            numeric.append(row)
        torch.testing.assert_close(grad, torch.tensor(numeric, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_margin_heads_compute_in_fp32_under_bf16_autocast() -> None:
    """bf16 logits at s = 64 would be off by ~0.25 (8 mantissa bits); fp32 ones by ~1e-5."""
    x, labels = batch()
    for head in (ArcFaceHead(5, 4), CosFaceHead(5, 4)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(x.bfloat16(), labels)
        assert logits.dtype == torch.float32
        rounded = x.bfloat16().double()
        kind = "arcface" if isinstance(head, ArcFaceHead) else "cosface"
        expected = ref_logits(kind, rounded.tolist(), head.weight.tolist(), None, labels.tolist(), 64.0, head.margin)
        torch.testing.assert_close(logits.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-3)


def test_build_head_uses_the_papers_defaults_and_rejects_bad_values() -> None:
    cos, arc = build_head("cosface", 8, 3), build_head("arcface", 8, 3)
    assert (cos.scale, cos.margin) == (64.0, 0.35) and (arc.scale, arc.margin) == (64.0, 0.5)
    assert isinstance(build_head("softmax", 8, 3), SoftmaxHead)
    assert build_head("arcface", 8, 3, scale=30, margin=0.2).margin == 0.2
    for bad in ({"scale": 0.0}, {"scale": float("inf")}, {"margin": -0.1}, {"margin": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_head("arcface", 8, 3, **bad)
    with pytest.raises(ValueError, match="unknown head"):
        build_head("sphereface", 8, 3)
