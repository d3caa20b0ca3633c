"""LoRA: the framework-neutral set (:mod:`.lora_set`), UNet layer naming (:mod:`.unet_names`), key
formats (:mod:`.keys`), file I/O (:mod:`.io`), target-layer selection (:mod:`.targets`), peft adapters on a
diffusers UNet (:mod:`.peft_adapter`) and applying LoRAs at a strength for inference (:mod:`.apply`)."""

from .io import load_lora, save_lora
from .lora_set import LoraLayer, LoraSet
from .unet_names import UNetNames

__all__ = ["LoraLayer", "LoraSet", "UNetNames", "load_lora", "save_lora"]
