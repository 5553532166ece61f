"""Top-k softmax routing: one work-item per token."""

import math
from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .numerics import loader


@lru_cache(maxsize=None)
def make_topk_softmax_kernel(logits_kind: str):
    load = loader(logits_kind)

    @dpex.kernel
    def topk_softmax_kernel(
        item: kapi.Item,
        logits,  # IN  (T * E) any float kind
        weights,  # OUT (T * k) float32
        ids,  # OUT (T * k) int32
        num_experts,
        top_k,
        renormalize,
    ):
        t = item.get_id(0)
        base = t * num_experts
        largest = load(logits, base)
        for e in range(1, num_experts):
            largest = max(largest, load(logits, base + e))
        total = np.float32(0.0)
        for e in range(num_experts):
            total += math.exp(load(logits, base + e) - largest)
        # k selection passes over the logits; each pass takes the best element strictly
        # after the previous pick in the order (logit descending, index ascending), so ties
        # go to the smaller expert index and nothing needs to be marked as taken
        prev_value = np.float32(np.inf)
        prev_index = -1
        picked_sum = np.float32(0.0)
        for j in range(top_k):
            best_value = np.float32(-np.inf)
            best_index = -1
            for e in range(num_experts):
                v = load(logits, base + e)
                after_prev = v < prev_value or (v == prev_value and e > prev_index)
                if after_prev and (best_index < 0 or v > best_value):
                    best_value = v
                    best_index = e
            w = math.exp(best_value - largest) / total
            weights[t * top_k + j] = w
            ids[t * top_k + j] = best_index
            picked_sum += w
            prev_value = best_value
            prev_index = best_index
        if renormalize != 0:
            for j in range(top_k):
                weights[t * top_k + j] = weights[t * top_k + j] / picked_sum

    def launch(logits, weights, ids, num_tokens, num_experts, top_k, renormalize):
        dpex.call_kernel(
            topk_softmax_kernel, dpex.Range(num_tokens), logits, weights, ids,
            num_experts, top_k, int(renormalize),
        )

    return launch
