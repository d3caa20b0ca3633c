"""The Denoiser protocols (safetydpo_core/denoiser/protocol.py) are real: each backend, built from a tiny model,
has every member :class:`Denoiser` and :class:`RenderingDenoiser` declare (data attributes and properties of
the declared kind, methods that take the declared parameters, none of them the protocol's own stub), and
the protocols declare what the core calls.

Backends: the diffusers UNet backend (SD1.5, SDXL and the shipped world model), the diffusers flow backend
(SD3, Flux.1-dev, Flux.1-schnell), the ComfyUI backend (SD1.5, SDXL, SD3, Flux.1; only with ``COMFYUI_PATH``),
and the tests' toy denoiser (a :class:`Denoiser` that does not render).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from comfyui_support import backend_module, requires_comfyui, tiny_flux, tiny_sd3, tiny_sd15, tiny_sdxl
from safetydpo_core.denoiser.protocol import SCHEDULES, AdapterHandle, Denoiser, PromptEmbedder, RenderingDenoiser

# what the core calls beyond the forward process (issue 14: these were called without being declared)
CORE_USES = {"latent_channels", "vae_scale_factor", "sample_size", "default_size", "latent_shape", "dtype", "names",
             "unit_marginal", "sample_timesteps", "fingerprint", "weight_shapes", "set_gradient_checkpointing"}
RENDERING = {"sample", "encode_images", "decode_latents", "default_cfg"}


def declared(proto: type) -> dict[str, str]:
    """Every member ``proto`` declares, its bases' included: ``{name: "data" | "property" | "method"}``."""
    out: dict[str, str] = {}
    for klass in reversed(proto.__mro__):
        if not getattr(klass, "_is_protocol", False) or klass.__module__ == "typing":
            continue
        out.update({name: "data" for name in klass.__dict__.get("__annotations__", {})})
        for name, value in vars(klass).items():
            if name.startswith("_"):
                continue
            if isinstance(value, property):
                out[name] = "property"
            elif inspect.isfunction(value):
                out[name] = "method"
    return out


def problems(obj, proto: type) -> list[str]:
    """What ``obj`` lacks of ``proto``: absent members, methods that are not callable or do not take the declared
    parameters by name, members inherited from the protocol's own stubs."""
    out = []
    for name, kind in declared(proto).items():
        if not hasattr(obj, name):
            out.append(f"{name}: absent")
            continue
        stub = inspect.getattr_static(proto, name, None)  # None for a data attribute
        if stub is not None and inspect.getattr_static(type(obj), name, None) is stub:
            out.append(f"{name}: the protocol's stub")
        if kind != "method":
            continue
        fn = getattr(obj, name)
        if not callable(fn):
            out.append(f"{name}: not callable")
            continue
        have = inspect.signature(fn).parameters
        takes_any = any(p.kind == p.VAR_KEYWORD for p in have.values())
        want = [p for p in list(inspect.signature(stub).parameters)[1:]]
        lacking = [p for p in want if p not in have and not takes_any]
        if lacking:
            out.append(f"{name}: does not take {', '.join(lacking)}")
    return out


def check_values(d) -> None:
    """The data members hold what the protocol says they hold."""
    assert d.naming in ("diffusers", "ldm")
    assert d.schedule in SCHEDULES
    assert d.prediction_type in (("flow",) if d.schedule == "flow" else ("epsilon", "v_prediction"))
    assert isinstance(d.num_train_timesteps, int) and d.num_train_timesteps > 0
    assert isinstance(d.base_model_version, str) and d.base_model_version
    assert isinstance(d.device, torch.device)
    assert isinstance(d.guidance_input, bool)
    assert (d.guidance is None) != d.guidance_input and (d.guidance is None or isinstance(d.guidance, float))
    assert isinstance(d.module, torch.nn.Module) and isinstance(d.dtype, torch.dtype)
    for name in ("latent_channels", "vae_scale_factor", "sample_size"):
        assert isinstance(getattr(d, name), int) and getattr(d, name) > 0, name
    h, w = d.default_size
    assert isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
    assert d.latent_shape(h, w)[0] == d.latent_channels
    if isinstance(d, RenderingDenoiser):
        assert isinstance(d.default_cfg, float) and d.default_cfg > 0


