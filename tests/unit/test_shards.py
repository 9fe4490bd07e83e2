from dataclasses import fields

import pytest
import torch

from cascade.data.concat_rows import ConcatRows
from cascade.data.shards import is_complete, load_parts, save_part
from cascade.routing import compaction
from cascade.sequence_data import SequenceData
from test_sequence_data import mapped_file, random_data

ARRAYS = ("inputs", "targets", "positions", "offsets", "sequence_ids")


def test_shards_partition_the_sequences_and_concat_restores_them():
    data = random_data(torch.randint(1, 9, (11,), generator=torch.Generator().manual_seed(0)), width=4)
    parts = [data.shard(r, 3) for r in range(3)]
    assert [p.num_sequences for p in parts] == [3, 4, 4]
    whole = type(data).concat(parts)
    for name in ("inputs", "targets", "positions", "offsets", "sequence_ids"):
        assert torch.equal(getattr(whole, name), getattr(data, name)), name
    assert data.shard(0, 20).num_sequences == 0 and data.shard(19, 20).num_sequences == 1


def test_select_keeps_the_chosen_sequences_in_the_given_order():
    data = random_data([2, 3, 4])
    picked = data.select(torch.tensor([2, 0]))
    assert picked.lengths.tolist() == [4, 2]
    assert picked.sequence_ids.tolist() == [20, 0]
    assert torch.equal(picked.inputs, torch.cat([data.inputs[5:9], data.inputs[0:2]]))


def test_parts_load_in_rank_order_and_incomplete_sets_are_refused(tmp_path):
    data = random_data([3, 1, 4, 1, 5], width=4)
    for rank in (1, 0):
        save_part(data.shard(rank, 2), tmp_path / "train", rank, 2)
    loaded = load_parts(tmp_path / "train")
    assert torch.equal(loaded.sequence_ids, data.sequence_ids) and torch.equal(loaded.inputs[:], data.inputs)

    save_part(data.shard(0, 3), tmp_path / "partial", 0, 3)
    assert not is_complete(tmp_path / "partial")
    with pytest.raises(ValueError, match="holds 1 of its 3 parts: the hand-over was interrupted"):
        load_parts(tmp_path / "partial")
    save_part(data, tmp_path / "train", 0, 1)
    with pytest.raises(ValueError, match=r"mixes parts written by runs of \[1, 2\] processes"):
        load_parts(tmp_path / "train")
    with pytest.raises(FileNotFoundError):
        load_parts(tmp_path / "nothing")


def test_batch_aligned_shards_form_exactly_the_batches_of_one_process():
    data = random_data(torch.randint(1, 9, (53,), generator=torch.Generator().manual_seed(1)), width=4)
    whole = [b.token_index[b.token_index >= 0].tolist() for b in data.batches(4, row_length=12)]
    formed, offset = [], 0
    for rank in range(3):
        share = data.shard(rank, 3, batch_size=4, row_length=12)
        for b in share.batches(4, row_length=12):
            formed.append([i + offset for i in b.token_index[b.token_index >= 0].tolist()])
        offset += share.num_tokens
    assert formed == whole
    assert sum(data.shard(r, 3, 4, 12).num_sequences for r in range(3)) == data.num_sequences


def test_concat_rows_reads_like_the_concatenated_tensor():
    g = torch.Generator().manual_seed(0)
    for rest in ((), (3,)):
        parts = [torch.randn(n, *rest, generator=g).bfloat16() for n in (4, 0, 7, 3)]
        view, whole = ConcatRows(parts), torch.cat(parts)
        assert (view.shape, view.dim(), view.ndim, view.dtype, view.device) == (
            whole.shape, whole.dim(), whole.ndim, whole.dtype, whole.device)
        assert (len(view), view.numel()) == (len(whole), whole.numel())
        for index in (torch.randint(0, 14, (30,), generator=g), torch.randperm(14, generator=g),
                      torch.arange(4, 11), torch.tensor([13, 12]), torch.zeros(0, dtype=torch.long)):
            assert torch.equal(view.index_select(0, index), whole.index_select(0, index)), index
        assert torch.equal(view.index_select(0, torch.tensor([5, 1], dtype=torch.int32)), whole[[5, 1]])
        for a in (None, *range(-2, 17)):
            for b in (None, *range(-2, 17)):
                assert torch.equal(view[a:b], whole[a:b]), (a, b)
        assert torch.equal(view.detach().to("cpu").contiguous(), whole)
    with pytest.raises(IndexError):
        view.index_select(0, torch.tensor([14]))
    with pytest.raises(IndexError):
        view.index_select(0, torch.tensor([-1]))
    with pytest.raises(TypeError):
        view[::2]
    with pytest.raises(TypeError):
        view[3]
    with pytest.raises(ValueError, match="one dtype, device and trailing shape"):
        ConcatRows([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="one dtype, device and trailing shape"):
        ConcatRows([torch.zeros(2), torch.zeros(2, dtype=torch.long)])


def real(t):
    assert isinstance(t, (torch.Tensor, ConcatRows)), type(t)
    return t[:] if isinstance(t, ConcatRows) else t


def assert_same(a: SequenceData, b: SequenceData, what=""):
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), (what, name)
        assert x is None or torch.equal(real(x), real(y)), (what, name)


