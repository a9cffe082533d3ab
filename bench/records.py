"""How the benchmark records results: JSON written atomically and exceptions as one line (the
package's own writer and the engine's rule)."""
from packptq_onnx.exporters.files import save_json  # noqa: F401

from packptq_onnx.engine import one_line  # noqa: F401  (bench modules import them from here)
