import json

import pytest
import torch

import datamodules.text as text_module
from conftest import SHARED_DATA, write_corpus
from datamodules import TextDataModule
from datamodules.text import windows


def test_windows_shift_targets_by_one():
    tokens = torch.arange(10, dtype=torch.int32)
    data = windows(tokens, 3, "train")
    assert data.lengths.tolist() == [3, 3, 3]
    assert data.inputs.tolist() == list(range(9)) and data.targets.tolist() == list(range(1, 10))
    assert data.positions is None, "nothing stored per token beyond the memory-mapped ids"
    assert data.positions_at(torch.arange(9)).tolist() == [0, 1, 2] * 3
    assert next(data.batches(3)).position_ids.tolist() == [[0, 1, 2]] * 3
    with pytest.raises(ValueError, match="has 3 tokens, too few for one window of seq_len 3"):
        windows(tokens[:3], 3, "train")


def test_local_text_with_a_trained_bpe_is_tokenized_once(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus.txt", 200)
    args = dict(train_files=[str(corpus)], vocab_size=300, seq_len=32, batch_size=4, cache_dir=str(tmp_path / "cache"))
    data = TextDataModule(**args)
    data.setup()
    assert data.vocab_size == 300
    assert int(data.train_data.inputs.max()) < 300 and data.val_data.num_tokens > 0
    text = corpus.read_text()
    assert data.train_data.num_tokens + data.val_data.num_tokens < 0.9 * len(text), "BPE merges characters"

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(text_module, "tokenize_to_cache", must_not_run)
    monkeypatch.setattr(text_module, "train_bpe", must_not_run)
    again = TextDataModule(**args)
    again.setup()
    assert torch.equal(again.train_data.inputs, data.train_data.inputs)
    batch = next(iter(again.train_dataloader()))
    assert batch.inputs.shape == (4, 32) and batch.single_sequence_rows


def test_json_lines_and_a_missing_text_column(tmp_path):
    rows = [{"body": " ".join(f"word{i % 17}" for i in range(j, j + 80))} for j in range(100)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = TextDataModule(train_files=[str(path)], text_column="body", vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c"))
    data.setup()
    assert data.train_data.num_sequences > 10
    wrong = TextDataModule(train_files=[str(path)], vocab_size=300, seq_len=16, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="the corpus has no column 'text'; its columns are \\['body'\\]"):
        wrong.setup()


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.txt"])
def test_a_gzipped_corpus_reads_as_its_plain_file(tmp_path, name):
    import gzip

    plain = tmp_path / name
    if name.endswith(".jsonl"):
        plain.write_text("\n".join(json.dumps({"text": f"document {j} " + "words " * 40}) for j in range(30)))
    else:
        write_corpus(plain, 30)
    zipped = tmp_path / f"gz-{name}.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    tokens = []
    for path in (plain, zipped):
        data = TextDataModule(train_files=[str(path)], vocab_size=300, seq_len=16, cache_dir=str(tmp_path / f"cache-{path.name}"))
        data.setup()
        tokens.append(data.train_data.inputs)
    assert tokens[0].numel() > 100 and torch.equal(tokens[0], tokens[1])
    (tmp_path / "latin.txt.gz").write_bytes(gzip.compress("caf\u00e9\n".encode("latin-1")))
    with pytest.raises(ValueError, match="is not UTF-8 text: the byte 0xe9 at offset 3"):
        TextDataModule(train_files=[str(tmp_path / "latin.txt.gz")], vocab_size=300, cache_dir=str(tmp_path / "c")).setup()


def test_pretrained_tokenizer_from_a_directory(tmp_path):
    tokenizer = SHARED_DATA / "gpt2-tokenizer"
    if not tokenizer.is_dir():
        pytest.skip(f"{tokenizer} is absent")
    corpus = tmp_path / "hello.txt"
    corpus.write_text("Hello world " * 200 + "\n\n" + "Hello world " * 200)
    data = TextDataModule(train_files=[str(corpus)], val_files=[str(corpus)], tokenizer=str(tokenizer), seq_len=8,
                          cache_dir=str(tmp_path / "c"))
    data.setup()
    assert data.vocab_size == 50257
    assert data.train_data.inputs[:4].tolist() == [15496, 995, 18435, 995]  # "Hello world Hello world"


def test_missing_files_no_corpus_and_a_tiny_bpe_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 200 is too small for a byte-level BPE"):
        TextDataModule(dataset="python-stdlib", vocab_size=200)
    with pytest.raises(FileNotFoundError, match="corpus files not found"):
        TextDataModule(train_files=[str(tmp_path / "nope.txt")], cache_dir=str(tmp_path)).setup()
    with pytest.raises(ValueError, match="no corpus: give data.dataset"):
        TextDataModule(cache_dir=str(tmp_path)).setup()


def test_the_python_stdlib_corpus_is_cached_per_python_version(tmp_path, monkeypatch):
    """Its text is the running Python's own (3.10 to 3.13 give 3,306 to 3,145 documents): runs of two Pythons sharing
    a cache must not read each other's tokens or BPE. A corpus of files does not depend on the Python version."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    stdlib = TextDataModule(dataset="python-stdlib", vocab_size=300, cache_dir=str(tmp_path))
    files = TextDataModule(train_files=[str(corpus)], vocab_size=300, cache_dir=str(tmp_path))
    before = stdlib.token_dir, files.token_dir
    monkeypatch.setattr(text_module.platform, "python_version", lambda: "3.99.0")
    assert stdlib.token_dir != before[0]
    assert files.token_dir == before[1]
