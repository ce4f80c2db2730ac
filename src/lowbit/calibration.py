"""Calibration as a library verb: run data through a quantised model so that its quantisers set
their data-driven state, with no gradient step and nothing else changed.

    lowbit.calibrate(model, batches)          # a list/iterable of input batches

    with lowbit.Calibration(model):           # or by hand, any forward calls
        for x in batches:
            model(x)

Inside a calibration the activation quantisers run in training mode, so that observers update
(``affine``'s EMA min/max) and data-initialised quantisers set themselves (LSQ's sign and first
step), while every other module stays in evaluation mode: BatchNorm keeps its running
statistics, dropout is off. Gradients are off. On exit the model is in evaluation mode. The
post-training quantisation baselines (:mod:`lowbit.bench.ptq`) are built on it.

Quantisers are found by ownership (``isinstance(module, Quantizer)`` with the activation role),
never by parameter names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .quant.base import Quantizer


def activation_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Activation quantisers by the name of the layer they feed (``x.input_quant`` -> ``x``)."""
    found: dict[str, Quantizer] = {}
    for name, module in model.named_modules():
        if isinstance(module, Quantizer) and getattr(module, "role", None) == "activation":
            layer = name.removesuffix(".input_quant").removesuffix(".quantizer")
            found[layer or name] = module
    return found


@contextmanager
def recording_inputs(
    quantizers: Mapping[str, Quantizer], record: Callable[[str, Tensor], None]
) -> Iterator[None]:
    """Inside the ``with`` block, ``record(name, x)`` sees every input ``x`` (detached) that
    quantiser ``quantizers[name]`` gets; the hooks are removed on exit."""

    def hook_for(name: str) -> Callable[..., None]:
        return lambda _module, args: record(name, args[0].detach())

    handles = [q.register_forward_pre_hook(hook_for(n)) for n, q in quantizers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class Calibration:
    """Context manager: forwards inside it calibrate ``model``'s activation quantisers.

    ``record(layer, x)``, if given, sees every input of each activation quantiser (by the name
    of the layer it feeds) during the calibration.
    """

    def __init__(
        self, model: nn.Module, record: Callable[[str, Tensor], None] | None = None
    ) -> None:
        self.model = model
        self.quantizers = activation_quantizers(model)
        self._record = record
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> nn.Module:
        self.model.eval()
        for q in self.quantizers.values():
            q.train()
        self._stack.callback(self.model.eval)
        self._stack.enter_context(torch.no_grad())
        if self._record is not None:
            self._stack.enter_context(recording_inputs(self.quantizers, self._record))
        return self.model

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    record: Callable[[str, Tensor], None] | None = None,
) -> nn.Module:
    """Forward every batch of ``batches`` through ``model`` inside a :class:`Calibration`.

    Batches are moved to the model's device. Returns ``model``, in evaluation mode.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with Calibration(model, record):
        for x in batches:
            model(x.to(device))
    return model
