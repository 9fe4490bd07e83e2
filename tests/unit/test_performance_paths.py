"""The fast paths of issue 5 compute what the plain ones do: fused-able loss, vocabulary padding,
mask-free causal rows, fixed-length batches, pipelined inference. Merged optimizer groups, batches moved without
blocking and the compiled inference pass: tests/system/test_performance_paths_trainer.py."""


import pytest
import torch
import torch.nn.functional as F

from cascade import LLM, SequenceData
from cascade.exit_fn import EXIT_FNS
from cascade.model.hf_models import build_causal_lm, pad_vocab
from cascade.routing.scoring import run_llm
from cascade.training.losses import next_token_loss
from cascade.sequence_data import IGNORE_INDEX
from conftest import VOCAB, tiny_model, token_batches

TINY = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}


def padded_and_plain(seed: int = 0) -> tuple[LLM, LLM]:
    """The same weights twice: with the LM head padded from VOCAB to 128 rows, and unpadded."""
    plain = tiny_model("gpt2", seed=seed)
    padded = tiny_model("gpt2", seed=seed)
    pad_vocab(padded, 64)
    return LLM(padded), LLM(plain)


def test_next_token_loss_value_and_gradients_equal_cross_entropy_on_float32_logits():
    llm = LLM(tiny_model("gpt2"))
    h = torch.randn(2, 7, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 7))
    targets[1, -2:] = IGNORE_INDEX
    loss = next_token_loss(llm, h, targets)
    (grad_h,) = torch.autograd.grad(loss, h)
    h_ref = h.detach().double().requires_grad_()
    logits = F.linear(h_ref, llm.base_llm.lm_head.weight.double())
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (grad_ref,) = torch.autograd.grad(ref, h_ref)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert torch.allclose(grad_h.double(), grad_ref, rtol=1e-4, atol=1e-8)


def test_padded_vocabulary_is_never_predicted():
    padded, plain = padded_and_plain()
    assert padded.base_llm.lm_head.weight.shape[0] == 128 and padded.vocab_size == plain.vocab_size == VOCAB
    with torch.no_grad():  # padded rows that would win every argmax if they were seen
        padded.base_llm.lm_head.weight[VOCAB:] = 100 * padded.base_llm.lm_head.weight[:1]
    x, y = token_batches(1)[0]
    h_padded, history_padded = padded(x)
    h_plain, history_plain = plain(x)
    assert torch.equal(h_padded, h_plain)
    assert padded.get_logits(h_padded).shape[-1] == VOCAB
    assert torch.allclose(padded.get_logits(h_padded), plain.get_logits(h_plain))
    assert next_token_loss(padded, h_padded, y).item() == pytest.approx(next_token_loss(plain, h_plain, y).item())
    for name, fn in EXIT_FNS.items():
        assert torch.allclose(fn(history_padded, h_padded, padded), fn(history_plain, h_plain, plain), atol=1e-6), name


def test_the_loss_through_a_padded_head_has_the_gradients_of_the_unpadded_one():
    padded, plain = padded_and_plain()
    x, y = token_batches(1)[0]
    next_token_loss(padded, padded(x)[0], y).backward()
    next_token_loss(plain, plain(x)[0], y).backward()
    grad_padded, grad_plain = padded.base_llm.lm_head.weight.grad, plain.base_llm.lm_head.weight.grad  # tied: also the embedding's
    assert torch.allclose(grad_padded[:VOCAB], grad_plain, atol=1e-6)
    assert torch.count_nonzero(grad_padded[VOCAB:]) == 0


def test_padded_vocabulary_survives_save_and_load(tmp_path):
    llm = LLM(build_causal_lm("gpt2", TINY, vocab_size=VOCAB, pad_vocab_to_multiple_of=64))
    llm.save_pretrained(tmp_path)
    loaded = LLM.from_pretrained(tmp_path)
    assert loaded.vocab_size == VOCAB and loaded.base_llm.get_output_embeddings().weight.shape[0] == 128
    with pytest.raises(ValueError, match="pad_vocab_to_multiple_of must be >= 1"):
        pad_vocab(loaded.base_llm, 0)


