"""The memory estimate: the recipe's optimizer step run on fake tensors, counting every tensor it creates.

A fake tensor (torch's FakeTensorMode, the machinery behind torch.compile and torch.export) has a shape, dtype and
device but no data, so a step of any model costs seconds and no memory. Every tensor an operation returns is
counted at its storage's size from its birth until its storage is freed; the peak of the sum over a step that holds
the optimizer's state throughout (as every step but the first does) is the step's memory on top of the weights.
This is what torch's allocator is asked for (CUDA's `max_memory_allocated` reports the same quantity), without the
kernels' internal scratch space and the allocator's rounding, which the measurement (`--measure`) includes.

Why a simulation rather than a closed formula: what autograd keeps for backward depends on the method (LoRA keeps
its dropout's output, a frozen linear keeps nothing for its own weight), the attention kernel (dropout in training
rules out the fused one on CPU), the loss (an LM's logits and their log-softmax, or the chunks of ftune's fused
linear cross-entropy) and the optimizer; counting the step's own tensors gets all of them right for every method
and architecture, with and without gradient checkpointing, where a formula would have to know each.

The batch stays real (token ids, masks and labels: small), and so does every result computed from real tensors
alone: a loss selects the positions that carry loss by the labels, and the number selected decides shapes; the
attention mask decides whether a mask tensor is built at all. The model's buffers stay real too (small, and some
are read on the host: a sparse mask's positions), and so do a quantised base's weights and their quantisation state,
shared with the model (frozen, packed, and read by bitsandbytes' kernels, whose dequantised copies are then real and
counted, as in training; the first forward moves an 8-bit layer's constants as the model's own first forward would).
Everything else is fake, so no trainable weight, activation or gradient takes memory. What closes over the model
reads the copy: the model's hooks (AdapterDrop's choice of the blocks whose adapters run) and the objective's
functions (DPO's reference, the policy with its method switched off; a distillation teacher, copied fake as well).

Each counted byte is put in one kind, by when it was born: in the forward (`activations`: what autograd saves for
backward, and the forward's temporaries), in backward (`temporaries`: activation gradients and, under gradient
checkpointing, the block being recomputed; a parameter's gradient moves to `gradients` once accumulated), or in the
optimizer step (`optimizer scratch`; what survives the step is `optimizer state`).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ftune import models
from ftune.estimate import step
from ftune.models import quantize

KINDS = ("gradients", "optimizer state", "activations", "temporaries", "optimizer scratch")


class NotSimulated(Exception):
    """The step needs data the fake tensors do not have (an operation whose result's shape or value depends on the
    values of a weight or an activation): no estimate. Not an FtuneError: the recipe itself is fine."""


@dataclass(frozen=True)
class Footprint:
    """Bytes a training step needs on top of the weights, from the simulation."""

    at_peak: dict[str, int]
    """Live at the step's peak, by kind (KINDS); they sum to `peak`."""
    phase: str
    """Where the peak falls: "forward", "backward" or "optimizer step"."""
    saved_for_backward: int
    """Activations alive when backward starts (the largest over the micro-batches)."""
    optimizer_state: int
    """The optimizer's state after the step."""
    flops: int
    """Floating-point operations of one optimizer step (matrix products and attention, by torch's flop counter's
    formulas; backward and recomputation included)."""

    @property
    def peak(self) -> int:
        return sum(self.at_peak.values())


