"""A growth slice's or a compression's working copy of the served weight file."""

from __future__ import annotations

import numpy as np

from . import experts, state


class Work:
    """The slice's working copy: a Runtime on a copy of the engine's weight file (in
    `state/`, sized once) and a writable map of that file; `set_expert`/`router` change its
    bytes in place, `reload` serves them."""

    def __init__(self, rt, interrupt=None):
        self.rt = rt.working_copy(state.folder(rt.bundle.path) / f"work.{rt.backend}",
                                  interrupt)
        self.buf = np.memmap(self.rt.weights, np.uint8, mode="r+")

    def set_expert(self, layer: int, slot: int, weights: list[np.ndarray]) -> None:
        experts.write_in_place(self.buf, self.rt.bundle, self.rt.backend, layer, slot, weights)

    def views(self, layer: int, slot: int) -> list[np.ndarray] | None:
        """Expert (layer, slot)'s fp32 [gate, up, down] as views of the working copy, which
        `set_expert` changes in place; None where the file holds it quantized."""
        return experts.views(self.buf, self.rt.bundle, self.rt.backend, layer, slot)

    def router(self, layer: int) -> np.ndarray:
        return experts.router(self.rt.bundle, layer, self.rt.backend, self.buf)

    def reload(self) -> None:
        self.buf.flush()
        self.rt.reload()

    def live(self, programs: set[str]) -> bool:
        """Whether all of `programs` see the working copy's bytes without a reload."""
        return programs <= getattr(self.rt.engine, "live", set())

    def close(self) -> None:
        path = self.rt.weights
        del self.buf, self.rt
        path.unlink(missing_ok=True)
