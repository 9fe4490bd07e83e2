"""Mixture-of-Depths on the model's own decoder layers (cascade/model/mod.py), on every tested family, both attention
paths, training and evaluation: no Lightning, but a second of models, kept out of the unit tier's ten-second budget.
As a StageModule setting: tests/system/test_mod_training.py."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from cascade import LLM
from cascade.routing.layer_skip import run_from
from cascade.model.mod import MixtureOfDepths, gather_index, gather_mask, top_k_per_sequence
from conftest import ARCHS, VOCAB, tiny_model


def layers_and_dim(llm):
    return llm.layers, llm.dim


def tokens(rows=3, length=10, seed=0):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def balance_router(llm, mod, x, layer=2):
    """Centre the router on x's layer inputs so that about half the tokens pass sigmoid(logit) > 0.5."""
    _, history = llm(x)
    with torch.no_grad():
        router = mod.routers[str(layer)]
        router.bias -= router(history[layer - 1]).median()


def test_top_k_per_sequence_keeps_each_segments_best_and_never_padding():
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 9.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    segments = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    kept = top_k_per_sequence(scores, segments, 0.5)  # ceil(1.5) = 2 of segment 0, ceil(1.0) = 1 of segment 1, 3 of row 1
    assert kept.tolist() == [[True, False, True, False, True, False], [False, False, False, True, True, True]]
    assert top_k_per_sequence(torch.zeros(1, 10), torch.zeros(1, 10, dtype=torch.long), 0.3).sum() == 3  # not 4


def test_gather_index_pads_short_rows_and_the_mask_hides_the_padding():
    selected = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid = gather_index(selected)
    assert index[0].tolist() == [0, 2, 3] and index[1, 0] == 1
    assert valid.tolist() == [[True, True, True], [True, False, False]]
    assert gather_mask(None, index, valid) is None  # padding slots come last: plain causal attention never reaches them
    causal = torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 1, 4, 4)
    mask = gather_mask(causal, index, valid)
    assert mask[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert mask[1, 0].tolist() == [[True, False, False], [False, True, False], [True, False, True]]  # rows 1, 2: padding
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~causal, -1e9)
    assert torch.equal(gather_mask(additive, index, valid) == 0, mask)
    full, none_padded = gather_index(torch.ones(2, 4, dtype=torch.bool))
    assert none_padded is None and full.tolist() == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_capacity_one_in_training_is_the_plain_model_and_trains_the_router(arch, attn):
    llm = LLM(tiny_model(arch, attn=attn))
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=1.0).train()
    x = tokens()
    plain, _ = llm(x)
    with llm.routed_by(mod):
        routed, _ = llm(x)
    assert torch.equal(routed, plain)
    assert mod.selected[2].all() and mod.compute_fraction() == 1.0
    routed.pow(2).sum().backward()
    assert mod.routers["2"].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_half_capacity_runs_the_layer_on_half_the_tokens_and_skipped_tokens_pass_through(arch):
    llm = LLM(tiny_model(arch, attn="eager" if arch == "gpt2" else "sdpa"))
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=0.5).train()
    x = tokens(length=9)
    seen = []
    handle = llm.layers[1].register_forward_pre_hook(lambda m, args, kwargs: seen.append((args or [kwargs["hidden_states"]])[0].shape), with_kwargs=True)
    try:
        with llm.routed_by(mod):
            _, history = llm(x)
    finally:
        handle.remove()
    assert seen == [torch.Size([3, 5, llm.dim])]  # ceil(0.5 * 9) tokens per row
    selected = mod.selected[2]
    assert selected.sum(1).tolist() == [5, 5, 5] and mod.layer_tokens[2] == 15
    assert torch.equal(history[2][~selected], history[1][~selected])
    assert not torch.allclose(history[2][selected], history[1][selected])
    assert mod.compute_fraction() == pytest.approx((27 + 15) / 54)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_kept_tokens_get_the_layer_run_on_them_alone_at_their_positions(arch, training, attn):
    llm = LLM(tiny_model(arch, attn=attn))
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=0.5).train(training)
    x = tokens(rows=4, length=12)
    balance_router(llm, mod, x)
    with llm.routed_by(mod):
        h_out, history = llm(x)
    selected = mod.selected[2]
    if not training:
        assert len(set(selected.sum(1).tolist())) > 1  # rows of different counts: padding slots were used
    for row in range(x.shape[0]):
        kept = selected[row].nonzero().squeeze(1)
        alone = run_from(llm, history[1][row, kept][None], kept[None], None, 1)  # layer 2 on the kept tokens only
        assert_close(h_out[row, kept], alone[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_routing_is_causal_and_training_top_k_is_not(arch):
    llm = LLM(tiny_model(arch))
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=0.5)
    x, t = tokens(rows=2, length=16), 7
    balance_router(llm, mod, x)

    def run(inputs, training):
        mod.train(training)
        with llm.routed_by(mod):
            h_out, _ = llm(inputs)
        return h_out, mod.selected[2]

    futures = [torch.cat([x[:, : t + 1], tokens(rows=2, length=16 - t - 1, seed=s)], 1) for s in range(1, 6)]
    h_out, selected = run(x, training=False)
    assert selected[:, : t + 1].any() and not selected[:, : t + 1].all()
    for future in futures:
        other_h, other_selected = run(future, training=False)
        assert torch.equal(other_selected[:, : t + 1], selected[:, : t + 1])
        assert_close(other_h[:, : t + 1], h_out[:, : t + 1])
    _, top_k = run(x, training=True)
    assert any(not torch.equal(run(f, training=True)[1][:, : t + 1], top_k[:, : t + 1]) for f in futures)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_sequences_are_routed_and_attended_as_if_alone(arch, training):
    llm = LLM(tiny_model(arch))
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=0.5).train(training)
    a, b = tokens(rows=1, length=5, seed=1), tokens(rows=1, length=7, seed=2)
    balance_router(llm, mod, torch.cat([a, b], 1))
    row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], 1)
    segments = torch.tensor([[0] * 5 + [1] * 7 + [-1] * 2])
    positions = torch.tensor([[*range(5), *range(7), 0, 0]])
    with llm.routed_by(mod):
        packed, _ = llm(row, position_ids=positions, segment_ids=segments)
    packed_selected = mod.selected[2][0]
    assert not packed_selected[-2:].any()  # padding is never routed
    for seq, span in ((a, slice(0, 5)), (b, slice(5, 12))):
        with llm.routed_by(mod):
            alone, _ = llm(seq)
        assert torch.equal(mod.selected[2][0], packed_selected[span])
        assert_close(packed[0, span], alone[0])


