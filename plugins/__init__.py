"""polarc kernels: selective head attention (decode) and the selective GEMM pair for ReLU MLPs.

Each op has a Triton kernel behind a checking wrapper, a plain-torch reference that defines
it, and a ``torch.library`` custom op (``torch.ops.polarc.*``) with a fake implementation.
Importing this package needs triton; CPU tensors run through Triton's interpreter only when
TRITON_INTERPRET=1 was set before triton was imported.
"""

from .selective_attention import (
    AttentionPlan,
    AttentionWorkspace,
    plan_selective_attention,
    selective_attention,
    selective_attention_reference,
    selective_attention_workspace,
)
from .selective_gemm import (
    GemmPlan,
    GemmWorkspace,
    plan_selective_gemm,
    selective_gemm_down,
    selective_gemm_down_reference,
    selective_gemm_up,
    selective_gemm_up_reference,
    selective_gemm_workspace,
)

__all__ = [
    "AttentionPlan",
    "AttentionWorkspace",
    "GemmPlan",
    "GemmWorkspace",
    "plan_selective_attention",
    "plan_selective_gemm",
    "selective_attention",
    "selective_attention_reference",
    "selective_attention_workspace",
    "selective_gemm_down",
    "selective_gemm_down_reference",
    "selective_gemm_up",
    "selective_gemm_up_reference",
    "selective_gemm_workspace",
]