def simulate(model: nn.Module, batch: dict[str, torch.Tensor], setup: step.StepSetup, checkpointing: bool) -> Footprint:
    """Run an optimizer step of `setup` on `batch` with a fake copy of `model` (which stays untouched), its optimizer
    state already made, with gradient checkpointing on or off, and count what it allocates."""
    from torch._subclasses import fake_tensor

    fake_mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    kept = [*model.buffers()]
    for m in filter(quantize.is_quantized_linear, model.modules()):
        kept += [m.weight, *([m.state] if hasattr(m, "state") else [])]  # LLM.int8()'s state moves into the weight
    memo = {id(k): k for k in kept}
    with _FakeCopy(fake_mode, setup.device):
        fake = copy.deepcopy(model, memo)
        for module in fake.modules():  # a hook that closes over the model's modules acts on the copy's
            for hooks in (
                module._forward_pre_hooks,
                module._forward_hooks,
                module._backward_pre_hooks,
                module._backward_hooks,
            ):  # (deepcopy already rebinds a bound method to the copy)
                hooks.update(
                    {key: _rebound(hook, memo) for key, hook in hooks.items() if isinstance(hook, types.FunctionType)}
                )
        # the objective's and the method's functions close over the model too (DPO's reference is the policy with
        # its method switched off) and over the frozen models they read (a teacher): they read the copies
        setup = dataclasses.replace(
            setup, objective=_rebound(setup.objective, memo), loss_term=_rebound(setup.loss_term, memo)
        )
    models.set_gradient_checkpointing(fake, checkpointing)
    fake.train()  # dropout draws masks, and decides the attention kernel
    counts = _Counts([t for t in memo.values() if isinstance(t, torch.Tensor)])  # every weight, teacher's too
    batches = [{k: v.to(setup.device) for k, v in batch.items()}] * setup.grad_accum
    optimizer = setup.optimizer(fake)  # outside the fake mode: bitsandbytes computes its quantisation maps here
    optimizer.register_step_pre_hook(counts.optimizer_starts)
    optimizer.register_step_post_hook(counts.optimizer_ends)
    trained = [p for p in fake.parameters() if p.requires_grad]
    for p in trained:
        p.register_post_accumulate_grad_hook(lambda p: counts.relabel(p.grad.untyped_storage(), "gradients"))
    try:
        # the counting sees each operation first, the fake mode last; a random draw that decides what runs (robust
        # AdapterDrop's k) is taken from a fork of the generator, so the measured step that follows draws the same
        with torch.random.fork_rng(devices=[]), fake_mode, _RealWhereKnown(), counts:
            _create_state(optimizer, trained)
            counts.flops = 0
            step.train_step(fake, batches, setup, optimizer)
    except (
        fake_tensor.DataDependentOutputException,
        fake_tensor.DynamicOutputShapeException,
        fake_tensor.UnsupportedOperatorException,
    ) as e:
        raise NotSimulated(f"{e.func} needs values that fake tensors do not have") from e
    return Footprint(
        {k: counts.at_peak.get(k, 0) for k in KINDS},
        counts.phase_at_peak,
        counts.saved_for_backward,
        counts.live["optimizer state"],
        counts.flops,
    )


def _rebound(value, memo: dict):
    """`value` deep-copied with `memo` (the model's copy), where a function's closure is copied along: `copy.deepcopy`
    keeps a function as it is, so a closure over the model (a hook that switches blocks' adapters on and off, an
    objective's reference model) would act on the original and the step on the copy would not see it. A frozen
    dataclass of functions (the objective's `Bound`) is copied field by field; a closure cell that cannot be copied
    is kept."""
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, types.FunctionType) and value.__closure__:
        cells = tuple(types.CellType() for _ in value.__closure__)
        copied = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, cells)
        copied.__kwdefaults__, copied.__dict__ = value.__kwdefaults__, dict(value.__dict__)
        memo[id(value)] = copied  # before the cells: a closure may hold itself
        memo.setdefault(id(memo), []).append(value)  # keeps value alive, so its id is not reused while memo lives
        for cell, original in zip(cells, value.__closure__, strict=True):
            try:
                cell.cell_contents = _rebound(original.cell_contents, memo)
            except ValueError:  # an empty cell (a name bound later in the enclosing function)
                pass
            except TypeError:  # cannot be copied (a lock, a generator): read as it is
                cell.cell_contents = original.cell_contents
        return copied
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _rebound(getattr(value, f.name), memo) for f in dataclasses.fields(value) if f.init}
        memo[id(value)] = copied = dataclasses.replace(value, **fields)
        return copied
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType | type) or value is None:
        return value
    return copy.deepcopy(value, memo)


