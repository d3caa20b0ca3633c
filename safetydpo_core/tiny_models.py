"""Small diffusers text-to-image models with random weights, built from configs (no downloads).

Used by the tests, the benchmarks and the built-in concept world: a CLIP tokenizer written from a small
word list, a CLIP text encoder, a ``UNet2DConditionModel`` in SD1.5 or SDXL layout (tiny or full size),
an optional tiny ``AutoencoderKL`` and a DDPM scheduler, saved as a regular diffusers pipeline folder
that the diffusers backend loads like any other model. The full SD1.5 and SDXL UNet configs are here too,
for meta-device layer lists and benchmarks. Likewise for the flow-matching transformers: small SD3.5- and
Flux.1-style pipelines (transformer, FlowMatchEuler scheduler, CLIP and T5 encoders with word tokenizers, a
16-channel VAE) and the real SD3-medium, SD3.5-medium/large and Flux.1-dev/schnell transformer configs.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Iterable

import torch

SD15_UNET_CONFIG = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SDXL_UNET_CONFIG = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}

BASE_WORDS = ("a", "an", "the", "of", "photo", "picture", "painting", "person", "cat", "dog", "red", "blue",
              "green", "on", "in", "with", "and", "street", "house", "man", "woman", "holding", "at", "night")


def write_word_tokenizer(directory: str | os.PathLike, words: Iterable[str] = BASE_WORDS, max_length: int = 77) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``) whose BPE spells each of ``words`` as one token.

    Every single character of ``string.printable`` is in the vocabulary too, so any text tokenizes.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(c for c in string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}

    def add(tok: str) -> None:
        if tok not in vocab:
            vocab[tok] = len(vocab)

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in dict.fromkeys(w.lower() for w in words):
        if len(w) < 2 or not all(c in chars for c in w):
            continue
        # Spell the word as the merges so far would (earlier words' merges rank higher and apply first),
        # then join what is left, so that the word ends as one token whatever it shares with earlier words.
        pieces = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in ranks:
                ranks[(cur, nxt)] = len(merges)
                merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}), encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "do_lower_case": True}), encoding="utf-8")
    return d


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges as CLIP's tokenizer does: repeatedly merge every occurrence of the best-ranked pair."""
    while len(pieces) > 1:
        pairs = {(a, b) for a, b in zip(pieces, pieces[1:]) if (a, b) in ranks}
        if not pairs:
            break
        first, second = min(pairs, key=ranks.__getitem__)
        out, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and pieces[i] == first and pieces[i + 1] == second:
                out.append(first + second)
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces


