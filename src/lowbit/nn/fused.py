"""Conv + BatchNorm (+ ReLU/ReLU6) folded for fake-quant training (Jacob et al. 2018, Sec. 3.2).

Inference folds BatchNorm into the convolution,

    w_fold = gamma * w / sqrt(var + eps),    b_fold = beta + gamma * (b - mean) / sqrt(var + eps)

(``b`` the conv bias, 0 if none), so training must fake-quantise ``w_fold``, not ``w``.
:class:`ConvBnAct` does so in two phases:

* **before the freeze** (training): the paper's folding with correction, in the form
  ``torch.ao.nn.intrinsic.qat.ConvBn2d`` uses. With ``s = gamma / sqrt(running_var + eps)``,
  ``y = BN_batch(conv(x, fq(w * s)) / s + b)``: the quantised weight is the one folded with the
  running statistics, dividing by ``s`` undoes the scale, and BatchNorm then normalises with the
  batch statistics (and updates its running statistics as usual). Without quantisation this is
  exactly ``BN_batch(conv(x))``.
* **after the freeze** (``freeze_bn()``, after ``freeze_bn_after`` training forwards, and
  always in eval mode): ``y = conv(x, fq(w_fold)) + b_fold`` with the running statistics,
  which is what the integer engine computes.

:func:`fuse_conv_bn` finds such triples in a model and swaps in ``ConvBnAct`` blocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from ..quant.base import Quantizer

ACTIVATIONS = (nn.ReLU, nn.ReLU6)
QuantFactory = Callable[[str], Quantizer | None]


class ConvBnAct(nn.Module):
    """``act(BN(conv(input_quant(x))))`` with BatchNorm folded into the fake-quantised weight.

    ``weight_quant`` quantises the folded weight and ``input_quant`` the block's input; None keeps
    that side in float. ``act`` is ``nn.ReLU``, ``nn.ReLU6`` or None. See the module docstring
    for the two phases. Buffers ``steps`` (training forwards so far, int64) and ``bn_frozen``
    (bool) persist the schedule in the state dict; Python copies of them decide the phase so the
    forward needs no host sync. Under ``torch.compile`` the phase is a Python flag: switching it
    (``freeze_bn()``) recompiles once; with ``freeze_bn_after`` set, the pending count is a
    Python int, so each training step before the freeze recompiles (call ``freeze_bn()`` from
    the training loop instead when compiling).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        bn: nn.BatchNorm2d,
        act: nn.Module | None = None,
        weight_quant: Quantizer | None = None,
        input_quant: Quantizer | None = None,
        freeze_bn_after: int | None = None,
    ) -> None:
        super().__init__()
        _check_block(conv, bn, act)
        if freeze_bn_after is not None and (
            not isinstance(freeze_bn_after, int) or freeze_bn_after < 0
        ):
            raise ValueError(
                f"freeze_bn_after must be None or an int >= 0, got {freeze_bn_after!r}"
            )
        self.conv = conv
        self.bn = bn
        self.act = act
        self.weight_quant = weight_quant
        self.input_quant = input_quant
        self.freeze_bn_after = freeze_bn_after
        device = conv.weight.device
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.bool, device=device))
        self._steps = 0
        self._frozen = False

    def freeze_bn(self) -> None:
        """Switch to the running statistics for good: ``conv(x, fq(w_fold)) + b_fold``."""
        self._frozen = True
        self.bn_frozen.fill_(True)

    def _bn_scale(self) -> Tensor:
        """Per output channel ``gamma / sqrt(running_var + eps)`` (``gamma = 1`` if not affine)."""
        bn = self.bn
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        return inv_std if bn.weight is None else bn.weight * inv_std

    def folded_weight_bias(self) -> tuple[Tensor, Tensor]:
        """``(w_fold, b_fold)`` from the running statistics, in float (what export quantises)."""
        bn, conv = self.bn, self.conv
        s = self._bn_scale()
        w_fold = conv.weight * s.reshape(-1, 1, 1, 1)
        centred = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        b_fold = centred * s if bn.bias is None else bn.bias + centred * s
        return w_fold, b_fold

    def _quantize_weight(self, w: Tensor) -> Tensor:
        return w if self.weight_quant is None else self.weight_quant(w)

    def _forward_batch_stats(self, x: Tensor) -> Tensor:
        """Before the freeze: ``BN_batch(conv(x, fq(w s)) / s + b)``, ``s`` from running stats.

        A channel with ``gamma = 0`` (e.g. zero-initialised residual BN) would make ``s = 0`` and
        the division NaN; such channels use ``s = 1`` here (their output is ``beta`` either way).

        The division by ``s`` is applied to the (small) quantised weight rather than to the conv
        output: ``conv(x, fq(w s)) / s = conv(x, fq(w s) / s)`` by linearity, with the same
        gradients, and it saves a pass over the activation in forward and three in backward.
        """
        s = self._bn_scale()
        s = torch.where(s == 0, torch.ones_like(s), s).reshape(-1, 1, 1, 1)
        w = self._quantize_weight(self.conv.weight * s) / s
        return self.bn(self.conv._conv_forward(x, w, self.conv.bias))

    def _forward_frozen(self, x: Tensor) -> Tensor:
        w_fold, b_fold = self.folded_weight_bias()
        return self.conv._conv_forward(x, self._quantize_weight(w_fold), b_fold)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quant is not None:
            x = self.input_quant(x)
        if not self.training:
            y = self._forward_frozen(x)
        else:
            after = self.freeze_bn_after
            if not self._frozen and after is not None:
                # the Python count is kept only while a scheduled freeze is pending: a compiled
                # forward then has no Python int that changes every step
                if self._steps >= after:
                    self.freeze_bn()  # once freeze_bn_after training forwards have run
                self._steps += 1
            y = self._forward_frozen(x) if self._frozen else self._forward_batch_stats(x)
            self.steps.add_(1)
        return y if self.act is None else self.act(y)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._steps = int(self.steps)
        self._frozen = bool(self.bn_frozen)

    def extra_repr(self) -> str:
        return f"freeze_bn_after={self.freeze_bn_after}, bn_frozen={self._frozen}"


