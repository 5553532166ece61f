"""The expert-parallel cases, run on every rank by ``mpiexec -n N python -m mpi4py
tests/ep_worker.py CASE...`` (tests/test_distributed.py launches it).

Every rank builds the same single-process MoELayer (same seed) and the same global batch;
rank r takes its slice (sizes differ, some ranks get none), the ExpertParallelMoE output
is gathered on rank 0 and compared with the single-process layer there. Rank 0 prints one
line per case: ``CASE <name> OK`` or ``CASE <name> FAIL <why>``.
"""

import json
import os
import sys
import traceback
import warnings

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(__file__))
warnings.simplefilter("ignore")  # DefaultConfigWarning, fallback notices

import dpmoe  # noqa: E402
from dpmoe.distributed import ExpertParallelMoE, contiguous_placement  # noqa: E402
from conftest import BF16, assert_close  # noqa: E402

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.rank, COMM.size


def split(num_tokens, seed):
    """Uneven token counts per rank summing to num_tokens; rank 1 (if any) gets none."""
    rng = np.random.default_rng(seed)
    weights = rng.random(SIZE) + 0.2
    if SIZE > 1:
        weights[1] = 0.0
    counts = np.floor(weights / weights.sum() * num_tokens).astype(int)
    counts[0] += num_tokens - counts.sum()
    bounds = np.concatenate(([0], np.cumsum(counts)))
    return bounds[RANK], bounds[RANK + 1]


def gathered(y):
    """Every rank's rows stacked on rank 0 (in rank order)."""
    parts = COMM.gather(np.asarray(y), root=0)
    return np.concatenate(parts) if RANK == 0 else None


def layer_for(dtype, shared=True, experts=7, hidden=72, inter=40, top_k=2, **extra):
    return dpmoe.MoELayer(hidden, inter, experts, top_k=top_k, dtype=dtype, seed=11,
                          shared_expert_intermediate_size=24 if shared else 0, **extra)


def tokens(n, hidden, dtype, seed=5):
    x = np.random.default_rng(seed).standard_normal((n, hidden), dtype=np.float32)
    return x.astype(dtype)


def compare(got, want, exact, dtype):
    if RANK != 0:
        return
    if exact:
        same = got.view(np.uint8) == want.view(np.uint8)
        if not same.all():
            rows = np.flatnonzero(~same.reshape(len(got), -1).all(axis=1))
            raise AssertionError(f"not bit-identical: {len(rows)} of {len(got)} rows differ, "
                                 f"max |diff| {np.abs(got.astype(np.float32) - want.astype(np.float32)).max():.3e}")
    else:
        assert_close(got, want, dtype)


def case_forward(dtype, path):
    layer = layer_for(dtype)
    ep = ExpertParallelMoE.from_layer(layer)
    x = tokens(37, layer.hidden_size, dtype)
    lo, hi = split(len(x), 1)
    y = ep(x[lo:hi], path=path)
    assert y.dtype == x.dtype and y.shape == (hi - lo, layer.hidden_size)
    got = gathered(y)
    want = layer(x, path=path) if RANK == 0 else None
    compare(got, want, exact=path == "per_token", dtype=x.dtype)


def case_replies_in_token_dtype():
    """replies="tokens": expert outputs travel back as bf16, within bf16 of the layer; the
    host path the same way."""
    layer = layer_for(BF16, experts=6)
    ep = ExpertParallelMoE.from_layer(layer, replies="tokens")
    x = tokens(29, layer.hidden_size, BF16, seed=12)
    lo, hi = split(len(x), 7)
    before = dict(ep.stats)
    got = gathered(ep(x[lo:hi], path="per_token"))
    compare(got, layer(x, path="per_token") if RANK == 0 else None, False, BF16)
    got = gathered(ep.reference(x[lo:hi]))
    compare(got, layer.reference(x) if RANK == 0 else None, False, BF16)
    received = ep.stats["bytes_received"] - before["bytes_received"]
    sent_slots = ep.stats["slots_sent"] - before["slots_sent"]
    received_slots = ep.stats["slots_received"] - before["slots_received"]
    row = layer.hidden_size * 2  # a bf16 row, both ways
    assert received == received_slots * (row + 4) + sent_slots * row, (received, row)


def case_quantized_experts():
    """Quantized experts (mxfp4 codes and scales) are sharded like float ones."""
    from dpmoe import quant

    base = layer_for(BF16, experts=5, hidden=64, inter=64)
    a = base.arguments()
    q = {k: quant.quantize(a[k].astype(np.float32), "mxfp4") for k in ("gate", "up", "down")}
    layer = dpmoe.MoELayer.from_numpy(**dict(a, **q))
    ep = ExpertParallelMoE.from_layer(layer)
    x = tokens(13, 64, BF16, seed=4)
    lo, hi = split(len(x), 8)
    got = gathered(ep(x[lo:hi], path="per_token"))
    compare(got, layer(x, path="per_token") if RANK == 0 else None, True, BF16)


