import numpy as np
import pytest
from conftest import DTYPE_IDS, DTYPES, assert_close, needs_device, normal, routing, to_dpnp

import dpmoe
from dpmoe import reference

# (T, H, I, E, top_k, skew), each row there for a reason
CASES = [
    (1, 33, 17, 4, 2, None),  # one token; H, I odd
    (3, 24, 40, 8, 2, None),  # tokens < experts
    (37, 65, 23, 5, 1, None),  # top_k = 1, nothing a multiple of a block or group
    (9, 16, 16, 3, 3, None),  # top_k = E
    (40, 32, 24, 6, 1, "one"),  # every token to one expert
    (30, 20, 12, 10, 2, "half"),  # half the experts get no token
]
CASE_IDS = ["T1", "T<E", "k1-odd", "k=E", "one-expert", "idle-experts"]


def make_problem(rng, num_tokens, hidden, inter, num_experts, top_k, skew, dtype):
    x = normal(rng, (num_tokens, hidden), dtype)
    gate = normal(rng, (num_experts, hidden, inter), dtype, scale=hidden**-0.5)
    up = normal(rng, (num_experts, hidden, inter), dtype, scale=hidden**-0.5)
    down = normal(rng, (num_experts, inter, hidden), dtype, scale=inter**-0.5)
    weights, ids = routing(rng, num_tokens, num_experts, top_k, skew)
    return x, gate, up, down, weights, ids


class TestFusedMoE:
    def test_basic_fused_moe_forward(self, rng):
        """The seed's usage example, scaled down: 32 experts, top-2, bfloat16."""
        x, gate, up, down, weights, ids = make_problem(rng, 64, 128, 96, 32, 2, None, np.float32)
        args = [a.astype(dpmoe.arrays.BFLOAT16) for a in (x, gate, up, down)]
        out = dpmoe.fused_moe_forward(*args, weights, ids, top_k=2, renormalize=True)
        assert out.shape == (64, 128) and out.dtype == args[0].dtype
        assert_close(out, reference.fused_moe_forward(*args, weights, ids, 2, True))

    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
    @pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
    def test_matches_reference(self, rng, dtype, grouped, case):
        x, gate, up, down, weights, ids = make_problem(rng, *case, dtype)
        top_k = case[4]
        out = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, top_k=top_k,
                                      renormalize=True, use_grouped_topk=grouped)
        assert_close(out, reference.fused_moe_forward(x, gate, up, down, weights, ids, top_k, True))

    @pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
    def test_without_renormalize(self, rng, grouped):
        x, gate, up, down, weights, ids = make_problem(rng, 11, 24, 16, 4, 2, None, np.float32)
        out = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, 2, renormalize=False,
                                      use_grouped_topk=grouped)
        assert_close(out, reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, False))

    def test_paths_agree_and_repeat_bit_identically(self, rng):
        problem = make_problem(rng, 17, 48, 40, 6, 2, None, np.float32)
        grouped = dpmoe.fused_moe_forward(*problem, use_grouped_topk=True)
        per_token = dpmoe.fused_moe_forward(*problem, use_grouped_topk=False)
        assert_close(per_token, grouped)
        np.testing.assert_array_equal(dpmoe.fused_moe_forward(*problem, use_grouped_topk=True), grouped)
        np.testing.assert_array_equal(dpmoe.fused_moe_forward(*problem, use_grouped_topk=False), per_token)

    def test_bf16_weights_with_f32_activations(self, rng):
        x, gate, up, down, weights, ids = make_problem(rng, 5, 32, 24, 4, 2, None, np.float32)
        w16 = [a.astype(dpmoe.arrays.BFLOAT16) for a in (gate, up, down)]
        for grouped in (True, False):
            out = dpmoe.fused_moe_forward(x, *w16, weights, ids, use_grouped_topk=grouped)
            assert out.dtype == np.float32
            assert_close(out, reference.fused_moe_forward(x, *w16, weights, ids, 2, True))

    @pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
    def test_inplace_numpy(self, rng, grouped):
        x, gate, up, down, weights, ids = make_problem(rng, 8, 20, 12, 4, 2, None, np.float32)
        want = reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, True)
        result = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, inplace=True,
                                         use_grouped_topk=grouped)
        assert result is x
        assert_close(x, want)

    def test_inplace_failure_leaves_input_untouched(self, rng):
        x, gate, up, down, weights, ids = make_problem(rng, 8, 20, 12, 4, 2, None, np.float32)
        before = x.copy()
        ids[3, 1] = 4  # out of range for E = 4
        with pytest.raises(ValueError, match="topk_indices"):
            dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, inplace=True)
        np.testing.assert_array_equal(x, before)

    def test_zero_tokens(self, rng):
        x, gate, up, down, weights, ids = make_problem(rng, 0, 20, 12, 4, 2, None, np.float32)
        for grouped in (True, False):
            out = dpmoe.fused_moe_forward(x, gate, up, down, weights, ids, use_grouped_topk=grouped)
            assert out.shape == (0, 20)

    def test_int64_ids_accepted(self, rng):
        x, gate, up, down, weights, ids = make_problem(rng, 6, 16, 8, 3, 2, None, np.float32)
        assert_close(dpmoe.fused_moe_forward(x, gate, up, down, weights, ids.astype(np.int64)),
                     reference.fused_moe_forward(x, gate, up, down, weights, ids, 2, True))


