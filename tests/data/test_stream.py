"""The epoch order over caption shards: a permutation fixed by (seed, epoch), resumable by index."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from albef_ray.data import stream as stream_module
from albef_ray.data.schema import ROW_SCHEMA
from albef_ray.data.stream import EpochOrder, Window, decode_window, file_row_counts, iter_window, read_rows, row_seed
from albef_ray.data.transforms import AugmentSpec

from .shard_fixtures import CORRUPT, encode

FILE_ROWS = (37, 5, 64, 13)  # uneven files: short blocks at every file end


def _order(seed=7, block_rows=8, window_blocks=3):
    return EpochOrder(tuple(f"f{i}" for i in range(len(FILE_ROWS))), FILE_ROWS, seed, block_rows, window_blocks)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_is_a_permutation_split_without_overlap(world):
    order = _order()
    for epoch in range(3):
        per_rank = [order.worker_rows(epoch, r, world) for r in range(world)]
        every = np.concatenate(per_rank)
        assert sorted(every.tolist()) == list(range(sum(FILE_ROWS)))  # each row once, across workers


def test_order_is_a_function_of_seed_and_epoch():
    a, b = _order(), _order()
    assert np.array_equal(a.worker_rows(1, 0, 2), b.worker_rows(1, 0, 2))  # a new object, the same order
    epochs = [a.worker_rows(e, 0, 1) for e in range(3)]
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert np.mean(epochs[0] == epochs[1]) < 0.2  # reshuffled, not a rotation
    assert not np.array_equal(_order(seed=8).worker_rows(0, 0, 1), epochs[0])
    # rows are mixed across blocks and files, not read in file order
    assert np.mean(np.diff(epochs[0]) == 1) < 0.2


def test_windows_read_whole_aligned_blocks_of_one_file():
    order = _order()
    offsets = order.file_offsets.tolist()
    for window in order.windows(0):
        assert 1 <= len(window.ranges) <= 3
        for start, stop in window.ranges:
            f = np.searchsorted(offsets, start, side="right") - 1
            assert stop <= offsets[f + 1] and (start - offsets[f]) % 8 == 0  # inside one file, aligned


@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_any_position_is_the_tail_of_the_full_order(world):
    order = _order()
    for rank in range(world):
        full = order.worker_rows(2, rank, world)
        for position in range(len(full) + 1):
            assert np.array_equal(order.worker_rows(2, rank, world, position), full[position:]), position
            windows = order.worker_windows(2, rank, world, position)
            assert sum(w.rows - w.skip for w in windows) == len(full) - position  # skipped: index arithmetic only
            if windows:
                assert windows[0].position == position


def test_row_seed_is_fixed_per_row_and_epoch():
    assert row_seed(42, 0, 5) == row_seed(42, 0, 5)
    assert len({row_seed(42, 0, 5), row_seed(42, 1, 5), row_seed(42, 0, 6), row_seed(43, 0, 5)}) == 4
    assert 0 <= row_seed(-1, 3, 10**12) < 2**63


def _noise(i: int) -> np.ndarray:
    # Textured images: every crop, flip and op shows in the pixels (a solid colour hides them).
    return np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)


def _write(path: Path, ids: range, corrupt: set[int], group_rows: int) -> None:
    rows = {name: [] for name in ROW_SCHEMA.names}
    for i in ids:
        rows["image"].append(CORRUPT if i in corrupt else encode(_noise(i)))
        rows["caption"].append(f"A Red circle, {i}!")
        rows["image_id"].append(str(i))
        rows["source"].append("test")
        rows["width"].append(32)
        rows["height"].append(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=ROW_SCHEMA), path, row_group_size=group_rows)


def test_read_rows_reads_rows_in_the_asked_order_across_row_groups(tmp_path):
    _write(tmp_path / "a.parquet", range(20), set(), group_rows=6)
    table = read_rows(str(tmp_path / "a.parquet"), np.array([13, 2, 19, 6, 5]), ["image_id"])
    assert table.column("image_id").to_pylist() == ["13", "2", "19", "6", "5"]
    assert file_row_counts([str(tmp_path / "a.parquet")]) == [20]


def _shards(tmp_path):
    _write(tmp_path / "p0.parquet", range(0, 12), {3}, group_rows=4)
    _write(tmp_path / "p1.parquet", range(12, 21), {15}, group_rows=4)
    files = (str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet"))
    return EpochOrder(files, (12, 9), seed=3, block_rows=4, window_blocks=2)


def test_decode_window_resumed_is_bit_identical_and_decodes_only_the_tail(tmp_path, monkeypatch):
    order = _shards(tmp_path)
    spec = AugmentSpec(image_res=16)
    decoded = []
    real = stream_module.pretrain_image

    def counting(data, spec, generator=None):
        decoded.append(data)
        return real(data, spec, generator)

    monkeypatch.setattr(stream_module, "pretrain_image", counting)
    for window in order.windows(1):
        full = decode_window(order, 1, window, spec, max_words=30)
        assert len(decoded) == window.rows
        ids = order.window_order(1, window)
        assert full["row"].tolist() == [i for i in ids.tolist() if i not in (3, 15)]  # in order, corrupt dropped
        assert int(full["num_dropped"].sum()) == window.rows - len(full["row"])
        assert full["image_id"].tolist() == [str(i) for i in full["row"].tolist()]
        assert full["caption"][0].startswith("a red circle")
        for skip in range(window.rows):
            decoded.clear()
            tail = decode_window(order, 1, Window(window.index, window.ranges, skip, 100 + skip), spec, 30)
            assert len(decoded) == window.rows - skip  # nothing before the resume point is decoded
            keep = np.flatnonzero(np.isin(full["row"], ids[skip:]))
            assert np.array_equal(tail["image"], full["image"][keep])  # same augmentations, bit for bit
            assert tail["row"].tolist() == full["row"][keep].tolist()
            assert tail["position"].tolist() == (100 + np.flatnonzero(np.isin(ids, tail["row"]))).tolist()
        decoded.clear()


def test_augmentation_differs_across_epochs_for_the_same_row(tmp_path):
    order = _shards(tmp_path)
    spec = AugmentSpec(image_res=16, crop_scale=(0.2, 0.5))
    images = {}
    for epoch in (0, 1):
        for window in order.windows(epoch):
            out = decode_window(order, epoch, window, spec, 30)
            for row, image in zip(out["row"].tolist(), out["image"]):
                images[epoch, row] = torch.from_numpy(image)
    assert any(not torch.equal(images[0, r], images[1, r]) for r in range(21) if r not in (3, 15))


def test_iter_window_chunks_are_the_whole_window_in_order(tmp_path):
    order = _shards(tmp_path)
    spec = AugmentSpec(image_res=16)
    for window in order.windows(0):
        whole = decode_window(order, 0, window, spec, 30)
        chunks = list(iter_window(order, 0, window, spec, 30, chunk_rows=3))
        assert len(chunks) == -(-window.rows // 3) and all(len(c["row"]) <= 3 for c in chunks)
        for key in ("image", "row", "position", "image_idx"):
            assert np.array_equal(np.concatenate([c[key] for c in chunks]), whole[key]), key
        assert sum(int(c["num_dropped"].sum()) for c in chunks) == int(whole["num_dropped"].sum())
