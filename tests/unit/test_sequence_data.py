import hashlib
import json

import pytest
import torch

from cascade import SequenceData
from cascade.data import storage
from cascade.data.packing import best_fit_decreasing, block_causal_mask, next_fit_row_starts, segment_arange
from cascade.sequence_data import IGNORE_INDEX


def random_data(lengths, width=None, seed=0) -> SequenceData:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths)
    n = int(lengths.sum())
    inputs = torch.randint(0, 50, (n,), generator=g) if width is None else torch.randn(n, width, generator=g).bfloat16()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    positions = torch.arange(n) - offsets[:-1].repeat_interleave(lengths) + 3
    return SequenceData(inputs, torch.randint(0, 50, (n,), generator=g), positions, offsets, torch.arange(lengths.numel()) * 10)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose memory mapping holds t's data (Linux), or None."""
    address = t.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            begin, end = (int(a, 16) for a in fields[0].split("-"))
            if begin <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


def test_stage0_data_from_token_batches():
    x = torch.arange(12).reshape(2, 6)
    data = SequenceData.from_token_batches([(x, x + 1), (x[:1] + 100, x[:1] + 101)])
    assert (data.num_sequences, data.num_tokens) == (3, 18)
    assert data.lengths.tolist() == [6, 6, 6]
    assert data.positions.tolist() == list(range(6)) * 3
    assert data.inputs[6:12].tolist() == list(range(6, 12))
    assert data.targets[12:].tolist() == list(range(101, 107))
    assert data.input_type == "token_ids"


def test_segment_arange():
    assert segment_arange(torch.tensor([5, 0, 9]), torch.tensor([2, 3, 1])).tolist() == [5, 6, 0, 1, 2, 9]


def next_fit_reference(lengths, capacity):
    starts, fill = [], capacity + 1
    for i, n in enumerate(lengths):
        if fill + n > capacity:
            starts.append(i)
            fill = 0
        fill += n
    return starts


@pytest.mark.parametrize("seed", range(5))
def test_next_fit_packing_matches_the_greedy_reference(seed):
    g = torch.Generator().manual_seed(seed)
    capacity = 32
    lengths = torch.randint(1, capacity + 1, (500,), generator=g)
    assert next_fit_row_starts(lengths, capacity).tolist() == next_fit_reference(lengths.tolist(), capacity)


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 0, 1],
        ]
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("pack,shuffle,best_fit", [(True, False, False), (False, False, False), (True, True, False), (True, True, True)])
def test_batches_cover_every_token_once_in_order(pack, shuffle, best_fit):
    lengths = torch.randint(1, 20, (57,), generator=torch.Generator().manual_seed(3))
    data = random_data(lengths, width=8)
    seen = []
    batches = data.batches(4, row_length=20, pack=pack, shuffle=shuffle, generator=torch.Generator().manual_seed(0), best_fit=best_fit)
    for batch in batches:
        assert batch.inputs.shape[:2] == batch.targets.shape and batch.inputs.shape[0] <= 4
        assert batch.inputs.shape[1] <= 20
        real = batch.token_index >= 0
        index = batch.token_index[real]
        seen.append(index)
        assert torch.equal(batch.inputs[real], data.inputs[index])
        assert torch.equal(batch.targets[real], data.targets[index])
        assert torch.equal(batch.position_ids[real], data.positions[index])
        assert (batch.targets[~real] == IGNORE_INDEX).all() and (batch.segment_ids[~real] == -1).all()
        # within a row, one segment holds one sequence, contiguous and in order
        for row in range(batch.inputs.shape[0]):
            for seg in batch.segment_ids[row].unique().tolist():
                if seg < 0:
                    continue
                tokens = batch.token_index[row][batch.segment_ids[row] == seg]
                assert torch.equal(tokens, torch.arange(int(tokens[0]), int(tokens[0]) + tokens.numel()))
                owner = torch.searchsorted(data.offsets, tokens[0], right=True) - 1
                assert tokens.numel() == int(data.lengths[owner])
        if not pack:
            assert (batch.segment_ids <= 0).all()
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(data.num_tokens))
    if not shuffle:
        assert torch.equal(seen, torch.arange(data.num_tokens))