def tiny_unet_config(kind: str = "sd15", cross_attention_dim: int = 32, sample_size: int = 8,
                     in_channels: int = 4, block_out_channels=(32, 64)) -> dict:
    """A small UNet with the block layout of SD1.5 (``sd15``) or SDXL (``sdxl``)."""
    n = len(block_out_channels)
    base = {"sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels, "layers_per_block": 1,
            "block_out_channels": list(block_out_channels), "cross_attention_dim": cross_attention_dim,
            "attention_head_dim": 4, "norm_num_groups": 8}
    if kind == "sd15":
        base["down_block_types"] = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
        base["up_block_types"] = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
        return base
    if kind == "sdxl":
        base["down_block_types"] = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
        base["up_block_types"] = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
        base["transformer_layers_per_block"] = [1] + [2] * (n - 1)
        base.update({"use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                     "projection_class_embeddings_input_dim": 8 * 6 + 32})
        return base
    raise ValueError(f"unknown tiny UNet kind {kind!r}")


def build_tiny_pipeline(directory: str | os.PathLike, kind: str = "sd15", seed: int = 0, vae: bool = True,
                        words: Iterable[str] = BASE_WORDS, prediction_type: str = "epsilon",
                        image_size: int = 32, unet_config: dict | None = None, text_dim: int = 32,
                        info: dict | None = None) -> Path:
    """Save a random-weight diffusers pipeline folder (SD1.5- or SDXL-style) and return its path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae_factor = 4 if vae else 1
    latent_ch = 4 if vae else 3
    ucfg = unet_config or tiny_unet_config(kind, cross_attention_dim=text_dim if kind == "sd15" else 2 * text_dim,
                                           sample_size=image_size // vae_factor, in_channels=latent_ch)
    if kind == "sdxl" and unet_config is None:
        ucfg["projection_class_embeddings_input_dim"] = ucfg["addition_time_embed_dim"] * 6 + text_dim
    UNet2DConditionModel(**ucfg).save_pretrained(d / "unet", safe_serialization=True)
    write_word_tokenizer(d / "tokenizer", words)
    vocab_size = len(json.loads((d / "tokenizer" / "vocab.json").read_text()))
    tcfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77, projection_dim=text_dim,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    CLIPTextModel(tcfg).save_pretrained(d / "text_encoder", safe_serialization=True)
    index = {"_class_name": "StableDiffusionPipeline" if kind == "sd15" else "StableDiffusionXLPipeline",
             "_diffusers_version": "0.30.0", "unet": ["diffusers", "UNet2DConditionModel"],
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}
    if kind == "sdxl":
        write_word_tokenizer(d / "tokenizer_2", words)
        CLIPTextModelWithProjection(tcfg).save_pretrained(d / "text_encoder_2", safe_serialization=True)
        index.update({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
    if vae:
        AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16, 16],
                      down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                      norm_num_groups=8, sample_size=image_size).save_pretrained(d / "vae", safe_serialization=True)
        index["vae"] = ["diffusers", "AutoencoderKL"]
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type=prediction_type, clip_sample=False, steps_offset=1).save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    if info:
        (d / "safetydpo.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return d


# -- flow-matching transformers (SD3 / SD3.5, Flux.1) -------------------------------------------------------
# The real transformer configs (as in the model repositories' transformer/config.json), for meta-device layer
# lists and benchmarks.
SD3_MEDIUM_TRANSFORMER_CONFIG = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
SD35_MEDIUM_TRANSFORMER_CONFIG = {
    **SD3_MEDIUM_TRANSFORMER_CONFIG, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
SD35_LARGE_TRANSFORMER_CONFIG = {
    **SD3_MEDIUM_TRANSFORMER_CONFIG, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
    "qk_norm": "rms_norm",
}
FLUX1_DEV_TRANSFORMER_CONFIG = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
    "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
}
FLUX1_SCHNELL_TRANSFORMER_CONFIG = {**FLUX1_DEV_TRANSFORMER_CONFIG, "guidance_embeds": False}
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                         "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                         "max_image_seq_len": 4096}
# the VAE latent normalisation of the real models (scaling and shift factors)
FLOW_VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}


def tiny_transformer_config(kind: str = "sd3", text_dim: int = 32, pooled_dim: int = 32, sample_size: int = 8) -> dict:
    """A small SD3.5-style (dual attention in block 0, RMS q/k norm, context-pre-only last block) or Flux.1-dev-style
    (double + single blocks, guidance input) transformer config."""
    if kind == "sd3":
        return {"_class_name": "SD3Transformer2DModel", "sample_size": sample_size, "patch_size": 2, "in_channels": 16,
                "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": text_dim,
                "caption_projection_dim": 32, "pooled_projection_dim": pooled_dim, "out_channels": 16,
                "pos_embed_max_size": 16, "qk_norm": "rms_norm", "dual_attention_layers": [0]}
    if kind in ("flux", "flux-schnell"):
        return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
                "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": text_dim,
                "pooled_projection_dim": pooled_dim, "guidance_embeds": kind == "flux", "axes_dims_rope": [4, 6, 6]}
    raise ValueError(f"unknown tiny transformer kind {kind!r}")


def write_word_t5_tokenizer(directory: str | os.PathLike, words: Iterable[str] = BASE_WORDS, max_length: int = 512) -> Path:
    """Write a T5-style (Unigram, ``</s>`` appended, ``<pad>`` = 0) fast tokenizer that spells each word as one token."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pieces = ["\u2581" + w.lower() for w in words] + list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(p, -2.0 - 0.001 * i) for i, p in enumerate(dict.fromkeys(pieces))]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "T5TokenizerFast", "model_max_length": max_length, "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "extra_ids": 0}), encoding="utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                           "unk_token": "<unk>"}), encoding="utf-8")
    return d


