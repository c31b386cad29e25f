"""The C++ host beside the Python runtime on one ExecuTorch bundle (docs/embedding.md):

    python apps/native/compare.py BUNDLE BUILD_DIR      # BUILD_DIR: where CMake built the hosts

Runs `moegrow_generate` (its own printout: load, cold prefill, suggestions, decode per
token, peak RSS) and, in this process, the same prompt through `moegrow.runtime` (warm
medians of prefill, decode and suggest; peak RSS), and prints both.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "PATIENCE, n.  A minor form of despair, disguised as a"


def native(bundle: str, build: str, out: Path) -> str:
    from moegrow.runtime import bundle as bundle_format
    from moegrow.runtime import session

    b = bundle_format.load(bundle)
    slots = session.slot_state(b)
    slots.astype(np.float32).tofile(out / "slots.bin")
    c = b.config
    head = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    shape = f"{c['num_hidden_layers']},{c['num_key_value_heads']},{b.context},{head},"
    return subprocess.run(
        [str(Path(build) / "moegrow_generate"), str(b.tokenizer),
         str(b.path / b.manifest["programs"]["prefill"]["executorch"]["file"]),
         str(b.weights("executorch")), str(out / "slots.bin"), shape + str(slots.shape[2]),
         "prefill,decode", PROMPT, "32", str(out)], capture_output=True, text=True,
        check=True).stdout


def python(bundle: str) -> dict:
    start = time.perf_counter()
    from moegrow import runtime

    rt = runtime.open(bundle, "executorch")
    ids = [1] + rt.sp.encode(PROMPT)
    rt.prefill(ids)
    first = time.perf_counter() - start

    def median(f, n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return 1e3 * sorted(times)[n // 2]
    logits, k, v, novelty = rt.prefill(ids)
    token = int(logits[0].argmax())
    return {"open_and_first_prefill_s": first, "prefill_ms": median(lambda: rt.prefill(ids), 5),
            "decode_ms": median(lambda: rt.decode(token, len(ids), k, v, novelty), 32),
            "suggest_ms_with_prefill": median(lambda: rt.suggest(PROMPT), 5),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "suggestions": rt.suggest(PROMPT), "text": "".join(rt.generate(PROMPT, 32))}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(native(sys.argv[1], sys.argv[2], Path(tmp)))
    print(json.dumps(python(sys.argv[1]), indent=1))
