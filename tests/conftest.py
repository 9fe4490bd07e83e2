import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

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