def test_plain_causal_rows_need_no_mask_or_positions():
    llm = LLM(tiny_model("gpt2"))
    data = SequenceData.from_token_batches(token_batches(1))
    batch = next(data.batches(3))
    assert batch.default_positions and batch.model_position_ids() is None
    without, _ = llm(batch.inputs)
    with_mask, _ = llm(batch.inputs, position_ids=batch.position_ids)
    assert torch.allclose(without, with_mask, atol=1e-6)


def test_fixed_length_batches_have_one_shape_and_the_same_tokens():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 12, (40,), generator=g)
    n = int(lengths.sum())
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    data = SequenceData(torch.randn(n, 8, generator=g), torch.arange(n), torch.arange(n), offsets, torch.arange(40))
    varying = list(data.batches(4, row_length=16))
    fixed = list(data.batches(4, row_length=16, fixed_length=True))
    assert {b.inputs.shape[1] for b in fixed[:-1]} == {16}
    for a, b in zip(varying, fixed):
        assert torch.equal(a.token_index[a.token_index >= 0], b.token_index[b.token_index >= 0])
        assert a.num_tokens == b.num_tokens and not b.default_positions


def test_run_llm_results_are_in_token_order_with_and_without_a_hidden_file(tmp_path):
    llm = LLM(tiny_model("gpt2"))
    data = SequenceData.from_token_batches(token_batches(3, batch_size=5))
    every = run_llm(llm, data, 4, scores=True, hidden="host", nll=True)
    with open(tmp_path / "hidden.bin", "wb") as f:
        streamed = run_llm(llm, data, 4, scores=True, hidden=f)
    raw = torch.frombuffer(bytearray((tmp_path / "hidden.bin").read_bytes()), dtype=torch.bfloat16).view(-1, llm.dim)
    assert torch.equal(raw, every.hidden) and torch.equal(streamed.scores, every.scores)
    h, _ = llm(data.inputs.view(15, 16))
    nll = F.cross_entropy(llm.get_logits(h).flatten(0, 1), data.targets, reduction="none")
    assert torch.allclose(every.nll, nll, atol=1e-5)


def test_a_failed_store_stops_run_llm_with_its_error():
    """Results are stored batches after they were computed; a store's error still stops the run, and the LLM
    goes back to training mode."""

    class FullDisk:
        def write(self, data):
            raise OSError(28, "No space left on device")

    llm = LLM(tiny_model("gpt2")).train()
    data = SequenceData.from_token_batches(token_batches(3, batch_size=5))
    with pytest.raises(OSError, match="No space left"):
        run_llm(llm, data, 4, scores=True, hidden=FullDisk())
    assert llm.training


def test_padding_rows_give_the_last_batch_the_shape_of_the_others():
    data = SequenceData.from_token_batches(token_batches(1, batch_size=5))
    (seqs, bounds), = data.plan_batches(8)
    batch = data.make_batch(seqs, bounds, num_rows=8)
    assert batch.inputs.shape == (8, 16) and batch.num_tokens == 80
    assert (batch.targets[5:] == IGNORE_INDEX).all() and (batch.token_index[5:] == -1).all()
    # rows of padding alone keep the batch on the others' mask-free path (one compiled graph for every batch)
    assert batch.single_sequence_rows and batch.default_positions
    assert batch.model_position_ids() is None and batch.model_segment_ids() is None
    llm = LLM(tiny_model("gpt2"))
    alone, _ = llm(data.inputs.view(5, 16))
    for position_ids, segment_ids in ((None, None), (batch.position_ids, batch.segment_ids)):
        h, _ = llm(batch.inputs, position_ids=position_ids, segment_ids=segment_ids)
        assert torch.allclose(h[:5], alone, atol=1e-5)
