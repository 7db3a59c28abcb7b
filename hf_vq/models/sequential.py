"""`Sequential`: modules around one quantizer, returning the quantizer's output with the last module's features
(vqp 1.32 `Sequential`)."""

from __future__ import annotations

from torch import Tensor, nn

from ..modeling_utils import QuantizerModel, QuantizerOutput


class Sequential(nn.Module):
    """Runs `modules` in order; exactly one of them is an hf_vq quantizer. The modules before it map the input to
    its features, the quantizer is called with the keyword arguments of the call (`mask`, `return_dict`, ...), and
    the modules after it map its quantized features on. The result is the quantizer's own output with
    `quantized` replaced by the last module's output: the output dataclass, or with `return_dict=False` the
    quantizer's tuple with its first element replaced (as vqp 1.32's `Sequential`, which returns
    `(x, *rest)` of the quantizer's tuple).

    Example:
        >>> seq = Sequential(nn.Linear(8, 4), FSQ(levels=[8, 5, 5, 5]), nn.Linear(4, 8))
        >>> out = seq(torch.randn(2, 10, 8))
        >>> out.quantized.shape, out.indices.shape
        (torch.Size([2, 10, 8]), torch.Size([2, 10]))
    """

    def __init__(self, *modules: nn.Module):
        super().__init__()
        quantizers = [i for i, m in enumerate(modules) if isinstance(m, QuantizerModel)]
        if len(quantizers) != 1:
            raise ValueError(f"Sequential takes exactly one hf_vq quantizer among its modules, got {len(quantizers)} "
                             f"(modules: {[type(m).__name__ for m in modules]})")
        self.fns = nn.ModuleList(modules)
        self.quantizer_index = quantizers[0]

    @property
    def quantizer(self) -> QuantizerModel:
        return self.fns[self.quantizer_index]

    def forward(self, x: Tensor, **kwargs) -> QuantizerOutput | tuple | Tensor:
        for fn in self.fns[: self.quantizer_index]:
            x = fn(x)
        out = self.quantizer(x, **kwargs)
        after = self.fns[self.quantizer_index + 1:]
        if not after:
            return out
        x = out.quantized if isinstance(out, QuantizerOutput) else out[0] if isinstance(out, tuple) else None
        if x is None:  # (RandomProjectionQuantizer's tuple form is one tensor: its indices or its loss)
            raise ValueError(f"{type(self.quantizer).__name__} returned no quantized features for the modules after "
                             f"it (output: {type(out).__name__})")
        for fn in after:
            x = fn(x)
        if isinstance(out, tuple):
            return (x, *out[1:])
        out.quantized = x
        return out
