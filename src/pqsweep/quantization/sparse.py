"""Unstructured zeros run as sparse: pruned Linear layers (and Conv2d layers where it pays) stored as CSR, float32
values, and multiplied by PyTorch's sparse CSR kernels (MKL on CPU) instead of dense kernels that compute the zeros.

CSR keeps each non-zero's value and int32 column index (8 bytes against a dense weight's 4) plus one int32 row pointer
per output row, so it stores less than dense below 50 % density; it runs faster only well below that. Measured on
this repository's 2-core machine, batch 1, one thread (`benchmarks/speed.py sparse`, and a scan of single layers):
AlexNet's 9216 -> 4096 Linear takes 10 ms dense, 12 ms as CSR at 20 % density, 6.5 ms at 10 %, 3.5 ms at 5 %
(its whole classifier: 0.88x at 20 %, 1.6x at 10 %, 3.2x at 5 %); a 3x3 conv with 256 channels on an 8x8 map
(64 output positions) runs 1.6x faster at 10 % density, the same conv on a 16x16 or 32x32 map is slower. Hence a
layer is converted when
- at most MAX_DENSITY of its weights are non-zero (below the Linear crossover, about 17 %), and
- it is a Linear, or a Conv2d (groups=1, zero padding) whose output has at most MAX_CONV_POSITIONS positions per
  image on the run's example input (`ctx.example`): such a conv becomes im2col (F.unfold) times the CSR weight, and
  on larger maps unfolding the input costs more than the zeros save.
Every other layer stays as it is. Small layers (the `cnn`'s 256 -> 64 and 64 -> 10 Linear) are converted by the
same rule and lose: the sparse kernel's fixed cost per call is most of their time (the cnn's FC layers at batch 64
run 1.2-1.35x slower at 90-95 %, the whole cnn at batch 1 1.3x), though they store 4-6.5x less. resnet18_cifar at
90 % runs 1.5x faster (its 8x8 and 4x4 convs and the classifier as CSR); its convs would pay at 20 % density too
(1.25x at 80 % with the density rule off), where AlexNet's Linear layers do not (0.92x): the one threshold, set
below the Linear crossover, leaves such convs dense.

The CSR weight is a buffer named `weight` (torch.save writes its row pointers, column indices and values, which is
what `size_mb` counts; `pqsweep.measure` reads it as a weight of the layer's dense shape). Export: torchscript yes
(torch.jit.trace keeps the CSR buffer and the sparse matmul); onnx no: neither ONNX exporter takes a sparse
tensor ("Sparse CSR tensors do not have strides"). quantization.order=quantize_then_prune is refused before a run (the
`orders` fact of its option file): this option stores the zeros pruning made, and before pruning there are none.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

MAX_DENSITY = 0.15  # non-zero share at or below which a layer is stored as CSR (see the module doc)
MAX_CONV_POSITIONS = 64  # output positions per image (8 x 8) up to which a conv is converted


def sparse(model: nn.Module, cfg, ctx) -> nn.Module:
    """A copy of `model` whose layers sparse enough to pay (see the module doc) are stored and run as CSR."""
    example = ctx.example if ctx is not None else None
    return sparsify(copy.deepcopy(model).cpu().eval(), example)


def sparsify(model: nn.Module, example: torch.Tensor | None, max_density: float = MAX_DENSITY,
             max_positions: int = MAX_CONV_POSITIONS) -> nn.Module:
    """Replace, in place, each Linear and Conv2d of `model` that passes the rule (convs only with an `example` to
    size their outputs) by its CSR form; returns `model`. The benchmark passes max_density=1 to force CSR."""
    positions = _output_positions(model, example) if example is not None else {}
    for name, layer in list(model.named_modules()):
        if type(layer) is nn.Linear:
            fits = True
        elif type(layer) is nn.Conv2d:
            fits = (layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                    and positions.get(name, max_positions + 1) <= max_positions)
        else:
            continue
        weight = layer.weight.detach()
        if fits and int(torch.count_nonzero(weight)) <= max_density * weight.numel():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, (CsrLinear if type(layer) is nn.Linear else CsrConv2d)(layer))
    return model


def _output_positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output positions per image (H x W) of every Conv2d on `example`."""
    found: dict[str, int] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: found.__setitem__(name, out[0, 0].numel()))
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for hook in hooks:
            hook.remove()
    return found


def csr(weight: torch.Tensor) -> torch.Tensor:
    """A 2-d float tensor as CSR with int32 indices (MKL's own index type: the fastest CSR x dense kernel here)."""
    with _quiet():
        full = weight.detach().float().to_sparse_csr()
        return torch.sparse_csr_tensor(full.crow_indices().to(torch.int32), full.col_indices().to(torch.int32),
                                       full.values(), full.shape, check_invariants=False)


class _CsrLayer(nn.Module):
    """What both CSR layers share: the CSR `weight` buffer, a float bias, copies and state dicts that keep CSR."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", csr(weight))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def __deepcopy__(self, memo):
        # torch cannot deep-copy a CSR tensor (it has no storage of its own to copy); clone() copies its three parts
        twin = self.__class__.__new__(self.__class__)
        memo[id(self)] = twin
        weight = self._buffers.pop("weight")
        try:
            twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self._buffers["weight"] = weight
        with _quiet():
            twin._buffers["weight"] = weight.clone()
        return twin

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # copy_ into a CSR tensor needs the same number of non-zeros: a loaded CSR weight with another count first
        # takes the buffer's place as a clone, which the copy that follows then overwrites with the same values
        loaded = state_dict.get(prefix + "weight")
        if loaded is not None and loaded.layout == torch.sparse_csr and loaded.shape == self.weight.shape:
            with _quiet():
                self._buffers["weight"] = loaded.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def density(self) -> float:
        return self.weight.values().numel() / self.weight.numel()


class CsrLinear(_CsrLayer):
    """nn.Linear with a CSR weight: y = W x (+ b) by the sparse kernel, for any leading batch dimensions."""

    def __init__(self, layer: nn.Linear):
        super().__init__(layer.weight, layer.bias)
        self.in_features, self.out_features = layer.in_features, layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).t()  # (in, N): CSR is the left operand
        out = self.weight @ flat if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat)
        return out.t().reshape(*x.shape[:-1], self.out_features)


class CsrConv2d(_CsrLayer):
    """nn.Conv2d (groups=1, zero padding) with its weight as a CSR (out, in x kh x kw) matrix: im2col, then the
    sparse kernel; a 1x1 stride-1 conv without padding skips the unfold."""

    def __init__(self, layer: nn.Conv2d):
        super().__init__(layer.weight.flatten(1), layer.bias)
        self.in_channels, self.out_channels = layer.in_channels, layer.out_channels
        self.kernel_size, self.stride = layer.kernel_size, layer.stride
        self.padding, self.dilation = layer.padding, layer.dilation
        self.pointwise = self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols = x.flatten(2) if self.pointwise else F.unfold(x, self.kernel_size, self.dilation, self.padding,
                                                            self.stride)  # (N, C kh kw, oh ow)
        # one branch for every batch size (torch.jit.trace keeps one); at batch 1 the transposes are free views
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (C kh kw, N oh ow)
        out = self.weight @ cols if self.bias is None else torch.addmm(self.bias[:, None], self.weight, cols)
        return out.view(self.out_channels, n, oh, ow).transpose(0, 1)


class _quiet(warnings.catch_warnings):
    """torch warns that CSR support is in beta and that invariant checks are off when a CSR tensor is built; we
    build them from dense tensors (valid by construction) and check the outputs against dense ones (tests)."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        return self