def _check_block(conv: nn.Module, bn: nn.Module, act: nn.Module | None) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None:
        raise ValueError("bn must be an nn.BatchNorm2d with track_running_stats=True")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"bn has {bn.num_features} features but conv has {conv.out_channels} output channels"
        )
    if act is not None and not isinstance(act, ACTIVATIONS):
        raise ValueError(f"act must be nn.ReLU, nn.ReLU6 or None, got {type(act).__name__}")


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that does not trace into quantisers or already-fused blocks."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (Quantizer, ConvBnAct)) or super().is_leaf_module(
            m, module_qualified_name
        )


Chain = tuple[str, str, str | None]  # (conv name, bn name, act name or None)


def _fx_chains(model: nn.Module) -> list[Chain] | None:
    """Conv -> BN (-> act) chains in ``model``'s traced graph, or None if it does not trace.

    A conv joins when it is called once and its output feeds only a BN module (as its input)
    that is called once; the act joins when the BN output feeds only a ReLU/ReLU6 module that is
    called once. Functional activations (``F.relu``) stay where they are, after the block.
    """
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # arbitrary user code: any failure means "not traceable"
        return None
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")

    def sole_module_user(
        node: torch.fx.Node, kind: type | tuple[type, ...]
    ) -> torch.fx.Node | None:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        ok = (
            user.op == "call_module"
            and isinstance(modules[user.target], kind)
            and calls[user.target] == 1
            and user.args == (node,)
            and not user.kwargs
        )
        return user if ok else None

    chains: list[Chain] = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.Conv2d:
            continue
        bn = sole_module_user(node, nn.BatchNorm2d) if calls[node.target] == 1 else None
        if bn is not None:
            act = sole_module_user(bn, ACTIVATIONS)
            chains.append((node.target, bn.target, None if act is None else act.target))
    return chains


def _sequential_chains(model: nn.Module) -> list[Chain]:
    """Conv, BN (, act) as adjacent children of ``nn.Sequential`` containers, each used once."""
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    chains: list[Chain] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        prefix = f"{seq_name}." if seq_name else ""
        kids = [(prefix + n, m) for n, m in seq.named_children()]
        for i in range(len(kids) - 1):
            (conv_name, conv), (bn_name, bn) = kids[i], kids[i + 1]
            if not (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d)):
                continue
            if uses[id(conv)] > 1 or uses[id(bn)] > 1:
                continue
            nxt = kids[i + 2] if i + 2 < len(kids) else None
            fuse_act = nxt is not None and isinstance(nxt[1], ACTIVATIONS) and uses[id(nxt[1])] == 1
            chains.append((conv_name, bn_name, nxt[0] if fuse_act else None))
    return chains


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def fuse_conv_bn(
    model: nn.Module,
    weight_quant_factory: QuantFactory | None = None,
    input_quant_factory: QuantFactory | None = None,
    freeze_bn_after: int | None = None,
) -> list[str]:
    """Fold every ``Conv2d -> BatchNorm2d (-> ReLU/ReLU6)`` of ``model`` into a ConvBnAct, in place.

    Rule. If ``model`` traces with ``torch.fx`` (quantisers and ConvBnAct blocks kept opaque), a
    chain is a plain ``nn.Conv2d`` module (subclasses such as quantised convs are left alone)
    called once whose output feeds only a ``BatchNorm2d`` module called once; a ``ReLU`` /
    ``ReLU6`` module joins when it is called once and is the only consumer of the BN output.
    If tracing fails, chains are adjacent children ``conv, bn (, act)`` of ``nn.Sequential``
    containers, each module object used once in the model. BatchNorms without running
    statistics, or whose width differs from the conv's, are skipped.

    The conv module is replaced by ``ConvBnAct(conv, bn, act, weight_quant_factory(name),
    input_quant_factory(name), freeze_bn_after)`` (``name`` the conv's qualified name, the
    quantisers moved to the conv's device), and the BN and fused act modules by ``nn.Identity``.
    Returns the qualified names of the fused convs, in graph (or module) order.
    """
    chains = _fx_chains(model)
    if chains is None:
        chains = _sequential_chains(model)
    fused: list[str] = []
    for conv_name, bn_name, act_name in chains:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if bn.running_mean is None or bn.num_features != conv.out_channels:
            continue
        act = None if act_name is None else model.get_submodule(act_name)
        device = conv.weight.device
        block = ConvBnAct(
            conv,
            bn,
            act,
            weight_quant=_make(weight_quant_factory, conv_name, device),
            input_quant=_make(input_quant_factory, conv_name, device),
            freeze_bn_after=freeze_bn_after,
        )
        block.train(conv.training)
        _set_submodule(model, conv_name, block)
        _set_submodule(model, bn_name, nn.Identity())
        if act_name is not None:
            _set_submodule(model, act_name, nn.Identity())
        fused.append(conv_name)
    return fused


def _make(factory: QuantFactory | None, name: str, device: torch.device) -> Quantizer | None:
    quantizer = None if factory is None else factory(name)
    return None if quantizer is None else quantizer.to(device)
