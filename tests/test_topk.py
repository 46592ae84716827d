import random

import pytest

from dtm_ops.topk import TopK


@pytest.mark.parametrize("seed", range(5))
def test_topk_equals_sorting_with_ties_by_key(seed):
    rng = random.Random(seed)
    items = [(float(rng.randint(0, 20)), f"f{i:04d}") for i in range(300)]  # many ties
    want = sorted(items, key=lambda t: (-t[0], t[1]))[:17]
    for _ in range(3):
        rng.shuffle(items)
        heap = TopK(17)
        for score, key in items:
            heap.push(score, key, payload=key)
        assert [(s, k) for s, k, _ in heap.items()] == want


def test_merge_of_partial_heaps_equals_one_heap():
    rng = random.Random(1)
    items = [(rng.random(), f"k{i}") for i in range(200)]
    whole, parts = TopK(10), [TopK(10) for _ in range(4)]
    for i, (s, k) in enumerate(items):
        whole.push(s, k)
        parts[i % 4].push(s, k)
    merged = TopK(10)
    for p in parts:
        merged.merge(p)
    assert merged.items() == whole.items()


def test_threshold_and_bad_k():
    heap = TopK(2)
    assert heap.threshold() == float("-inf")
    heap.push(1.0, "a")
    heap.push(3.0, "b")
    assert heap.threshold() == 1.0
    with pytest.raises(ValueError):
        TopK(0)
