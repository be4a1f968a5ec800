import pytest

from engine.page_pool import PagePool


def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError, match="num_pages=0"):
        PagePool(0)


def test_fresh_pool_counts() -> None:
    pool = PagePool(8)
    assert (pool.num_pages, pool.num_free, pool.num_used) == (8, 8, 0)
    assert not any(pool.is_allocated(p) for p in range(8))


def test_alloc_hands_out_distinct_ids_in_order() -> None:
    pool = PagePool(8)
    assert pool.alloc(3) == [0, 1, 2]
    assert pool.alloc(2) == [3, 4]
    assert (pool.num_free, pool.num_used) == (3, 5)
    assert all(pool.is_allocated(p) for p in range(5))
    assert not pool.is_allocated(5)


def test_alloc_zero_and_negative() -> None:
    pool = PagePool(2)
    assert pool.alloc(0) == []
    assert pool.num_free == 2
    with pytest.raises(ValueError, match="n=-1"):
        pool.alloc(-1)


def test_alloc_too_many_takes_nothing() -> None:
    pool = PagePool(4)
    pool.alloc(3)
    assert pool.alloc(2) is None
    assert pool.num_free == 1
    assert pool.alloc(1) == [3]
    assert pool.alloc(1) is None


def test_free_is_lifo() -> None:
    pool = PagePool(8)
    pages = pool.alloc(6)
    assert pages is not None
    pool.free([1, 4])
    pool.free([2])
    assert pool.num_free == 5
    assert pool.alloc(3) == [2, 4, 1]


def test_free_then_realloc_everything() -> None:
    pool = PagePool(5)
    pages = pool.alloc(5)
    assert pages is not None
    pool.free(pages)
    assert pool.num_free == 5
    assert sorted(pool.alloc(5) or []) == [0, 1, 2, 3, 4]


def test_free_accepts_any_iterable() -> None:
    pool = PagePool(4)
    pool.alloc(4)
    pool.free(p for p in (0, 1))
    pool.free(range(2, 4))
    assert pool.num_free == 4


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_free_out_of_range(bad: int) -> None:
    pool = PagePool(4)
    pool.alloc(4)
    with pytest.raises(ValueError, match=f"page {bad} is out of range"):
        pool.free([bad])
    assert not pool.is_allocated(bad)


def test_double_free() -> None:
    pool = PagePool(4)
    pool.alloc(2)
    pool.free([1])
    with pytest.raises(ValueError, match="page 1 is not allocated"):
        pool.free([1])
    with pytest.raises(ValueError, match="page 3 is not allocated"):
        pool.free([3])


def test_duplicate_in_one_batch_is_a_double_free() -> None:
    pool = PagePool(4)
    pool.alloc(2)
    with pytest.raises(ValueError, match="page 0 is not allocated"):
        pool.free([0, 0])
    assert pool.is_allocated(0)
    assert pool.num_free == 2


@pytest.mark.parametrize("batch", [[0, 1, 9], [0, 1, 3], [2, 0, 2]])
def test_free_is_all_or_nothing(batch: list[int]) -> None:
    pool = PagePool(4)
    pool.alloc(3)
    with pytest.raises(ValueError):
        pool.free(batch)
    assert pool.num_free == 1
    assert all(pool.is_allocated(p) for p in range(3))
    assert pool.alloc(1) == [3]


def test_alloc_avoiding_pages_skips_them_and_keeps_them_in_place() -> None:
    pool = PagePool(8)
    taken = pool.alloc(8)
    assert taken is not None
    pool.free(taken)  # the free list, last out first: 7, 6, ..., 0
    assert pool.alloc(2, avoid={7, 5}) == [6, 4]
    assert pool.alloc(1) == [7]  # the skipped page, still where it was
    assert pool.alloc(6, avoid={5}) is None  # 5 free pages outside {5}: nothing taken
    assert pool.num_free == 5 and pool.is_free(5)
    assert pool.alloc(5, avoid={99, 0}) is None
    assert pool.alloc(4, avoid={5, 99}) == [3, 2, 1, 0]
    assert pool.alloc(1, avoid={5}) is None and pool.alloc(1) == [5]


def test_on_free_hears_every_batch_taken_back() -> None:
    pool = PagePool(4)
    heard: list[list[int]] = []
    pool.on_free = heard.append
    pages = pool.alloc(3)
    assert pages is not None
    pool.free(pages[:2])
    pool.free([])
    with pytest.raises(ValueError, match="double free"):
        pool.free([pages[0]])
    assert heard == [pages[:2]]  # nothing for an empty batch or a refused one
