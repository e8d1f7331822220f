"""A stack of (1x1 conv, BatchNorm2d, ReLU) layers that keeps one tensor per layer for backward.

Autograd's own graph of ``conv -> BN -> ReLU -> conv`` keeps two full-resolution tensors per
layer: the BN input z (the conv output) and the ReLU output y (saved by ReLU and again, as the
same storage, by the next conv). y is a per-channel affine map of z followed by ReLU, with the
batch statistics BN already saved, so backward can rebuild it from z in one elementwise pass.
This stack saves only z and the statistics, which halves the memory of the DGL head (three
128-channel layers at the module's full resolution, heavier than a CIFAR ResNet module).

Gradients are those of the plain stack up to rounding; BN running statistics and
``num_batches_tracked`` are updated exactly as ``nn.BatchNorm2d`` does in training mode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _layers(stack: nn.Sequential) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    mods = list(stack)
    if len(mods) % 3 != 0:
        raise ValueError("conv_bn_relu_stack: expected (Conv2d, BatchNorm2d, ReLU) triples")
    layers = []
    for conv, bn, relu in zip(mods[0::3], mods[1::3], mods[2::3]):
        ok = (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
              and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
              and conv.groups == 1 and conv.dilation == (1, 1) and conv.bias is None and bn.affine
              and bn.track_running_stats)
        if not ok:
            raise ValueError("conv_bn_relu_stack: each layer must be Conv2d(1x1, stride 1, no bias), "
                             "BatchNorm2d(affine, tracking running stats), ReLU")
        layers.append((conv, bn))
    return layers


def _momentum(bn: nn.BatchNorm2d) -> float:
    """What nn.BatchNorm2d.forward uses in training mode (after counting this batch)."""
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _bn_relu(z: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """relu(BN(z)) in training mode, by the very kernel the forward used: the same batch statistics
    and bitwise the same output, so the ReLU mask in backward is exactly the forward's."""
    out, _, _ = torch.ops.aten.native_batch_norm(z, weight, bias, None, None, True, 0.0, eps)
    return out.relu_()


class _ConvBNReLUStack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dtype, eps_momenta, running, *params):
        # params: (conv weight, bn weight, bn bias) per layer; running: (mean, var) per layer.
        y, saved, stats = x.to(dtype), [], []
        for i, (eps, momentum) in enumerate(eps_momenta):
            w, gamma, beta = params[3 * i:3 * i + 3]
            z = F.conv2d(y, w.to(dtype))
            out, mean, invstd = torch.ops.aten.native_batch_norm(
                z, gamma, beta, running[2 * i], running[2 * i + 1], True, momentum, eps)
            # In place in eager mode (no second tensor); out of place under torch.compile, where some
            # releases (2.11 among them) trace an in-place op on this output wrongly and give a
            # zero gradient for x (inductor fuses the ReLU either way).
            y = out.relu() if torch.compiler.is_compiling() else out.relu_()
            saved.append(z)
            stats += [mean, invstd]
            del out
        ctx.save_for_backward(x, *saved, *stats, *params)
        ctx.eps = [eps for eps, _ in eps_momenta]
        ctx.dtype = dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        L, dtype = len(ctx.eps), ctx.dtype
        tensors = ctx.saved_tensors
        x, zs, stats, params = tensors[0], tensors[1:1 + L], tensors[1 + L:1 + 3 * L], tensors[1 + 3 * L:]
        needs = ctx.needs_input_grad[4:]  # per layer: conv weight, bn weight, bn bias

        def rebuilt(i):  # input of layer i's conv: relu(BN(z_{i-1})), or x for the first layer
            if i == 0:
                return x.to(dtype)
            return _bn_relu(zs[i - 1], params[3 * i - 2], params[3 * i - 1], ctx.eps[i - 1])

        grads = [None] * (3 * L)
        g, y = grad.to(dtype), rebuilt(L)
        for i in reversed(range(L)):
            w, gamma, beta = params[3 * i:3 * i + 3]
            g = torch.ops.aten.threshold_backward(g, y, 0)  # ReLU
            dz, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                g, zs[i], gamma, None, None, stats[2 * i], stats[2 * i + 1], True, ctx.eps[i],
                [True, needs[3 * i + 1], needs[3 * i + 2]])
            y = rebuilt(i)
            need_input = i > 0 or ctx.needs_input_grad[0]
            g, dw, _ = torch.ops.aten.convolution_backward(
                dz, y, w.to(dtype), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                [need_input, needs[3 * i], False])
            grads[3 * i:3 * i + 3] = [None if t is None else t.to(p.dtype)
                                      for t, p in ((dw, w), (dgamma, gamma), (dbeta, beta))]
        dx = g.to(x.dtype) if ctx.needs_input_grad[0] else None
        return (dx, None, None, None, *grads)


def conv_bn_relu_stack(x: torch.Tensor, stack: nn.Sequential) -> torch.Tensor:
    """x [B,C,H,W] through ``stack`` = (Conv2d 1x1, BatchNorm2d, ReLU) x L -> [B,C_out,H,W].

    In training mode with autograd recording, runs the memory-lean function (one saved tensor
    per layer); otherwise the modules themselves. Honours autocast (the convs run in its dtype).
    """
    layers = _layers(stack)
    if not (stack.training and torch.is_grad_enabled()):
        return stack(x)
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    eps_momenta = [(bn.eps, _momentum(bn)) for _, bn in layers]
    running = [t for _, bn in layers for t in (bn.running_mean, bn.running_var)]
    params = [p for conv, bn in layers for p in (conv.weight, bn.weight, bn.bias)]
    with torch.autocast(dev, enabled=False):
        return _ConvBNReLUStack.apply(x, dtype, eps_momenta, running, *params)