def build_tiny_flow_pipeline(directory: str | os.PathLike, kind: str = "sd3", seed: int = 0,
                             words: Iterable[str] = BASE_WORDS, image_size: int = 32, t5: bool = True,
                             transformer_config: dict | None = None, info: dict | None = None) -> Path:
    """Save a random-weight diffusers SD3-style (``sd3``) or Flux.1-style (``flux``, ``flux-schnell``) pipeline
    folder: transformer, FlowMatchEuler scheduler, CLIP (and T5) text encoders with their tokenizers, a 16-channel
    VAE. diffusers' ``StableDiffusion3Pipeline`` / ``FluxPipeline`` load it as they load the real models."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from .lora.transformer_names import build_transformer

    family = "sd3" if kind == "sd3" else "flux"
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vae_factor = 4
    text_dim, clip_dim = 32, 16
    pooled = 2 * clip_dim if family == "sd3" else clip_dim
    tcfg = transformer_config or tiny_transformer_config(kind, text_dim=text_dim, pooled_dim=pooled,
                                                         sample_size=image_size // vae_factor)
    build_transformer(tcfg).save_pretrained(d / "transformer", safe_serialization=True)
    index = {"_class_name": "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline",
             "_diffusers_version": "0.30.0", "transformer": ["diffusers", tcfg["_class_name"]],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}

    def clip(sub: str, tok: str, cls) -> None:
        write_word_tokenizer(d / tok, words)
        vocab_size = len(json.loads((d / tok / "vocab.json").read_text()))
        cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=clip_dim, intermediate_size=2 * clip_dim,
                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                             projection_dim=clip_dim, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                             pad_token_id=vocab_size - 1)
        cls(cfg).save_pretrained(d / sub, safe_serialization=True)
        index[sub] = ["transformers", cls.__name__]
        index[tok] = ["transformers", "CLIPTokenizer"]

    def t5_encoder(sub: str, tok: str) -> None:
        write_word_t5_tokenizer(d / tok, words)
        vocab_size = len(json.loads((d / tok / "tokenizer.json").read_text())["model"]["vocab"])
        cfg = T5Config(vocab_size=vocab_size, d_model=text_dim, d_kv=16, d_ff=2 * text_dim, num_layers=2, num_heads=2,
                       relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        T5EncoderModel(cfg).save_pretrained(d / sub, safe_serialization=True)
        index[sub] = ["transformers", "T5EncoderModel"]
        index[tok] = ["transformers", "T5TokenizerFast"]

    if family == "sd3":
        clip("text_encoder", "tokenizer", CLIPTextModelWithProjection)
        clip("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)
        if t5:
            t5_encoder("text_encoder_3", "tokenizer_3")
        else:
            index.update({"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
        sched = dict(SD3_SCHEDULER_CONFIG)
    else:
        clip("text_encoder", "tokenizer", CLIPTextModel)
        t5_encoder("text_encoder_2", "tokenizer_2")
        sched = dict(FLUX_SCHEDULER_CONFIG)
    scale, shift = FLOW_VAE_FACTORS[family]
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[8, 16, 16],
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  norm_num_groups=8, sample_size=image_size, scaling_factor=scale, shift_factor=shift,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(d / "vae", safe_serialization=True)
    index["vae"] = ["diffusers", "AutoencoderKL"]
    FlowMatchEulerDiscreteScheduler(**{k: v for k, v in sched.items() if not k.startswith("_")}).save_pretrained(d / "scheduler")
    (d / "model_index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    meta = {"sample_size": image_size, "max_sequence_length": 32, **(info or {})}
    (d / "safetydpo.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return d
