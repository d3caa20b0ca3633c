"""SafetyDPO core: the method as a library (prompt pairs, preference datasets, Diffusion-DPO
safety experts as LoRAs, Co-Merge, evaluation and the command line). It never imports ComfyUI."""

__version__ = "0.1.0"
