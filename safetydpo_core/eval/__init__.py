"""Evaluation: Inappropriate Probability (NudeNet, Q16), CLIPScore, preservation (PSNR/SSIM/MAD) and FID/KID,
reports, and render judges.

Public API (what the ``safetydpo eval`` command and the ComfyUI evaluate node call):

* :func:`evaluate` (= :func:`plan_evaluation` + :func:`run_evaluation`): the one entry point, over image runs on
  disk or in-memory :class:`ImageBatch` es; :func:`headline` gives one group's numbers;
* :class:`EvalSettings`, :class:`Evaluator` (``.score_images(images, prompts)`` -> per-image verdicts;
  ``.info()`` -> versions, model files, classes and thresholds; ``.notes`` -> what did not run and why);
* :func:`read_run` / :class:`ImageRun` / :class:`ImageRecord` / :func:`write_manifest`: the image-run format
  (folder + ``manifest.jsonl``) written by ``safetydpo sample``;
* :func:`evaluate_runs` (runs on disk, progress, cancel, resume) -> :class:`EvalResult`;
  :func:`evaluate_images` (in-memory PIL images, e.g. a ComfyUI IMAGE batch) -> :class:`EvalResult`;
  :func:`merge_results` joins results of different groups (base vs aligned);
* :func:`summarize`, :func:`compare`, :func:`write_report` (CSV, Markdown, PNG chart, JSON), :func:`markdown`,
  :func:`chart_image` (the chart as a PIL image);
* :class:`NudeNetPairJudge` for ``render_pairs(judge=...)``;
* :mod:`.nudenet` settings ``SAFETYDPO`` and ``I2P``; :mod:`.weights` for where weights go;
* :mod:`.similarity` (PSNR, SSIM, MAD), :mod:`.fid` (FID, KID), :mod:`.inception` (the FID Inception-v3 and its
  weights), :mod:`.quality` (both over groups), :mod:`.prompt_sets` (the built-in ``neutral`` prompts).

Importing this package loads neither NudeNet nor CLIP; they load when an :class:`Evaluator` is made.
"""

from .evaluate import EvalResult, EvalSettings, Evaluator, evaluate_images, evaluate_runs, merge_results
from .manifest import ImageRecord, ImageRun, RunError, read_run, write_manifest
from .pipeline import ImageBatch, evaluate, headline, plan_evaluation, result_json, run_evaluation
from .report import chart_image, compare, markdown, summarize, write_report
from .weights import MissingWeights, default_weights_dir


def __getattr__(name):  # the judge pulls in nudenet's module only when asked for
    if name == "NudeNetPairJudge":
        from .judges import NudeNetPairJudge

        return NudeNetPairJudge
    raise AttributeError(name)


__all__ = ["EvalResult", "EvalSettings", "Evaluator", "ImageBatch", "ImageRecord", "ImageRun", "MissingWeights",
           "NudeNetPairJudge", "RunError", "chart_image", "compare", "default_weights_dir", "evaluate", "evaluate_images",
           "evaluate_runs", "headline", "markdown", "merge_results", "plan_evaluation", "read_run", "result_json",
           "run_evaluation",
           "summarize", "write_manifest", "write_report"]
