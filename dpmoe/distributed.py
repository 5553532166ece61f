"""Expert parallelism over MPI: one MoE layer's experts spread over the ranks of a
communicator, tokens exchanged with all-to-all.

Each rank holds the router and the shared expert (replicated) and only its own experts, on
its own SYCL device. A forward on a rank routes that rank's tokens, then:

1. one ``Alltoall`` of (status, dtype, slot count) per destination rank: every rank learns
   what it will receive, and all ranks refuse together when one rank's input was bad;
2. one ``Alltoallv`` of the token rows of each slot (tokens in their storage dtype: 16-bit
   floats travel as 16 bits) and one of the slots' expert ids (local to the receiver);
3. the receiver runs its experts on those rows with the fused forward (each row one slot,
   weight 1, output in float32 or, with ``replies="tokens"``, in the tokens' dtype);
4. one ``Alltoallv`` back, in the order the rows came, so a slot's place in the reply says
   which it is (no slot index travels);
5. the source rank sums each token's k expert rows with its routing weights, in slot order,
   with the same reduction kernel as :class:`dpmoe.MoELayer` and adds the shared expert.

Expert outputs come back in float32 by default because the single-process layer sums them
in float32 and rounds once: with the per-token path on both sides the result is then
bit-identical to :class:`dpmoe.MoELayer` on the same tokens. ``replies="tokens"`` sends
them back in the tokens' dtype instead (half the bytes for 16-bit tokens; each slot's
output rounded once more, so within that dtype's rounding of the single-process layer). On CPU devices device memory is host memory, so
MPI reads and writes the device arrays in place; on other devices messages are staged
through host copies.

mpi4py is imported when a layer is built, not with dpmoe (``pip install "dpmoe[mpi]"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

from . import reference, validation
from ._engine import forward
from ._engine.convert import ids_to_device, narrow, weights_to_device, widen
from ._engine.plan import ExecutionPlan, choose
from ._engine.reduce import weighted_sum
from .arrays import HOST_DTYPE, empty, flat, from_device, host_view, to_device, to_host
from .device import dpnp, is_device_array, returns_numpy
from .layer import MoELayer
from .pages import upload

KIND_CODES = {"float32": 1, "float16": 2, "bfloat16": 3}
# where a forward's time goes, in order (``ExpertParallelMoE.stats``): routing and input
# checks, the counts' Alltoall, the rows' and ids' Alltoallv, the local experts, the replies'
# Alltoallv, the weighted sum plus the shared expert. An exchange's time includes waiting
# for the slowest rank to reach it.
STAGES = ("route", "counts", "dispatch", "experts", "return", "combine")
REPLIES = ("float32", "tokens")
# the parts of a layer every rank holds whole (MoELayer's host names)
REPLICATED = ("router", "router_bias", "correction_bias", "shared_gate", "shared_up",
              "shared_down", "shared_expert_gate")
_KIND_NAMES = {code: kind for kind, code in KIND_CODES.items()}


def _mpi() -> Any:
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("dpmoe.distributed needs mpi4py and an MPI library: "
                          'pip install "dpmoe[mpi]" (see the README, "Expert parallelism")'
                          ) from exc
    return MPI


def contiguous_placement(num_experts: int, world_size: int) -> np.ndarray:
    """The default placement: [E] int32 rank of each expert, contiguous ranges whose sizes
    differ by at most one (expert e on rank e*N//E; E=7, N=3: [0, 0, 0, 1, 1, 2, 2])."""
    num_experts = validation.positive_int("num_experts", num_experts)
    world_size = validation.positive_int("world_size", world_size)
    return ((np.arange(num_experts, dtype=np.int64) * world_size) // num_experts).astype(np.int32)


def _placement(placement: Any, num_experts: int, world_size: int) -> np.ndarray:
    """A validated expert -> rank map: every expert on a rank in [0, N), every rank holding
    at least one expert."""
    if placement is None:
        placement = contiguous_placement(num_experts, world_size)
    if is_device_array(placement):
        raise TypeError("placement must be a host sequence of ranks, not a dpnp array")
    ranks = np.asarray(placement)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise TypeError(f"placement must be a 1-D sequence of int ranks, got {ranks.dtype} of "
                        f"shape {ranks.shape}")
    if ranks.shape[0] != num_experts:
        raise ValueError(f"placement must give a rank for each of the {num_experts} experts, "
                         f"got {ranks.shape[0]}")
    if ranks.min() < 0 or ranks.max() >= world_size:
        raise ValueError(f"placement must hold ranks in [0, {world_size}) (the communicator's "
                         f"size), found {int(ranks.min() if ranks.min() < 0 else ranks.max())}")
    empty_ranks = np.setdiff1d(np.arange(world_size), ranks)
    if empty_ranks.size:
        raise ValueError(f"placement leaves rank(s) {empty_ranks.tolist()} without an expert; "
                         "every rank must hold at least one (use fewer ranks)")
    return ranks.astype(np.int32)


def _agree(comm: Any, error: BaseException | None, *values: int) -> np.ndarray:
    """Every rank's (ok, *values) row; raises on every rank when one of them failed, so
    that no rank waits in a collective the failed one never reaches."""
    mine = np.array([0 if error else 1, *values], np.int64)
    rows = np.empty((comm.size, mine.size), np.int64)
    comm.Allgather(mine, rows)
    _stop_together(error, rows[:, 0], "failed")
    return rows


def _stop_together(error: BaseException | None, ok: np.ndarray, what: str) -> None:
    """Raises this rank's ``error``, or a RuntimeError naming the ranks whose ``ok`` flag
    (exchanged by a collective) is 0: every rank stops at the same collective."""
    if error is not None:
        raise error
    failed = np.flatnonzero(ok == 0)
    if failed.size:
        raise RuntimeError(f"ExpertParallelMoE: rank(s) {failed.tolist()} {what} (see their "
                           "errors); this rank stopped with them")


def _ranges(ids: np.ndarray) -> str:
    """``"experts 3..5"`` for a run of ids, else the list."""
    if ids.size and (np.diff(ids) == 1).all():
        return f"experts {ids[0]}..{ids[-1]}"
    return f"experts {ids.tolist()}"


_ROW_TYPES: dict[int, Any] = {}


def _row_type(nbytes: int) -> Any:
    """An MPI datatype of one token row (counts are in rows: no 2**31-element limit)."""
    if nbytes not in _ROW_TYPES:
        _ROW_TYPES[nbytes] = _mpi().BYTE.Create_contiguous(nbytes).Commit()
    return _ROW_TYPES[nbytes]


def _displacements(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


def _refuse_unsupported(gate: Any, options: dict) -> None:
    """The MoELayer options expert parallelism does not run yet, refused by name."""
    validation.options("ExpertParallelMoE", options, MoELayer.OPTIONS)
    given = [name for name, used in (
        ("identity_experts", options.get("identity_experts", 0) not in (0, None)),
        ("weights_on_input", bool(options.get("weights_on_input", False))),
        ("output_bias", options.get("output_bias") is not None),
        ("non-gated experts (gate=None)", gate is None)) if used]
    if given:
        raise ValueError(f"ExpertParallelMoE does not support {', '.join(given)} yet")


class ExpertParallelMoE(MoELayer):
    """An MoE block whose experts are spread over the ranks of an MPI communicator (see the
    module docstring). Every rank builds it (a collective) and calls it (a collective) on its
    own tokens; ranks may have different numbers of tokens, none included.

    Built from this rank's shard: ``router`` [H, E] (the same on every rank), ``gate``/``up``
    [E_r, H, I] and ``down`` [E_r, I, H] of the experts ``placement`` gives this rank, in
    increasing id order (with their biases [E_r, I] / [E_r, H] if any). Use
    :meth:`from_numpy` when every rank can read all experts' weights (each keeps its own)
    and :meth:`from_layer` to spread an existing :class:`dpmoe.MoELayer`.

    Args:
        comm: an mpi4py communicator (default ``MPI.COMM_WORLD``).
        placement: [E] rank of each expert (default :func:`contiguous_placement`); every
            rank must hold at least one expert.
        replies: "float32" (default; bit-identical to the single-process layer on the
            per-token path) or "tokens" (expert outputs travel back in the tokens' dtype:
            half the return bytes for 16-bit tokens, one more rounding per slot).
        device: this rank's device (dpctl filter string, SyclDevice or SyclQueue; default:
            the default device). On one machine, one CPU device per rank (not a
            sub-device: numba-dpex 0.23 launches kernels on root devices only).
        top_k, renormalize, options: as :meth:`dpmoe.MoELayer.from_numpy` (except
            ``held_experts``, which the placement decides).
    """

    def __init__(self, router: Any, gate: Any, up: Any, down: Any, top_k: int = 2,
                 renormalize: bool = True, *, comm: Any = None, placement: Any = None,
                 replies: str = "float32", device: Any = None, **options: Any) -> None:
        # its own communicator: dpmoe's collectives never meet the caller's messages
        self.comm = (_mpi().COMM_WORLD if comm is None else comm).Dup()
        self.replies = replies
        error = None
        fingerprint = 0
        try:
            if replies not in REPLIES:
                raise ValueError(f"replies must be one of {REPLIES}, got {replies!r}")
            if "held_experts" in options:
                raise TypeError("ExpertParallelMoE takes no held_experts: the placement says "
                                "which experts a rank holds")
            _refuse_unsupported(gate, options)
            validation.float_array("router", router, 2)
            self.placement = _placement(placement, router.shape[1], self.comm.size)
            held = np.flatnonzero(self.placement == self.comm.rank).astype(np.int32)
            given = (gate if validation.quantized(gate) else validation.array("gate", gate, 3)
                     ).shape[0]
            if given != held.size:
                raise ValueError(
                    f"gate holds {given} experts but the placement gives rank "
                    f"{self.comm.rank} {held.size} ({_ranges(held)}): pass this rank's experts "
                    "only, or all of them to ExpertParallelMoE.from_numpy")
            self._setup(router, gate, up, down, top_k, renormalize, device, held_experts=held,
                        **options)
            self._rows_held = np.zeros(self.num_experts, np.int32)  # global -> owner's local id
            for rank in range(self.comm.size):
                mine = self.placement == rank
                self._rows_held[mine] = np.arange(int(mine.sum()), dtype=np.int32)
            fingerprint = self._fingerprint()
        except Exception as exc:  # the other ranks learn of it below instead of waiting
            error = exc
        self.reset_stats()
        rows = _agree(self.comm, error, fingerprint)
        differs = np.flatnonzero(rows[:, 1] != rows[0, 1])
        if differs.size:
            raise ValueError(
                f"ExpertParallelMoE: rank(s) {differs.tolist()} were given another router, "
                "router or correction bias, shared expert, placement, expert shape, dtype or "
                "routing than rank 0; every rank must build the same layer")

    @classmethod
    def from_numpy(cls, router: Any, gate: Any, up: Any, down: Any, top_k: int = 2,
                   renormalize: bool = True, device: Any = None, *, comm: Any = None,
                   placement: Any = None, replies: str = "float32", **options: Any
                   ) -> "ExpertParallelMoE":
        """From all experts' weights (router [H, E], gate/up [E, H, I], down [E, I, H],
        biases [E, ...]; host arrays, memory-mapped ones too): each rank copies only the
        experts ``placement`` gives it. Other arguments as the constructor."""
        comm = _mpi().COMM_WORLD if comm is None else comm
        _refuse_unsupported(gate, options)
        return cls._collectively_built(comm, lambda: cls._sliced(
            comm, router, gate, up, down, top_k, renormalize, device, placement, replies,
            options))

    @classmethod
    def _sliced(cls, comm: Any, router: Any, gate: Any, up: Any, down: Any, top_k: int,
                renormalize: bool, device: Any, placement: Any, replies: str,
                options: dict) -> tuple:
        """The constructor's arguments for this rank, cut from all experts' weights."""
        validation.float_array("router", router, 2)
        num_experts = router.shape[1]
        held = np.flatnonzero(_placement(placement, num_experts, comm.size) == comm.rank)
        shard = {}
        for name, a in dict(gate=gate, up=up, down=down, gate_bias=options.get("gate_bias"),
                            up_bias=options.get("up_bias"),
                            down_bias=options.get("down_bias")).items():
            if a is None and name in ("gate", "up", "down"):
                raise TypeError(f"{name} must be an array of every expert's weights, got None")
            if a is None:
                continue
            if is_device_array(a):
                raise TypeError(f"{name} must be a host array (NumPy, memory-mapped too) for "
                                "from_numpy, which copies each rank's experts to its device; "
                                "got a dpnp array")
            if not validation.quantized(a):
                validation.array(name, a, 3 if name in ("gate", "up", "down") else 2)
            if a.shape[0] != num_experts:
                raise ValueError(f"{name} must have one entry per expert of the router "
                                 f"({num_experts}), got {a.shape[0]}")
            shard[name] = a[held]
        options = dict(options, **{k: v for k, v in shard.items() if k.endswith("_bias")})
        return (router, shard["gate"], shard["up"], shard["down"], top_k, renormalize), dict(
            comm=comm, placement=placement, replies=replies, device=device, **options)

    @classmethod
    def _collectively_built(cls, comm: Any, arguments: Callable[[], tuple]
                            ) -> "ExpertParallelMoE":
        """The layer from ``arguments()`` (positional, keywords), made on every rank; when
        they fail on one rank, every rank raises (no rank waits for the failed one)."""
        error, made = None, None
        try:
            made = arguments()
        except Exception as exc:
            error = exc
        _agree(comm, error)
        return cls(*made[0], **made[1])

    @classmethod
    def from_layer(cls, layer: MoELayer, *, comm: Any = None, placement: Any = None,
                   replies: str = "float32", device: Any = None) -> "ExpertParallelMoE":
        """The experts of ``layer`` (an :class:`dpmoe.MoELayer` holding every expert, the same
        on every rank, e.g. built with the same seed) spread over ``comm``."""
        comm = _mpi().COMM_WORLD if comm is None else comm

        def arguments() -> tuple:
            if not isinstance(layer, MoELayer):
                raise TypeError(f"layer must be a dpmoe.MoELayer, got {type(layer).__name__}")
            args = layer.arguments()
            if args.pop("held_experts") is not None:
                raise ValueError("layer must hold every expert (it is a shard)")
            weights = [args.pop(k) for k in ("router", "gate", "up", "down", "top_k",
                                            "renormalize")]
            _refuse_unsupported(weights[1], args)
            return cls._sliced(comm, *weights, device, placement, replies, args)

        return cls._collectively_built(comm, arguments)

    def reset_stats(self) -> None:
        """Zeroes :attr:`stats`: seconds per stage (:data:`STAGES`), calls, slots and bytes
        this rank sent to and received from other ranks (token rows, expert ids, replies)."""
        self.stats: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.stats.update(calls=0, slots_sent=0, slots_received=0, bytes_sent=0,
                          bytes_received=0)

    def _tick(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.stats[stage] += now - start
        return now

    # -- collectives --------------------------------------------------------------------

    def _fingerprint(self) -> int:
        """What must agree between ranks, hashed: the replicated arrays (router and its
        bias, correction bias, shared expert and its gate; each or its absence), placement,
        shapes, dtype, routing and expert options."""
        h = hashlib.blake2b(digest_size=7)
        for name in REPLICATED:
            a = self._given[name]
            a = a if a is None else to_host(a)
            h.update(name.encode() + (b"-" if a is None else np.ascontiguousarray(a).tobytes()))
        h.update(self.placement.tobytes())
        h.update(repr((self.hidden_size, self.intermediate_size, self.kind, self.routing,
                       self.activation, self._alpha, self._limit, self.replies)).encode())
        return int.from_bytes(h.digest(), "little")

    def _after_agreement(self, step: Callable[[], Any]) -> Any:
        """Runs a step that follows the ranks' agreement on their inputs. A failure there
        (out of memory, a bug) would leave the other ranks waiting in the next collective,
        so it aborts the job (with more than one rank)."""
        if self.comm.size == 1:
            return step()
        try:
            return step()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            self.comm.Abort(1)
            raise  # Abort does not return; kept for readers and for tests that mock it

    def _exchange_counts(self, error: BaseException | None, kind: str, dest: np.ndarray
                         ) -> np.ndarray:
        """Step 1: slots to send per rank -> slots to receive per rank. Raises on every rank
        when a rank's input was refused or the ranks' token dtypes differ."""
        size = self.comm.size
        send = np.zeros((size, 3), np.int64)
        send[:, 0] = 0 if error else 1
        send[:, 1] = KIND_CODES.get(kind, 0)
        if error is None:
            send[:, 2] = np.bincount(dest, minlength=size)
        recv = np.empty_like(send)
        self.comm.Alltoall(send, recv)
        _stop_together(error, recv[:, 0], "refused their input")
        if (recv[:, 1] != recv[0, 1]).any():
            kinds = ", ".join(f"rank {r} {_KIND_NAMES[int(c)]}" for r, c in enumerate(recv[:, 1]))
            raise ValueError(f"hidden_states must have one dtype on every rank: {kinds}")
        return recv[:, 2]

    def _alltoallv(self, send: np.ndarray, send_counts: np.ndarray, recv: np.ndarray,
                   recv_counts: np.ndarray) -> None:
        """Rows of ``send`` (grouped by destination) to ``recv`` (grouped by source)."""
        row = send.dtype.itemsize * int(np.prod(send.shape[1:], dtype=np.int64))
        kind = _row_type(row)
        self.comm.Alltoallv([send, (send_counts, _displacements(send_counts)), kind],
                            [recv, (recv_counts, _displacements(recv_counts)), kind])

    # -- the forward ----------------------------------------------------------------------

    def __call__(self, hidden_states: Any, *, path: str = "auto") -> Any:
        """This rank's tokens ``hidden_states`` [T, H] (float32/float16/bfloat16, the same
        dtype on every rank) -> [T, H] of that dtype. A collective: every rank calls it.
        ``path`` chooses how each rank runs its experts ("auto", "grouped", "per_token")."""
        return self._forward(hidden_states, None, path)

    def experts(self, hidden_states: Any, topk_weights: Any, topk_ids: Any, *,
                path: str = "auto") -> Any:
        """The routed experts alone on given routing (global ids in [0, E); weights used as
        given), as :meth:`dpmoe.MoELayer.experts`, over all ranks' experts. A collective."""
        return self._forward(hidden_states, (topk_weights, topk_ids), path)

    def reference(self, hidden_states: Any) -> np.ndarray:
        """The same block with NumPy math on each rank (its oracle), exchanged the same way.
        A collective."""
        return self._forward(hidden_states, None, "auto", on_host=True)

    def plan(self, num_tokens: int, hidden_dtype: Any = None, path: str = "auto"
             ) -> ExecutionPlan | None:
        """How this rank runs its experts on ``num_tokens`` received rows (one slot each).
        With ``path="auto"`` the path is the one a call of as many tokens of top_k slots
        would take (the tuned configs are per token of top_k slots)."""
        num_tokens = validation.positive_int("num_tokens", num_tokens, 0)
        x_kind = self.tokens_kind(hidden_dtype)
        path = validation.execution_path(path)
        if self.queue is None:
            return None
        shape, trans = self._experts.shape, self._experts.trans
        if path != "auto":
            return choose(self.queue, num_tokens, shape, 1, x_kind, self.kind, path, trans)
        auto = choose(self.queue, -(-num_tokens // self.top_k), shape, self.top_k, x_kind,
                      self.kind, path, trans)
        plan = choose(self.queue, num_tokens, shape, 1, x_kind, self.kind, auto.path, trans)
        return dataclasses.replace(plan, source=auto.source)

    def _forward(self, hidden_states: Any, routing: tuple | None, path: str,
                 on_host: bool = False) -> Any:
        error, kind, dest = None, "", np.zeros(0, np.int64)
        start = time.perf_counter()
        try:
            kind, as_numpy = self._check(hidden_states, finite=routing is None)
            path = validation.execution_path(path)
            num_tokens = hidden_states.shape[0]
            if routing is not None:
                validation.routing_weights("topk_weights", routing[0], (num_tokens, self.top_k))
                validation.expert_ids("topk_ids", routing[1], (num_tokens, self.top_k),
                                      self.num_experts)
                as_numpy = returns_numpy({"hidden_states": hidden_states,
                                          "topk_weights": routing[0], "topk_ids": routing[1]})
            device = self.queue is not None and not on_host
            shared_plan = None
            if device:
                self._check_row_budget(kind, path)
                for name, a in zip(("topk_weights", "topk_ids"), routing or ()):
                    if is_device_array(a) and a.sycl_queue != self.queue:
                        raise ValueError(f"{name} must be on the layer's queue ({self.device})")
                shared_plan = self._checked_plans(hidden_states, kind, path,
                                                  shared=routing is None)[1]
                x = to_device(hidden_states, self.queue)
                x32 = widen(x, kind) if routing is None else None
                weights, ids = self._route(x32) if routing is None else (
                    weights_to_device(routing[0], self.queue), ids_to_device(routing[1], self.queue))
                ids_host = to_host(ids).reshape(-1)
            else:
                x = x32 = to_host(hidden_states)
                weights, ids = (self._reference_route(x) if routing is None
                                else (to_host(routing[0]), to_host(routing[1])))
                ids_host = np.asarray(ids).reshape(-1)
            dest = self.placement[ids_host]
        except Exception as exc:
            error = exc
        routed = time.perf_counter()
        recv_counts = self._exchange_counts(error, kind, dest)
        self._tick("counts", routed)
        self.stats["route"] += routed - start
        return self._after_agreement(lambda: self._dispatch_and_combine(
            x, x32, kind, as_numpy, weights, ids_host, dest, recv_counts, path, device,
            routing is None, shared_plan))

    def _check_row_budget(self, kind: str, path: str) -> None:
        """MemoryError, before the ranks agree, when one received row's intermediates would
        exceed the chunk budget on a path this rank's experts may take (whatever arrives)."""
        for candidate in ("grouped", "per_token") if path == "auto" else (path,):
            plan = choose(self.queue, 1, self._experts.shape, 1, kind, self.kind, candidate,
                          self._experts.trans)
            forward.check_memory(plan, self.queue, "ExpertParallelMoE")

    def _dispatch_and_combine(self, x: Any, x32: Any, kind: str, as_numpy: bool, weights: Any,
                              ids: np.ndarray, dest: np.ndarray, recv_counts: np.ndarray,
                              path: str, device: bool, shared: bool,
                              shared_plan: ExecutionPlan | None) -> Any:
        """Steps 2-5 on agreed inputs: ``x`` [T, H] (storage form on the device, or host),
        ``ids`` [T * k] global expert ids on the host, ``dest`` their ranks."""
        num_tokens, hidden = x.shape
        top_k = self.top_k
        order = np.argsort(dest, kind="stable")  # slots grouped by destination rank
        send_counts = np.bincount(dest, minlength=self.comm.size)
        n_send, n_recv = int(order.size), int(recv_counts.sum())
        queue = self.queue if device else None
        storage = np.dtype(np.float32 if kind == "float32" else np.uint16)
        reply_kind = "float32" if self.replies == "float32" else kind
        reply_storage = np.dtype(np.float32 if reply_kind == "float32" else np.uint16)
        reply_bytes = hidden * reply_storage.itemsize
        if device:
            parts = {"rows sent and received": (n_send + n_recv) * hidden * storage.itemsize,
                     "expert outputs and replies": (n_send + n_recv) * reply_bytes}
            plan = self.plan(n_recv, kind, path)
            forward.check_memory(plan, queue, "ExpertParallelMoE", **{
                k.replace(" ", "_"): v for k, v in parts.items()})

        start = time.perf_counter()
        remote_sent = n_send - int(send_counts[self.comm.rank])
        remote_received = n_recv - int(recv_counts[self.comm.rank])
        row_bytes = hidden * storage.itemsize + 4  # a token row and its expert id
        self.stats["calls"] += 1
        self.stats["slots_sent"] += remote_sent
        self.stats["slots_received"] += remote_received
        self.stats["bytes_sent"] += remote_sent * row_bytes + remote_received * reply_bytes
        self.stats["bytes_received"] += remote_received * row_bytes + remote_sent * reply_bytes

        # 2. token rows and the receivers' expert ids out
        send_host = np.take(self._readable(x, storage), order // top_k, axis=0)
        recv_rows, recv_host = self._buffer((n_recv, hidden), storage, queue)
        self._alltoallv(send_host, send_counts, recv_host, recv_counts)
        recv_ids = np.empty(n_recv, np.int32)
        self._alltoallv(np.ascontiguousarray(self._rows_held[ids[order]]), send_counts,
                        recv_ids, recv_counts)
        if device:
            recv_rows = self._settled(recv_rows, recv_host, queue)
        start = self._tick("dispatch", start)

        # 3. this rank's experts on the rows it got, one slot per row
        outputs = self._run_local(recv_rows if device else recv_host, kind, recv_ids, path,
                                  queue, reply_kind)
        # a view of the device memory on CPU devices: ``outputs`` must outlive it
        outputs_host = self._readable(outputs, reply_storage)  # waits for the device
        start = self._tick("experts", start)

        # 4. expert outputs back, in the order the rows came
        replies, replies_host = self._buffer((n_send, hidden), reply_storage, queue)
        self._alltoallv(outputs_host, recv_counts, replies_host, send_counts)
        start = self._tick("return", start)

        # 5. each token's k rows summed with its weights in slot order, plus the shared expert
        row_of_slot = np.empty(n_send, np.int32)
        row_of_slot[order] = np.arange(n_send, dtype=np.int32)
        if not device:
            rows = replies_host[row_of_slot].view(HOST_DTYPE[reply_kind]).astype(np.float32)
            rows = rows.reshape(num_tokens, top_k, hidden)
            out = reference.moe_sum(rows, np.asarray(weights, np.float32).reshape(num_tokens, top_k))
            if shared:
                out = out + reference.shared_expert(x, self._host, self.activation, self._alpha,
                                                     self._limit)
            out = out.astype(HOST_DTYPE[kind])
            self._tick("combine", start)
            return out
        replies = self._settled(replies, replies_host, queue)
        out_kind = kind if self._shared is None or not shared else "float32"
        out = empty((num_tokens, hidden), out_kind, queue)
        if num_tokens:
            slots = upload(row_of_slot, queue)
            weighted_sum(replies, reply_kind, slots, flat(weights), slots, out, out_kind, top_k,
                         False)
        if shared and self._shared is not None:
            out += self._shared_out(x, kind, x32, shared_plan)
            out = narrow(out, kind)
        out = from_device(out, kind, as_numpy)
        self._tick("combine", start)
        return out

    def _run_local(self, rows: Any, kind: str, ids: np.ndarray, path: str, queue: Any,
                   out_kind: str) -> Any:
        """[R, H] outputs (storage form of ``out_kind``) of this rank's experts, row i through
        expert ``ids[i]``."""
        n_rows = rows.shape[0]
        ones = np.ones((n_rows, 1), np.float32)
        if queue is None:
            h = self._host
            x32 = rows.view(HOST_DTYPE[kind]).astype(np.float32)
            y = reference.fused_moe_forward(
                x32, h["gate"], h["up"], h["down"], ones, ids.reshape(-1, 1), 1, False,
                activation=self.activation, gate_bias=h["gate_bias"], up_bias=h["up_bias"],
                down_bias=h["down_bias"], alpha=self._alpha, limit=self._limit)
            return y.astype(HOST_DTYPE[out_kind])
        plan = self.plan(n_rows, kind, path)
        return forward.run(plan, rows, kind, self._experts, upload(ones, queue),
                           upload(ids.reshape(-1, 1), queue), False, self._options, out_kind)

    @staticmethod
    def _buffer(shape: tuple[int, int], dtype: np.dtype, queue: Any) -> tuple[Any, np.ndarray]:
        """(device array or None, the host memory MPI uses for it): on CPU devices the device
        array's own memory, elsewhere a host staging array; on the host, a NumPy array."""
        if queue is None:
            h = np.empty(shape, dtype)
            return h, h
        d = empty(shape, "float32" if dtype == np.float32 else "bfloat16", queue)
        view = host_view(d)
        return d, view if view is not None else np.empty(shape, dtype)

    @staticmethod
    def _settled(d: Any, host: np.ndarray, queue: Any) -> Any:
        """The device array after MPI wrote ``host``: itself when ``host`` is its memory,
        else the staged rows copied to the device."""
        view = host_view(d)
        if view is not None and (d.size == 0 or view.ctypes.data == host.ctypes.data):
            return d
        return upload(host, queue)

    @staticmethod
    def _readable(a: Any, dtype: np.dtype) -> np.ndarray:
        """Host memory MPI (or NumPy) can read ``a`` from as ``dtype``: a device array's own
        memory on CPU devices, else a host copy; host arrays as they are."""
        if is_device_array(a):
            view = host_view(a)
            a = view if view is not None else dpnp.asnumpy(a)
        return np.ascontiguousarray(a).view(dtype)
