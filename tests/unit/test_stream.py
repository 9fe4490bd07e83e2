"""The streamed hand-over (`cascade.routing.stream`): over one pass it hands on exactly what the materialized hand-over
writes, in batches of one shape, resumable from its state; its threshold is the exact quantile over every process."""

import copy

import pytest
import torch

from cascade import LLM
from cascade.data.packing import first_fit_rows
from cascade.routing.handover import collect_hard_tokens
from cascade.routing.stream import (HardTokenStream, calibrate_streamed, calibration_windows, choose_mode,
                                    handover_bytes, route_through, window_batches, window_order)
from cascade.routing.threshold import calibrate_threshold, quantile
from cascade.sequence_data import SequenceData
from conftest import run_processes, tiny_model

SEQ_LEN, WINDOWS = 16, 45


def corpus_windows(windows=WINDOWS, seed=0) -> SequenceData:
    tokens = torch.randint(0, 97, (windows * SEQ_LEN + 1,), generator=torch.Generator().manual_seed(seed))
    n = windows * SEQ_LEN
    return SequenceData(tokens[:n], tokens[1 : n + 1], None, torch.arange(windows + 1) * SEQ_LEN, torch.arange(windows))


def rows(data_or_batches) -> torch.Tensor:
    """Every token as one float64 row (position, target, hidden state...), sorted: the hand-over as a multiset."""
    if isinstance(data_or_batches, SequenceData):
        d = data_or_batches
        table = torch.cat([d.all_positions()[:, None].double(), d.targets[:, None].double(), d.inputs.double()], 1)
    else:
        parts = []
        for b in data_or_batches:
            real = b.token_index >= 0
            parts.append(torch.cat([b.position_ids[real][:, None].double(), b.targets[real][:, None].double(),
                                    b.inputs[real].double()], 1))
        table = torch.cat(parts)
    return torch.unique(table, dim=0)  # sorted rows; a token's row is unique (its hidden state differs)


def by_sequence(parts: list[SequenceData]) -> SequenceData:
    data = SequenceData.concat(parts)
    return data.select(data.sequence_ids.argsort())


@pytest.fixture(scope="module")
def llms():
    return [LLM(tiny_model("gpt2", seed=0)), LLM(tiny_model("gpt2", seed=1))]


@pytest.mark.parametrize("chunk_windows", [4, 7])
def test_one_pass_streams_exactly_the_materialized_hand_over(llms, chunk_windows):
    windows = corpus_windows()
    materialized = collect_hard_tokens(llms[0], windows, 0.3, 4).hard  # sets LLM 0's threshold
    stream = HardTokenStream(llms[:1], windows, 4, SEQ_LEN, seed=5, passes=1, chunk_windows=chunk_windows)
    streamed = list(stream)
    assert {tuple(b.inputs.shape) for b in streamed} == {(4, SEQ_LEN, llms[0].dim)}, "one shape for every batch"
    assert sum(b.num_tokens for b in streamed) == stream.tokens_hard == materialized.num_tokens
    assert stream.tokens_in == windows.num_tokens
    assert torch.equal(rows(streamed), rows(materialized)), "the same tokens, positions, targets and hidden states"
    # chunk by chunk, in the stream's order, the same sequences (ids, offsets) as the materialized hand-over
    order = window_order(WINDOWS, 0, 1, seed=5)
    parts = [route_through(llms[:1], windows.select(order[i : i + chunk_windows]), 4) for i in range(0, WINDOWS, chunk_windows)]
    chunked = by_sequence(parts)
    for name in ("sequence_ids", "offsets", "targets"):
        assert torch.equal(getattr(chunked, name), getattr(materialized, name)), name
    assert torch.equal(chunked.all_positions(), materialized.all_positions())
    assert torch.equal(chunked.inputs.float(), materialized.inputs.float()), "hidden states equal in fp32"


def test_stage_two_streams_through_llms_0_and_1_as_the_materialized_chain(llms):
    windows = corpus_windows()
    first = collect_hard_tokens(llms[0], windows, 0.3, 4).hard
    second = collect_hard_tokens(llms[1], first, 0.5, 4).hard  # the materialized stage 1 hands over to stage 2
    streamed = by_sequence([route_through(llms, windows.select(torch.arange(i, min(i + 8, WINDOWS))), 4, )
                            for i in range(0, WINDOWS, 8)])
    assert 0 < streamed.num_tokens < first.num_tokens
    for name in ("sequence_ids", "offsets", "targets"):
        assert torch.equal(getattr(streamed, name), getattr(second, name)), name
    assert torch.equal(streamed.all_positions(), second.all_positions())
    # LLM 1 packs other sequences side by side than the materialized pass: equal up to fp32 summation order
    torch.testing.assert_close(streamed.inputs.float(), second.inputs.float(), atol=2e-2, rtol=2e-2)


def test_endless_stream_carries_waiting_tokens_and_restarts_in_a_new_order(llms):
    windows = corpus_windows()
    collect_hard_tokens(llms[0], windows, 0.3, 4)
    stream = HardTokenStream(llms[:1], windows, 4, SEQ_LEN, seed=1, chunk_windows=6)
    batches = [stream.next_batch() for _ in range(40)]  # more than a pass holds
    assert stream.pass_index >= 1 and all(b is not None for b in batches)
    capacity = 4 * SEQ_LEN
    fill = sum(b.num_tokens for b in batches[:-1]) / (capacity * (len(batches) - 1))
    assert fill > 0.75, "first fit over a buffer of a batch or more fills most of each batch"
    assert window_order(WINDOWS, 0, 1, seed=1).tolist() != window_order(WINDOWS, 0, 1, seed=2).tolist()


