"""Helpers of every tier (tests/unit, tests/system, tests/e2e): tiny models, token batches, corpora. Pytest puts this
folder on sys.path, so a test anywhere below imports them with `from conftest import ...`. Nothing here imports
Lightning when it loads: the unit tier runs without it (TokenCounter, a Lightning callback, is built on first use)."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

# The tests' tensors are tiny: a second intra-op thread gains nothing, and where the cores are shared (this 2-core
# machine running other work, a CI runner) OpenMP's spin-waiting makes every op many times slower (tests/unit took 90 s
# instead of 10 s under a load of 5). The same for the commands the tests start (`python -m cascade.fit`, benchmarks,
# experiments), the more so as `pytest -n auto` runs a test on each core (pytest-xdist).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

VOCAB = 97
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

_SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

_LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_SPECIAL,
)
TINY_CONFIGS = {  # config class and its tiny settings; overrides go to the constructor (derived fields follow)
    "gpt2": (GPT2Config, dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_SPECIAL)),
    "llama": (LlamaConfig, _LLAMA_LIKE),
    "qwen2": (Qwen2Config, _LLAMA_LIKE),
    "gpt_neox": (GPTNeoXConfig, dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, **_SPECIAL,
    )),
}
ARCHS = sorted(TINY_CONFIGS)


def pytest_configure(config):
    """Under `pytest -n auto`, tests go to the cores few at a time (pytest-xdist otherwise sends each core a block of
    consecutive tests at once: the `long` ones, first, would all go to one core)."""
    if config.pluginmanager.hasplugin("xdist") and config.getoption("maxschedchunk") is None:
        config.option.maxschedchunk = 1


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n auto` (collected in each worker), the tests marked `long` first, so that the cores finish
    together; one test at a time, the tiers in order, the fast ones first."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: item.get_closest_marker("long") is None)


def tiny_model(arch: str = "gpt2", seed: int = 0, attn: str = "sdpa", **overrides):
    """A randomly initialised tiny HF CausalLM in eval mode."""
    config_class, settings = TINY_CONFIGS[arch]
    config = config_class(**{**settings, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def token_batches(num_batches=2, batch_size=3, seq_len=16, seed=0, vocab=VOCAB):
    """(x, y) pairs cut from one random token stream, y = x shifted by one."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        t = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        batches.append((t[:, :-1], t[:, 1:]))
    return batches


@pytest.fixture
def tiny_gpt2_dir():
    path = SHARED_DATA / "tiny-gpt2"
    if not (path / "config.json").is_file():
        pytest.skip(f"{path} is absent (it lives in ../shared/data beside the checkout)")
    return path


def write_corpus(path: Path, paragraphs: int = 400) -> Path:
    """A small text file of varied paragraphs (pydoc topics), blank-line separated."""
    from pydoc_data.topics import topics

    words = " ".join(topics[name] for name in sorted(topics)).split()
    text = "\n\n".join(" ".join(words[i : i + 60]) for i in range(0, 60 * paragraphs, 60))
    path.write_text(text)
    return path


def __getattr__(name: str):
    """`conftest.TokenCounter`, built on first use (a CLI test names it as a callback's class path)."""
    if name in ("TokenCounter", "BatchShapes"):
        globals()[name] = probe = {"TokenCounter": _token_counter_class, "BatchShapes": _batch_shapes_class}[name]()
        return probe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _token_counter_class() -> type:
    from lightning.pytorch import Callback

    class TokenCounter(Callback):
        """Counts the real tokens a stage trains on; appends {"stage", "train_tokens", "epochs"} to `path` at fit end."""

        def __init__(self, path: str):
            self.path = path
            self.tokens = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.tokens += batch.num_tokens

        def on_fit_end(self, trainer, pl_module):
            record = {"stage": pl_module.hparams.stage, "train_tokens": self.tokens, "epochs": trainer.current_epoch}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    TokenCounter.__qualname__ = "TokenCounter"
    return TokenCounter


def _batch_shapes_class() -> type:
    from lightning.pytorch import Callback

    class BatchShapes(Callback):
        """Records, per process, every training step's batch shape and real tokens; appends {"stage", "rank", "shapes",
        "tokens", "global_step"} to `path` at fit end."""

        def __init__(self, path: str):
            self.path, self.shapes, self.tokens = path, [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.shapes.append(list(batch.inputs.shape))
            self.tokens.append(batch.num_tokens)

        def on_fit_end(self, trainer, pl_module):
            record = {"stage": pl_module.hparams.stage, "rank": trainer.global_rank, "shapes": self.shapes,
                      "tokens": self.tokens, "global_step": trainer.global_step}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    BatchShapes.__qualname__ = "BatchShapes"
    return BatchShapes


# -- helpers of tests in more than one tier --------------------------------------------------------------------------

# packed rows: three sequences and padding in row 0, two in row 1, with gapped positions (stage k > 0)
SEGMENTS = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3 + [-1] * 4, [0] * 10 + [1] * 6])
POSITIONS = torch.tensor([[0, 2, 3, 7, 9, 1, 2, 3, 5, 0, 4, 6, 0, 0, 0, 0], list(range(10)) + [3, 4, 5, 8, 9, 12]])


