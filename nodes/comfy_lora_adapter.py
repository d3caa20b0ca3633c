"""Trainable LoRA adapters on a ComfyUI ``MODEL``, as weight wrappers, switchable for the DPO reference pass.

This follows ComfyUI's own training recipe (``comfy_extras/nodes_train.py``): every weight and bias of
the diffusion model gets a *weight wrapper* on a clone of the ``ModelPatcher``
(``ModelPatcher.add_weight_wrapper``). ComfyUI's ops call the wrappers on each forward, on a copy of the
weight (``comfy.ops.cast_bias_weight``), so:

* target layers get a :class:`LoraWrapper` (fp32 ``down``/``up`` parameters, kohya shapes) that adds
  ``(alpha / rank) * up @ down`` while the adapter is enabled and returns the weight untouched while
  it is disabled: the DPO reference is the very same network with the LoRA switched off, no copy made;
* every other weight and bias gets a parameter-free :class:`IdentityWrapper`. Without it backward fails
  with "Inference tensors cannot be saved for backward": ComfyUI's executor builds the checkpoint's
  parameters under ``torch.inference_mode()``, and only the wrapped path works on copies of them;
* parameters outside ComfyUI's ops, which no wrapper reaches (the RMS-norm scales of the SD3.5 and Flux
  transformers), are lent out as normal-tensor copies, bit for bit equal, only while a trainable forward
  runs (:meth:`ComfyLoraAdapter.grad_safe`), and put back right after it.

The loaded model itself is never written to: ``remove()`` takes the wrappers off the clone and off the
shared modules and restores the parameters' ``requires_grad`` flags, so other nodes see exactly the
weights they saw before.

Also here: :func:`lora_to_comfy` / :func:`lora_from_comfy`, between a :class:`LoraSet` and ComfyUI's
``LORA_MODEL`` dict (``diffusion_model.<ldm name>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``,
what core ``SaveLoRA`` writes and ``LoraModelLoader`` reads).

This module imports no ComfyUI code: it works on the objects it is given.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ._core import from_core

# the core, whichever way the pack was imported (nodes/_core.py)
ConfigError, LoraError, ModelError = from_core("errors", "ConfigError", "LoraError", "ModelError")
from_state_dict, to_state_dict = from_core("lora.keys", "from_state_dict", "to_state_dict")
LoraLayer, LoraSet = from_core("lora.lora_set", "LoraLayer", "LoraSet")
layer_rank = from_core("lora.targets", "layer_rank")

PREFIX = "diffusion_model."
INITS = ("gaussian", "kaiming", "zeros")


class _Switch:
    """The one flag that all wrappers of an adapter read on every forward."""

    def __init__(self) -> None:
        self.enabled = True


class IdentityWrapper:
    """A parameter-free weight wrapper: the weight as it is (forces ComfyUI's copy-and-wrap path)."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def move_to(self, device=None) -> int:
        return 0


class LoraWrapper(torch.nn.Module):
    """``W + (alpha / rank) * up @ down`` while its adapter is enabled, ``W`` while it is disabled.

    ``down`` is ``[r, in]`` (``[r, in, kh, kw]`` for convs) and ``up`` ``[out, r]`` (``[out, r, 1, 1]``),
    as kohya and ComfyUI store them.
    """

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, switch: _Switch):
        super().__init__()
        self.down = torch.nn.Parameter(down)
        self.up = torch.nn.Parameter(up)
        self.alpha = float(alpha)
        self.rank = int(down.shape[0])
        self._switch = switch

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self._switch.enabled:
            return weight
        delta = (self.up.flatten(1) @ self.down.flatten(1)).reshape(weight.shape)
        return weight + (delta * self.scale).to(device=weight.device, dtype=weight.dtype)

    def move_to(self, device=None) -> int:
        # ComfyUI moves weight functions with their module when it offloads a model (partial unloads
        # while another model is loaded). The trainable factors stay where the optimizer has them; the
        # update is moved to the weight's device in forward() instead.
        return sum(p.nelement() * p.element_size() for p in (self.down, self.up))


