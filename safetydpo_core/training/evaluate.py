"""Preference statistics of a LoRA on a dataset with fixed draws: implicit accuracy and reward margin.

Unlike the per-step training metrics (one random noise and timestep per pair), these use the same noise
and timesteps for every evaluation, so two LoRAs (or a LoRA before and after training) are compared on
equal terms.
"""

from __future__ import annotations

import torch

from ..data.preference_dataset import PreferenceDataset
from ..denoiser.protocol import Denoiser
from ..lora.lora_set import LoraSet
from .objectives import diffusion_dpo
from .trainer import step_generator


@torch.no_grad()
def preference_stats(denoiser: Denoiser, dataset: PreferenceDataset, lora: LoraSet | None, beta: float = 5000.0,
                     draws: int = 4, seed: int = 1234, condition: str = "unsafe", targets: str = "attn",
                     timesteps: tuple[int, int] | None = None) -> dict[str, float]:
    """Mean DPO statistics of ``lora`` (None: the base model, margin 0) over ``draws`` noises per pair."""
    ranks = set(lora.ranks.values()) if lora is not None and len(lora) else {1}
    adapter = denoiser.attach_lora(max(ranks), targets=targets) if lora is not None else None
    try:
        if adapter is not None:
            adapter.load(lora)
        totals: dict[str, float] = {}
        n = 0
        lo, hi = timesteps or (0, denoiser.num_train_timesteps)
        for i, rec in enumerate(dataset.records):
            s, u = dataset.load_pair(i)
            cond = denoiser.encode_prompts([rec.safe if condition == "safe" else rec.unsafe],
                                           size=(rec.height or s.shape[-2] * 8, rec.width or s.shape[-1] * 8))
            for k in range(draws):
                g = step_generator(seed, i, k, domain=7)
                noise = torch.randn(s.shape, generator=g).unsqueeze(0)
                t = denoiser.sample_timesteps(1, g, latent_shape=tuple(s.shape), t_range=(lo, hi))
                x0 = torch.stack([s, u]).to(denoiser.device)
                n2 = torch.cat([noise, noise]).to(denoiser.device)
                t2 = torch.cat([t, t]).to(denoiser.device)
                x_t = denoiser.add_noise(x0, n2, t2)
                target = denoiser.target(x0, n2, t2)
                c2 = cond.repeat(2)
                if adapter is not None:
                    with adapter.disabled():
                        ref = denoiser.predict(x_t, t2, c2)
                    pred = denoiser.predict(x_t, t2, c2)
                else:
                    ref = pred = denoiser.predict(x_t, t2, c2)
                out = diffusion_dpo(pred, ref, target, beta)
                for key, v in out.stats.items():
                    totals[key] = totals.get(key, 0.0) + v
                totals["loss"] = totals.get("loss", 0.0) + float(out.loss)
                n += 1
        return {k: v / n for k, v in totals.items()}
    finally:
        if adapter is not None:
            adapter.remove()
