"""Hugging Face checkpoint folders: `config.json` + safetensors (+ `tokenizer.model`).

`load` turns a folder into one of our `CausalLM`s with fp32 weights, checking everything a
bad folder can get wrong before any tensor is built; `save` writes a folder that
`transformers` and llama.cpp's converter read. The word `default` names the embedded
default model everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models import layers, mixtral, olmoe, qwen3_moe
from .tokenizer import Tokenizer, TokenizerError

MODELS = {"mixtral": mixtral, "olmoe": olmoe, "qwen3_moe": qwen3_moe}
DEFAULT = Path(__file__).parent / "default_model"
TOKENIZER = "tokenizer.model"


class CheckpointError(Exception):
    """A checkpoint folder that cannot be read or does not match its config."""


def resolve(target: str | os.PathLike) -> Path:
    return DEFAULT if str(target) == "default" else Path(target)


def read_config(path: Path):
    """-> (architecture module, config dataclass) for a checkpoint folder."""
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODELS:
        raise CheckpointError(f"{file}: unsupported model_type {model_type!r} "
                              f"(supported: {', '.join(MODELS)})")
    module = MODELS[model_type]
    try:
        return module, module.from_config(config)
    except layers.ConfigError as e:
        raise CheckpointError(f"{file}: {e}") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    try:
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        weights = {}
        for name in files:
            weights.update(load_file(path / name))
        return weights
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing weights ({Path(e.filename or '').name or e})") \
            from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt weights ({e})") from None


def load(target: str | os.PathLike, dtype: torch.dtype = torch.float32) -> layers.CausalLM:
    path = resolve(target)
    module, args = read_config(path)
    weights = module.sanitize(_read_weights(path), args)
    with torch.device("meta"):
        model = module.build(args)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise CheckpointError(f"{path}: weights do not match config.json ({what})")
    for key, value in expected.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(weights[key].shape)}, "
                                  f"config.json implies {tuple(value.shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, assign=True)
    return model.eval()


def load_tokenizer(target: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The checkpoint's tokenizer; with `vocab_size`, checked to fit the model's embedding."""
    path = resolve(target) / TOKENIZER
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint needs its tokenizer)")
    try:
        tok = Tokenizer(path)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise CheckpointError(f"{path}: wrong tokenizer ({tok.vocab_size} pieces for a model "
                              f"with {vocab_size} embeddings)")
    return tok


def save(model: layers.CausalLM, out: str | os.PathLike, tokenizer: Path | None = None,
         dtype: torch.dtype = torch.float32, extra: dict | None = None) -> Path:
    """Write an HF folder atomically: a sibling temp folder renamed over `out`."""
    out = Path(out)
    args = model.args
    module = MODELS[args.model_type]
    config = {**args.to_hf(), "torch_dtype": str(dtype).removeprefix("torch."), **(extra or {})}
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(module.to_hf(state, args), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
        for f in tmp.iterdir():  # mkdtemp and safetensors make private files; checkpoints are not
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        old = out.with_name(f".{out.name}.old")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
