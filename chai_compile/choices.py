"""Option choices and defaults the command line needs: kept free of torch, numpy and sklearn so that
`chai-compile --help` does not import them. The modules that use the values import them from here."""

from __future__ import annotations

from enum import StrEnum

BUILTIN_CALIBRATION = "builtin"  # --calib value: the offline corpus shipped with Python
FEATURES = ("rows", "first_n")  # attention features that decide clusters
METHODS = ("agglomerative", "kmeans")  # clustering algorithms
REPRESENTATIVES = ("auto", "medoid", "lowest", "kv-min")  # how a cluster's score head is chosen
GREEDY_STEPS = 32  # greedy steps export, verify-artifact and verify ARTIFACT_DIR compare by default
DEFAULT_OPSET = 23
DEVICES = ("cpu", "cuda", "cuda:N")  # what --device accepts, for messages
GRAPH_NAME = "model.onnx"  # an export directory's graph
DATA_NAME = GRAPH_NAME + ".data"  # and its external weights (what torch.onnx's ONNXProgram.save writes)
SPAN_SINKS = (0, 4, 16)  # attention-sink counts the long-context profile measures by default
SPAN_WINDOWS = (64, 128, 256, 512, 1024, 2048)  # recent-window lengths it measures (those that fit a window)


class Choice(StrEnum):
    """An option's closed set of values. A StrEnum, so a value read from JSON or the command line
    compares equal to its member and serialises as its plain string."""

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, value: str, what: str) -> Choice:
        """The member named `value`, or a ValueError that names the accepted spellings."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what} {value!r} (one of {', '.join(cls.values())})") from None


class LayerKind(Choice):
    """What a plan does to one layer's attention. SHARED and SPAN: the cross-layer and attention-span transforms
    (the rewrite and the portable export carry them out; the fused export refuses them)."""

    DENSE = "dense"
    CLUSTERED = "clustered"
    SHARED = "shared"
    SPAN = "span"


class Membership(Choice):
    """Static: cluster membership frozen by the plan. Dynamic: representatives chosen per request."""

    STATIC = "static"
    DYNAMIC = "dynamic"


class AttentionForm(Choice):
    """Portable: standard ONNX ops. Fused: one ClusteredAttention node per layer."""

    PORTABLE = "portable"
    FUSED = "fused"


class KVCacheMode(Choice):
    """Concat: present = concat(past, new). Inplace: one preallocated buffer, a step writes its token."""

    CONCAT = "concat"
    INPLACE = "inplace"


class ExportFormat(Choice):
    ONNX = "onnx"
    TENSORRT = "tensorrt"


class DType(Choice):
    """Floating dtypes. Every command accepts both spellings (float32 or fp32, ...); `parse` folds
    the short one into the long one, which is what files and reports carry."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @classmethod
    def parse(cls, value: str, what: str = "dtype") -> DType:
        return super().parse(DTYPE_ALIASES.get(value, value), what)  # type: ignore[return-value]


DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# what --dtype accepts: each long spelling, then its short one
DTYPE_SPELLINGS = tuple(name for short, long in DTYPE_ALIASES.items() for name in (long, short))


class Rank(Choice):
    """How the transform planner orders candidates. MEASURED: the KL each one adds, measured by a forward pass
    (the default). PROFILE: the attention mass a span leaves out, from the long-context statistics alone (no
    forward pass per candidate: minutes on a CPU instead of hours; span candidates only)."""

    MEASURED = "measured"
    PROFILE = "profile"


class Transform(Choice):
    """What the planner may do to cut the KV cache. CHAI: drop K heads (clustered scores); SPAN: a KV head's
    cache becomes sinks + a recent window; SHARED: a layer reuses an earlier layer's probabilities (no K)."""

    CHAI = "chai"
    SPAN = "span"
    SHARED = "shared"
