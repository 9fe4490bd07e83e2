"""Stage training throughput and memory: the framework (StageModule under a Lightning Trainer) vs a plain loop.

One setting per call, every figure measured in the same process:
  - plain loop: the same HF CausalLM (built by `build_causal_lm`), the same batches (pinned, copied
    without blocking), bf16 autocast, fused AdamW with the same groups, warm-up/cosine schedule,
    gradient clipping at 1.0; loss = cross-entropy of the model's logits in float32 (under
    torch.compile when the setting compiles, as one function with the model); run twice: as written
    with transformers (its attention masks, the logits cut to the vocabulary), and with the framework's
    fast paths (SDPA given no mask, `cascade.model.attention`; a padded head's full width, `cascade.training.losses`);
  - framework stage 0: `StageModule` trained by `lightning.Trainer` on stage-0 windows
    (`SequenceDataModule.from_data`), bf16-mixed, TensorBoard logger, no checkpoints or validation;
  - framework stage k > 0: the same on packed hard-token sequences (a random fraction of each
    window's tokens kept, around `hard_ratio` with the spread across windows of a real hand-over;
    hidden-state inputs, block-causal mask), counting real tokens only;
  - which attention kernel each stage runs (CUDA kernel names from the profiler).
Tokens/s is timed between steps `--warmup` and `--steps` with the GPU synchronised at both ends.
MFU follows PaLM / nanoGPT: (6 N + 12 L D T) FLOPs per token, N the parameters without position
embeddings, over `--peak-tflops` (989: H100 SXM dense bf16).

    python benchmarks/bench_stage_training.py --setting eager   # HF defaults: no compile, vocab 50,257, dropout 0.1
    python benchmarks/bench_stage_training.py --setting best    # compiled, vocab padded to 64, dropout 0
    python benchmarks/bench_stage_training.py --smoke           # CPU, tiny (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
import traceback
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim.lr_scheduler import LambdaLR

from cascade.model.attention import own_masks
from cascade.model.hf_models import build_causal_lm
from cascade.llm import LLM
from cascade.training.losses import without_padded_vocab
from cascade.training.optim import warmup_cosine
from cascade.routing.compaction import compact_hard_tokens
from cascade.sequence_data import IGNORE_INDEX, SequenceData
from datamodules.sequence import SequenceDataModule
from lightning_modules.stage import StageModule
from synthetic import random_windows  # benchmarks/synthetic.py

SETTINGS = {  # StageModule / build_causal_lm options of each setting
    "eager": {"compile": False, "pad_vocab_to_multiple_of": None, "dropout": None},
    "best": {"compile": True, "pad_vocab_to_multiple_of": 64, "dropout": 0.0},
}
ATTENTION_KERNELS = ("flash", "fmha", "cudnn", "attention", "mem_eff", "efficient")


def hard_token_data(windows: SequenceData, hard_ratio: float, spread: float, dim: int, seed: int = 1) -> SequenceData:
    """A stage-k hand-over's shape: random bf16 hidden states of a random fraction of every window's tokens, the
    fraction drawn per window around `hard_ratio` with standard deviation `spread` (how hard windows differ)."""
    g = torch.Generator().manual_seed(seed)
    ratio = (hard_ratio + spread * torch.randn(windows.num_sequences, generator=g)).clamp(0.01, 0.99)
    hard = torch.rand(windows.num_tokens, generator=g) < ratio.repeat_interleave(windows.lengths)
    kept = compact_hard_tokens(windows, hard)
    inputs = torch.randn(kept.num_tokens, dim, generator=g).bfloat16()
    return SequenceData(inputs, kept.targets, kept.positions, kept.offsets, kept.sequence_ids)


def model_config(args) -> dict:
    config = json.loads(args.model_config)
    dropout = SETTINGS[args.setting]["dropout"]
    if dropout is not None:
        config.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return config


def flops_per_token(llm: LLM, seq_len: int) -> float:
    params = sum(p.numel() for p in llm.parameters())
    position = getattr(llm.base_llm.base_model, "wpe", None)
    params -= position.weight.numel() if position is not None else 0
    return 6 * params + 12 * llm.num_layers * llm.dim * seq_len


class StepTimer(Callback):
    """Wall clock from the start of step `warmup` to the end of training, GPU synchronised at both ends."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.start, self.seconds = warmup, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            synchronize()
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.tokens += batch.num_tokens

    def on_train_end(self, trainer, pl_module):
        synchronize()
        self.seconds = time.perf_counter() - self.start


