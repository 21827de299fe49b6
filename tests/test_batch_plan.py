"""batch_plan.Planner: which graph each batch of a job runs in (no model: graphs are keys here)."""
import numpy as np
import pytest

from tinyclip import batch_plan
from tinyclip.batch_plan import IMAGE_COMPILE_IMAGES, TEXT_COMPILE_TOKENS, Planner, bucket, buckets_from
from tinyclip.runner import text_lengths

LENGTHS = text_lengths(77)


def planner(compiled=()):
    compiled = set(compiled)
    return Planner(lambda key: key in compiled), compiled


def keys(plan) -> list[tuple]:
    return [key for _, key in plan]


def test_buckets_are_powers_of_two_capped_at_the_batch_size():
    assert [bucket(n, 32) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert bucket(5, 6) == 6 and bucket(7, 6) == 7
    assert buckets_from(3, 32) == [4, 8, 16, 32]
    assert buckets_from(3, 20) == [4, 8, 16, 20]
    assert buckets_from(32, 32) == [32]


def test_a_text_job_sorted_longest_first_compiles_one_length_when_padding_is_cheap():
    """800 label prompts of 6 to 12 positions: one graph, not one per length."""
    needed = np.array([6, 9, 12, 8, 7, 10] * 133 + [6, 6])
    plan = list(planner()[0].text(needed, 32, LENGTHS))
    assert set(keys(plan)) == {("text", 32, 12)}
    rows = np.concatenate([r for r, _ in plan])
    assert sorted(rows.tolist()) == list(range(len(needed))), "every text once"
    assert list(needed[rows]) == sorted(needed, reverse=True), "longest first"
    assert all(len(r) <= 32 for r, _ in plan)


def test_a_batch_compiles_its_own_graph_once_its_padding_has_cost_a_compile():
    p, _ = planner(compiled={("text", 32, 40)})
    padding = 32 * 40 - 32 * 8                                   # tokens one batch of 8 positions pads
    calls = TEXT_COMPILE_TOKENS // padding                       # calls whose padding stays within a compile
    for _ in range(calls):
        assert keys(p.text(np.full(32, 8), 32, LENGTHS)) == [("text", 32, 40)]
    assert p.rent[("text", 32, 8)] == calls * padding
    assert keys(p.text(np.full(32, 8), 32, LENGTHS)) == [("text", 32, 8)]


def test_a_big_job_rents_then_compiles_within_the_job():
    needed = np.array([40] * 32 + [8] * 32 * 100)
    plan = keys(planner()[0].text(needed, 32, LENGTHS))
    padding = 32 * 40 - 32 * 8
    rented = TEXT_COMPILE_TOKENS // padding
    assert plan == [("text", 32, 40)] * (1 + rented) + [("text", 32, 8)] * (100 - rented)


def test_the_smallest_graph_that_fits_is_the_one_padded_into():
    p, _ = planner(compiled={("text", 32, 77), ("text", 32, 16), ("text", 8, 20), ("text", 4, 12)})
    assert keys(p.text(np.full(5, 10), 32, LENGTHS)) == [("text", 8, 20)]     # 160 tokens against 512
    assert keys(p.text(np.full(3, 10), 32, LENGTHS)) == [("text", 4, 12)]     # its own bucket, a longer length
    assert keys(p.text(np.full(3, 18), 32, LENGTHS)) == [("text", 8, 20)]


def test_a_query_compiles_the_full_context_which_later_queries_run_in():
    p, compiled = planner()
    assert keys(p.text(np.array([4]), 32, LENGTHS)) == [("text", 1, 77)]
    compiled.add(("text", 1, 77))
    for needed in (9, 30, 77, 4):
        assert keys(p.text(np.array([needed]), 32, LENGTHS)) == [("text", 1, 77)]


def test_a_query_that_has_rented_long_enough_compiles_its_own_length(monkeypatch):
    monkeypatch.setattr(batch_plan, "TEXT_COMPILE_TOKENS", 77 - 4)
    p, _ = planner(compiled={("text", 1, 77)})
    assert keys(p.text(np.array([4]), 32, LENGTHS)) == [("text", 1, 77)]
    assert keys(p.text(np.array([4]), 32, LENGTHS)) == [("text", 1, 4)]


def test_a_plan_without_record_leaves_the_rents():
    p, _ = planner(compiled={("text", 32, 40)})
    assert keys(p.text(np.full(32, 8), 32, LENGTHS, record=False)) == [("text", 32, 40)]
    assert p.rent == {}


def test_the_last_partial_image_batch_pads_into_the_bucket_the_job_compiles():
    p, _ = planner()
    assert p.images([32, 32, 32, 4], 32, lambda b: ("image", b)) == [32, 32, 32, 32]
    assert p.rent == {("image", 4): 28}


def test_an_image_batch_alone_compiles_its_own_bucket():
    p, compiled = planner()
    assert p.images([6], 32, lambda b: ("image", b)) == [8]
    compiled.add(("image", 8))
    assert p.images([3], 32, lambda b: ("image", b)) == [8]
    assert p.images([9], 32, lambda b: ("image", b)) == [16]


def test_image_keys_come_from_the_caller():
    """A graph is looked up by the caller's key for a bucket (a uint8 image graph's key has a third part)."""
    p, _ = planner(compiled={("image", 16, "uint8")})
    assert p.images([5], 32, lambda b: ("image", b, "uint8")) == [16]
    assert p.images([5], 32, lambda b: ("image", b)) == [8]


@pytest.mark.parametrize("images, rented", [(IMAGE_COMPILE_IMAGES // 28, True), (IMAGE_COMPILE_IMAGES // 28 + 1, False)])
def test_an_image_bucket_rents_up_to_a_compile(images, rented):
    p, _ = planner(compiled={("image", 32)})
    for _ in range(images - 1):
        p.images([4], 32, lambda b: ("image", b))
    assert p.images([4], 32, lambda b: ("image", b)) == ([32] if rented else [4])
