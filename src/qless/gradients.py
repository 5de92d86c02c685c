"""Per-example LoRA gradients for a whole batch in one backward pass, and the Adam direction.

Step 2 of the pipeline needs, for every example z, the gradient of its mean response-token loss
with respect to the LoRA parameters only. LESS runs one forward/backward per example; here one
forward and one backward of the *sum* of per-example mean losses give all B gradients at once:

* A LoRA factor is an ``nn.Linear`` (``lora_A``: in -> r, ``lora_B``: r -> out) applied to a
  layer input ``x`` of shape [B, T, in]. Its weight gradient for the summed loss is
  ``sum_b sum_t g[b, t]^T x[b, t]`` where ``g`` = d(loss)/d(output), shape [B, T, out].
* Example b's loss depends only on row b of the batch (a causal LM with right padding and an
  attention mask does not mix rows), so ``g[b]`` is the gradient of loss_b alone and
  ``G[b] = g[b]^T @ x[b]`` ([out, in], one batched matmul over T) is loss_b's weight gradient,
  exactly. Nothing of shape [B, T, out, in] is ever built.

:class:`PerExampleGradients` captures ``x`` with a forward hook on each trainable LoRA Linear and
``g`` with a hook on that Linear's output tensor, and writes ``G`` straight into one [B, d]
buffer laid out in :func:`lora_parameters` order. Hooks exist only for the duration of a call.
A frozen output head is fed only the N positions that predict a label, so the logits are
[N, V] rather than [B, T, V] (the vocabulary projection is the largest activation by far).
:func:`per_example_gradients_loop` is the slow, obvious reference the tests compare against.

Pool examples are then turned into Adam directions (:func:`adam_direction`) with the warmup
checkpoint's moments; target examples keep the plain gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from qless.errors import ConfigError, ModelError
from qless.project import ProjectionConfig
from qless.project.logra import Factor, LograProjection

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value of positions that take no loss (the Hugging Face convention)."""

VERIFY_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
"""Relative tolerance of the first-batch self-check (sum over examples == autograd's batch
gradient), by LoRA parameter dtype: only the summation order differs, so a real miss (a weight
used outside its Linear's forward) shows up as an O(1) error. Half-precision parameters use
:data:`VERIFY_RTOL_LOW_PRECISION`."""

VERIFY_RTOL_LOW_PRECISION = 5e-2
"""Self-check tolerance for bfloat16/float16 LoRA parameters, whose autograd gradient is rounded
to 8 (bf16) or 11 (fp16) significant bits."""

_BATCH_KEYS = ("input_ids", "attention_mask", "labels")


class Observer(Protocol):
    """Something that hooks the model for one :class:`PerExampleGradients` call."""

    def install(self, bsz: int) -> list[RemovableHandle]:
        """Register this call's hooks (batch size ``bsz``); they are removed when the call ends."""
        ...


@dataclasses.dataclass(frozen=True)
class _Slot:
    """One trainable LoRA Linear and where its parameters live in the flattened gradient."""

    name: str  # module path, e.g. "...q_proj.lora_A.default"
    module: nn.Linear
    weight_offset: int  # column of weight[0, 0] in the [B, d] gradient; -1 if the weight is frozen
    bias_offset: int  # column of bias[0]; -1 if there is no trainable bias