def test_the_protocols_declare_what_the_core_uses():
    core, rendering = declared(Denoiser), declared(RenderingDenoiser)
    assert CORE_USES <= set(core), sorted(CORE_USES - set(core))
    assert RENDERING <= set(rendering) and not RENDERING & set(core)
    assert set(core) <= set(rendering)
    assert {"latent_channels", "vae_scale_factor", "sample_size", "default_size", "dtype"} <= {
        n for n, k in core.items() if k == "property"}
    assert declared(AdapterHandle) and declared(PromptEmbedder)  # the helper reads the other protocols too


def test_a_missing_member_is_found():
    """The check itself: an object without ``unit_marginal``, or with one that takes other parameters, fails."""
    from test_merge_calibration import ToyDenoiser

    class Lacking(ToyDenoiser):
        unit_marginal = None

    class OtherArgs(ToyDenoiser):
        def sample_timesteps(self, n, generator):  # no latent_shape / t_range
            return super().sample_timesteps(n, generator)

    assert not isinstance(Lacking(), Denoiser)
    assert problems(Lacking(), Denoiser) == ["unit_marginal: not callable"]
    assert problems(OtherArgs(), Denoiser) == ["sample_timesteps: does not take latent_shape, t_range"]


def test_the_toy_denoiser_is_a_denoiser_that_does_not_render():
    from test_merge_calibration import ToyDenoiser

    toy = ToyDenoiser()
    assert isinstance(toy, Denoiser) and problems(toy, Denoiser) == []
    assert not isinstance(toy, RenderingDenoiser)
    check_values(toy)


def _diffusers(request, kind):
    from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
    from safetydpo_core.tiny_models import build_tiny_flow_pipeline

    if kind == "world":
        from safetydpo_core.world.model import load_world_model

        return load_world_model()
    if kind in ("sd15", "sdxl"):
        return DiffusersDenoiser.from_pretrained(request.getfixturevalue(f"tiny_{kind}"))
    folder = request.getfixturevalue("tmp_path") / kind
    return DiffusersDenoiser.from_pretrained(build_tiny_flow_pipeline(folder, kind=kind, seed=0))


@pytest.mark.parametrize("kind", ["sd15", "sdxl", "world", "sd3", "flux", "flux-schnell"])
def test_every_diffusers_backend_has_every_member(request, kind):
    d = _diffusers(request, kind)
    assert type(d).__name__ == ("DiffusersFlowDenoiser" if kind.startswith(("sd3", "flux")) else "DiffusersDenoiser")
    assert isinstance(d, Denoiser) and isinstance(d, RenderingDenoiser)
    assert problems(d, RenderingDenoiser) == []
    check_values(d)
    assert d.default_size == (d.sample_size, d.sample_size)
    noise = torch.randn(2, *d.latent_shape(*d.default_size), generator=torch.Generator().manual_seed(0))
    t = d.sample_timesteps(2, torch.Generator().manual_seed(1), latent_shape=noise.shape[1:])
    if d.schedule == "discrete":  # variance preserving: the marginal of unit-variance latents is the noise
        assert torch.equal(d.unit_marginal(noise, t), noise)


@requires_comfyui
@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux"])
def test_the_comfyui_backend_has_every_member(kind):
    build = {"sd15": tiny_sd15, "sdxl": tiny_sdxl, "sd3": tiny_sd3, "flux": tiny_flux}[kind]
    mp, clip, vae = build(seed=21)
    cd = backend_module("comfy_denoiser")
    with torch.inference_mode():  # as a node builds it
        d = cd.ComfyDenoiser(mp, clip, vae)
    assert isinstance(d, Denoiser) and isinstance(d, RenderingDenoiser)
    assert problems(d, RenderingDenoiser) == []
    check_values(d)
    assert d.default_size == ((512, 512) if kind == "sd15" else (1024, 1024))