def _three_layer_llm(arch="llama", seed=0):
    from cascade import LLM

    return LLM(tiny_model(arch, seed=seed, n_layer=3) if arch == "gpt2" else tiny_model(arch, seed=seed, num_hidden_layers=3))


def _varied_sequences(seed=0):
    """Stage-k-like data: sequences of different lengths with gaps in their positions (packed several to a row)."""
    from cascade import SequenceData
    from cascade.routing.compaction import compact_hard_tokens

    data = SequenceData.from_token_batches(token_batches(num_batches=2, batch_size=4, seq_len=16, seed=seed))
    keep = torch.rand(data.num_tokens, generator=torch.Generator().manual_seed(seed)) < 0.6
    return compact_hard_tokens(data, keep)


def _median_confidence(llm, data, layer):
    from cascade.routing.layer_skip import routed_nll

    with torch.no_grad():
        return float(torch.cat([routed_nll(llm, b, layer, [])[1] for b in data.batches(4)]).median())


SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def ids(*shape, vocab=97, seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def tiny_args(tmp_path, corpus, *extra):
    return [
        "--name", "tiny", "--runs_dir", str(tmp_path / "runs"), "--num_stages", "2",
        "--model.model", "gpt2",
        "--model.model_config", '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}',
        "--model.lr", "3e-3", "--model.warmup_steps", "5",
        "--data.train_files", f"[{corpus}]", "--data.vocab_size", "300", "--data.seq_len", "32",
        "--data.batch_size", "8", "--data.cache_dir", str(tmp_path / "cache"),
        "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "4", "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--handover.hard_ratio", "0.3",
        *extra,
    ]


def one_stage_args(runs_dir, *extra):
    """`python -m cascade.fit`'s arguments for one tiny stage of 80 steps on `corpus.txt` in the working directory,
    checkpointed every 10 steps."""
    return [
        "--name", "tiny", "--runs_dir", str(runs_dir), "--num_stages", "1",
        "--model.model_config", '{"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64}', "--model.lr", "3e-3",
        "--model.warmup_steps", "5", "--data.train_files", "[corpus.txt]", "--data.vocab_size", "300",
        "--data.seq_len", "32", "--data.batch_size", "8", "--data.cache_dir", "cache", "--trainer.max_steps", "80",
        "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "25", "--trainer.check_val_every_n_epoch",
        "null", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
        "--checkpoint.every_n_train_steps", "10", "--eval_curve", "false", *extra,
    ]


def flip(path: Path, offset: int | None = None, count: int = 16) -> None:
    """Change `count` bytes of `path` in place (same size), in its middle by default."""
    raw = bytearray(path.read_bytes())
    start = len(raw) // 2 if offset is None else offset
    for i in range(start, start + count):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def patterned_batches(num_batches, batch_size=8, seq_len=32, vocab=64, seed=0):
    """Learnable token streams: each row counts up from a random start with a random stride."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        start = torch.randint(0, vocab, (batch_size, 1), generator=g)
        stride = torch.randint(1, 4, (batch_size, 1), generator=g)
        t = (start + stride * torch.arange(seq_len + 1)) % vocab
        batches.append((t[:, :-1], t[:, 1:]))
    return batches


def run_processes(fns):
    """Run `fns[r](reduce)` for each rank r in a thread of its own, `reduce` (`cascade.routing.threshold.Reduce`)
    combining every thread's tensor as `torch.distributed.all_reduce` would; returns their results in rank order."""
    import threading

    barrier, slots, results, errors = threading.Barrier(len(fns)), [None] * len(fns), [None] * len(fns), []
    combine = {"sum": lambda ts: torch.stack(ts).sum(0), "min": lambda ts: torch.stack(ts).min(0).values,
               "max": lambda ts: torch.stack(ts).max(0).values}

    def run(rank):
        def reduce(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            out = combine[op](slots)
            barrier.wait()  # every thread has read the slots
            return out

        try:
            results[rank] = fns[rank](reduce)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