def case_given_routing_one_rank():
    """experts() with every slot on the last rank's experts; the other experts get none."""
    layer = layer_for("float32", shared=False, experts=9)
    placement = contiguous_placement(9, SIZE)
    ep = ExpertParallelMoE.from_layer(layer, placement=placement)
    target = np.flatnonzero(placement == SIZE - 1)
    x = tokens(23, layer.hidden_size, np.float32, seed=8)
    rng = np.random.default_rng(3)
    ids = np.stack([rng.permutation(target)[:2] if len(target) > 1 else np.repeat(target, 2)
                    for _ in range(len(x))]).astype(np.int32)
    weights = rng.random(ids.shape, dtype=np.float32)
    lo, hi = split(len(x), 2)
    got = gathered(ep.experts(x[lo:hi], weights[lo:hi], ids[lo:hi], path="per_token"))
    want = layer.experts(x, weights, ids, path="per_token") if RANK == 0 else None
    compare(got, want, exact=True, dtype=np.float32)


def case_placement_and_dpnp():
    """A scattered expert -> rank map, routing by sigmoid groups with a bias, dpnp in/out."""
    import dpnp

    rng = np.random.default_rng(4)
    experts = 8
    placement = np.arange(experts) % SIZE
    rng.shuffle(placement)
    layer = dpmoe.MoELayer.from_numpy(
        **{k: v for k, v in layer_for("float32", experts=experts, top_k=3).arguments().items()
           if k not in ("top_k", "scoring", "num_expert_group", "topk_group", "held_experts",
                        "routed_scaling_factor")},
        top_k=3, scoring="sigmoid", num_expert_group=4, topk_group=2, routed_scaling_factor=2.5,
        correction_bias=rng.standard_normal(experts).astype(np.float32))
    ep = ExpertParallelMoE.from_layer(layer, placement=placement)
    x = tokens(19, layer.hidden_size, np.float32, seed=9)
    lo, hi = split(len(x), 5)
    y = ep(dpnp.asarray(x[lo:hi]), path="per_token")
    assert isinstance(y, dpnp.ndarray)
    got = gathered(dpnp.asnumpy(y))
    compare(got, layer(x, path="per_token") if RANK == 0 else None, True, np.float32)


def case_reference():
    """The host path (NumPy math, the same exchange) against the single-process oracle."""
    layer = layer_for(BF16)
    ep = ExpertParallelMoE.from_layer(layer)
    x = tokens(21, layer.hidden_size, BF16, seed=6)
    lo, hi = split(len(x), 6)
    got = gathered(ep.reference(x[lo:hi]))
    compare(got, layer.reference(x) if RANK == 0 else None, False, BF16)


def case_refusals():
    """A bad input on one rank, or dtypes that differ between ranks: every rank raises, no
    rank waits, and the layer works afterwards."""
    layer = layer_for("float32", shared=False)
    ep = ExpertParallelMoE.from_layer(layer)
    x = tokens(4, layer.hidden_size, np.float32)
    bad = x.copy()
    if RANK == SIZE - 1:
        bad[0, 0] = np.nan
    raised = None
    try:
        ep(bad)
    except (ValueError, RuntimeError) as exc:
        raised = type(exc).__name__
    want = "ValueError" if RANK == SIZE - 1 else "RuntimeError"
    if SIZE == 1:
        want = "ValueError"
    assert raised == want, (raised, want)
    if SIZE > 1:
        mixed = x.astype(BF16) if RANK == 0 else x
        try:
            ep(mixed)
            raise AssertionError("mixed dtypes were accepted")
        except ValueError as exc:
            assert "one dtype on every rank" in str(exc), exc
    compare(gathered(ep(x, path="per_token")),
            np.concatenate([layer(x, path="per_token")] * SIZE) if RANK == 0 else None,
            True, np.float32)


def case_bad_construction():
    """A placement that leaves a rank empty is refused on every rank alike."""
    layer = layer_for("float32", shared=False, experts=SIZE + 1)
    placement = np.zeros(SIZE + 1, np.int32)
    try:
        ExpertParallelMoE.from_layer(layer, placement=placement)
        assert SIZE == 1, "an empty rank was accepted"
    except ValueError as exc:
        assert "without an expert" in str(exc), exc


def refused(build):
    """The error ``build()`` raises (it must raise: on every rank, none waiting)."""
    try:
        build()
    except (ValueError, TypeError, RuntimeError, MemoryError) as exc:
        return exc
    raise AssertionError("accepted")


