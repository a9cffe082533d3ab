"""How the benchmark records results: JSON written atomically (the package's writer), exceptions
as one line."""
from packptq_onnx.exporters.files import save_json  # noqa: F401  (bench modules import it from here)


def one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")
