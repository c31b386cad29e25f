"""Device-side runtime: bundles, engines, error map, growth (never imports export).

`moegrow.runtime.open(bundle, backend="executorch"|"onnxruntime")` is the embedding API.
"""

from .session import Runtime, open  # `open`, as in `io.open`

__all__ = ["Runtime", "open"]
