"""Red-teaming: adversarial attacks against an aligned model, and their attack success rate (ASR).

One attack a module, each working through the Denoiser protocol only (the token-level access some need is
the protocol's ``prompt_embedder()``):

* :mod:`.wording` (black-box): synonyms and paraphrases, character noise, dilution;
* :mod:`.ring_a_bell` (Tsai et al., ICLR 2024; black-box with respect to the aligned model): a concept
  vector from the text encoder added to a prompt's conditioning (soft), and a genetic search for tokens
  whose encoding matches it (hard, a text prompt);
* :mod:`.unlearndiff` (Zhang et al., 2023; white-box): prepended token embeddings, projected to the
  vocabulary, optimised so that the aligned model denoises the base model's unsafe picture;
* :mod:`.inversion` (concept inversion, Pham et al., 2023; white-box): textual inversion of a new token on
  the base model's unsafe pictures, against the aligned model.

Shared parts: :mod:`.base` (prompts, budget, candidates, records, ASR), :mod:`.oracles` (the world judge;
NudeNet and Q16 for real models), :mod:`.runner` (chunks, resume, output folder: the one orchestration of
the ``safetydpo attack`` command, the ComfyUI node and the benchmark), :mod:`.report`. The wording table for
real models is the data file ``synonyms.json``.
"""

from .base import AttackPrompt, Budget, Candidate, PromptResult, Sampling, asr_summary, read_attack_prompts
from .oracles import ORACLES, DetectorOracle, WorldOracle, make_oracle
from .runner import ATTACK_NAMES, AttackRun, AttackSettings, get_attack, make_targets, run_attack

__all__ = ["ATTACK_NAMES", "ORACLES", "AttackPrompt", "AttackRun", "AttackSettings", "Budget", "Candidate",
           "DetectorOracle", "PromptResult", "Sampling", "WorldOracle", "asr_summary", "get_attack", "make_oracle",
           "make_targets", "read_attack_prompts", "run_attack"]
