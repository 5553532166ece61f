"""Routing kernels: one work-item per token.

Every selection takes k passes; each pass takes the best candidate strictly after the
previous pick in the order (value descending, index ascending), so ties go to the smaller
index and nothing needs to be marked as taken.
"""

import math
from functools import lru_cache

import numpy as np
import numba_dpex as dpex
from numba_dpex import kernel_api as kapi

from .launch import call

from .numerics import loader

NAN = np.float32(np.nan)


@dpex.device_func
def follows(value, index, prev_value, prev_index):
    """Whether a candidate comes strictly after the previous pick in the selection order."""
    return value < prev_value or (value == prev_value and index > prev_index)


@lru_cache(maxsize=None)
def _softmax_stats(logits_kind: str):
    load = loader(logits_kind)

    @dpex.device_func
    def softmax_stats(logits, base, num_experts):
        """(max, sum of exp(logit - max)) over one token's logits."""
        largest = load(logits, base)
        for e in range(1, num_experts):
            largest = max(largest, load(logits, base + e))
        total = np.float32(0.0)
        for e in range(num_experts):
            total += math.exp(load(logits, base + e) - largest)
        return largest, total

    return softmax_stats


@lru_cache(maxsize=None)
def _next_pick(logits_kind: str):
    load = loader(logits_kind)

    @dpex.device_func
    def next_pick(logits, base, num_experts, prev_value, prev_index):
        """(logit, index) of the best expert strictly after the previous pick."""
        best_value = np.float32(-np.inf)
        best_index = -1
        for e in range(num_experts):
            v = load(logits, base + e)
            if follows(v, e, prev_value, prev_index) and (best_index < 0 or v > best_value):
                best_value = v
                best_index = e
        return best_value, best_index

    return next_pick


@lru_cache(maxsize=None)
def make_topk_softmax_kernel(logits_kind: str, after_topk: bool = False):
    """Softmax over all experts then top-k, or (``after_topk``) top-k logits then softmax."""
    load = loader(logits_kind)
    softmax_stats = _softmax_stats(logits_kind)
    next_pick = _next_pick(logits_kind)

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
        largest, total = softmax_stats(logits, base, num_experts)
        prev_value = np.float32(np.inf)
        prev_index = -1
        picked_sum = np.float32(0.0)
        for j in range(top_k):
            best_value, best_index = next_pick(logits, base, num_experts, prev_value, prev_index)
            w = math.exp(best_value - largest) / total
            weights[t * top_k + j] = w
            ids[t * top_k + j] = best_index
            picked_sum += w
            prev_value = best_value
            prev_index = best_index
        if after_topk:  # softmax over the k picked logits; the first pick is their maximum
            first = load(logits, base + ids[t * top_k])
            picked_total = np.float32(0.0)
            for j in range(top_k):
                picked_total += math.exp(load(logits, base + ids[t * top_k + j]) - first)
            for j in range(top_k):
                v = load(logits, base + ids[t * top_k + j])
                weights[t * top_k + j] = math.exp(v - first) / picked_total
        elif renormalize != 0:
            for j in range(top_k):
                weights[t * top_k + j] = weights[t * top_k + j] / picked_sum

    def launch(logits, weights, ids, num_tokens, num_experts, top_k, renormalize):
        call(
            topk_softmax_kernel, dpex.Range(num_tokens), logits, weights, ids,
            num_experts, top_k, int(renormalize),
        )

    return launch