def _lora_linears(model: nn.Module) -> dict[int, tuple[str, nn.Module, nn.Linear]]:
    """Map id(parameter) -> (owning Linear's path, its LoRA layer, the Linear) for every
    parameter of every ``lora_A``/``lora_B`` Linear of every peft LoRA layer.

    Raises ModelError for layers the hook path cannot differentiate: merged or disabled
    adapters, LoRA variants (DoRA, aLoRA, ...), which use the factor weights outside the
    Linears' own forward calls.
    """
    from peft.tuners.lora import LoraLayer

    found: dict[int, tuple[str, nn.Module, nn.Linear]] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for factor in ("lora_A", "lora_B"):
            for adapter, linear in getattr(layer, factor, {}).items():
                if not any(p.requires_grad for p in linear.parameters()):
                    continue
                where = f"{layer_name}.{factor}.{adapter}"
                if getattr(layer, "use_dora", {}).get(adapter, False):
                    raise ModelError(
                        f"{where}: DoRA adapters are not supported for per-example gradients "
                        "(their weight norm uses the factors outside the LoRA Linears); "
                        "train the adapter with use_dora=False"
                    )
                variant = getattr(layer, "lora_variant", {}).get(adapter)
                if variant is not None:
                    raise ModelError(
                        f"{where}: the LoRA variant {type(variant).__name__} is not supported for "
                        "per-example gradients; use a plain LoraConfig adapter"
                    )
                if getattr(layer, "merged", False):
                    raise ModelError(
                        f"{where}: the adapter is merged into the base weights; call unmerge_adapter() first"
                    )
                if getattr(layer, "disable_adapters", False):
                    raise ModelError(
                        f"{where}: adapters are disabled on this layer; enable them before extracting gradients"
                    )
                if type(linear) is not nn.Linear:
                    raise ModelError(
                        f"{where}: LoRA factor of type {type(linear).__name__} is not supported "
                        "(only nn.Linear factors: LoRA on Linear/Conv1D projections, not embeddings or convolutions)"
                    )
                for p in linear.parameters():
                    found[id(p)] = (where, layer, linear)
    return found


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable LoRA parameters of ``model`` in ``model.named_parameters()`` order.

    This order defines the flattened gradient layout used everywhere downstream: parameter
    ``i`` occupies columns ``[sum(numel of 0..i-1), ... + numel_i)`` of a [B, d] gradient, each
    parameter flattened row-major in its own shape (``lora_A.weight``: [r, in],
    ``lora_B.weight``: [out, r]).

    Raises:
        ModelError: no trainable LoRA parameter; a trainable parameter that is not a LoRA
            factor (``modules_to_save``, an unfrozen base weight); or a LoRA variant the
            per-example path cannot handle (DoRA, LoRA on embeddings or convolutions, merged
            or disabled adapters).
    """
    owners = _lora_linears(model)
    params: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in owners:
            params.append((name, p))
        elif "lora_" in name:
            raise ModelError(
                f"trainable parameter {name} belongs to an unsupported LoRA form (DoRA magnitude, LoRA on "
                "an embedding or convolution, ...); use plain LoRA on Linear/Conv1D projections"
            )
        else:
            raise ModelError(
                f"trainable parameter {name} is not a LoRA factor; gradients are taken with respect to LoRA "
                "parameters only: freeze it (requires_grad_(False)) or drop it from modules_to_save"
            )
    if not params:
        raise ModelError(
            "the model has no trainable LoRA parameters: load the adapter with is_trainable=True "
            "(PeftModel.from_pretrained(..., is_trainable=True)) or wrap the model with get_peft_model"
        )
    return params


def _check_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a right-padded batch; returns (input_ids, attention_mask, labels), each [B, T].

    Raises ValueError when a key is missing, shapes differ, padding is not on the right, or an
    example has no label token after the causal shift (upstream code skips such examples).
    """
    missing = [k for k in _BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch lacks {', '.join(missing)}; expected keys {', '.join(_BATCH_KEYS)}")
    ids, mask, labels = (batch[k] for k in _BATCH_KEYS)
    if ids.dim() != 2 or mask.shape != ids.shape or labels.shape != ids.shape:
        raise ValueError(
            f"batch tensors must share one [B, T] shape; got input_ids {tuple(ids.shape)}, "
            f"attention_mask {tuple(mask.shape)}, labels {tuple(labels.shape)}"
        )
    m = mask.to(torch.long)
    if bool((m[:, 1:] > m[:, :-1]).any()):
        b = int((m[:, 1:] > m[:, :-1]).any(dim=1).nonzero()[0])
        raise ValueError(f"batch example {b} is not right-padded: its attention_mask has a 0 before a 1")
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        b = int((counts == 0).nonzero()[0])
        raise ValueError(
            f"batch example {b} has no label tokens (labels are all {IGNORE_INDEX} after the first position)"
        )
    if bool(((labels != IGNORE_INDEX) & (m == 0)).any()):
        b = int(((labels != IGNORE_INDEX) & (m == 0)).any(dim=1).nonzero()[0])
        raise ValueError(f"batch example {b} has labels on padding positions (attention_mask 0)")
    return ids, mask, labels


def _mean_label_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over label tokens.

    ``logits`` are either [B, T, V], where position t predicts ``labels[:, t + 1]``, or already
    gathered at the N label positions, [N, V] in row-major order of ``labels[:, 1:] != -100``.
    Returns [B] in float32 (float64 if the logits are); only the [N, V] rows are upcast.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX  # [B, T-1]
    rows = keep.nonzero()[:, 0]  # [N], the example of each label token
    token_logits = logits if logits.dim() == 2 else logits[:, :-1][keep]
    token_loss = F.cross_entropy(token_logits.to(dtype), target[keep], reduction="none")  # [N]
    sums = torch.zeros(labels.shape[0], dtype=dtype, device=logits.device).index_add_(0, rows, token_loss)
    return sums / keep.sum(dim=1).to(dtype)


def _frozen_output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output projection if it is a plain, frozen ``nn.Linear`` (else None).

    Only then may its input be cut down to the label positions: a LoRA-wrapped or quantized
    head keeps the full [B, T, H] input so that its hooks see the batch layout.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters()):
        return head
    return None


