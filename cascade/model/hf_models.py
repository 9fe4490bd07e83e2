"""Building Hugging Face CausalLMs from a model type, a hub name or a local directory."""

from __future__ import annotations

import difflib
import re

import os
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as transformers_logging
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from cascade.model.hub import require_hub

# config field set by `pad_vocab`: the real vocabulary below the padding
UNPADDED_VOCAB = "unpadded_vocab_size"
# the model types an unknown type's error names
KNOWN_TYPES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "gemma")


def build_causal_lm(
    model: str,
    config: dict | None = None,
    pretrained: bool = False,
    vocab_size: int | None = None,
    attn_implementation: str | None = None,
    pad_vocab_to_multiple_of: int | None = None,
) -> PreTrainedModel:
    """A CausalLM from `model`: a model type ("gpt2", "llama", ...), hub name or local directory.

    `config` overrides fields of the model type's default config (or of the saved config).
    With `pretrained`, weights are loaded with `from_pretrained`; otherwise the model is freshly
    initialised, with no special token ids of the family's hub tokenizer (a pad id would freeze a
    real token's embedding row, or fall outside a small vocabulary). `vocab_size` applies to fresh
    models unless `config` sets it. `attn_implementation`: transformers' attention ("sdpa",
    "eager", ...); default SDPA where the family has it, else eager. With
    `pad_vocab_to_multiple_of`, the embedding and LM head get rows up to that multiple
    (`pad_vocab`).
    """
    overrides = dict(config or {})
    if not pretrained:
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        # a fresh model for pre-training has no special tokens of its own (and no generation)
        for special in ("bos_token_id", "eos_token_id", "pad_token_id"):
            overrides.setdefault(special, None)
    hf_config = _model_config(model, overrides, pretrained)
    if attn_implementation is None:
        attn_implementation = default_attention(hf_config)
    if pretrained:
        causal_lm = _load_pretrained(model, hf_config, dict(config or {}), attn_implementation)
    else:
        causal_lm = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=attn_implementation
        )
    if pad_vocab_to_multiple_of:
        pad_vocab(causal_lm, pad_vocab_to_multiple_of)
    return causal_lm


SIZES = re.compile(r"^(n_|num_)|(_size|_dim|_embd|_layers?|_heads?|_positions)$")  # config keys that count things


def looks_like_path(model: str) -> bool:
    """A local path rather than a model type or an `owner/name` on the hub."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or os.sep != "/" and os.sep in model


def check_overrides(model: str, defaults, overrides: dict) -> None:
    """ValueError for a `model_config` key that `model`'s config does not have (with the close match) or a size that
    is not positive: before anything is built or written."""
    known = set(defaults.to_dict()) | set(getattr(defaults, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model.model_config: {model}'s config has no key {key!r}{hint}")
        if SIZES.search(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"model.model_config: {key} must be >= 1, got {value}")


def _model_config(model: str, overrides: dict, pretrained: bool):
    """The config of `model` (a model type's default, or a saved one) with `overrides` applied."""
    is_path = Path(model).expanduser().is_dir()
    if not is_path and looks_like_path(model):
        raise ValueError(f"model.model {model!r}: no such directory (a local model is a directory written by "
                         "save_pretrained)")
    defaults = None
    if not is_path and model in CONFIG_MAPPING and not pretrained:
        defaults = AutoConfig.for_model(model)
    elif is_path:
        defaults = AutoConfig.from_pretrained(model)
    if defaults is not None:
        user = {k: v for k, v in overrides.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
        check_overrides(model, defaults, user)
    if not is_path and model in CONFIG_MAPPING and not pretrained:
        return AutoConfig.for_model(model, **overrides)
    if is_path or "/" in model or pretrained:
        if not is_path:
            require_hub(
                model,
                "model.model",
                "give a local directory saved with save_pretrained, or a transformers model type "
                "(gpt2, llama, ...) for a fresh model",
            )
        try:
            return AutoConfig.from_pretrained(model, **overrides)
        except OSError as e:
            raise ValueError(
                f"cannot load a config for {model!r}: not a local directory, and the hub could not "
                f"provide it ({e})"
            ) from e
    known = ", ".join(sorted(t for t in KNOWN_TYPES if t in CONFIG_MAPPING))
    raise ValueError(
        f"unknown model type {model!r}: give a transformers model type (e.g. {known}), "
        "a hub model name, or a local directory saved with save_pretrained"
    )


def load_causal_lm(path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, with `default_attention` unless
    `kwargs` name an `attn_implementation`."""
    if "attn_implementation" not in kwargs:
        kwargs["attn_implementation"] = default_attention(AutoConfig.from_pretrained(path))
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def default_attention(hf_config) -> str:
    """SDPA where the family has it (with the masks cascade gives, `cascade.model.attention`), else
    eager."""
    return "sdpa" if supports_sdpa(hf_config) else "eager"


def supports_sdpa(hf_config) -> bool:
    """Whether the family's CausalLM has SDPA attention in transformers."""
    model_class = AutoModelForCausalLM._model_mapping.get(type(hf_config), None)
    return model_class is None or bool(getattr(model_class, "_supports_sdpa", False))


def _load_pretrained(
    model: str, hf_config, overrides: dict, attn_implementation: str
) -> PreTrainedModel:
    """`from_pretrained`, with a clear error where `overrides` (model_config) reshaped the saved
    model."""
    saved = AutoConfig.from_pretrained(model) if overrides else None
    changed = {
        k: (getattr(saved, k, None), v)
        for k, v in overrides.items()
        if getattr(saved, k, None) != v
    }
    if not changed:
        return AutoModelForCausalLM.from_pretrained(
            model, config=hf_config, attn_implementation=attn_implementation
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report would list every reshaped weight
    try:
        return AutoModelForCausalLM.from_pretrained(
            model, config=hf_config, attn_implementation=attn_implementation
        )
    except (RuntimeError, ValueError) as e:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"model.model_config changes the saved config of {model} ({listed}), so its weights no "
            f"longer fit the model ({str(e).splitlines()[0][:200]}): drop those keys from "
            "model.model_config to load the pretrained weights, or set model.pretrained false to "
            "train a fresh model of the new shape"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def pad_vocab(model: PreTrainedModel, multiple_of: int) -> None:
    """Give the embedding and LM head rows up to a multiple of `multiple_of` (GPT-2's 50,257 ->
    50,304), so that the head's matrix product has tensor-core friendly shapes.

    The real vocabulary size stays in the config as `unpadded_vocab_size` (saved with the model);
    `LLM.vocab_size` reads it and `LLM.get_logits` cuts the padded columns off, so they are never
    predicted.
    """
    if multiple_of < 1:
        raise ValueError(f"pad_vocab_to_multiple_of must be >= 1, got {multiple_of}")
    config = model.config.get_text_config()
    real = getattr(config, UNPADDED_VOCAB, None) or config.vocab_size
    # no copy if already padded
    model.resize_token_embeddings(real, pad_to_multiple_of=multiple_of, mean_resizing=False)
    if model.get_input_embeddings().weight.shape[0] != real:
        setattr(config, UNPADDED_VOCAB, real)


def max_positions(config) -> int | None:
    """The longest sequence the model's position embeddings allow, where the config says."""
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None