def _create_state(optimizer, params: list[nn.Parameter]) -> None:
    """An optimizer step on zero gradients, so the optimizer creates its state (lazily made on the first step) before
    the counted step: the first training step holds no state during its forward and backward and so needs no more
    than the second."""
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class _Counts(TorchDispatchMode):
    """Counts every storage an operation creates, by kind, from its birth until it is freed, and the operations'
    floating-point work (torch.utils.flop_counter's formulas; its FlopCounterMode is not used because its module
    hooks keep recomputed activations alive under gradient checkpointing)."""

    def __init__(self, held: list[torch.Tensor]) -> None:
        super().__init__()
        self.held = {id(storage): storage for storage in (t.untyped_storage() for t in held)}
        """Storages that exist before the step (the weights): an operation writing into one creates nothing."""
        self.live: Counter[str] = Counter()
        self.kind_of: dict[int, str] = {}
        self.size_of: dict[int, int] = {}
        self.storage_of: dict[int, weakref.ref] = {}
        self.in_optimizer = False
        self.peak, self.at_peak, self.phase_at_peak = -1, {}, ""
        self.saved_for_backward = 0
        self.flops = 0
        self._was_in_backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.flops += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        in_backward = torch._C._current_autograd_node() is not None
        if in_backward and not self._was_in_backward:  # backward starts: what the forward left is what it saved
            self.saved_for_backward = max(self.saved_for_backward, self.live["activations"])
        self._was_in_backward = in_backward
        kind = "optimizer scratch" if self.in_optimizer else "temporaries" if in_backward else "activations"
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._born(tensor.untyped_storage(), kind)
        total = sum(self.live.values())
        if total >= self.peak:  # the later of equal peaks: the step's, not the one that made the optimizer state
            self.peak, self.at_peak = total, dict(self.live)
            self.phase_at_peak = "optimizer step" if self.in_optimizer else "backward" if in_backward else "forward"
        return out

    def _born(self, storage, kind: str) -> None:
        key = id(storage)
        if key in self.kind_of or key in self.held:  # a view, or an operation writing in place
            return
        self.kind_of[key], self.size_of[key] = kind, storage.nbytes()
        self.live[kind] += self.size_of[key]
        self.storage_of[key] = weakref.ref(storage, lambda _, key=key: self._freed(key))

    def _freed(self, key: int) -> None:
        self.live[self.kind_of.pop(key)] -= self.size_of.pop(key)
        del self.storage_of[key]

    def relabel(self, storage, kind: str) -> None:
        key = id(storage)
        if key in self.kind_of and self.kind_of[key] != kind:
            self.live[self.kind_of[key]] -= self.size_of[key]
            self.live[kind] += self.size_of[key]
            self.kind_of[key] = kind

    def optimizer_starts(self, *_) -> None:
        self.in_optimizer = True

    def optimizer_ends(self, *_) -> None:
        self.in_optimizer = False
        for key, kind in list(self.kind_of.items()):
            if kind == "optimizer scratch":  # what outlives the step is state
                self.relabel(self.storage_of[key](), "optimizer state")


class _RealWhereKnown(TorchDispatchMode):
    """Below the counting, above the fake mode: an operation on real tensors only (the batch, a buffer) is computed
    on their data, and so is an integer or boolean tensor made from nothing (positions, task ids, masks: what code
    reads on the host); a real boolean index into a fake tensor becomes the integer positions it selects, so the
    result's shape is known (`hidden[kept]` keeps as many rows as the labels say)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if tensors and not any(isinstance(t, FakeTensor) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if not tensors:
            made = func(*args, **kwargs)
            if not isinstance(made, torch.Tensor) or made.is_floating_point() or made.is_complex():
                return made
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is torch.ops.aten.index.Tensor:
            positions = []
            for index in args[1]:
                if isinstance(index, torch.Tensor) and index.dtype == torch.bool and not isinstance(index, FakeTensor):
                    with unset_fake_temporarily():
                        positions.extend(index.nonzero(as_tuple=True))
                else:
                    positions.append(index)
            args = (args[0], positions, *args[2:])
        return func(*args, **kwargs)


class _FakeCopy(TorchFunctionMode):
    """`copy.deepcopy` of a module under this mode copies each tensor as a fake tensor on `device` (torch's
    FakeCopyMode, which keeps the device: a model is built on the CPU and trained where the loop puts it)."""

    def __init__(self, fake_mode, device: torch.device) -> None:
        super().__init__()
        self.fake_mode, self.device = fake_mode, device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._C.TensorBase.clone:  # nn.Parameter.__deepcopy__ clones its data
            return func(self._fake(args[0]), **kwargs)
        if func is torch.Tensor.__deepcopy__:
            tensor, memo = args
            if id(tensor) not in memo:
                memo[id(tensor)] = self._fake(tensor)
            return memo[id(tensor)]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def _fake(self, tensor: torch.Tensor) -> torch.Tensor:
        fake = self.fake_mode.from_tensor(tensor, static_shapes=True)
        return fake if fake.device == self.device else fake.to(self.device)
