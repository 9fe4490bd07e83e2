"""Rounds of a streamed stage (`GainRouter`): LLM k-1 re-routed by a gain router fitted to LLM k as it is, calibrated
to hard_ratio, LLM k going on from its weights on the new router's tokens; the routing saved, loaded and restored from a
checkpoint, and the same with one process and with two."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.gain_router import GainRouter
from cascade import LLM, Ensemble
from cascade.ensemble import load_routing, routing_state, save_routing, set_routing
from cascade.exit_fn import learned_exit_fn
from cascade.routing.learned_exit import route_by_gain
from cascade.routing.stream import calibrate_streamed, calibration_scores
from conftest import tiny_model, write_corpus
from datamodules.stream import StreamDataModule
from datamodules.text import TextDataModule
from lightning_modules import StageModule

TINY = {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}


def corpus(tmp_path, write: bool = True) -> TextDataModule:
    if write:  # spawned processes read what the test wrote: writing it again races with the other process's reading
        write_corpus(tmp_path / "train.txt", 300)
        write_corpus(tmp_path / "val.txt", 40)
    text = TextDataModule(train_files=[str(tmp_path / "train.txt")], val_files=[str(tmp_path / "val.txt")],
                          vocab_size=300, seq_len=32, batch_size=8, cache_dir=str(tmp_path / "cache"))
    text.setup()
    return text


def first_llm(tmp_path, text) -> float:
    """LLM 0 routing by the cosine at 0.3, saved in tmp_path/llm0; returns the fraction it hands on."""
    llm0 = LLM(tiny_model("gpt2", vocab_size=300, n_positions=64))
    stats, _ = calibrate_streamed([], llm0, text.train_data, 0.3, 8, tokens=None, seed=0)
    llm0.save_pretrained(tmp_path / "llm0")
    return stats["hard_fraction"]


class Steps(Callback):
    """Every step's batch (its real tokens' inputs) and LLM 1's weights after it, before the router acts."""

    def __init__(self):
        self.inputs, self.weights = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        real = batch.segment_ids >= 0
        self.inputs.append(batch.inputs[real].float().clone())
        self.weights.append({k: v.clone() for k, v in pl_module.llm.state_dict().items()})


def fit(tmp_path, text, fraction, max_steps, callbacks, ckpt_path=None):
    data = StreamDataModule(text, [tmp_path / "llm0"], fraction, seed=1)
    torch.manual_seed(0)
    module = StageModule(model_config=TINY, vocab_size=300, stage=1, warmup_steps=2)
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
                      default_root_dir=tmp_path, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return data, module, trainer


def test_a_round_routes_by_the_gain_of_llm_k_as_it_is_and_goes_on_from_its_weights(tmp_path):
    text = corpus(tmp_path)
    fraction = first_llm(tmp_path, text)
    before, router, after = Steps(), GainRouter(rounds=2, tokens=4000, steps=40, calibration_tokens=None), Steps()
    data, module, trainer = fit(tmp_path, text, fraction, 8, [before, router, after])
    previous = data.frozen_llms[0]
    assert trainer.global_step == 8 and router.done == 1 and router.stats[0]["step"] == 4
    assert previous.exit_fn is learned_exit_fn and router.routed is previous
    # the round changed nothing of LLM 1, which trained on after it
    assert all(torch.equal(before.weights[3][k], after.weights[3][k]) for k in before.weights[3])
    assert not torch.equal(after.weights[3]["base_llm.transformer.h.0.mlp.c_fc.weight"],
                           after.weights[7]["base_llm.transformer.h.0.mlp.c_fc.weight"])
    # the threshold hands on exactly hard_ratio of the calibration tokens (all of them here)
    scores = calibration_scores([], previous, text.train_data, 8)
    hard = int((scores < previous.threshold).sum())
    assert hard == router.stats[0]["hard_tokens"] and abs(hard / scores.numel() - 0.3) < 1e-3
    # every token handed on after the round (but the batch Lightning drew before it) is hard by the gain router; its
    # score read from the handed-over state (LLM 0's final-norm output, in bf16)
    with torch.no_grad():
        hard_by_router = [float((learned_exit_fn([], x, previous) < previous.threshold).float().mean())
                          for x in before.inputs]
    assert min(hard_by_router[5:]) > 0.99, hard_by_router
    assert max(hard_by_router[:4]) < 0.9, hard_by_router  # the cosine's tokens were not the router's


