"""The NumPy oracle: one plain, readable implementation of every dpmoe operation.

Every test compares the SYCL kernels with these functions, and they run instead of the
kernels when there is no SYCL device. They take NumPy arrays (bfloat16 as
``ml_dtypes.bfloat16``), compute in float32 like the kernels, and return the input's dtype.
Inputs are assumed valid: the public functions validate before calling them.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(F32)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) in float32, written as x / (1 + exp(-x)) like the kernels."""
    with np.errstate(over="ignore"):
        return x / (F32(1) + np.exp(-x))


def topk_softmax(
    gating_logits: np.ndarray, top_k: int, renormalize: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over all experts in float32, then the top-k; ties pick the smaller index.

    ``gating_logits`` [T, E] -> (``topk_weights`` [T, k] float32, ``topk_ids`` [T, k] int32).
    Selection uses the logits (softmax is monotonic), so equal probabilities that come from
    different logits still order by logit.
    """
    logits = _f32(gating_logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True, dtype=F32)
    # stable sort of -logits: descending value, ascending index among ties
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :top_k].astype(np.int32)
    weights = np.take_along_axis(probs, ids, axis=1).astype(F32)
    if renormalize:
        weights = weights / weights.sum(axis=1, keepdims=True, dtype=F32)
    return weights, ids


def moe_align_block_size(
    topk_ids: np.ndarray, num_experts: int, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group the T*k routing slots by expert, each expert's group padded to whole blocks.

    Returns ``sorted_token_ids`` [T*k + E*(block_size-1)] int32 (slot ids, sentinel T*k in
    padding), ``experts_ids`` [ceil(len(sorted_token_ids)/block_size)] int32 (owner of each
    block, -1 for unused blocks) and ``num_tokens_post_pad`` [1] int32.

    Example: topk_ids = [[2, 0], [2, 1]], E = 3, block_size = 2 gives slots 0..3 with experts
    [2, 0, 2, 1]; expert 0 owns block 0 = [1, 4], expert 1 block 1 = [3, 4], expert 2
    block 2 = [0, 2]; sorted_token_ids = [1, 4, 3, 4, 0, 2, 4] (length 4 + 3*1), experts_ids =
    [0, 1, 2, -1], num_tokens_post_pad = [6].
    """
    flat = np.asarray(topk_ids).reshape(-1)
    n_slots = flat.size
    capacity = n_slots + num_experts * (block_size - 1)
    sorted_ids = np.full(capacity, n_slots, dtype=np.int32)
    experts_ids = np.full(-(-capacity // block_size), -1, dtype=np.int32)
    position = 0
    for expert in range(num_experts):
        slots = np.flatnonzero(flat == expert)
        if slots.size == 0:
            continue
        sorted_ids[position : position + slots.size] = slots
        n_blocks = -(-slots.size // block_size)
        first_block = position // block_size
        experts_ids[first_block : first_block + n_blocks] = expert
        position += n_blocks * block_size
    return sorted_ids, experts_ids, np.array([position], dtype=np.int32)


def silu_and_mul(x: np.ndarray) -> np.ndarray:
    """``x`` [..., 2d] -> silu(x[..., :d]) * x[..., d:], in x's dtype."""
    d = x.shape[-1] // 2
    xf = _f32(x)
    return (silu(xf[..., :d]) * xf[..., d:]).astype(x.dtype)


def silu_and_mul_moe(gate_output: np.ndarray, up_output: np.ndarray) -> None:
    """``gate_output <- silu(gate_output) * up_output``, in place."""
    gate_output[...] = (silu(_f32(gate_output)) * _f32(up_output)).astype(gate_output.dtype)


def moe_sum(expert_out: np.ndarray, topk_weights: np.ndarray) -> np.ndarray:
    """``expert_out`` [T, k, H], ``topk_weights`` [T, k] -> sum_j w[t, j] * y[t, j] [T, H]."""
    y = _f32(expert_out)
    w = _f32(topk_weights)
    out = np.zeros((y.shape[0], y.shape[2]), dtype=F32)
    for j in range(y.shape[1]):  # in slot order, like the kernel
        out += w[:, j, None] * y[:, j, :]
    return out.astype(expert_out.dtype)


def grouped_gemm_moe(
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray | None,
    D: np.ndarray,
    topk_weights: np.ndarray,
    topk_indices: np.ndarray,
    top_k: int,
    trans_b: bool = False,
) -> None:
    """``D[t] = sum_j w[t, j] * (A[t] @ B[e_tj] + C[e_tj])``, written into ``D`` [T, N].

    ``B`` is [E, K, N] ([E, N, K] with ``trans_b``), ``C`` an optional bias [E, N].
    """
    a = _f32(A)
    b = _f32(B)
    if trans_b:
        b = b.transpose(0, 2, 1)
    w = _f32(topk_weights)
    out = np.zeros((a.shape[0], b.shape[2]), dtype=F32)
    for t in range(a.shape[0]):
        for j in range(top_k):
            e = int(topk_indices[t, j])
            y = a[t] @ b[e]
            if C is not None:
                y = y + _f32(C[e])
            out[t] += w[t, j] * y
    D[...] = out.astype(D.dtype)


def fused_moe_forward(
    hidden_states: np.ndarray,
    gate_weights: np.ndarray,
    up_weights: np.ndarray,
    down_weights: np.ndarray,
    topk_weights: np.ndarray,
    topk_indices: np.ndarray,
    top_k: int = 2,
    renormalize: bool = True,
) -> np.ndarray:
    """``out[t] = sum_j w[t, j] * down_e(silu(x_t @ gate_e) * (x_t @ up_e))`` [T, H].

    Shapes: hidden_states [T, H], gate/up [E, H, I], down [E, I, H], topk [T, k].
    ``renormalize`` scales each token's k weights to sum to 1 first.
    """
    x = _f32(hidden_states)
    w = _f32(topk_weights)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True, dtype=F32)
    out = np.zeros(x.shape, dtype=F32)
    for t in range(x.shape[0]):
        for j in range(top_k):
            e = int(topk_indices[t, j])
            act = silu(x[t] @ _f32(gate_weights[e])) * (x[t] @ _f32(up_weights[e]))
            out[t] += w[t, j] * (act @ _f32(down_weights[e]))
    return out.astype(hidden_states.dtype)


def moe_layer(
    hidden_states: np.ndarray,
    router: np.ndarray,
    gate_weights: np.ndarray,
    up_weights: np.ndarray,
    down_weights: np.ndarray,
    top_k: int = 2,
    renormalize: bool = True,
) -> np.ndarray:
    """A whole MoE block: logits = x @ router [H, E], top-k softmax routing, experts."""
    logits = _f32(hidden_states) @ _f32(router)
    weights, ids = topk_softmax(logits, top_k, renormalize)
    return fused_moe_forward(
        hidden_states, gate_weights, up_weights, down_weights, weights, ids, top_k, False
    )