def test_aux_loss_trains_the_router_to_predict_its_top_k():
    llm = LLM(tiny_model("llama", num_hidden_layers=4)).requires_grad_(False)
    mod = MixtureOfDepths(llm.layers, llm.dim, capacity=0.25).train()
    assert mod.layers == [2, 4]
    optimizer = torch.optim.Adam(mod.parameters(), lr=1e-1)
    x = tokens(rows=4, length=16)
    losses = []
    for _ in range(15):
        with llm.routed_by(mod):
            llm(x)
        loss = mod.aux_loss()
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("capacity", [0, -0.5, 1.5])
def test_bad_capacity_is_rejected(capacity):
    with pytest.raises(ValueError, match=rf"capacity must be in \(0, 1\], got {capacity}"):
        MixtureOfDepths(*layers_and_dim(LLM(tiny_model("gpt2"))), capacity)


@pytest.mark.parametrize("layers", [[0], [3], [], [2, 2]])
def test_bad_layers_are_rejected(layers):
    with pytest.raises(ValueError, match=rf"layers of 1..2 .* got {layers}".replace("[", r"\[").replace("]", r"\]")):
        MixtureOfDepths(*layers_and_dim(LLM(tiny_model("gpt2"))), 0.5, layers)


def test_a_layer_input_that_cannot_be_gathered_is_named():
    class CrossLayer(nn.Module):
        def forward(self, hidden_states, cross_states=None):
            return hidden_states

    mod = MixtureOfDepths(*layers_and_dim(LLM(tiny_model("gpt2"))), 0.5)
    with pytest.raises(ValueError, match="'cross_states'"):
        mod.run_layer(2, CrossLayer(), torch.randn(1, 4, 32), (), {"cross_states": torch.randn(1, 4, 32)})


@torch.no_grad()
def test_the_evaluation_counts_only_the_layers_the_routers_let_tokens_through():
    from cascade.ensemble import Ensemble
    from cascade.model.flops import forward_flops_per_token
    from cascade.run.report import format_diagnostics

    llm = LLM(tiny_model("gpt2"))  # 2 layers, layer 2 routed
    mod = llm.enable_mod(capacity=0.5)
    x = tokens(rows=4, length=16, seed=3)
    balance_router(llm, mod, x)
    llm.eval()
    llm(x)
    kept = float(mod.selected[2].float().mean())
    assert 0 < kept < 1
    stats = Ensemble([llm]).evaluate([(x, torch.roll(x, -1, 1))], batch_size=4)
    full = forward_flops_per_token(llm.base_llm, 16)
    assert stats["llm_stats"][0]["layer_tokens"] == pytest.approx(x.numel() * (1 + kept))
    assert stats["compute_fraction"] == pytest.approx(forward_flops_per_token(llm.base_llm, 16, 1 + kept) / full)
    assert stats["compute_fraction"] < 1
    assert stats["llm_stats"][0]["mod_layer_fraction"] == pytest.approx((1 + kept) / 2)
    assert f"through {(1 + kept) / 2:.1%} of its layers' token work" in format_diagnostics({**stats, "prefix_ppl": [1.0]})
