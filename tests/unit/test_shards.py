import pytest
import torch

from cascade.data.shards import is_complete, load_parts, save_part
from test_sequence_data import random_data


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
    assert torch.equal(loaded.sequence_ids, data.sequence_ids) and torch.equal(loaded.inputs, data.inputs)

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


def test_merging_parts_streams_them_into_one_identical_part(tmp_path):
    from cascade.data.shards import merge_parts

    data = random_data([3, 1, 4, 1, 5, 9, 2], width=4)
    for rank in range(3):
        save_part(data.shard(rank, 3), tmp_path / "train", rank, 3)
    merge_parts(tmp_path / "train")
    assert [p.name for p in (tmp_path / "train").iterdir()] == ["part-00000-of-00001"]
    merged = load_parts(tmp_path / "train", verify=True)
    for name in ("inputs", "targets", "positions", "offsets", "sequence_ids"):
        assert torch.equal(getattr(merged, name), getattr(data, name)), name
