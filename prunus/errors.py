"""The typed errors of prunus: every error a user can cause derives from `PrunusError`."""
from __future__ import annotations


class PrunusError(Exception):
    """Base class of every error prunus raises on purpose."""


class SpecError(PrunusError, ValueError):
    """Bad pipeline text or pass parameters.

    `column` is the 1-based column in the pipeline text (None when the spec did not come from text).
    """

    def __init__(self, message: str, *, text: str | None = None, column: int | None = None,
                 pass_name: str | None = None, key: str | None = None, accepted: str | None = None):
        self.text, self.column, self.pass_name, self.key, self.accepted = text, column, pass_name, key, accepted
        parts = []
        if column is not None:
            parts.append(f"column {column}")
        if pass_name is not None:
            parts.append(f"pass '{pass_name}'")
        if key is not None:
            parts.append(f"key '{key}'")
        where = (", ".join(parts) + ": ") if parts else ""
        full = where + message
        if accepted:
            full += f" (accepted: {accepted})"
        if text is not None and column is not None:
            full += f"\n  {text}\n  {' ' * (column - 1)}^"
        super().__init__(full)


class CaptureError(PrunusError):
    """The model could not be captured by torch.export; says where and what to try."""


class PassError(PrunusError):
    """A pass cannot apply to this graph; names the pass, the node and the reason."""

    def __init__(self, pass_name: str, reason: str, node: str | None = None):
        self.pass_name, self.reason, self.node = pass_name, reason, node
        at = f" at node '{node}'" if node else ""
        super().__init__(f"pass '{pass_name}'{at}: {reason}")


class VerificationError(PrunusError):
    """A pass exceeded its declared error budget."""

    def __init__(self, pass_name: str, metric: str, value: float, budget: str):
        self.pass_name, self.metric, self.value, self.budget = pass_name, metric, value, budget
        super().__init__(f"pass '{pass_name}' violated its budget: {metric} = {value:.6g}, budget {budget}")


class ExportError(PrunusError):
    """ONNX lowering failed; names the op."""


class ArtifactError(PrunusError):
    """An artifact directory or file is unreadable or incompatible."""


class InputError(PrunusError, ValueError):
    """Inputs given to an optimized model do not match what was captured (count, rank or dtype)."""
