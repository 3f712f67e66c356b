"""``rvqllm::rvq_linear`` as a custom torch op: fake (meta) kernel, autograd formula, dispatch inside.

Because it is a registered op with a fake implementation, ``torch.compile`` traces through it (it
appears as one node in the graph) and CUDA graphs capture it; ``register_autograd`` gives gradients for
``x``, ``codebooks``, ``scales`` and ``bias`` (``codes`` are integers), so codebooks and scales can be
fine-tuned. The backward decodes the weight whole in float32 (a fine-tuning path, not a serving one).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch
from .reference import dequantize


@torch.library.custom_op("rvqllm::rvq_linear", mutates_args=())
def rvq_linear_op(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
                  in_features: int) -> Tensor:
    """``x [..., in_features]`` → ``[..., out]`` in ``x.dtype``; see :func:`rvqllm.kernels.rvq_linear`."""
    return run_eager(x, codes, codebooks, scales, bias, in_features)


def run_eager(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor, bias: Tensor | None,
              in_features: int) -> Tensor:
    """The op's real implementation (no autograd): flatten, dispatch, reshape, cast."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = dispatch.run(x2, codes, codebooks, scales, bias, in_features)
    return y.reshape(*lead, codes.shape[0]).to(x.dtype)


@rvq_linear_op.register_fake
def _fake(x, codes, codebooks, scales, bias, in_features):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


def _setup_context(ctx, inputs, output):
    x, codes, codebooks, scales, bias, in_features = inputs
    ctx.save_for_backward(x, codes, codebooks, scales)
    ctx.in_features = in_features
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    x, codes, codebooks, scales = ctx.saved_tensors
    in_features = ctx.in_features
    out, groups, stages = codes.shape
    d = codebooks.shape[-1]
    need_x, _, need_cb, need_sc, need_b, _ = ctx.needs_input_grad
    g2 = grad.reshape(-1, out).float()
    unscaled = dequantize(codes, codebooks, torch.ones_like(scales), in_features)  # [out, in] fp32
    sc = scales.float()
    gx = gcb = gsc = gb = None
    if need_x:
        gx = (g2 @ (unscaled * sc[:, None])).reshape(x.shape).to(x.dtype)
    if need_cb or need_sc:
        dw = g2.T @ x.reshape(-1, in_features).float()  # [out, in]
        if need_sc:
            gsc = (dw * unscaled).sum(1).to(scales.dtype)
        if need_cb:
            dws = torch.nn.functional.pad(dw * sc[:, None], (0, groups * d - in_features)).reshape(out * groups, d)
            idx = codes.long().reshape(out * groups, stages)
            if codes.dtype == torch.int16:
                idx = idx & 0xFFFF
            gcb32 = torch.zeros(codebooks.shape, dtype=torch.float32, device=codebooks.device)
            for s in range(stages):
                gcb32[s].index_add_(0, idx[:, s], dws)
            gcb = gcb32.to(codebooks.dtype)
    if need_b:
        gb = g2.sum(0).to(ctx.bias_dtype)
    return gx, None, gcb, gsc, gb, None


rvq_linear_op.register_autograd(_backward, setup_context=_setup_context)
