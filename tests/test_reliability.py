"""Determinism, batch invariance, memory limits, chunking, threads, and NaN containment."""

import threading

import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, routing

import dpmoe
from dpmoe import memory, reference


def problem(rng, num_tokens=40, hidden=48, inter=40, num_experts=6, top_k=2, dtype=np.float32):
    x = normal(rng, (num_tokens, hidden), dtype)
    gate = normal(rng, (num_experts, hidden, inter), dtype, hidden**-0.5)
    up = normal(rng, (num_experts, hidden, inter), dtype, hidden**-0.5)
    down = normal(rng, (num_experts, inter, hidden), dtype, inter**-0.5)
    weights, ids = routing(rng, num_tokens, num_experts, top_k)
    return x, gate, up, down, weights, ids


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_same_call_twice_is_bit_identical(rng, dtype, grouped):
    args = problem(rng, dtype=dtype)
    first = dpmoe.fused_moe_forward(*args, use_grouped_topk=grouped)
    for _ in range(2):
        np.testing.assert_array_equal(dpmoe.fused_moe_forward(*args, use_grouped_topk=grouped), first)


def test_per_token_path_is_batch_invariant(rng):
    """A token's output on the per-token path does not depend on the rest of its batch."""
    x, gate, up, down, weights, ids = problem(rng, num_tokens=12)
    batch = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, use_grouped_topk=False)
    for t in (0, 5, 11):
        alone = dpmoe.fused_moe_forward(x[t:t + 1], gate, up, down, weights[t:t + 1], ids[t:t + 1],
                                        use_grouped_topk=False)
        np.testing.assert_array_equal(alone[0], batch[t])


def test_grouped_path_depends_on_the_batch_only_by_rounding(rng):
    """oneMKL picks GEMM kernels by shape, so the grouped path is deterministic but not
    bitwise batch invariant; the difference stays at float32 rounding."""
    x, gate, up, down, weights, ids = problem(rng, num_tokens=12)
    batch = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids)
    alone = np.concatenate([dpmoe.fused_moe_forward(x[t:t + 1], gate, up, down, weights[t:t + 1],
                                                    ids[t:t + 1]) for t in range(12)])
    assert_close(alone, batch)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_nan_in_a_token_stays_in_that_token(rng, grouped):
    x, gate, up, down, weights, ids = problem(rng, num_tokens=10)
    x[3, 7] = np.nan
    x[6, 0] = np.inf
    out = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, use_grouped_topk=grouped)
    clean = np.ones(10, bool)
    clean[[3, 6]] = False
    assert np.isfinite(out[clean]).all()
    assert not np.isfinite(out[3]).all() and not np.isfinite(out[6]).all()
    with np.errstate(invalid="ignore"):
        want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, True)
    assert_close(out[clean], want[clean])


@needs_device
def test_memory_error_names_need_and_device_before_anything_runs(rng, monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda queue: (1 << 16, 1 << 15))
    x, gate, up, down, weights, ids = problem(rng)
    before = x.copy()
    with pytest.raises(MemoryError, match=r"fused_moe_forward needs about .* on .*global memory"):
        dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, inplace=True)
    np.testing.assert_array_equal(x, before)
    layer = dpmoe.MoELayer(16, 8, 4, seed=0)
    with pytest.raises(MemoryError, match="MoELayer"):
        layer(normal(rng, (500, 16)))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_chunked_tokens_give_the_same_result(rng, monkeypatch, grouped):
    args = problem(rng, num_tokens=37)
    whole = dpmoe.fused_moe_forward(*args, use_grouped_topk=grouped)
    path = "grouped" if grouped else "per_token"
    plan = dpmoe.explain(37, 48, 40, 6, 2, path=path)
    if plan is None:
        pytest.skip("no SYCL device: nothing is chunked")
    monkeypatch.setenv("DPMOE_MAX_INTERMEDIATE_BYTES", str(plan.intermediate_bytes(5)))
    assert dpmoe.explain(37, 48, 40, 6, 2, path=path).chunk_tokens == 5  # chunks of 5 tokens
    chunked = dpmoe.fused_moe_forward(*args, use_grouped_topk=grouped)
    if grouped:  # GEMM shapes change with the chunk: equal up to float32 rounding
        assert_close(chunked, whole)
    else:
        np.testing.assert_array_equal(chunked, whole)


def run_in_threads(work, n=4):
    errors, results = [], [None] * n

    def target(i):
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    return results


def test_threads_sharing_the_default_queue(rng):
    problems = [problem(np.random.default_rng(i), num_tokens=9 + i) for i in range(4)]

    def work(i):
        return [dpmoe.fused_moe_forward(*problems[i], use_grouped_topk=bool(r % 2)) for r in range(3)]

    for args, outs in zip(problems, run_in_threads(work)):
        want = reference.fused_moe_forward(*args, 2, True)
        for out in outs:
            assert_close(out, want)


def test_threads_compiling_the_same_new_kernel(rng):
    """First use of a kernel specialisation from four threads at once (cache + compiler)."""
    from conftest import BF16

    gates = [normal(np.random.default_rng(i), (5, 21)) for i in range(4)]
    ups = [normal(np.random.default_rng(10 + i), (5, 21), BF16) for i in range(4)]
    wants = []
    for g, u in zip(gates, ups):
        w = g.copy()
        reference.silu_and_mul_moe(w, u)
        wants.append(w)
    run_in_threads(lambda i: dpmoe.silu_and_mul_moe(gates[i], ups[i]))
    for g, w in zip(gates, wants):
        assert_close(g, w)


@needs_device
def test_threads_with_their_own_queues(rng):
    import dpctl
    import dpnp

    problems = [problem(np.random.default_rng(i), num_tokens=7) for i in range(4)]

    def work(i):
        queue = dpctl.SyclQueue()
        args = [dpnp.asarray(a, sycl_queue=queue) for a in problems[i]]
        out = dpmoe.fused_moe_forward(*args)
        assert out.sycl_queue == queue
        return out.asnumpy()

    for args, out in zip(problems, run_in_threads(work)):
        assert_close(out, reference.fused_moe_forward(*args, 2, True))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
def test_weights_summing_to_zero_give_nan_under_renormalize(rng, grouped):
    """0/0 is NaN for that token alone (it was whatever the output memory held)."""
    x, gate, up, down, weights, ids = problem(rng, num_tokens=5)
    weights[2] = 0.0
    for _ in range(2):  # the old garbage changed between calls
        out = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, use_grouped_topk=grouped)
        assert np.isnan(out[2]).all()
        keep = [0, 1, 3, 4]
        want = reference.fused_moe_forward(x[keep], gate, up, down, weights[keep], ids[keep])
        assert_close(out[keep], want)


def test_topk_sigmoid_of_all_zero_chosen_scores_is_nan_under_renormalize():
    logits = np.full((3, 4), -200.0, np.float32)  # sigmoid(-200) is 0 in float32
    logits[1] = [0.0, 1.0, 2.0, 3.0]
    weights, ids = dpmoe.topk_sigmoid(logits, 2, renormalize=True)
    with np.errstate(invalid="ignore"):
        want_w, want_ids = reference.topk_sigmoid(logits, 2, True)
    np.testing.assert_array_equal(ids, want_ids)
    assert np.isnan(weights[[0, 2]]).all() and np.isnan(want_w[[0, 2]]).all()
    assert_close(weights[1], want_w[1])