def test_stream_state_restores_the_rest_of_the_stream_exactly(llms):
    windows = corpus_windows()
    collect_hard_tokens(llms[0], windows, 0.3, 4)
    make = lambda: HardTokenStream(llms[:1], windows, 4, SEQ_LEN, seed=3, chunk_windows=5)  # noqa: E731
    straight = make()
    expected = [straight.next_batch() for _ in range(30)]
    first = make()
    for _ in range(13):
        first.next_batch()
    assert first.buffer is not None, "tokens are waiting at the cut"
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(expected[13:], (resumed.next_batch() for _ in range(17))):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.position_ids, b.position_ids) and torch.equal(a.segment_ids, b.segment_ids)


def test_shares_are_disjoint_and_cover_the_windows():
    shares = [window_order(10, r, 3, seed=0) for r in range(3)]
    assert sorted(torch.cat(shares).tolist()) == list(range(10))
    assert [s.numel() for s in shares] == [4, 3, 3]


def test_validation_batches_are_one_per_batch_of_windows_whatever_is_handed_on(llms):
    windows = corpus_windows(10)
    llm = llms[0]
    llm.threshold.fill_(-2.0)  # no token scores below: nothing is handed on
    empty = list(window_batches([llm], windows, 4, SEQ_LEN))
    assert len(empty) == 3 and all(b.num_tokens == 0 and tuple(b.inputs.shape) == (4, SEQ_LEN, llm.dim) for b in empty)
    llm.threshold.fill_(2.0)  # every token is hard
    full = list(window_batches([llm], windows, 4, SEQ_LEN))
    assert [b.num_tokens for b in full] == [64, 64, 32]


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.999])
def test_distributed_quantile_is_the_single_process_quantile(q):
    scores = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    scores[::7] = 0.25  # ties
    parts = [scores[:500], scores[500:500], scores[500:]]  # the middle process holds nothing
    results = run_processes([lambda reduce, p=p: quantile(p, q, reduce) for p in parts])
    assert results == [quantile(scores, q)] * 3


def test_distributed_threshold_refuses_diverged_scores():
    with pytest.raises(ValueError, match="NaN or infinite"):
        run_processes([lambda reduce: calibrate_threshold(torch.tensor([0.1, float("nan")]), 0.3, reduce),
                       lambda reduce: calibrate_threshold(torch.tensor([0.2, 0.3]), 0.3, reduce)])


def test_streamed_calibration_over_two_processes_equals_one(llms):
    windows = corpus_windows()
    one, _ = calibrate_streamed([], llms[0], windows, 0.3, 4, tokens=None, seed=0)
    copies = [copy.deepcopy(llms[0]) for _ in range(2)]  # a process each: their forward hooks must not mix
    two = run_processes([lambda reduce, r=r: calibrate_streamed([], copies[r], windows, 0.3, 4, tokens=None, seed=0, rank=r,
                                                                world_size=2, reduce=reduce)[0] for r in range(2)])
    assert two[0] == two[1] == one
    assert one["calibration_tokens"] == windows.num_tokens and abs(one["hard_fraction"] - 0.3) < 0.01
    collect_hard_tokens(llms[0], windows, 0.3, 4)  # the materialized hand-over scores every token too
    assert one["threshold"] == float(llms[0].threshold)


def test_calibration_sample_is_seeded_whole_windows():
    assert calibration_windows(100, 16, None, 0).tolist() == list(range(100))
    assert calibration_windows(100, 16, 10**6, 0).tolist() == list(range(100))
    sample = calibration_windows(100, 16, 330, seed=1)
    assert sample.numel() == 21 and sample.tolist() == sorted(set(sample.tolist()))
    assert torch.equal(sample, calibration_windows(100, 16, 330, seed=1))
    assert not torch.equal(sample, calibration_windows(100, 16, 330, seed=2))


def test_auto_mode_materializes_what_fits_the_budget():
    small = handover_bytes(10**6, 768, 0.3, 4 * 10**9)
    assert small == int(10**6 * 0.3 * (768 * 2 + 24)), "every token's hidden state waits in memory"
    large = handover_bytes(10**9, 768, 0.3, 4 * 10**9)
    assert large == int(10**9 * 0.3 * (768 * 2 + 24)) + 10**9 * 768 * 2, "and in a temporary file beyond the budget"
    assert choose_mode("auto", small, 10e9, 10**12)[0] is False
    streams, why = choose_mode("auto", large, 10e9, 10**15)
    assert streams and "materialize_gb" in why
    streams, why = choose_mode("auto", small, 10e9, small)
    assert streams and "free" in why
    assert choose_mode("stream", small, 10e9, 10**12)[0] and not choose_mode("materialize", large, 1, 1)[0]


def test_first_fit_places_the_oldest_first_and_keeps_the_rest_waiting():
    placed, bounds, waiting = first_fit_rows([5, 9, 4, 8, 3, 7], num_rows=2, row_length=10)
    rows = [placed[bounds[r] : bounds[r + 1]] for r in range(2)]
    assert rows == [[0, 2], [1]] and waiting == [3, 4, 5]
