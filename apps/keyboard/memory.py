"""What the keyboard's process holds, stage by stage (docs/embedding.md):

    python apps/keyboard/memory.py BUNDLE TEXT_FILE DOMAIN

The keyboard's calls in one process, without the terminal: open the runtime, suggestions,
`observe` of TEXT_FILE, one growth slice, suggestions again; the resident memory (VmRSS)
and its peak (VmHWM) after each, and the suggestions' median latency. Grows BUNDLE: give
it a copy.
"""

from __future__ import annotations

import sys
import time


def memory() -> str:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    rss, peak = (int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    return f"RSS {rss:.0f} MB, peak {peak:.0f} MB"


def latency(rt, prompt: str) -> float:
    times = []
    for _ in range(11):
        rt.typed = None  # a new context each time (the whole prompt prefilled)
        start = time.perf_counter()
        rt.suggestions(prompt, 3)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[5]


if __name__ == "__main__":
    bundle, text, domain = sys.argv[1:4]
    print("python", memory())
    from moegrow import runtime
    from moegrow.runtime import backends

    print("import moegrow.runtime", memory(), "(torch loaded)" * ("torch" in sys.modules))
    rt = runtime.open(bundle, "onnxruntime")
    prompt = "PATIENCE, n.  A minor form of despair, disguised as a"
    print(f"open, suggestions (median {latency(rt, prompt):.0f} ms)", memory())
    rt.observe(open(text, encoding="utf-8").read(), domain)
    print("observe", memory())
    r = rt.idle(600, domain, interrupt=backends.Interrupt())
    print(f"idle: committed {r['committed']} in {r['seconds']:.0f} s", memory())
    print(f"suggestions after growth (median {latency(rt, prompt):.0f} ms)", memory())
