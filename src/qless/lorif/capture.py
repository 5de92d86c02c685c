"""Per-example, per-layer projected gradients of whole layers, factored to rank c (LoRIF's rows).

For a layer ``y = W x`` the gradient of one example's loss with respect to ``W`` is
``sum_t g_t x_t^T`` ([out, in]), ``x_t`` its input and ``g_t`` the loss gradient at its output at
token t. The hooks take both sides during the one forward/backward that
:class:`qless.gradients.PerExampleGradients` already runs, project them with the seeded side
matrices of :mod:`qless.project.logra` (``x -> P_in x``, ``g -> P_out g``), form each example's
``[k_out, k_in]`` projected gradient with one batched product over tokens, and factor it
(:func:`qless.lorif.factors.factorize`). The ``[out, in]`` gradient is never built.

Layers: ``lora`` takes every LoRA-adapted layer as a whole (peft's wrapper: input x, output
``base(x) + lora(x)``, so ``W`` is the base weight the adapter sits on); ``all`` adds every other
``nn.Linear`` of the model except the output head. A layer whose output does not depend on a
trainable LoRA parameter (below the first adapted layer) has no output gradient in the backward
and is refused by name.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from qless.errors import ModelError
from qless.gradients import PerExampleGradients
from qless.lorif.factors import FactorLayout, factorize
from qless.project import ProjectionConfig
from qless.project.logra import LograProjection


def capture_layers(model: nn.Module, which: Literal["lora", "all"]) -> list[tuple[str, nn.Module, int, int]]:
    """``(name, module, out_features, in_features)`` of the layers whose gradients LoRIF factors, in
    ``named_modules`` order."""
    from peft.tuners.lora import LoraLayer

    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    inside = set()
    for _, m in lora_layers:
        inside |= {id(x) for x in m.modules()}
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            base = m.get_base_layer()
            if not isinstance(base, nn.Linear):
                raise ModelError(f"{name}: LoRIF captures Linear layers; this adapter wraps a {type(base).__name__}")
            out.append((name, m, base.out_features, base.in_features))
        elif which == "all" and type(m) is nn.Linear and id(m) not in inside and m is not head:
            out.append((name, m, m.out_features, m.in_features))
    if not out:
        raise ModelError("the model has no LoRA-adapted layer to capture; wrap it with a LoRA adapter")
    return out


class LayerCapture:
    """Rank-c factor rows ``[B, width]`` of each example's projected per-layer gradients.

    ``projection`` is the lorif projection config (``dim`` = side size s, ``rank`` = c, ``layers``);
    ``seed`` fixes the side matrices. Use with :class:`PerExampleGradients` as an observer, or
    call the object on a batch."""

    def __init__(self, model: nn.Module, projection: ProjectionConfig) -> None:
        if projection.kind != "lorif":
            raise ModelError(f"LayerCapture needs projection.kind lorif, got {projection.kind!r}")
        self.cfg = projection
        self.layers = capture_layers(model, projection.layers)
        shapes = [(name, out_f, in_f, False) for name, _, out_f, in_f in self.layers]
        self.input_dim = sum(out_f * in_f for _, _, out_f, in_f in self.layers)
        # the side matrices: LoGra's seeded +-1 stream over these layers
        self.sides = LograProjection(replace(projection, kind="logra"), shapes, self.input_dim)
        self.layout = FactorLayout([(f.name, f.k_out, f.k_in) for f in self.sides.factors], projection.rank)
        self.dim = self.layout.width
        self._grads = PerExampleGradients(model, verify=False, observers=[self], lora_rows=False)
        self.device = self._grads.device
        self._sums: dict[int, torch.Tensor] = {}

    def identity(self) -> dict[str, Any]:
        """The manifest's projection fields: everything that fixes a row's meaning."""
        return {"kind": "lorif", "dim": self.dim, "seed": self.cfg.seed, "input_dim": self.input_dim,
                "side": self.cfg.dim, "rank": self.cfg.rank, "layers": self.cfg.layers,
                "layer_list": [[lay.name, lay.k_out, lay.k_in] for lay in self.layout.layers]}

    def install(self, bsz: int) -> list[RemovableHandle]:
        self._sums = {}
        return [m.register_forward_hook(functools.partial(self._forward_hook, i, name, bsz))
                for i, (name, m, _, _) in enumerate(self.layers)]

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Factor rows ``[B, width]`` float32 and the losses ``[B]`` of one right-padded batch."""
        try:
            _, losses = self._grads(batch)
            missing = [self.layers[i][0] for i in range(len(self.layers)) if i not in self._sums]
            if missing:
                raise ModelError(f"{missing[0]} (and {len(missing) - 1} more) received no output gradient in the backward: "
                                 "the layer is not used by the model's forward")
            # factored once per call, after the backward: a layer called twice has its two parts summed first
            rows = self.layout.join([factorize(self._sums[i], lay.rank) for i, lay in enumerate(self.layout.layers)])
        finally:
            self._sums = {}
        return rows, losses

    def _forward_hook(self, i: int, name: str, bsz: int, module: nn.Module, inputs: tuple, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        if not (isinstance(output, torch.Tensor) and output.requires_grad):
            raise ModelError(f"{name}: its output does not depend on a trainable LoRA parameter (it lies below the first "
                             "adapted layer), so the backward gives it no gradient; capture layers='lora' or adapt the "
                             "layers below it too")
        x = inputs[0]
        if x.dim() != 3 or x.shape[0] != bsz:
            raise ModelError(f"{name} received an input of shape {tuple(x.shape)}, not [B={bsz}, T, features]")
        output.register_hook(functools.partial(self._grad_hook, i, x.detach()))

    def _grad_hook(self, i: int, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add this call's ``sum_t (P_out g_t)(P_in x_t)^T`` per example, ``[B, k_out, k_in]`` float32."""
        side = self.sides.factors[i]
        gp = self.sides.side(side, "out", g)  # [B, T, k_out]
        xp = self.sides.side(side, "in", x)  # [B, T, k_in]
        part = torch.bmm(gp.transpose(1, 2), xp).to(self.device)
        self._sums[i] = part if i not in self._sums else self._sums[i] + part


__all__ = ["LayerCapture", "capture_layers"]