def _factor_shapes(module: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    w = module.weight
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(f"Grouped convolutions cannot take a LoRA (groups={module.groups}).")
        return (rank, w.shape[1], w.shape[2], w.shape[3]), (w.shape[0], rank, 1, 1)
    if isinstance(module, torch.nn.Linear):
        return (rank, w.shape[1]), (w.shape[0], rank)
    raise ConfigError(f"Only linear and 2-D convolution layers can take a LoRA, not {type(module).__name__}.")


class ComfyLoraAdapter:
    """Rank-``rank`` LoRA on ``target_names`` of a ComfyUI ``MODEL`` clone; the handle the trainer works with.

    ``patcher`` is the denoiser's own clone of the graph's ``ModelPatcher`` (never the graph's object),
    ``target_names`` are module names inside ``patcher.model.diffusion_model`` ("ldm" naming). Adding
    or removing wrappers changes ``patcher.patches_uuid``, so the next load re-applies them.
    """

    naming = "ldm"

    def __init__(self, patcher, target_names: Sequence[str], rank: int, alpha: float | None = None,
                 init: str = "gaussian", device: torch.device | str | None = None,
                 metadata: Mapping[str, str] | None = None, names_provider: Callable[[], object] | None = None):
        if int(rank) != rank or rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer; got {rank}.")
        if init not in INITS:
            raise ConfigError(f"Unknown LoRA init {init!r}; choose one of {', '.join(INITS)}.")
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"LoRA alpha must be a positive number; got {alpha}.")
        self.patcher = patcher
        self.metadata = dict(metadata or {})
        self._names_provider = names_provider
        self._switch = _Switch()
        self._identity = IdentityWrapper()
        self.layers: dict[str, LoraWrapper] = {}
        self._keys: list[str] = []
        self._grad_flags: list[tuple[torch.nn.Parameter, bool]] = []
        self._lent: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self._lending = 0
        dm = patcher.model.diffusion_model
        modules = dict(dm.named_modules())
        missing = [n for n in target_names if n not in modules]
        if missing:
            raise ConfigError(f"Layer {missing[0]!r} does not exist in this model's diffusion model.")
        self.unreached = self._check_coverage(dm)
        device = torch.device(device) if device is not None else patcher.load_device
        with torch.inference_mode(False):
            for name in target_names:
                module = modules[name]
                rank = layer_rank(module, self.rank)  # a layer smaller than the rank: its own, at the run's scale
                down_shape, up_shape = _factor_shapes(module, rank)
                down = torch.zeros(down_shape, dtype=torch.float32, device=device)
                if init == "gaussian":  # peft's "gaussian": A ~ N(0, 1/r), B = 0
                    torch.nn.init.normal_(down, std=1.0 / rank)
                elif init == "kaiming":  # peft's default
                    torch.nn.init.kaiming_uniform_(down.view(down.shape[0], -1), a=math.sqrt(5))
                up = torch.zeros(up_shape, dtype=torch.float32, device=device)
                self.layers[name] = LoraWrapper(down, up, self.alpha * rank / self.rank, self._switch)
        self.freeze_base()
        try:
            for name, module in dm.named_modules():
                if not hasattr(module, "weight_function"):
                    continue
                if getattr(module, "weight", None) is not None:
                    self._add(f"{PREFIX}{name}.weight", self.layers.get(name, self._identity))
                if getattr(module, "bias", None) is not None:
                    self._add(f"{PREFIX}{name}.bias", self._identity)
        except Exception:
            self.remove()
            raise

    # -- construction helpers -------------------------------------------------------------------
    @staticmethod
    def _check_coverage(dm: torch.nn.Module) -> list[tuple[torch.nn.Module, str]]:
        """The parameters outside ComfyUI's ops (lent out by :meth:`grad_safe`); an op holding other parameters
        than its weight and bias cannot be trained."""
        unreached = []
        for name, module in dm.named_modules():
            own = [n for n, _ in module.named_parameters(recurse=False)]
            if not own:
                continue
            if not hasattr(module, "weight_function"):
                unreached.extend((module, n) for n in own)
            elif any(n not in ("weight", "bias") for n in own):
                raise ModelError(
                    f"Training on this model is not supported yet: its layer {name or '<root>'!r} "
                    f"({type(module).__name__}) holds parameters that ComfyUI's weight wrappers do not reach.")
        return unreached

    @contextlib.contextmanager
    def grad_safe(self) -> Iterator[None]:
        """Within this block every parameter outside ComfyUI's ops that is an inference tensor is replaced by an
        equal normal tensor (made once, kept until :meth:`remove`), so that autograd may save it; the model's own
        parameter objects are back in place when the block ends. Nested blocks are fine."""
        if not self.unreached or self._lending:
            self._lending += 1
            try:
                yield
            finally:
                self._lending -= 1
            return
        self._lending += 1
        swapped = []
        try:
            with torch.inference_mode(False):
                for module, pname in self.unreached:
                    p = module._parameters.get(pname)
                    if p is None or not p.is_inference():
                        continue
                    hit = self._lent.get(id(p))
                    if hit is None or hit[0] is not p:
                        hit = (p, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
                        self._lent[id(p)] = hit
                    module._parameters[pname] = hit[1]
                    swapped.append((module, pname, p))
            yield
        finally:
            for module, pname, p in swapped:
                module._parameters[pname] = p
            self._lending -= 1

    def _add(self, key: str, fn) -> None:
        self.patcher.add_weight_wrapper(key, fn)
        self._keys.append(key)

    def freeze_base(self) -> None:
        """``requires_grad=False`` on the model's own parameters (as TrainLoraNode does), flags kept aside."""
        if self._grad_flags:
            return
        for p in self.patcher.model.diffusion_model.parameters():
            self._grad_flags.append((p, p.requires_grad))
            p.requires_grad_(False)

    def restore_base(self) -> None:
        """Give the model's parameters their ``requires_grad`` flags back."""
        with torch.inference_mode():  # an inference tensor's requires_grad can only be set back in there
            for p, flag in self._grad_flags:
                if p.requires_grad != flag and p.is_inference():
                    p.requires_grad_(flag)
        for p, flag in self._grad_flags:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        self._grad_flags = []

    # -- the AdapterHandle interface --------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        ps = []
        for layer in self.layers.values():
            for p in (layer.down, layer.up):
                p.requires_grad_(True)
                ps.append(p)
        return ps

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        out = {}
        for n, layer in self.layers.items():
            out[f"{n}.lora_down.weight"] = layer.down
            out[f"{n}.lora_up.weight"] = layer.up
        return out

    @property
    def enabled(self) -> bool:
        return self._switch.enabled

    def set_enabled(self, enabled: bool) -> None:
        self._switch.enabled = bool(enabled)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Within this block the network is the untouched loaded model (the DPO reference)."""
        prev = self._switch.enabled
        self._switch.enabled = False
        try:
            yield
        finally:
            self._switch.enabled = prev

    def export(self) -> LoraSet:
        """The trained factors as a :class:`LoraSet` in "ldm" naming, on the CPU in fp32."""
        if not self.layers:
            raise LoraError("This adapter has been removed; export it before remove().")
        layers = {n: LoraLayer(l.down.detach().float().cpu().clone(), l.up.detach().float().cpu().clone(), l.alpha)
                  for n, l in self.layers.items()}
        return LoraSet(layers, "ldm", dict(self.metadata))

    @torch.no_grad()
    def load(self, lora: LoraSet) -> None:
        """Copy the factors of ``lora`` into the adapters (same layers and ranks; alphas may differ)."""
        if lora.naming != "ldm":
            if self._names_provider is None:
                raise LoraError("This adapter uses ldm layer names; convert the LoRA first.")
            names = self._names_provider()
            lora = names.convert_lora(lora, "ldm")
        extra = set(lora.layers) - set(self.layers)
        if extra:
            raise LoraError(f"LoRA layer {sorted(extra)[0]!r} is not among the adapted layers of this model.")
        for n, layer in self.layers.items():
            if n not in lora.layers:
                raise LoraError(f"The LoRA lacks layer {n!r}, which this adapter trains.")
            src = lora.layers[n]
            if tuple(src.down.shape) != tuple(layer.down.shape) or tuple(src.up.shape) != tuple(layer.up.shape):
                raise LoraError(f"LoRA layer {n!r} has down {tuple(src.down.shape)} / up {tuple(src.up.shape)}; "
                                f"the adapter has {tuple(layer.down.shape)} / {tuple(layer.up.shape)} (rank {self.rank}).")
            layer.down.copy_(src.down.to(layer.down.dtype))
            layer.up.copy_((src.up * (src.alpha / layer.alpha)).to(layer.up.dtype))

    def remove(self) -> None:
        """Take every wrapper off again and restore the parameters' flags; the model is as it was."""
        self._switch.enabled = False
        ours = {id(self._identity)} | {id(l) for l in self.layers.values()}
        wrappers = self.patcher.weight_wrapper_patches
        for key in set(self._keys):
            kept = [f for f in wrappers.get(key, []) if id(f) not in ours]
            if kept:
                wrappers[key] = kept
            else:
                wrappers.pop(key, None)
        self._keys = []
        self.patcher.patches_uuid = uuid.uuid4()
        for module in self.patcher.model.modules():
            for attr in ("weight_function", "bias_function"):
                fns = module.__dict__.get(attr)  # only lists ComfyUI put on the instance at load time
                if fns:
                    module.__dict__[attr] = [f for f in fns if id(f) not in ours]
        self.restore_base()
        self._lent = {}
        self.layers = {}


def lora_to_comfy(lora: LoraSet, names=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A :class:`LoraSet` as ComfyUI's ``LORA_MODEL`` dict (comfy-native keys, CPU tensors).

    A set in diffusers naming needs ``names`` (the model's :class:`UNetNames`) to be converted.
    """
    if lora.naming != "ldm" and names is None:
        raise LoraError("This LoRA uses diffusers layer names; ComfyUI's LORA_MODEL needs the model's layer "
                        "names to convert it (pass names=denoiser.names()).")
    return to_state_dict(lora, fmt="comfy", names=names, dtype=dtype)


def lora_from_comfy(sd: Mapping[str, torch.Tensor], names=None, metadata: Mapping[str, str] | None = None,
                    source: str = "LORA_MODEL") -> LoraSet:
    """ComfyUI's ``LORA_MODEL`` dict (or any LoRA state dict the core reads) as a :class:`LoraSet`."""
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LoraError(f"{source} is not a dict of tensors.")
    return from_state_dict(sd, names=names, metadata=metadata, source=source)