def assert_same_batch(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert type(x) is type(y) and (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f.name


def saved_parts(path, data, bounds):
    """`data` split at sequences `bounds` into parts saved under `path`; the parts, in memory."""
    parts = [data.select(torch.arange(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    for rank, part in enumerate(parts):
        save_part(part, path, rank, len(parts))
    return parts


@pytest.mark.parametrize("width, bounds", [(8, [0, 3, 10, 14]), (None, [0, 6, 8, 14]), (8, [0, 5, 5, 14])])
def test_parts_read_in_place_give_what_their_concatenation_gives(tmp_path, monkeypatch, width, bounds):
    lengths = torch.randint(1, 9, (14,), generator=torch.Generator().manual_seed(2))
    data = random_data(lengths, width=width)
    whole = SequenceData.concat(saved_parts(tmp_path / "split", data, bounds))
    loaded = load_parts(tmp_path / "split")
    assert all(isinstance(getattr(loaded, n), ConcatRows) for n in ("inputs", "targets", "positions"))
    assert_same(loaded, whole)
    assert (loaded.num_tokens, loaded.num_sequences, loaded.input_type) == (whole.num_tokens, whole.num_sequences,
                                                                             whole.input_type)
    assert torch.equal(loaded.lengths, whole.lengths) and torch.equal(real(loaded.all_positions()), whole.all_positions())
    index = torch.randint(0, whole.num_tokens, (40,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.positions_at(index), whole.positions_at(index))
    seqs = torch.randperm(14, generator=torch.Generator().manual_seed(4))[:9]
    assert_same(loaded.select(seqs), whole.select(seqs), "select")
    for s in range(whole.num_sequences):
        assert_same(loaded.sequence(s), whole.sequence(s), f"sequence {s}")
    for rank in range(3):
        assert_same(loaded.shard(rank, 3), whole.shard(rank, 3), "shard")
        assert_same(loaded.shard(rank, 3, 2, 12), whole.shard(rank, 3, 2, 12), "batch-aligned shard")

    plan = dict(shuffle=True, generator=torch.Generator().manual_seed(5), best_fit=True)
    pairs = loaded.plan_batches(3, 12, **plan), whole.plan_batches(3, 12, **dict(plan, generator=torch.Generator().manual_seed(5)))
    for (seqs_a, rows_a), (seqs_b, rows_b) in zip(*pairs, strict=True):
        assert torch.equal(seqs_a, seqs_b) and torch.equal(rows_a, rows_b)
        assert_same_batch(loaded.make_batch(seqs_a, rows_a, 12, 3), whole.make_batch(seqs_b, rows_b, 12, 3))
    for kwargs in (dict(), dict(fixed_length=True, pad_last_batch=True), dict(pack=False)):
        for a, b in zip(loaded.batches(4, 16, **kwargs), whole.batches(4, 16, **kwargs), strict=True):
            assert_same_batch(a, b)
    assert loaded.packing_waste(4, 16, best_fit=True) == whole.packing_waste(4, 16, best_fit=True)

    loaded.save(tmp_path / "saved")
    assert_same(SequenceData.load(tmp_path / "saved"), whole, "save")

    hard = torch.rand(whole.num_tokens, generator=torch.Generator().manual_seed(6)) < 0.5
    expected = compaction.compact_hard_tokens(whole, hard)
    assert_same(compaction.compact_hard_tokens(loaded, hard), expected, "compact in memory")
    monkeypatch.setattr(compaction, "CHUNK_TOKENS", 5)  # chunks straddle the parts
    compacted = compaction.compact_hard_tokens(loaded, hard, inputs=None, path=tmp_path / "compacted")
    assert_same(compacted, expected, "compact to a directory")


def test_loaded_parts_stay_memory_mapped_in_their_files(tmp_path):
    data = random_data(torch.randint(1, 9, (12,), generator=torch.Generator().manual_seed(7)), width=64)
    saved_parts(tmp_path / "split", data, [0, 2, 7, 12])
    loaded = load_parts(tmp_path / "split")
    for name in ("inputs", "targets", "positions"):
        for rank, part in enumerate(getattr(loaded, name).parts):
            assert mapped_file(part) == str(tmp_path / "split" / f"part-{rank:05d}-of-00003" / f"{name}.bin"), name
    # a change to a part's file shows through: the rows are read from the file, not from a copy
    first = int(loaded.offsets[7])
    with open(tmp_path / "split" / "part-00002-of-00003" / "inputs.bin", "r+b") as f:
        f.write(torch.ones(64, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    assert torch.equal(loaded.inputs[first : first + 1], torch.ones(1, 64, dtype=torch.bfloat16))
    assert torch.equal(loaded.inputs.index_select(0, torch.tensor([first, 0])), torch.stack([torch.ones(64).bfloat16(), data.inputs[0]]))
