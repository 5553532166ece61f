"""Expert parallelism with dpmoe: one MoE layer's experts spread over the ranks of an MPI job.

Run it with the MPI of the ``mpi`` extra (``pip install "dpmoe[mpi]"``)::

    mpiexec -n 2 python -m mpi4py notebooks/expert_parallel.py

(``python -m mpi4py`` makes an uncaught exception on one rank end the whole job.) Every
rank builds the same layer, keeps only its experts, and runs a forward on its own tokens;
rank 0 then checks the result against the single-process layer and prints where the time
went and what was exchanged.
"""

import warnings

import numpy as np
from mpi4py import MPI

import dpmoe
from dpmoe.distributed import ExpertParallelMoE

warnings.simplefilter("ignore", dpmoe.tuning.DefaultConfigWarning)
comm = MPI.COMM_WORLD

# An OLMoE-like block at a quarter of its width: 64 experts, top-8, bfloat16 weights.
# The same seed on every rank gives every rank the same weights; each keeps its experts.
layer = dpmoe.MoELayer(512, 256, 64, top_k=8, dtype="bfloat16", seed=0)
ep = ExpertParallelMoE.from_layer(layer, comm=comm)
held = ep.held_experts
print(f"rank {comm.rank}/{comm.size} on {ep.device}: experts {held[0]}..{held[-1]} "
      f"({len(held)} of {ep.num_experts})", flush=True)

# Each rank brings its own tokens, as many as it has (here 16 per rank).
rng = np.random.default_rng(comm.rank)
x = rng.standard_normal((16, 512), dtype=np.float32).astype(dpmoe.arrays.BFLOAT16)
ep(x, path="per_token")  # the first call compiles the kernels
ep.reset_stats()
y = ep(x, path="per_token")

everything = comm.gather((x, y), root=0)
stats = comm.gather(ep.stats, root=0)
if comm.rank == 0:
    xs = np.concatenate([a for a, _ in everything])
    ys = np.concatenate([b for _, b in everything])
    same = np.array_equal(ys.view(np.uint16), layer(xs, path="per_token").view(np.uint16))
    print(f"{len(xs)} tokens over {comm.size} rank(s): "
          + ("bit-identical to the single-process layer" if same else "DIFFERS from the single-process layer"))
    for rank, s in enumerate(stats):
        stages = ", ".join(f"{k} {s[k] * 1e3:.2f} ms" for k in dpmoe.distributed.STAGES)
        print(f"  rank {rank}: {stages}; sent {s['bytes_sent'] / 1e3:.0f} kB, "
              f"received {s['bytes_received'] / 1e3:.0f} kB")
    if not same:
        raise SystemExit(1)
