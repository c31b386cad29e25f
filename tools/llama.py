"""llama.cpp on the same weights: the peer of `moegrow bench infer` (the optional `bench` extra).

The checkpoint folder goes through llama.cpp's own `convert_hf_to_gguf.py` to a GGUF F16 file;
`llama_model_quantize` (what `llama-quantize` runs) makes Q8_0 and Q4_0 from it. The converter
is not in the llama-cpp-python wheel, only in its source distribution, so the sdist of the
installed version is fetched once with `pip download` and its converter files are kept under
~/.cache/moegrow. GGUF files are cached there too, keyed by the checkpoint's sha256.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from moegrow.export import checkpoint

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moegrow"
QUANTS = {32: "F16", 8: "Q8_0", 4: "Q4_0"}  # bundle bits -> the GGUF type it is compared with
NOT_INSTALLED = "llama.cpp: not installed (pip install moegrow[bench])"
# what the converter needs from the sdist: the script, its model classes, the gguf package
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


class GGUFError(Exception):
    """The checkpoint could not be converted or quantized to GGUF."""


def load():
    """The `llama_cpp` module, or None when the `bench` extra is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # quantize logs every tensor
    return llama_cpp


def converter(version: str) -> Path:
    """`convert_hf_to_gguf.py` from the llama-cpp-python sdist of `version`, fetched once."""
    root = CACHE / f"llama-cpp-python-{version}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp]
        run = subprocess.run(pip, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if run.returncode or not sdists:
            raise GGUFError(f"pip download llama-cpp-python=={version} failed: "
                            f"{_last_line(run.stderr)}")
        part = root.with_name(root.name + ".part")
        with tarfile.open(sdists[0]) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(CONVERTER_FILES)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(part, members, filter="data")
        part.rename(root)
    return script


def checkpoint_sha(folder: Path) -> str:
    """sha256 over every file of a checkpoint folder (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode() + b"\0")
        with f.open("rb") as r:
            while chunk := r.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def convert(ckpt: str, say: Callable[[str], None] = lambda _m: None) -> dict[str, Path]:
    """The checkpoint as GGUF files {"F16": path, "Q8_0": path, "Q4_0": path} (cached)."""
    llama_cpp = load()
    folder = checkpoint.resolve(ckpt)
    checkpoint.read_config(folder)  # a clear error for a folder that is not a checkpoint
    out = CACHE / "gguf" / llama_cpp.__version__ / checkpoint_sha(folder)[:16]
    files = {q: out / f"model-{q.lower()}.gguf" for q in QUANTS.values()}
    out.mkdir(parents=True, exist_ok=True)
    if not files["F16"].is_file():
        say("converting the checkpoint to GGUF F16")
        script = converter(llama_cpp.__version__)
        tmp = files["F16"].with_suffix(".part")
        run = subprocess.run([sys.executable, str(script), str(folder), "--outfile", str(tmp),
                              "--outtype", "f16"], capture_output=True, text=True)
        if run.returncode:
            raise GGUFError(f"{folder}: convert_hf_to_gguf.py failed: {_last_line(run.stderr)}")
        tmp.rename(files["F16"])
    for quant in ("Q8_0", "Q4_0"):  # what `llama-quantize` does, with its defaults
        if files[quant].is_file():
            continue
        say(f"quantizing GGUF to {quant}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        tmp = files[quant].with_suffix(".part")
        if llama_cpp.llama_model_quantize(bytes(files["F16"]), bytes(tmp), ctypes.byref(params)):
            raise GGUFError(f"{files['F16']}: llama_model_quantize to {quant} failed")
        tmp.rename(files[quant])
    return files


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["no output"])[-1]


class Peer:
    """A GGUF file in llama.cpp behind the engines' prefill/decode calls (the cache is
    llama.cpp's own, so k and v are None)."""

    def __init__(self, path: Path, context: int, threads: int):
        llama_cpp = load()
        # flash attention on, as llama.cpp's own `auto` picks on CPU (the binding's default is off)
        self.llm = llama_cpp.Llama(str(path), n_ctx=context, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, flash_attn=True,
                                   verbose=False)
        self.logits = llama_cpp.llama_get_logits

    def _last(self) -> np.ndarray:
        """[1, V] logits of the last token evaluated."""
        row = np.ctypeslib.as_array(self.logits(self.llm.ctx), shape=(1, self.llm.n_vocab()))
        return row.copy()

    def prefill(self, ids: list[int]):
        self.llm.reset()
        self.llm.eval(ids)
        return self._last(), None, None, None

    def decode(self, token: int, pos: int, _k, _v, _novelty):
        assert pos == self.llm.n_tokens, "llama.cpp decodes right after the last token"
        self.llm.eval([token])
        return self._last(), None, None


def peers(ckpt: str, context: int, threads: int,
          say: Callable[[str], None] = lambda _m: None) -> dict[str, Peer]:
    """{"F16": Peer, "Q8_0": Peer, "Q4_0": Peer}, or {} when llama.cpp is not installed."""
    if load() is None:
        return {}
    return {q: Peer(path, context, threads) for q, path in convert(ckpt, say).items()}


def compare(rows: dict[str, tuple[float, float]], ours: dict[str, float], bits: int) -> list:
    """One entry per quant from {quant: (prefill tok/s, decode tok/s)}; only the quant that
    matches the bundle's `bits` gets ratios: our engines' decode tok/s over llama.cpp's."""
    out = []
    for quant, (prefill, decode) in rows.items():
        match = quant == QUANTS.get(bits)
        out.append({"quant": quant, "prefill_tps": prefill, "decode_tps": decode,
                    "ours_over_llama": (ours["executorch"] / decode
                                        if match and "executorch" in ours else None),
                    "onnxruntime_over_llama": (ours["onnxruntime"] / decode
                                               if match and "onnxruntime" in ours else None)})
    return out
