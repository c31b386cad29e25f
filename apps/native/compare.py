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
import time
from pathlib import Path

PROMPT = "PATIENCE, n.  A minor form of despair, disguised as a"


def native(bundle: str, build: str) -> str:
    return subprocess.run([str(Path(build) / "moegrow_generate"), bundle, PROMPT, "32"],
                          capture_output=True, text=True, check=True).stdout


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

    def suggest():  # a new context each time: the prompt's prefill counted
        rt.typed = None
        rt.suggest(PROMPT)
    return {"open_and_first_prefill_s": first, "prefill_ms": median(lambda: rt.prefill(ids), 5),
            "decode_ms": median(lambda: rt.decode(token, len(ids), k, v, novelty), 32),
            "suggest_ms_with_prefill": median(suggest, 5),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "suggestions": rt.suggest(PROMPT), "text": "".join(rt.generate(PROMPT, 32))}


if __name__ == "__main__":
    print(native(sys.argv[1], sys.argv[2]))
    print(json.dumps(python(sys.argv[1]), indent=1))
