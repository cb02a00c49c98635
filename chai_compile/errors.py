"""Typed errors. Each carries the problem, the offending value and the fix, and prints as one line."""

from __future__ import annotations

from typing import Any


class ChaiError(Exception):
    """Base class: `reason` says what is wrong, `value` is the offending value, `fix` what to do."""

    exit_code = 2

    def __init__(self, reason: str, *, value: Any = None, fix: str | None = None) -> None:
        self.reason = reason
        self.value = value
        self.fix = fix
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


class UnsupportedArchitectureError(ChaiError):
    """No adapter is registered for the model's architecture."""


class CalibrationError(ChaiError):
    """Calibration data is missing, empty or too short."""


class ClusteringError(ChaiError):
    """Cluster counts or overrides are impossible for the model."""


class MappingError(ChaiError):
    """A cluster mapping file is malformed, out of range, or for another model."""


class FingerprintMismatchError(MappingError):
    """The mapping was profiled on a different model."""


class OutputPathError(ChaiError):
    """The output location exists or cannot be written."""


class TaskError(ChaiError):
    """An evaluation task name or file is wrong."""


class ExportError(ChaiError):
    """Export to ONNX or TensorRT failed or was asked for something impossible."""


class ValidationFailed(ChaiError):
    """A verification check failed; exit code 1 separates it from bad input (2)."""

    exit_code = 1


class DependencyError(ChaiError):
    """An optional package a feature needs (a runtime such as Optimum) is not installed."""