class SyncAudit(Callback):
    """Where the framework's steps `first`..`first + count - 1` make the CPU wait for the GPU.

    torch's sync debug mode warns on every synchronising CUDA call (a blocking copy, `.item()`,
    a boolean index); each warning's Python stack, cut to the frames outside torch, is counted.
    The window starts at the end of step `first - 1`, so the batch transfers of its steps are in it.
    """

    def __init__(self, first: int, count: int = 3):
        self.first, self.count, self.found, self._saved = first, count, Counter(), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.first - 1:
            self._saved = warnings.showwarning, warnings.filters[:]
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            warnings.showwarning = self._record  # after the switch, which itself warns once
        elif batch_idx == self.first + self.count - 1 and self._saved is not None:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning, warnings.filters[:] = self._saved
            self._saved = None

    def _record(self, message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        self.found[" <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    def report(self) -> str:
        if not self.found:
            return f"none in steps {self.first}..{self.first + self.count - 1}"
        return "".join(f"\n  {n / self.count:.1f} a step: {where}" for where, n in self.found.most_common())


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def train_step(model: torch.nn.Module, optimizer, step_loss, inputs: tuple, autocast, cuda_graphs: bool) -> torch.Tensor:
    """One step of a plain loop: the loss under autocast (a new CUDA-graph step first), backward, clipping at 1.0,
    the optimizer's step; returns the loss."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
    with autocast:
        loss = step_loss(*inputs)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def plain_loop(args, data: SequenceData, device: torch.device, fast_paths: bool = False) -> dict:
    """The same HF model and batches in a hand-written training loop; with `fast_paths`, the framework's:
    attention switched by `cascade.model.attention.own_masks` (SDPA gets no mask) and the loss over a padded
    head's full width (`cascade.training.losses.without_padded_vocab`)."""
    setting = SETTINGS[args.setting]
    torch.manual_seed(0)
    model = build_causal_lm("gpt2", model_config(args), vocab_size=args.vocab, pad_vocab_to_multiple_of=setting["pad_vocab_to_multiple_of"])
    if fast_paths:
        assert own_masks(model)
    model.to(device).train()
    vocab = args.vocab
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wte" in n]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    schedule = LambdaLR(optimizer, warmup_cosine(10, args.steps, 0.1))

    def loss_fn(x, y):
        logits = model(input_ids=x, use_cache=False).logits
        logits = without_padded_vocab(logits, vocab) if fast_paths else logits[..., :vocab]
        return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)

    compiled = setting["compile"] and device.type == "cuda"
    step_loss = torch.compile(loss_fn, mode=args.compile_mode) if compiled else loss_fn
    batches = [(b.inputs, b.targets) for b in data.batches(args.batch_size, args.seq_len)][: args.steps]
    if device.type == "cuda":
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    reset_memory()
    tokens, start = 0, 0.0
    for step, (x, y) in enumerate(batches):
        if step == args.warmup:
            synchronize()
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = train_step(model, optimizer, step_loss, (x, y), autocast, compiled and args.compile_mode == "reduce-overhead")
        schedule.step()
        if step >= args.warmup:
            tokens += x.numel()
    synchronize()
    seconds = time.perf_counter() - start
    result = {"tokens_per_s": tokens / seconds, "peak_gb": peak_memory_gb(), "loss": float(loss)}
    del model, optimizer, step_loss
    return result


def framework(args, train: SequenceData, device: torch.device, stage: int, workdir: str, progress_bar: bool = False) -> tuple[dict, StageModule]:
    """StageModule trained by a Lightning Trainer on `train`."""
    setting = SETTINGS[args.setting]
    torch.manual_seed(0)
    module = StageModule(
        model="gpt2", model_config=model_config(args), vocab_size=args.vocab, stage=stage, warmup_steps=10,
        compile=setting["compile"], compile_mode=args.compile_mode, pad_vocab_to_multiple_of=setting["pad_vocab_to_multiple_of"],
    )
    datamodule = SequenceDataModule.from_data(
        train, train.select(torch.arange(1)), batch_size=args.batch_size, row_length=args.seq_len, num_workers=args.num_workers
    )
    timer = StepTimer(args.warmup)
    audit = SyncAudit(max(1, args.warmup - 4)) if device.type == "cuda" else None  # in the warm-up, not timed
    trainer = Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=args.steps, gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0,
        enable_checkpointing=False, enable_progress_bar=progress_bar, enable_model_summary=False,
        logger=TensorBoardLogger(workdir, name=f"stage_{stage}"), callbacks=[timer] + ([audit] if audit else []),
    )
    reset_memory()
    trainer.fit(module, datamodule=datamodule)
    assert timer.tokens > 0 and trainer.global_step == args.steps, "the data must cover every step in one epoch"
    syncs = audit.report() if audit else "(CPU)"
    return {"tokens_per_s": timer.tokens / timer.seconds, "peak_gb": peak_memory_gb(), "syncs": syncs}, module


