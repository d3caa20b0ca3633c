"""The pack's ComfyUI nodes (V1 style: class attributes, ComfyUI imported inside functions only).

``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` are built here from the node modules:

* :mod:`.pairs_nodes`: built-in pairs, LLM pairs, load pairs, save pairs;
* :mod:`.render_node`: render pairs into a preference dataset, load a dataset;
* :mod:`.train_node`: train an expert with Diffusion-DPO (or the ESD baseline) on the loaded MODEL;
* :mod:`.erase_node`: erase concepts with UCE (closed form), as a LORA_MODEL;
* :mod:`.lora_nodes`: load / save / apply a LoRA, expert list;
* :mod:`.merge_node`: Co-Merge;
* :mod:`.sampling_nodes`: the safe sampler (aligned beside unaligned, same seed);
* :mod:`.plot_node`: the loss plot;
* :mod:`.eval_node`: IP evaluation;
* :mod:`.attack_node`: the red-team attack (adversarial prompts and CONDITIONING against the MODEL).

Support modules: :mod:`.types` (socket type names), :mod:`.paths` (safe names, ComfyUI folders),
:mod:`.common`, :mod:`._core`; the ComfyUI denoiser backend is :mod:`.comfy_denoiser` /
:mod:`.comfy_lora_adapter` / :mod:`.comfy_prompt_embedder`.
"""

from .attack_node import RedTeamAttack
from .erase_node import EraseConceptsUCE
from .eval_node import Evaluate
from .lora_nodes import ApplySafetyLoRA, ExpertList, LoadLoRA, SaveLoRA
from .merge_node import CoMerge
from .pairs_nodes import BuiltinPairs, LLMPairs, LoadPairs, SavePairs
from .plot_node import LossPlot
from .render_node import LoadDataset, RenderPairs
from .sampling_nodes import SafeSampler
from .train_node import TrainExpert

_NODES = (
    ("SafetyDPO_BuiltinPairs", BuiltinPairs, "Prompt Pairs (built-in)"),
    ("SafetyDPO_LLMPairs", LLMPairs, "Prompt Pairs (LLM)"),
    ("SafetyDPO_LoadPairs", LoadPairs, "Load Prompt Pairs"),
    ("SafetyDPO_SavePairs", SavePairs, "Save Prompt Pairs"),
    ("SafetyDPO_RenderPairs", RenderPairs, "Render Pairs (same seed)"),
    ("SafetyDPO_LoadDataset", LoadDataset, "Load Preference Dataset"),
    ("SafetyDPO_TrainExpert", TrainExpert, "Train Safety Expert (DPO)"),
    ("SafetyDPO_EraseConceptsUCE", EraseConceptsUCE, "Erase Concepts (UCE)"),
    ("SafetyDPO_LoadLoRA", LoadLoRA, "Load LoRA (as LORA_MODEL)"),
    ("SafetyDPO_SaveLoRA", SaveLoRA, "Save LoRA"),
    ("SafetyDPO_ApplySafetyLoRA", ApplySafetyLoRA, "Apply Safety LoRA"),
    ("SafetyDPO_ExpertList", ExpertList, "Expert List"),
    ("SafetyDPO_CoMerge", CoMerge, "Co-Merge Experts"),
    ("SafetyDPO_SafeSampler", SafeSampler, "Safe Sampler (aligned vs unaligned)"),
    ("SafetyDPO_LossPlot", LossPlot, "Loss Plot"),
    ("SafetyDPO_Evaluate", Evaluate, "Evaluate Safety (IP)"),
    ("SafetyDPO_RedTeamAttack", RedTeamAttack, "Red-Team Attack"),
)

NODE_CLASS_MAPPINGS = {key: cls for key, cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {key: f"SafetyDPO: {title}" for key, _, title in _NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
