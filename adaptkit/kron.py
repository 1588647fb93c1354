r"""Kronecker products, written once: the dense product and its matrix-vector form.

``torch.kron``'s row-major convention, for ``L (a, c)`` and ``R (b, d)``::

    kron(L, R)[i*b + p, j*d + q] = L[i, j] * R[p, q]          (a*b, c*d)

Mixed-product identity (Van Loan, "The ubiquitous Kronecker product", J. Comput. Appl.
Math. 123, 2000): with ``x (..., c*d)`` viewed row-major as ``X (T, c, d)``
(``x[j*d + q] = X[j, q]``), ``x kron(L, R)^T = vec(L X R^T)``, so the product applies as two
small matmuls, never an (a*b, c*d) matrix: ``L`` first costs ``a*c*d + a*d*b``
multiply-adds per row of x, ``R`` first ``c*d*b + a*c*b``. Products of factors compose,
``kron(L1 L2, R1 R2) = kron(L1, R1) kron(L2, R2)``, so a factored ``R = R_a R_b`` applies as
``kron(I_c, R_b)`` then ``kron(L, R_a)``.

Users: LoKr (one product, w2 full, low-rank or Tucker), LoRA-MPO (a sum of r products given
by its two MPO cores) and ``adaptkit.mpo.kron_reconstruct``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kron_sum", "kron_apply"]


def kron_sum(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``sum_k kron(A[k], B[k])`` for ``A (r, a, c)`` and ``B (r, b, d, *kernel)``, as an
    ``(a*b, c*d, *kernel)`` tensor (trailing kernel axes of B are carried along untouched,
    as ``torch.kron(A[k][..., None, None], B[k])`` does for a conv weight).

    One GEMM on the rearranged factors, ``M[(i, j), (p, q, ..)] = sum_k A[k, i, j]
    B[k, p, q, ..]``, then the axes un-interleaved (Van Loan & Pitsianis' rearrangement, read
    backwards). ``r = 1`` is a single Kronecker product. Works in the factors' dtype and
    accepts non-contiguous factors (a Tucker-built kernel, a permuted core); differentiable.
    """
    r, a, c = A.shape
    b, d, kernel = B.shape[1], B.shape[2], tuple(B.shape[3:])
    m = A.reshape(r, a * c).t() @ B.reshape(r, -1)  # (a*c, r) @ (r, b*d*K) -> (a*c, b*d*K)
    m = m.view(a, c, b, d, -1).permute(0, 2, 1, 3, 4)  # (a, c, b, d, K) -> (a, b, c, d, K)
    return m.reshape(a * b, c * d, *kernel)  # (a*b, c*d, *kernel)


def kron_apply(
    x: torch.Tensor, in_shape: tuple[int, int], left: torch.Tensor | None = None, right: torch.Tensor | None = None
) -> torch.Tensor:
    """``x kron(L, R)^T`` without building the product: ``x (..., c*d) -> (..., a*b)``.

    ``in_shape = (c, d)``; ``left = L (a, c)``, ``right = R (b, d)``; ``None`` stands for the
    identity (``kron(I_c, R)`` or ``kron(L, I_d)``). With both factors, the order with fewer
    multiply-adds runs (module docstring). ``kron(I_c, R)`` is one GEMM over the (T*c, d)
    rows; ``kron(L, I_d)`` one batched GEMM (an explicit ``bmm`` on the expanded ``L``, which
    beats ``matmul``'s broadcasting forward and backward on CPU), a plain GEMM when d == 1.
    The output index is ``i*b + p`` (row-major ``(a, b)``), so a caller may re-view it as
    another ``(c', d')`` split for a next factor.
    """
    c, d = in_shape
    if left is not None and right is not None:
        a, b = left.shape[0], right.shape[0]
        if a * d * (c + b) <= c * b * (d + a):  # L first: fewer multiply-adds
            return kron_apply(kron_apply(x, (c, d), left=left), (a, d), right=right)
        return kron_apply(kron_apply(x, (c, d), right=right), (c, b), left=left)
    lead = x.shape[:-1]
    X = x.reshape(-1, c, d)  # (..., c*d) -> (T, c, d), row-major
    T = X.shape[0]
    if right is not None:
        y = F.linear(X.reshape(T * c, d), right)  # (T*c, d) @ R^T -> (T*c, b)
        return y.reshape(*lead, c * right.shape[0])  # (T*c, b) -> (..., c*b)
    if left is None:
        return x
    if d == 1:
        y = F.linear(X.reshape(T, c), left)  # (T, c) @ L^T -> (T, a)
    else:
        y = torch.bmm(left.expand(T, *left.shape), X)  # (T, a, c) @ (T, c, d) -> (T, a, d)
    return y.reshape(*lead, left.shape[0] * d)  # (T, a, d) -> (..., a*d)