@needs_device
class TestFusedMoEDevice:
    @pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
    @pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "per-token"])
    def test_dpnp_in_dpnp_out(self, rng, dtype, grouped):
        problem = make_problem(rng, 7, 24, 16, 5, 2, None, dtype)
        device_args = [to_dpnp(a) for a in problem]
        out = dpmoe.fused_moe_forward(*device_args, use_grouped_topk=grouped)
        assert out.sycl_queue == device_args[0].sycl_queue
        assert_close(dpmoe.arrays.to_host(out), reference.fused_moe_forward(*problem, 2, True))

    def test_dpnp_inplace(self, rng):
        problem = make_problem(rng, 7, 24, 16, 5, 2, None, np.float16)
        x = to_dpnp(problem[0])
        result = dpmoe.fused_moe_forward(x, *[to_dpnp(a) for a in problem[1:]], inplace=True)
        assert result is x
        assert_close(x.asnumpy(), reference.fused_moe_forward(*problem, 2, True))

    @pytest.mark.parametrize("dtype", [np.float32, dpmoe.arrays.BFLOAT16], ids=["f32", "bf16"])
    def test_host_onemkl_gemm_path_agrees_with_the_dpnp_matmul_path(self, rng, monkeypatch, dtype):
        from dpmoe import onemkl_host

        problem = make_problem(rng, 50, 64, 48, 6, 2, None, dtype)
        queue = dpmoe.device.default_queue()[0]
        if not onemkl_host.available(queue):
            pytest.skip("no in-place host oneMKL GEMM on this device")
        with_mkl = dpmoe.fused_moe_forward(*problem)
        monkeypatch.setenv("DPMOE_NO_HOST_ONEMKL", "1")
        with_dpnp = dpmoe.fused_moe_forward(*problem)
        want = reference.fused_moe_forward(*problem, 2, True)
        assert_close(with_mkl, want)
        assert_close(with_dpnp, want)

    def test_arrays_on_two_queues_are_refused(self, rng):
        import dpctl
        import dpnp

        problem = make_problem(rng, 4, 8, 8, 2, 1, None, np.float32)
        q1, q2 = dpctl.SyclQueue(), dpctl.SyclQueue()
        x = dpnp.asarray(problem[0], sycl_queue=q1)
        rest = [dpnp.asarray(a, sycl_queue=q2) for a in problem[1:]]
        with pytest.raises(ValueError, match="same SYCL queue"):
            dpmoe.fused_moe_forward(x, *rest, top_k=1)
