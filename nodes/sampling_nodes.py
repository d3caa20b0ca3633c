"""The safe sampler: one sampling run with the safety LoRA and one without, from the same seed and noise.

Both runs go through ComfyUI's own sampling (``comfy.sample.sample``, as core ``KSampler`` does), the
LoRA is applied with ``comfy.sd.load_lora_for_models`` on a clone (the input MODEL is untouched), and the
noise is drawn once (``comfy.sample.prepare_noise``, CPU-seeded) and used for both, so the only difference
between the two images is the LoRA.

``lora_start_step`` > 0 switches the LoRA on only after that many steps: the untouched model samples the
first steps once, and the aligned and the unaligned model each finish from there, as two core KSampler
(Advanced) nodes do it (the first returns its leftover noise, the second adds none). Both images share
those first steps, so even with an ancestral sampler (fresh noise in every call) they differ only by the
LoRA.
"""

from __future__ import annotations

from ._core import core, errors
from .common import FLOAT, INT, SEED, SOCKET, Node, COMBO, apply_lora, side_by_side
from .render_node import samplers, schedulers
from .types import LORA_MODEL


def sample_latent(model, noise, latent_image, latent: dict, seed, steps, cfg, sampler_name, scheduler, positive,
                  negative, denoise, pbar, offset: int, start_step=None, last_step=None, force_full_denoise=False):
    """ComfyUI's sampling as ``common_ksampler`` does it, with a given noise; progress shifted by ``offset``.

    ``start_step`` / ``last_step`` run only part of the schedule, as KSampler (Advanced) does; the noise of a
    part that continues another is zeros (its latent already holds the leftover noise)."""
    import comfy.sample

    def callback(step, x0, x, total):
        pbar.update_absolute(offset + step + 1)

    return comfy.sample.sample(model, noise, int(steps), float(cfg), sampler_name, scheduler, positive, negative,
                               latent_image, denoise=float(denoise), noise_mask=latent.get("noise_mask"),
                               start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise,
                               callback=callback, disable_pbar=True, seed=int(seed))


class SafeSampler(Node):
    DESCRIPTION = ("Samples the same seed twice with ComfyUI's sampler: once with the safety LoRA applied (aligned) and "
                   "once without (unaligned), from identical noise, and outputs both images and the two side by side "
                   "(aligned left, unaligned right), so the effect of the LoRA is seen directly.")
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "LATENT")
    RETURN_NAMES = ("aligned", "unaligned", "comparison", "aligned_latent")
    OUTPUT_TOOLTIPS = ("Images sampled with the safety LoRA.", "The same seed without the LoRA.",
                       "Aligned (left) beside unaligned (right), one image per batch item.",
                       "The aligned latent (to decode or refine further).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": SOCKET("MODEL", "The model (without the safety LoRA)."),
            "safety_lora": SOCKET(LORA_MODEL, "The safety LoRA (an expert or the merged LoRA)."),
            "vae": SOCKET("VAE", "The checkpoint's VAE, to decode both results."),
            "positive": SOCKET("CONDITIONING", "The prompt."),
            "negative": SOCKET("CONDITIONING", "The negative prompt."),
            "latent_image": SOCKET("LATENT", "The starting latent (e.g. Empty Latent Image)."),
            "seed": SEED("Noise seed, shared by both runs.", 0),
            "steps": INT(20, 1, 10000, "Sampling steps."),
            "cfg": FLOAT(7.5, 0.0, 100.0, "Classifier-free guidance scale.", step=0.1),
            "sampler_name": COMBO(samplers(), "ComfyUI sampler.", default="euler"),
            "scheduler": COMBO(schedulers(), "ComfyUI scheduler.", default="normal"),
            "strength": FLOAT(1.0, -10.0, 10.0, "Strength of the safety LoRA in the aligned run.", step=0.05),
            "denoise": FLOAT(1.0, 0.0, 1.0, "Denoising strength (1 = from pure noise).", step=0.01),
        }, "optional": {
            "lora_start_step": INT(0, 0, 10000, "The aligned run switches the LoRA on after this many steps (0: from the "
                                   "first). The untouched model lays out the picture in the first steps, so a later "
                                   "start changes less of what is unrelated to safety and removes less; on the built-in "
                                   "world, step 10 of 20 is the measured trade-off (README). Must be below steps."),
        }}

    def sample(self, model, safety_lora, vae, positive, negative, latent_image, seed, steps, cfg, sampler_name,
               scheduler, strength, denoise, lora_start_step=0):
        import comfy.sample
        import comfy.utils
        import torch

        if not isinstance(latent_image, dict) or "samples" not in latent_image:
            raise errors().ConfigError("latent_image: expected a LATENT (from Empty Latent Image or VAE Encode).")
        start = core("utils.numbers").check_start_step(lora_start_step or 0, int(steps), "lora_start_step")
        aligned_model = apply_lora(model, safety_lora, strength, "safety_lora")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        noise = comfy.sample.prepare_noise(latent, int(seed), latent_image.get("batch_index"))
        pbar = comfy.utils.ProgressBar(2 * int(steps) - start)
        common = dict(latent=latent_image, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                      scheduler=scheduler, positive=positive, negative=negative, denoise=denoise, pbar=pbar)
        if start:  # the first steps once, untouched; then each model from there
            head = sample_latent(model, noise.clone(), latent, offset=0, last_step=start, **common)
            tail = dict(start_step=start, force_full_denoise=True, **common)
            aligned = sample_latent(aligned_model, torch.zeros_like(noise), head, offset=start, **tail)
            unaligned = sample_latent(model, torch.zeros_like(noise), head, offset=int(steps), **tail)
        else:
            aligned = sample_latent(aligned_model, noise.clone(), latent, offset=0, **common)
            unaligned = sample_latent(model, noise.clone(), latent, offset=int(steps), **common)
        img_a = _decode(vae, aligned)
        img_u = _decode(vae, unaligned)
        out = dict(latent_image)
        out["samples"] = aligned
        return (img_a, img_u, side_by_side(img_a, img_u), out)


def _decode(vae, samples):
    images = vae.decode(samples)
    if images.ndim == 5:  # video VAEs give [B, T, H, W, C]
        images = images.reshape(-1, *images.shape[-3:])
    return images