def case_construction_refusals():
    """Bad construction arguments on one rank, or replicated parts that differ between
    ranks: every rank raises, then the ranks build a layer together as usual."""
    layer = layer_for("float32", experts=6)
    last = RANK == SIZE - 1
    exc = refused(lambda: ExpertParallelMoE.from_layer("not a layer" if last else layer))
    assert isinstance(exc, TypeError if last or SIZE == 1 else RuntimeError), exc
    a = layer.arguments()
    router, gate, up, down = (a.pop(k) for k in ("router", "gate", "up", "down"))
    a.pop("held_experts")
    exc = refused(lambda: ExpertParallelMoE.from_numpy(
        router, gate, None if last else up, down, **a))
    if last or SIZE == 1:
        assert isinstance(exc, TypeError) and "up must be an array" in str(exc), exc
    # replicated parts that differ: a router bias on one rank only, other shared weights
    if SIZE > 1:
        bias = np.ones(6, np.float32) if RANK == 0 else None
        exc = refused(lambda: ExpertParallelMoE.from_numpy(
            router, gate, up, down, **dict(a, router_bias=bias)))
        assert isinstance(exc, ValueError) and "router or correction bias, shared" in str(exc), exc
        shared = a["shared_up_proj"] * (1 + RANK)
        exc = refused(lambda: ExpertParallelMoE.from_numpy(
            router, gate, up, down, **dict(a, shared_up_proj=shared)))
        assert isinstance(exc, ValueError), exc
    # all experts given to the shard constructor: told what to pass
    if SIZE > 1:
        exc = refused(lambda: ExpertParallelMoE(router, gate, up, down, **a))
        assert "pass this rank's experts only" in str(exc), exc
    exc = refused(lambda: ExpertParallelMoE.from_numpy(
        router, gate, up, down, **dict(a, gate_bais=None)))
    assert "unknown option(s) gate_bais" in str(exc), exc
    ep = ExpertParallelMoE.from_numpy(router, gate, up, down, **a)
    x = tokens(5, layer.hidden_size, np.float32)
    compare(gathered(ep(x, path="per_token")),
            np.concatenate([layer(x, path="per_token")] * SIZE) if RANK == 0 else None,
            True, np.float32)


def case_row_budget():
    """A chunk budget too small for one row on a path the experts may take is refused
    before the ranks agree (every rank raises, nobody aborts); the output type follows all
    inputs (dpnp ids give a dpnp result)."""
    import dpnp

    layer = layer_for("float16", shared=False)
    ep = ExpertParallelMoE.from_layer(layer)
    x = tokens(4, layer.hidden_size, np.float16)
    w, ids = layer.route(x)
    if ep.queue is None:
        return  # the NumPy fallback has no chunk budget
    os.environ["DPMOE_MAX_INTERMEDIATE_BYTES"] = "5000"
    try:
        exc = refused(lambda: ep.experts(x, w, ids))
        assert isinstance(exc, MemoryError) and "chunk budget" in str(exc), exc
    finally:
        del os.environ["DPMOE_MAX_INTERMEDIATE_BYTES"]
    y = ep.experts(x, w, dpnp.asarray(ids))
    assert isinstance(y, dpnp.ndarray), type(y)


def case_abort():
    """A failure after the ranks agreed (here injected on the last rank) aborts the job."""
    layer = layer_for("float32", shared=False)
    ep = ExpertParallelMoE.from_layer(layer)
    if RANK == SIZE - 1:
        def fail(*args, **kwargs):
            raise MemoryError("injected failure on the last rank")
        ep._run_local = fail
    ep(tokens(3, layer.hidden_size, np.float32))
    print("UNREACHED", flush=True)


def case_exit():
    """The last rank dies while the others enter a forward (they must not wait forever)."""
    layer = layer_for("float32", shared=False)
    ep = ExpertParallelMoE.from_layer(layer)
    if RANK == SIZE - 1:
        os._exit(3)
    ep(tokens(3, layer.hidden_size, np.float32))
    print("UNREACHED", flush=True)


CASES = {
    "forward_f32_per_token": lambda: case_forward(np.float32, "per_token"),
    "forward_bf16_per_token": lambda: case_forward(BF16, "per_token"),
    "forward_f32_grouped": lambda: case_forward(np.float32, "grouped"),
    "forward_bf16_grouped": lambda: case_forward(BF16, "grouped"),
    "given_routing_one_rank": case_given_routing_one_rank,
    "replies_in_token_dtype": case_replies_in_token_dtype,
    "quantized_experts": case_quantized_experts,
    "placement_and_dpnp": case_placement_and_dpnp,
    "reference": case_reference,
    "refusals": case_refusals,
    "bad_construction": case_bad_construction,
    "construction_refusals": case_construction_refusals,
    "row_budget": case_row_budget,
}


def main(names):
    if names in (["abort"], ["exit"]):
        {"abort": case_abort, "exit": case_exit}[names[0]]()
        return
    for name in names:
        try:
            CASES[name]()
            error = None
        except Exception:
            error = traceback.format_exc()
        errors = COMM.gather(error, root=0)
        if RANK == 0:
            bad = [(r, e) for r, e in enumerate(errors) if e]
            print(f"CASE {name} " + ("OK" if not bad else "FAIL " + json.dumps(bad)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(CASES))
