import pytest
import torch
from torch.testing import assert_close

from cascade import LLM, SequenceData, create_sequence_data, Ensemble
from cascade.routing.compaction import compact_hard_tokens
from cascade.routing.threshold import hard_mask, quantile
from conftest import run_processes, token_batches, tiny_model


@pytest.mark.parametrize("q", [0.01, 0.3, 0.5, 0.77, 0.99])
@pytest.mark.parametrize("n", [1, 2, 10, 1001])
def test_quantile_equals_torch_quantile(q, n):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert quantile(scores, q) == pytest.approx(float(torch.quantile(scores, q)), abs=1e-6)
    ties = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n)).float()
    assert quantile(ties, q) == pytest.approx(float(torch.quantile(ties, q)), abs=1e-6)


@pytest.mark.parametrize("q", [0.1, 0.3, 0.5, 0.9])
def test_hard_fraction_is_hard_ratio(q):
    scores = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    hard = hard_mask(scores, quantile(scores, q))
    assert abs(hard.float().mean().item() - q) <= 1e-4


def test_compaction_by_hand():
    #                 seq 0        seq 1     seq 2
    data = SequenceData(
        inputs=torch.arange(10, 19),
        targets=torch.arange(20, 29),
        positions=torch.tensor([0, 1, 2, 3, 0, 1, 0, 1, 2]),
        offsets=torch.tensor([0, 4, 6, 9]),
        sequence_ids=torch.tensor([7, 8, 9]),
    )
    hard = torch.tensor([0, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    out = compact_hard_tokens(data, hard)
    assert out.inputs.tolist() == [11, 13, 16, 17, 18]
    assert out.targets.tolist() == [21, 23, 26, 27, 28]
    assert out.positions.tolist() == [1, 3, 0, 1, 2]
    assert out.offsets.tolist() == [0, 2, 5]
    assert out.sequence_ids.tolist() == [7, 9], "sequence 8 had no hard token and vanished"
    easy = compact_hard_tokens(data, ~hard)
    assert out.num_tokens + easy.num_tokens == data.num_tokens
    assert compact_hard_tokens(data, torch.zeros(9, dtype=torch.bool)).num_sequences == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_collect_hard_tokens_threshold_and_hand_over(arch):
    llm = LLM(tiny_model(arch))
    batches = token_batches(num_batches=3, batch_size=4, seq_len=16)
    data = create_sequence_data(Ensemble([llm]), batches)
    hard_ratio = 0.3
    out = llm.collect_hard_tokens(data, hard_ratio, batch_size=5)

    # independent reference: each sequence alone through the LLM, full hidden history
    scores, hidden = [], []
    with torch.no_grad():
        for s in range(data.num_sequences):
            one = data.sequence(s)
            h_out, history = llm(one.inputs[None])
            scores.append(llm.exit_fn(history, h_out, llm)[0])
            hidden.append(h_out[0])
    scores, hidden = torch.cat(scores), torch.cat(hidden)
    assert float(llm.threshold) == pytest.approx(float(torch.quantile(scores, hard_ratio)), abs=1e-6)
    hard = scores < llm.threshold
    assert abs(hard.float().mean().item() - hard_ratio) <= 1 / data.num_tokens
    assert out.num_tokens == int(hard.sum())
    assert out.input_type == "hidden_states" and out.inputs.dtype == torch.bfloat16
    assert_close(out.inputs.float(), hidden[hard].bfloat16().float())
    assert torch.equal(out.targets, data.targets[hard])
    assert torch.equal(out.positions, data.positions[hard])
    # per sequence: order kept, sequences without hard tokens gone
    per_seq = torch.stack([hard[data.offsets[s] : data.offsets[s + 1]].sum() for s in range(data.num_sequences)])
    assert out.sequence_ids.tolist() == per_seq.nonzero().squeeze(1).tolist()
    assert out.lengths.tolist() == per_seq[per_seq > 0].tolist()
    for s in range(out.num_sequences):
        positions = out.sequence(s).positions
        assert (positions[1:] > positions[:-1]).all()


@pytest.mark.parametrize("hard_ratio", [0.0, 1.0, -0.5, 1.5])
def test_hard_ratio_outside_open_unit_interval_is_rejected(hard_ratio):
    llm = LLM(tiny_model("gpt2"))
    data = create_sequence_data(Ensemble([llm]), token_batches(1))
    with pytest.raises(ValueError, match="hard_ratio must lie strictly between 0 and 1"):
        llm.collect_hard_tokens(data, hard_ratio, batch_size=2)


def test_empty_data_is_rejected():
    llm = LLM(tiny_model("gpt2"))
    data = create_sequence_data(Ensemble([llm]), token_batches(1))
    nothing = compact_hard_tokens(data, torch.zeros(data.num_tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="holds no tokens"):
        llm.collect_hard_tokens(nothing, 0.3, batch_size=2)
    with pytest.raises(ValueError, match="no batches"):
        create_sequence_data(Ensemble([llm]), [])


def test_equal_scores_give_an_empty_hard_set_error():
    llm = LLM(tiny_model("gpt2"), exit_fn=lambda history, h_out, llm: torch.ones(h_out.shape[:-1]))
    data = create_sequence_data(Ensemble([llm]), token_batches(1))
    with pytest.raises(ValueError, match="hard set is empty"):
        llm.collect_hard_tokens(data, 0.3, batch_size=2)


@pytest.mark.parametrize("host_memory_bytes", [0, 1 << 30], ids=["through-a-file", "in-host-memory"])
def test_hand_over_streamed_to_disk_equals_the_in_memory_one(tmp_path, monkeypatch, host_memory_bytes):
    import cascade.routing.compaction as routing
    from cascade import SequenceData as SD
    from cascade.routing.handover import collect_hard_tokens
    from cascade.routing.route import HiddenBudget

    monkeypatch.setattr(routing, "CHUNK_TOKENS", 7)  # many chunks, boundaries inside sequences
    llm = LLM(tiny_model("llama"))
    data = create_sequence_data(Ensemble([llm]), token_batches(num_batches=2, batch_size=4, seq_len=16))
    in_memory, scores = collect_hard_tokens(llm, data, 0.3, batch_size=3)
    threshold = float(llm.threshold)
    llm.threshold.fill_(0.0)
    budget = HiddenBudget(host_memory_bytes=host_memory_bytes)
    _, streamed_scores = collect_hard_tokens(llm, data, 0.3, 3, path=tmp_path / "part", budget=budget)
    assert float(llm.threshold) == threshold and torch.equal(streamed_scores, scores)
    streamed = SD.load(tmp_path / "part")
    for name in ("inputs", "targets", "positions", "offsets", "sequence_ids"):
        assert torch.equal(getattr(streamed, name), getattr(in_memory, name)), name
    assert [p.name for p in tmp_path.iterdir()] == ["part"], "the temporary file of hidden states is gone"


def test_a_process_with_no_tokens_hands_over_an_empty_part_of_hidden_states(tmp_path):
    """Under data parallelism a process may get no sequence; it still takes part in the threshold, and its part is
    hidden states of the LLM's width, so that the next stage reads every part alike."""
    from cascade.routing.handover import collect_hard_tokens
    from cascade.routing.threshold import calibrate_threshold

    llm = LLM(tiny_model("gpt2"))
    data = create_sequence_data(Ensemble([llm]), token_batches(1))
    nothing = data.select(torch.arange(0))
    others = torch.tensor([0.2, 0.4, 0.6, 0.8])  # the other process's scores
    handed, threshold = run_processes([
        lambda reduce: collect_hard_tokens(llm, nothing, 0.3, 4, reduce, path=tmp_path / "part").hard,
        lambda reduce: calibrate_threshold(others, 0.3, reduce),
    ])
    assert float(llm.threshold) == threshold == pytest.approx(quantile(others, 0.3))
    assert handed.num_tokens == 0 and handed.input_type == "hidden_states" and tuple(handed.inputs.shape) == (0, llm.dim)
    assert handed.inputs.dtype == torch.bfloat16