class PerExampleGradients:
    """Per-example gradients of the mean label-token loss w.r.t. the LoRA parameters, B at a time.

    Forward hooks on each trainable LoRA ``nn.Linear`` capture its input x [B, T, in] and hook
    its output so that, in the backward of ``sum_b loss_b``, the output gradient g [B, T, out]
    is turned into ``G = g^T @ x`` per example (``torch.bmm`` over T, upcast to float32) and
    written into its columns of the [B, d] result. This is exact: row b of the result is the
    gradient of loss_b alone (see the module docstring), and works for any causal LM whose
    LoRA factors are ``nn.Linear`` — Llama-style projections, GPT-2's Conv1D (peft's
    ``fan_in_fan_out`` transposes only the base weight; the factors keep the Linear layout),
    MLP projections, and bitsandbytes 4/8-bit base layers (the hooks never touch base weights).

    Hooks are installed at the start of each call and removed at its end, even on error, and
    no tensor outlives the call, so memory does not grow across batches. ``.grad`` of the
    parameters is never written (gradients are taken with ``torch.autograd.grad``). The object
    is also a context manager for symmetry with other stages; leaving it releases its state.

    The model must be in eval mode (dropout off). Non-finite values are returned as they are:
    the caller filters rows containing NaN/inf and reports them by example id.

    Args:
        model: a peft LoRA model (or any module with peft LoRA layers) in eval mode.
        verify: on the first call, check that the per-example gradients summed over the batch
            equal autograd's batch gradient (free: that gradient drives the backward anyway);
            a mismatch means the adapter uses its weights outside the hooked Linears.
    """

    def __init__(self, model: nn.Module, verify: bool = True, projection: ProjectionConfig | None = None,
                 observers: Sequence[Observer] = (), lora_rows: bool = True) -> None:
        self.model = model
        self.observers = list(observers)
        """Extra hooks installed for each call (e.g. LoRIF's per-layer capture, :mod:`qless.lorif.capture`)."""
        self.lora_rows = lora_rows
        """False: compute no LoRA rows (the call returns ``[B, 0]``), only drive the observers."""
        self.params = lora_parameters(model)
        owners = _lora_linears(model)
        offsets: dict[int, int] = {}
        d = 0
        for _, p in self.params:
            offsets[id(p)] = d
            d += p.numel()
        self.input_dim = d
        """d, the number of LoRA parameters."""
        self.dim = d
        """The width of the returned gradients: d, or LoGra's k when ``projection`` is given."""
        self.param_slices: dict[str, slice] = {}
        """Parameter name -> its columns in a [B, d] gradient; ``grads[:, s].view(B, *shape)``
        is that parameter's per-example gradient."""
        for name, p in self.params:
            self.param_slices[name] = slice(offsets[id(p)], offsets[id(p)] + p.numel())
        slots: dict[int, _Slot] = {}
        for _, p in self.params:
            where, _layer, linear = owners[id(p)]
            if id(linear) in slots:
                continue
            w, b = linear.weight, linear.bias
            slots[id(linear)] = _Slot(
                name=where,
                module=linear,
                weight_offset=offsets[id(w)] if w.requires_grad else -1,
                bias_offset=offsets[id(b)] if b is not None and b.requires_grad else -1,
            )
        self._slots = list(slots.values())
        self.logra: LograProjection | None = None
        """The factorised projection applied inside the hooks (``projection`` of kind logra), or None."""
        self._factors: dict[str, Factor] = {}
        if projection is not None:
            self._init_logra(projection)
        first = self.params[0][1]
        self.device = first.device
        self.dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        """Dtype of the returned gradients: float32, or float64 when the LoRA parameters are."""
        self._verify = verify
        self._buffer: torch.Tensor | None = None

    def layout(self) -> list[tuple[str, int, int, bool, int, int]]:
        """Each LoRA Linear as ``(name, out_features, in_features, has_trainable_bias, weight_offset,
        bias_offset)``, offsets in the full [B, d] layout (-1: not trainable), in hook order: what
        :mod:`qless.project.logra` needs to project full gradient rows."""
        return [(s.name, s.module.out_features, s.module.in_features, s.bias_offset >= 0, s.weight_offset, s.bias_offset)
                for s in self._slots]

    def _init_logra(self, projection: ProjectionConfig) -> None:
        if projection.kind != "logra":
            raise ConfigError(f"PerExampleGradients projects inside its hooks with kind logra only, not {projection.kind!r}; "
                              "other kinds project the returned rows (qless.project.Projector)")
        frozen = [s.name for s in self._slots if s.weight_offset < 0]
        if frozen:
            raise ModelError(f"{frozen[0]}: a LoRA factor with a frozen weight and a trainable bias cannot be projected "
                             "per layer; unfreeze the weight or use a dense or sparse projection")
        shapes = [(s.name, s.module.out_features, s.module.in_features, s.bias_offset >= 0) for s in self._slots]
        self.logra = LograProjection(projection, shapes, self.input_dim)
        self._factors = {s.name: f for s, f in zip(self._slots, self.logra.factors)}
        self.dim = self.logra.out_dim

    def __enter__(self) -> PerExampleGradients:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Drop any per-call state (hooks are already gone after every call)."""
        self._buffer = None

    def blocks(self, grads: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a [B, d] gradient into per-parameter views [B, *param.shape], without copying."""
        if self.logra is not None:
            raise ValueError("LoGra-projected gradients have no per-parameter blocks")
        bsz = grads.shape[0]
        return {name: grads[:, self.param_slices[name]].view(bsz, *p.shape) for name, p in self.params}

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example gradients and losses for one right-padded batch.

        Args:
            batch: ``input_ids``, ``attention_mask``, ``labels``, each [B, T]; labels are
                ``-100`` where no loss is taken. Every example needs at least one label token
                after position 0 (ValueError naming the example otherwise).

        Returns:
            grads: [B, d] float32 (float64 for a float64 adapter) on the LoRA parameters'
                device, columns in :func:`lora_parameters` order. Rows may contain NaN/inf if
                the model overflows; they are returned as is for the caller to filter.
            losses: [B] float32 (float64 likewise), each example's mean label-token loss.
        """
        if self.model.training:
            raise ModelError(
                "the model is in training mode, so dropout would make gradients random: call model.eval() first"
            )
        if torch.is_inference_mode_enabled():
            raise RuntimeError("per-example gradients cannot be taken under torch.inference_mode(); call outside it")
        ids, mask, labels = _check_batch(batch)
        bsz = ids.shape[0]
        in_device = self.model.get_input_embeddings().weight.device
        ids, mask, labels = ids.to(in_device), mask.to(in_device), labels.to(in_device)
        self._buffer = torch.zeros(bsz, self.dim if self.lora_rows else 0, dtype=self.dtype, device=self.device)
        handles = [s.module.register_forward_hook(functools.partial(self._forward_hook, s, bsz))
                   for s in (self._slots if self.lora_rows else [])]
        for obs in self.observers:
            handles += obs.install(bsz)
        head = _frozen_output_head(self.model)
        if head is not None:
            # Project only the N label positions to the vocabulary: [N, V] logits instead of [B, T, V].
            keep = labels[:, 1:] != IGNORE_INDEX
            handles.append(head.register_forward_pre_hook(functools.partial(_gather_label_positions, keep)))
        try:
            with torch.enable_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                losses = _mean_label_losses(logits, labels.to(logits.device))
                del logits
                total = losses.sum()
                if not total.requires_grad:
                    raise ModelError(
                        "the loss does not depend on the LoRA parameters: are the adapters active and not merged?"
                    )
                batch_grads = torch.autograd.grad(total, [p for _, p in self.params], allow_unused=True)
            grads = self._buffer
            if self._verify and self.lora_rows:
                self._check_sum(grads, batch_grads)
                self._verify = False
        finally:
            for h in handles:
                h.remove()
            self._buffer = None
        return grads, losses.detach().to(self.dtype)

    def _forward_hook(self, slot: _Slot, bsz: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        """Capture the Linear's input and hook its output's gradient (forward-hook signature)."""
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        x = inputs[0]
        if x.dim() != 3 or x.shape[0] != bsz:
            raise ModelError(
                f"{slot.name} received an input of shape {tuple(x.shape)}, not [B={bsz}, T, features]: "
                "per-example gradients need the batch dimension kept "
                "(token-routed layers such as MoE experts are not supported)"
            )
        output.register_hook(functools.partial(self._grad_hook, slot, x.detach()))

    def _grad_hook(self, slot: _Slot, x: torch.Tensor, g: torch.Tensor) -> None:
        """Write per-example weight (and bias) gradients g[b]^T @ x[b] into the buffer.

        x [B, T, in], g [B, T, out]; the weight block is [B, out, in], matching the Linear
        weight's own [out, in] layout. Accumulates, so a Linear called twice is still exact.
        """
        buf = self._buffer
        assert buf is not None, "gradient hook fired outside a PerExampleGradients call"
        bsz = buf.shape[0]
        if self.logra is not None:
            self._logra_block(slot, x, g, buf)
            return
        out_f, in_f = slot.module.out_features, slot.module.in_features
        gx = g.to(self.dtype)
        if slot.weight_offset >= 0:
            block = torch.bmm(gx.transpose(1, 2), x.to(self.dtype))  # [B, out, in]
            buf[:, slot.weight_offset : slot.weight_offset + out_f * in_f].add_(block.reshape(bsz, -1).to(buf.device))
        if slot.bias_offset >= 0:
            buf[:, slot.bias_offset : slot.bias_offset + out_f].add_(gx.sum(dim=1).to(buf.device))

    def _logra_block(self, slot: _Slot, x: torch.Tensor, g: torch.Tensor, buf: torch.Tensor) -> None:
        """Write ``sum_t (P_out g[b, t]) (P_in x[b, t])^T`` ([B, k_out, k_in]) and ``P_out sum_t g[b, t]``
        for a bias: the LoGra-projected gradient, without the [B, out, in] one."""
        assert self.logra is not None
        f = self._factors[slot.name]
        gp = self.logra.side(f, "out", g, self.dtype)  # [B, T, k_out]
        xp = self.logra.side(f, "in", x, self.dtype)  # [B, T, k_in]
        bsz, width = buf.shape[0], f.k_out * f.k_in
        block = torch.bmm(gp.transpose(1, 2), xp)
        buf[:, f.offset:f.offset + width].add_(block.reshape(bsz, -1).to(buf.device))
        if f.bias:
            buf[:, f.offset + width:f.offset + width + f.k_out].add_(gp.sum(dim=1).to(buf.device))

    def _logra_batch(self, batch_grads: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """Autograd's batch gradient projected the LoGra way, a [dim] row (the self-check's reference)."""
        assert self.logra is not None
        grads = {id(p): g for (_, p), g in zip(self.params, batch_grads)}
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for slot in self._slots:
            f = self._factors[slot.name]
            w = grads.get(id(slot.module.weight))
            if w is not None:
                wp = self.logra.side(f, "in", w.to(self.dtype), self.dtype)  # [out, k_in]
                wp = self.logra.side(f, "out", wp.T, self.dtype).T  # [k_out, k_in]
                out[f.offset:f.offset + f.k_out * f.k_in] = wp.reshape(-1).to(out.device)
            b = grads.get(id(slot.module.bias)) if f.bias else None
            if b is not None:
                start = f.offset + f.k_out * f.k_in
                out[start:start + f.k_out] = self.logra.side(f, "out", b.to(self.dtype), self.dtype).to(out.device)
        return out

    def _check_sum(self, grads: torch.Tensor, batch_grads: tuple[torch.Tensor | None, ...]) -> None:
        """Raise ModelError if a parameter's per-example gradients do not sum to autograd's."""
        if self.logra is not None:
            self._check_logra_sum(grads, batch_grads)
            return
        for (name, p), s, ref in zip(self.params, self.param_slices.values(), batch_grads):
            ours = grads[:, s]
            if not bool(torch.isfinite(ours).all()):
                continue
            ref_flat = torch.zeros_like(ours[0]) if ref is None else ref.reshape(-1).to(ours)
            if ref is not None and not bool(torch.isfinite(ref_flat).all()):
                continue
            rtol = VERIFY_RTOL.get(p.dtype, VERIFY_RTOL_LOW_PRECISION)
            err = float((ours.sum(dim=0) - ref_flat).norm())
            scale = float(ours.norm(dim=1).sum()) + float(ref_flat.norm()) + torch.finfo(self.dtype).tiny
            if err > rtol * scale:
                raise ModelError(
                    f"per-example gradients of {name} do not sum to the batch gradient "
                    f"(relative error {err / scale:.2e}): the adapter uses this weight outside its "
                    "LoRA Linear's forward, which is unsupported"
                )
        logger.debug("per-example gradients sum to the batch gradient for all %d LoRA parameters", len(self.params))


    def _check_logra_sum(self, grads: torch.Tensor, batch_grads: tuple[torch.Tensor | None, ...]) -> None:
        """The LoGra rows summed over the batch equal autograd's batch gradient projected alike
        (projection is linear), factor by factor."""
        if not bool(torch.isfinite(grads).all()) or not all(g is None or bool(torch.isfinite(g).all()) for g in batch_grads):
            return
        ref = self._logra_batch(batch_grads)
        ours = grads.sum(dim=0)
        rtol = VERIFY_RTOL.get(self.params[0][1].dtype, VERIFY_RTOL_LOW_PRECISION)
        if self.logra is not None and self.logra.dtype == torch.bfloat16 and self.dtype != torch.float64:
            rtol = max(rtol, VERIFY_RTOL_LOW_PRECISION)
        for f in self._factors.values():
            cols = slice(f.offset, f.offset + f.size)
            err = float((ours[cols] - ref[cols]).norm())
            scale = float(grads[:, cols].norm(dim=1).sum()) + float(ref[cols].norm()) + torch.finfo(self.dtype).tiny
            if err > rtol * scale:
                raise ModelError(
                    f"LoGra-projected per-example gradients of {f.name} do not sum to the projected batch gradient "
                    f"(relative error {err / scale:.2e}): the adapter uses this weight outside its LoRA Linear's forward")


def _gather_label_positions(keep: torch.Tensor, module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook on the output head: hidden [B, T, H] -> [N, H] at the positions that
    predict a label (``keep`` [B, T-1]), row-major. Other inputs are left alone."""
    h = args[0]
    if isinstance(h, torch.Tensor) and h.dim() == 3 and h.shape[:2] == (keep.shape[0], keep.shape[1] + 1):
        return (h[:, :-1][keep.to(h.device)], *args[1:])
    return None


