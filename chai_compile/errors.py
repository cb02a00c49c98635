"""Typed errors. Each carries the problem, the offending value and the fix, and prints as one line."""

from __future__ import annotations

from typing import Any


class ChaiError(Exception):
    """Base class: `reason` says what is wrong, `value` is the offending value, `fix` what to do."""

    exit_code = 2
    default_fix = "see `chai-compile --help`"  # each subclass names a more specific one

    def __init__(self, reason: str, *, value: Any = None, fix: str | None = None) -> None:
        self.reason = reason
        self.value = value
        self.fix = fix or self.default_fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.reason
        if self.value is not None:
            text += f" (got {self.value!r})"
        if self.fix:
            text += f"; fix: {self.fix}"
        return " ".join(text.split())


class ModelLoadError(ChaiError):
    """The model could not be found or loaded."""

    default_fix = "pass an existing model directory, a .gguf file, a hub id, or `smollm2-135m`"


class UnsupportedArchitectureError(ChaiError):
    """No adapter is registered for the model's architecture."""

    default_fix = "use a model of a supported family (llama, mistral, qwen2, gpt_neox, opt, gpt2)"


class CalibrationError(ChaiError):
    """Calibration data is missing, empty or too short."""

    default_fix = "pass a UTF-8 .txt or .jsonl file with enough text, or --calib builtin"


class ClusteringError(ChaiError):
    """Cluster counts or overrides are impossible for the model."""

    default_fix = "see `chai-compile profile --help`"


class MappingError(ChaiError):
    """A cluster mapping file is malformed, out of range, or for another model."""

    default_fix = "regenerate the mapping with `chai-compile profile`"


class FingerprintMismatchError(MappingError):
    """The mapping was profiled on a different model."""


class OutputPathError(ChaiError):
    """The output location exists or cannot be written."""

    default_fix = "choose another --out"


class TaskError(ChaiError):
    """An evaluation task name or file is wrong."""

    default_fix = "see `chai-compile verify --help` for the task names and formats"


class ExportError(ChaiError):
    """Export to ONNX or TensorRT failed or was asked for something impossible."""

    default_fix = "see `chai-compile export --help`"


class ArtifactError(ChaiError):
    """An export directory is incomplete, or a file in it differs from what its manifest records."""

    default_fix = "re-export with `chai-compile export`"


class UsageError(ChaiError):
    """A command-line option or argument is malformed or out of range (click's own errors included)."""

    default_fix = "see `chai-compile --help`"


class Terminated(BaseException):  # noqa: N818  (a signal, not an error: BaseException so `except Exception` misses it)
    """SIGTERM arrived; raised from the signal handler so staged output is cleaned like on Ctrl-C."""

    exit_code = 128 + 15


class ValidationFailed(ChaiError):
    """A verification check failed; exit code 1 separates it from bad input (2)."""

    default_fix = "see the report above"

    exit_code = 1


def root_cause(e: BaseException) -> str:
    """'Type: first line' of the innermost exception in `e`'s chain.

    Wrappers such as torch.onnx's TorchExportError put advice first ("... Next steps:") and the cause
    last; the innermost exception is what a user can act on."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