@lru_cache(maxsize=None)
def make_grouped_topk_kernel(logits_kind: str, use_sigmoid: bool, has_bias: bool):
    """Grouped top-k (DeepSeek): best groups first, then the best experts inside them."""
    load = loader(logits_kind)
    softmax_stats = _softmax_stats(logits_kind)

    @dpex.device_func
    def score(v, largest, total):
        if use_sigmoid:
            return np.float32(1.0) / (np.float32(1.0) + math.exp(-v))
        return math.exp(v - largest) / total

    @dpex.kernel
    def grouped_topk_kernel(
        item: kapi.Item,
        logits,  # IN  (T * E) any float kind
        bias,  # IN  (E) float32 correction bias, read only when has_bias
        weights,  # OUT (T * k) float32
        ids,  # OUT (T * k) int32
        num_experts,
        group_size,
        num_groups,
        topk_group,
        top_k,
        renormalize,
        epsilon,
        scale,
    ):
        t = item.get_id(0)
        base = t * num_experts
        largest = np.float32(0.0)
        total = np.float32(1.0)
        if not use_sigmoid:
            largest, total = softmax_stats(logits, base, num_experts)
        # groups: best-score (or best-two biased sum) order; kept ones as a bit mask
        kept = 0
        prev_value = np.float32(np.inf)
        prev_index = -1
        for _ in range(topk_group):
            best_value = np.float32(-np.inf)
            best_index = -1
            for g in range(num_groups):
                first = np.float32(-np.inf)
                second = np.float32(-np.inf)
                for e in range(g * group_size, (g + 1) * group_size):
                    v = score(load(logits, base + e), largest, total)
                    if has_bias:
                        v += bias[e]
                    if v > first:
                        second = first
                        first = v
                    elif v > second:
                        second = v
                value = first + second if has_bias else first
                better = best_index < 0 or value > best_value
                if follows(value, g, prev_value, prev_index) and better:
                    best_value = value
                    best_index = g
            kept |= 1 << best_index
            prev_value = best_value
            prev_index = best_index
        prev_value = np.float32(np.inf)
        prev_index = -1
        picked_sum = np.float32(0.0)
        for j in range(top_k):
            best_value = np.float32(-np.inf)
            best_index = -1
            for e in range(num_experts):
                if (kept >> (e // group_size)) & 1:
                    v = score(load(logits, base + e), largest, total)
                    if has_bias:
                        v += bias[e]
                    if follows(v, e, prev_value, prev_index) and (best_index < 0 or v > best_value):
                        best_value = v
                        best_index = e
            w = score(load(logits, base + best_index), largest, total)
            weights[t * top_k + j] = w
            ids[t * top_k + j] = best_index
            picked_sum += w
            prev_value = best_value
            prev_index = best_index
        denominator = picked_sum + epsilon
        for j in range(top_k):
            w = weights[t * top_k + j]
            if renormalize != 0:
                # 0/0 is NaN, as the README promises; numba would raise ZeroDivisionError,
                # which in a kernel ends the work-item before its stores
                w = NAN if denominator == 0 else w / denominator
            weights[t * top_k + j] = w * scale

    def launch(logits, bias, weights, ids, num_tokens, num_experts, num_groups, topk_group,
               top_k, renormalize, epsilon, scale):
        call(
            grouped_topk_kernel, dpex.Range(num_tokens), logits, bias, weights, ids,
            num_experts, num_experts // num_groups, num_groups, topk_group, top_k,
            int(renormalize), np.float32(epsilon), np.float32(scale),
        )

    return launch


@lru_cache(maxsize=None)
def make_sparsemixer_kernel(logits_kind: str):
    """PhiMoE's SparseMixer at inference: two picks; each weighted by a softmax over the
    logits within a relative distance ``2 * jitter_eps`` of that pick (the first pick left
    out of the second's softmax), not renormalized."""
    load = loader(logits_kind)
    next_pick = _next_pick(logits_kind)

    @dpex.device_func
    def masked_softmax_at(logits, base, num_experts, best, skip, threshold):
        """1 / sum of exp(logit - best) over the experts not masked (nor ``skip``): the
        softmax weight of the expert whose logit is ``best``."""
        total = np.float32(0.0)
        for e in range(num_experts):
            v = load(logits, base + e)
            factor = max(abs(v), best)
            # factor 0 means v = 0 and best <= 0: never masked (torch: -inf or NaN > t)
            masked = factor > 0 and (best - v) / factor > threshold
            if e != skip and not masked:
                total += math.exp(v - best)
        return np.float32(1.0) / total

    @dpex.kernel
    def sparsemixer_kernel(
        item: kapi.Item,
        logits,  # IN  (T * E) any float kind
        weights,  # OUT (T * 2) float32
        ids,  # OUT (T * 2) int32
        num_experts,
        threshold,  # 2 * jitter_eps
    ):
        t = item.get_id(0)
        base = t * num_experts
        prev_value = np.float32(np.inf)
        prev_index = -1
        for j in range(2):
            best_value, best_index = next_pick(logits, base, num_experts, prev_value, prev_index)
            weights[t * 2 + j] = masked_softmax_at(logits, base, num_experts, best_value,
                                                   prev_index, threshold)
            ids[t * 2 + j] = best_index
            prev_value = best_value
            prev_index = best_index

    def launch(logits, weights, ids, num_tokens, num_experts, jitter_eps):
        call(sparsemixer_kernel, dpex.Range(num_tokens), logits, weights, ids, num_experts,
             np.float32(2 * jitter_eps))

    return launch