def test_packing_reduces_waste_and_equal_windows_need_no_mask():
    data = random_data(torch.randint(5, 15, (200,), generator=torch.Generator().manual_seed(0)))
    assert data.packing_waste(8, row_length=64) < data.packing_waste(8, row_length=64, pack=False)
    assert data.packing_waste(8, row_length=64) < 0.15
    windows = random_data([16] * 10)
    batch = next(windows.batches(4))
    assert batch.single_sequence_rows and batch.inputs.shape == (4, 16)
    assert windows.packing_waste(4) == 0.0
    six = random_data([10] * 6)  # one row of 60 tokens: nothing padded to the fullest row, 4 of 64 as training pads
    assert six.packing_waste(8, row_length=64) == 0.0
    assert six.packing_waste(8, row_length=64, fixed_length=True) == 4 / 64


def test_best_fit_decreasing_packs_every_sequence_once_within_capacity_and_tighter_than_next_fit():
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randn(3000, generator=g) * 73 + 307).round().clamp(1, 1024).long()  # a stage-1 hand-over's spread
    order, starts = best_fit_decreasing(lengths, 1024, group=1000)
    assert torch.equal(order.sort().values, torch.arange(3000))
    bounds = torch.cat([starts, torch.tensor([3000])])
    rows = [order[a:b] for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]
    assert all(len(row) and int(lengths[row].sum()) <= 1024 for row in rows)
    for row in rows:  # groups are packed one after the other: a row holds sequences of one group
        assert len(set((row // 1000).tolist())) == 1
    assert [int(row[0]) // 1000 for row in rows] == sorted(int(row[0]) // 1000 for row in rows)
    waste = 1 - int(lengths.sum()) / (len(rows) * 1024)
    next_fit_waste = 1 - int(lengths.sum()) / (next_fit_row_starts(lengths, 1024).numel() * 1024)
    assert waste < 0.05 < 0.10 < next_fit_waste


def test_sequence_longer_than_a_row_is_an_error():
    for best_fit in (False, True):
        with pytest.raises(ValueError, match="does not fit in rows of 8"):
            next(random_data([4, 12]).batches(2, row_length=8, best_fit=best_fit))


def test_inconsistent_arrays_are_rejected():
    with pytest.raises(ValueError, match="offsets must run from 0"):
        SequenceData(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                     torch.tensor([0, 3, 4]), torch.arange(2))
    with pytest.raises(ValueError, match="one entry per token"):
        SequenceData(torch.zeros(5, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long),
                     torch.tensor([0, 5]), torch.arange(1))


@pytest.mark.parametrize("width", [None, 16])
def test_save_and_load_round_trip_memory_mapped(tmp_path, width):
    data = random_data([3, 7, 1, 9], width=width)
    data.save(tmp_path / "stage")
    manifest = json.loads((tmp_path / "stage" / "manifest.json").read_text())
    assert (manifest["num_tokens"], manifest["num_sequences"]) == (20, 4)
    assert manifest["arrays"]["inputs"]["dtype"] == ("int64" if width is None else "bfloat16")
    assert all(len(a["sha256_blocks"]) == 64 for a in manifest["arrays"].values())
    loaded = SequenceData.load(tmp_path / "stage")
    for name in ("inputs", "targets", "positions", "offsets", "sequence_ids"):
        assert torch.equal(getattr(loaded, name), getattr(data, name)), name
    assert loaded.inputs.dtype == data.inputs.dtype
    assert mapped_file(loaded.inputs) == str(tmp_path / "stage" / "inputs.bin"), "memory-mapped, not read into the heap"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"], "no temporary directory left behind"


def test_save_replaces_existing_directory_atomically(tmp_path):
    random_data([3, 3]).save(tmp_path / "d")
    newer = random_data([5], seed=1)
    newer.save(tmp_path / "d")
    assert torch.equal(SequenceData.load(tmp_path / "d").inputs, newer.inputs)
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


@pytest.mark.parametrize("position", [10, 200, -1], ids=["first-block", "middle-block", "last-byte"])
def test_corrupted_file_is_detected(tmp_path, monkeypatch, position):
    monkeypatch.setattr(storage, "BLOCK_BYTES", 64)  # many blocks, the last one partial
    random_data([20, 13], width=9).save(tmp_path / "d")  # 33 x 9 bf16 inputs: 594 bytes, 9 blocks and 18 bytes
    file = tmp_path / "d" / "inputs.bin"
    raw = bytearray(file.read_bytes())
    assert len(raw) % 64 and len(raw) > 3 * 64
    raw[position] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"inputs\.bin does not match the checksum"):
        SequenceData.load(tmp_path / "d")


def test_block_checksum_is_sha256_of_block_digests_whatever_the_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "BLOCK_BYTES", 64)
    payload = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    expected = hashlib.sha256(b"".join(hashlib.sha256(payload[i : i + 64]).digest() for i in range(0, 1000, 64))).hexdigest()
    for pieces in ([1000], [1] * 10 + [990], [64, 64, 872], [63, 2, 200, 735], [0, 500, 0, 500]):
        digest, begin = storage.BlockDigest(), 0
        for size in pieces:
            for future in digest.update(payload[begin : begin + size]):
                future.result()
            begin += size
        assert digest.hexdigest() == expected, pieces
    (tmp_path / "f").write_bytes(payload)
    assert storage.file_checksum(tmp_path / "f", 64) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert storage.file_checksum(tmp_path / "empty") == storage.BlockDigest().hexdigest() == hashlib.sha256(b"").hexdigest()


def test_directories_of_the_pre_release_checksum_format_are_refused_saying_what_to_do(tmp_path):
    data = random_data([4, 4], width=8)
    data.save(tmp_path / "d")
    manifest_file = tmp_path / "d" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for name, entry in manifest["arrays"].items():  # as written before the block checksum
        del entry["sha256_blocks"], entry["block_bytes"]
        entry["sha256"] = hashlib.sha256((tmp_path / "d" / entry["file"]).read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest))
    assert torch.equal(SequenceData.load(tmp_path / "d", verify=False).inputs, data.inputs)
    with pytest.raises(ValueError, match="pre-release version .* write it again"):
        SequenceData.load(tmp_path / "d")


def test_truncated_file_and_missing_manifest_are_detected(tmp_path):
    random_data([4, 4]).save(tmp_path / "d")
    file = tmp_path / "d" / "targets.bin"
    file.write_bytes(file.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"targets\.bin has 56 bytes but its manifest says 64"):
        SequenceData.load(tmp_path / "d", verify=False)
    (tmp_path / "d" / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json not found"):
        SequenceData.load(tmp_path / "d")


def test_data_without_stored_positions_batches_selects_compacts_and_saves_as_with_them(tmp_path):
    from cascade.routing.compaction import compact_hard_tokens

    stored = SequenceData.from_token_batches([(torch.arange(24).view(4, 6), torch.arange(1, 25).view(4, 6))])
    implicit = SequenceData(stored.inputs, stored.targets, None, stored.offsets, stored.sequence_ids)
    for a, b in zip(stored.batches(3, row_length=12), implicit.batches(3, row_length=12)):
        assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.token_index, b.token_index)
    picked = torch.tensor([2, 0])
    assert torch.equal(stored.select(picked).positions, implicit.select(picked).positions_at(torch.arange(12)))
    hard = torch.arange(24) % 5 == 0
    assert torch.equal(compact_hard_tokens(stored, hard).positions, compact_hard_tokens(implicit, hard).positions)
    implicit.save(tmp_path / "saved")
    assert torch.equal(SequenceData.load(tmp_path / "saved").positions, stored.positions)
    assert torch.equal(SequenceData.concat([implicit, stored]).positions, torch.cat([stored.positions] * 2))