def per_example_gradients_loop(
    model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype | None = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-example gradients: one unpadded example at a time, plain autograd.

    A copy of ``model`` is cast to ``dtype`` (float64 by default, so the reference is far more
    precise than the fast path) and each example's ``input_ids[b, :L_b]`` (L_b = its number of
    attention-mask ones) is run alone. ``dtype=None`` uses ``model`` itself, uncopied (for
    bitsandbytes-quantized bases, which cannot be cast). Slow by design; for tests.

    Returns:
        grads [B, d] and losses [B], in ``dtype`` (float32 or float64 for ``dtype=None``, as
        :class:`PerExampleGradients` returns); columns in :func:`lora_parameters` order.
    """
    ids, mask, labels = _check_batch(batch)
    ref = model if dtype is None else copy.deepcopy(model).to(dtype).eval()
    params = [p for _, p in lora_parameters(ref)]
    device = params[0].device
    rows_g, rows_l = [], []
    with torch.enable_grad():
        for b in range(ids.shape[0]):
            n = int(mask[b].sum())
            logits = ref(input_ids=ids[b : b + 1, :n].to(device), use_cache=False).logits
            loss = _mean_label_losses(logits, labels[b : b + 1, :n].to(device))[0]
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
            rows_g.append(torch.cat(flat))
            rows_l.append(loss.detach())
    if dtype is None:
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return torch.stack(rows_g).to(dtype), torch.stack(rows_l).to(dtype)


def adam_direction(
    grads: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> torch.Tensor:
    """The Adam update direction each example's gradient would produce from a checkpoint's moments.

    ``m = b1*m_i + (1-b1)*g``, ``v = b2*v_i + (1-b2)*g^2``, ``Γ = m / (sqrt(v) + eps)``, without
    bias correction (it only rescales all rows alike, and rows are normalised later), with eps
    outside the square root as in the QLESS paper.

    Args:
        grads: [B, d] (or [d]) per-example gradients.
        exp_avg, exp_avg_sq: [d] Adam moments of the checkpoint, flattened in
            :func:`lora_parameters` order; broadcast over the rows.

    Returns:
        Γ with the shape of ``grads``, float32 (float64 if any input is float64), on the
        device of ``grads``.
    """
    d = grads.shape[-1]
    if exp_avg.shape != (d,) or exp_avg_sq.shape != (d,):
        raise ValueError(
            f"Adam moments must be flat [d={d}] vectors in lora_parameters order; "
            f"got exp_avg {tuple(exp_avg.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}"
        )
    dtype = torch.float32
    if torch.float64 in (grads.dtype, exp_avg.dtype, exp_avg_sq.dtype):
        dtype = torch.float64
    g = grads.to(dtype)
    m = g.mul(1.0 - beta1).add_(exp_avg.to(g.device, dtype), alpha=beta1)
    v = g.square().mul_(1.0 - beta2).add_(exp_avg_sq.to(g.device, dtype), alpha=beta2)
    return m.div_(v.sqrt_().add_(eps))


__all__: list[str] = [
    "IGNORE_INDEX",
    "PerExampleGradients",
    "adam_direction",
    "lora_parameters",
    "per_example_gradients_loop",
]