def test_a_resumed_stage_routes_as_it_did_when_checkpointed(tmp_path):
    text = corpus(tmp_path)
    fraction = first_llm(tmp_path, text)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    data, _, _ = fit(tmp_path, text, fraction, 8, [GainRouter(rounds=2, tokens=4000, steps=40, calibration_tokens=None),
                                                   checkpoints])
    resumed_router = GainRouter(rounds=2, tokens=4000, steps=40, calibration_tokens=None)
    resumed, _, trainer = fit(tmp_path, text, fraction, 8, [resumed_router], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    assert trainer.global_step == 8 and resumed_router.done == 1  # not routed a second time
    one, two = data.frozen_llms[0], resumed.frozen_llms[0]
    assert two.exit_fn is learned_exit_fn and torch.equal(one.threshold, two.threshold)
    for name, value in one.exit_classifier.state_dict().items():
        assert torch.equal(value, two.exit_classifier.state_dict()[name]), name


def test_the_routing_saves_and_loads_bitwise_and_the_ensemble_routes_by_it(tmp_path):
    text = corpus(tmp_path)
    first_llm(tmp_path, text)
    llm0, llm1 = LLM.from_pretrained(tmp_path / "llm0"), LLM(tiny_model("gpt2", seed=1, vocab_size=300, n_positions=64))
    for k, llm in enumerate((llm0, llm1)):  # as their stages saved them
        llm.save_pretrained(tmp_path / "run" / f"stage_{k}" / "llm")
    route_by_gain([], llm0, llm1, text.val_data, text.train_data, 0.3, 8, tokens=3000, calibration_tokens=None, seed=0,
                  steps=20)
    cosine = LLM.from_pretrained(tmp_path / "run" / "stage_0" / "llm")  # its own files: the cosine, as stage 0 saved it
    assert cosine.exit_fn is not learned_exit_fn and cosine.exit_classifier is None
    save_routing(llm0, tmp_path / "run" / "stage_1" / "routing")
    loaded = Ensemble.from_pretrained(tmp_path / "run").llms[0]
    restored = LLM.from_pretrained(tmp_path / "run" / "stage_0" / "llm")
    set_routing(restored, routing_state(llm0))  # what a checkpoint carries
    for llm in (loaded, restored):
        assert llm.exit_fn is learned_exit_fn and torch.equal(llm.threshold, llm0.threshold)
        for name, value in llm0.exit_classifier.state_dict().items():
            assert torch.equal(value, llm.exit_classifier.state_dict()[name]), name
        assert torch.equal(calibration_scores([], llm, text.val_data, 8), calibration_scores([], llm0, text.val_data, 8))
    alone = LLM.from_pretrained(tmp_path / "run" / "stage_0" / "llm")
    load_routing(alone, tmp_path / "run" / "stage_1" / "routing")
    assert torch.equal(alone.threshold, llm0.threshold)
    # the last LLM of the ensemble taken has no later stage to route to: its own routing
    assert Ensemble.from_pretrained(tmp_path / "run", num_llms=1).llms[0].exit_classifier is None


def _route(rank: int, world_size: int, tmp_path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        text = corpus(tmp_path, write=False)
        llm0, llm1 = LLM.from_pretrained(tmp_path / "llm0"), LLM.from_pretrained(tmp_path / "llm1")

        def reduce(t, op):
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
            return t

        def broadcast(state):
            box = [state]
            dist.broadcast_object_list(box, src=0)
            return box[0]

        route_by_gain([], llm0, llm1, text.val_data, text.train_data, 0.3, 8, tokens=3000, calibration_tokens=5000,
                      seed=0, steps=20, rank=rank, world_size=world_size, reduce=reduce, broadcast=broadcast)
        if rank == 0:
            hard = calibration_scores([], llm0, text.train_data, 8) < llm0.threshold
            torch.save({"threshold": llm0.threshold, "hard": hard}, tmp_path / f"routed-{world_size}.pt")
    finally:
        dist.destroy_process_group()


def test_one_and_two_processes_route_alike(tmp_path):
    """The same threshold and hard set with one process and with two (gloo): the router is rank 0's, the threshold
    the exact quantile of both processes' scores."""
    text = corpus(tmp_path)
    first_llm(tmp_path, text)
    LLM(tiny_model("gpt2", seed=1, vocab_size=300, n_positions=64)).save_pretrained(tmp_path / "llm1")
    for world_size, port in ((1, 29511), (2, 29512)):
        mp.spawn(_route, args=(world_size, tmp_path, port), nprocs=world_size, join=True)
    one, two = (torch.load(tmp_path / f"routed-{n}.pt") for n in (1, 2))
    assert torch.equal(one["threshold"], two["threshold"])
    assert torch.equal(one["hard"], two["hard"]) and 0 < one["hard"].float().mean() < 1


def test_each_frozen_llm_routes_by_what_the_stage_after_it_saved_but_the_one_the_stage_trains_after(tmp_path):
    from cascade.ensemble import ROUTING_FILE
    from cascade.run.stage_inputs import stage_data
    from cascade.run.state import mark_stage_done

    text = corpus(tmp_path)
    run_dir = tmp_path / "run"
    for k in range(3):
        (run_dir / f"stage_{k}").mkdir(parents=True)
        mark_stage_done(run_dir / f"stage_{k}", {"handover": {"mode": "stream", "hard_fraction": 0.3}, "files": {}})
        if k:  # stage k re-routed LLM k-1
            (run_dir / f"stage_{k}" / "routing").mkdir()
            (run_dir / f"stage_{k}" / "routing" / ROUTING_FILE).write_text("{}")
    routing = [run_dir / "stage_1" / "routing", run_dir / "stage_2" / "routing"]
    # stage 2 trains: LLM 0 as stage 1 routed it, LLM 1 by its own (stage 2 chooses anew)
    assert stage_data(run_dir, 2, text, False).routing_dirs == [routing[0], None]
    # stage 2 only hands over (a run extended by a stage): LLM 1 too as stage 2 routed it
    assert stage_data(run_dir, 2, text, False, handover_only=True).routing_dirs == routing
    joint = stage_data(run_dir, 2, text, False, every_token=True)  # LLM 1 hands on all: 0.3 of the tokens reach it
    assert joint.every_token and abs(joint.expected_hard_fraction - 0.3) < 1e-9