def attention_kernels(module: StageModule, data: SequenceData, args, device: torch.device) -> str:
    """Names of the attention kernels one forward and backward of a batch of `data` runs."""
    if device.type != "cuda":
        return "(CPU)"
    from torch.profiler import ProfilerActivity, profile

    batch = next(iter(data.batches(args.batch_size, args.seq_len, fixed_length=True))).to(device)  # as trained
    module.to(device).train()
    with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = module.layer_losses(batch, {module.llm.num_layers: 1.0})
        loss.backward()
    names = {e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ATTENTION_KERNELS)}
    module.zero_grad(set_to_none=True)
    return "; ".join(sorted(name[:60] for name in names)) or "none found"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="best")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=20, help="steps left out of the timing (compilation included)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--hard-ratio", type=float, default=0.3)
    parser.add_argument("--hard-spread", type=float, default=0.071,
                        help="std of the hard fraction across windows (0.071 in the quickstart's real stage-0 hand-over)")
    parser.add_argument("--model-config", default='{"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}')
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of both loops (compiled settings)")
    parser.add_argument("--num-workers", type=int, default=2, help="the framework's DataLoader workers")
    parser.add_argument("--progress-bar", action="store_true", help="also time framework stage 0 with Lightning's progress bar")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, a few steps (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch_size, args.seq_len, args.vocab, args.num_workers = 4, 2, 2, 32, 300, 0
        args.model_config = '{"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 32}'
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    workdir = tempfile.mkdtemp(prefix="bench_stage_")

    stage0 = random_windows((args.steps + 1) * args.batch_size * args.seq_len, args.seq_len, args.vocab)
    plain = plain_loop(args, stage0, device)
    reset_memory()
    plain_fast = plain_loop(args, stage0, device, fast_paths=True)
    reset_memory()
    fw0, module0 = framework(args, stage0, device, 0, workdir)
    kernels0 = attention_kernels(module0, stage0, args, device)
    flops = flops_per_token(module0.llm, args.seq_len)
    del module0
    reset_memory()
    bar = framework(args, stage0, device, 0, workdir, progress_bar=True)[0] if args.progress_bar else None
    reset_memory()
    dim = json.loads(args.model_config)["n_embd"]
    windows = random_windows(int((args.steps + 2) * args.batch_size * args.seq_len / args.hard_ratio), args.seq_len, args.vocab, seed=2)
    stage1 = hard_token_data(windows, args.hard_ratio, args.hard_spread, dim)
    waste = stage1.packing_waste(args.batch_size, args.seq_len, fixed_length=True, best_fit=True)  # as trained
    next_fit_waste = stage1.packing_waste(args.batch_size, args.seq_len, fixed_length=True)
    fw1, module1 = framework(args, stage1, device, 1, workdir)
    kernels1 = attention_kernels(module1, stage1, args, device)
    del module1

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12
    print(f"setting {args.setting} {SETTINGS[args.setting]}, compile mode {args.compile_mode}; {name}; torch {torch.__version__}; "
          f"batch {args.batch_size} x {args.seq_len}, steps {args.warmup}..{args.steps}")
    print(f"{'run':<40}{'tokens/s':>12}{'MFU':>8}{'peak GB':>10}{'ratio':>8}")
    rows = [
        ("plain loop, stage 0 (baseline)", plain, plain),
        ("plain loop, fast paths / plain loop", plain_fast, plain),
        ("framework, stage 0 / plain loop", fw0, plain),
        ("framework, stage 0 / plain, fast paths", fw0, plain_fast),
        ("framework, stage 1 packed / stage 0", fw1, fw0),
    ]
    if bar is not None:
        rows.insert(2, ("framework, stage 0, progress bar / plain", bar, plain))
    for label, run, base in rows:
        mfu = run["tokens_per_s"] * flops / peak
        print(f"{label:<40}{run['tokens_per_s']:>12,.0f}{mfu:>8.1%}{run['peak_gb']:>10.2f}{run['tokens_per_s'] / base['tokens_per_s']:>8.3f}")
    print(f"peak memory framework / plain loop: {fw0['peak_gb'] / plain['peak_gb']:.3f} (fast paths: {fw0['peak_gb'] / plain_fast['peak_gb']:.3f}); "
          f"stage-1 packing waste {waste:.1%} (next fit: {next_fit_waste:.1%}; {stage1.num_tokens:,} hard tokens in {stage1.num_sequences:,} sequences, "
          f"hard fraction per window {args.hard_ratio} +- {args.hard_spread})")
    print(f"attention kernels, stage 0: {kernels0}")
    print(f"attention kernels, stage 1: {kernels1}")
    print(f"calls that wait for the GPU, framework stage 0: {fw0['syncs']}")
    print(f"calls that wait for the GPU, framework stage 1: {fw1['syncs']}")


if __name__ == "__main__":
    main()
