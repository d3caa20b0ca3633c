"""The Inception-v3 network of FID, its weights from a local file, and its pool3 features (2048-d per image).

FID and KID are computed on the features of the "FID Inception": the TensorFlow graph ``inception-2015-12-05``
that the original FID code (TTUR) used, as ported to PyTorch by pytorch-fid with the weights file
``pt_inception-2015-12-05-6726825d.pth``. :class:`FIDInceptionV3` rebuilds that network without torchvision:
the architecture is adapted from pytorch-fid's ``src/pytorch_fid/inception.py`` (Copyright Maximilian
Seitzer, Apache License 2.0; ``FIDInceptionA/C/E_1/E_2``) and torchvision's ``Inception3`` (BSD 3-Clause),
with the same module names, so its ``state_dict`` has exactly the keys and shapes of pytorch-fid's file.
The FID variant differs from torchvision's Inception-v3 in that the average pools of the A, C and first E
blocks leave the zero padding out of the average (TensorFlow's behaviour), the second E block pools its
``branch_pool`` with a max pool, and the classifier has 1008 classes (unused for features).

Preprocessing is pytorch-fid's default: the RGB picture as floats in [0, 1] (8-bit values / 255), resized
to 299x299 with **bilinear** interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``,
no anti-aliasing), scaled to [-1, 1], then the network up to its final average pool ("pool3"). Each
picture is resized on its own, so pictures of different sizes can be mixed. (clean-fid resizes with PIL's
anti-aliased bicubic filter and torch-fidelity with its own TF-like bilinear, so their FIDs differ slightly
from pytorch-fid's and these.)

Weights are read from a local file only: ``.safetensors``, or a ``.pth`` / ``.pt`` loaded with
``torch.load(weights_only=True)``; a pickle that needs more than that is refused, never unpickled. A file
with missing, unexpected or wrongly shaped tensors is refused with a list of them. Convert the ``.pth`` to
``.safetensors`` once with ``python -m safetydpo_core.eval.inception SRC.pth [DST.safetensors]``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..utils.fingerprint import file_sha256
from .weights import INCEPTION_CANDIDATES, MissingWeights

FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008
RESIZE = ("bilinear to 299x299 (torch.nn.functional.interpolate, align_corners=False, no anti-aliasing) from RGB "
          "in [0, 1], then scaled to [-1, 1], as pytorch-fid")
FEATURES = "pool3: the 2048-d output of the final average pool of the FID Inception-v3 (pt_inception-2015-12-05)"
_OPTIONAL_SUFFIX = ".num_batches_tracked"  # BatchNorm counters: present or not depending on the PyTorch that saved


# -- the network ---------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool leaves the zero padding out of the average
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """``pool="avg"``: pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``pool="max"``: FIDInceptionE_2 (Mixed_7c)."""

    def __init__(self, in_channels: int, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg_pool_same(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; ``forward`` takes ``[N, 3, H, W]`` RGB in [0, 1] and returns pool3 ``[N, 2048]``."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)  # in the weights file; not used for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return self.pool3(2 * x - 1)

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """From the network's input (299x299, in [-1, 1]) to the 2048-d pool3 features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of a complete weights file (without the optional ``num_batches_tracked`` counters)."""
    with torch.device("meta"):
        model = FIDInceptionV3()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_OPTIONAL_SUFFIX)}


# -- weights -----------------------------------------------------------------------------------------------
def read_weights(path: str | os.PathLike, help_text: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a ``.safetensors`` file, or of a ``.pth``/``.pt`` read with ``torch.load(weights_only=True)``,
    and the safetensors metadata (empty for ``.pth``). :class:`MissingWeights` for a missing or unreadable file and
    for a pickle that needs more than plain tensors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingWeights(f"The Inception weights file {p} does not exist. {help_text}".strip())
    if p.is_dir():
        raise MissingWeights(f"{p} is a folder; the Inception weights are one file (.safetensors or .pth). {help_text}".strip())
    if p.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for broken headers
            raise MissingWeights(f"The Inception weights file {p} is not a readable safetensors file ({e}). "
                                 f"{help_text}".strip()) from e
        return tensors, meta
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MissingWeights(
            f"The Inception weights file {p} is a pickle that needs more than plain tensors to load ({first}); this "
            f"pack never unpickles such files. Use the plain state dict pt_inception-2015-12-05-6726825d.pth from "
            f"pytorch-fid's release, or a .safetensors file. {help_text}".strip()) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise MissingWeights(f"The Inception weights file {p} cannot be read ({e}). {help_text}".strip()) from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise MissingWeights(f"The Inception weights file {p} does not hold a state dict (names -> tensors). "
                             f"{help_text}".strip())
    return dict(obj), {}


def check_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, help_text: str = "") -> None:
    """:class:`MissingWeights` listing missing, unexpected and wrongly shaped tensors (the first few of each)."""
    want = expected_shapes()
    got = {k: tuple(v.shape) for k, v in tensors.items() if not k.endswith(_OPTIONAL_SUFFIX)}
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [f"{k} is {list(got[k])}, expected {list(want[k])}" for k in want if k in got and got[k] != want[k]]
    if not (missing or extra or wrong):
        return

    def few(items: list[str]) -> str:
        return ", ".join(items[:4]) + (f" (and {len(items) - 4} more)" if len(items) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing: {few(missing)}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensors: {few(extra)}")
    if wrong:
        parts.append(f"{len(wrong)} of the wrong shape: {few(wrong)}")
    raise MissingWeights(f"The Inception weights file {path} is not the FID Inception-v3 (pt_inception-2015-12-05, "
                         f"{len(want)} tensors): {'; '.join(parts)}. {help_text}".strip())


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu", help_text: str = "") -> FIDInceptionV3:
    """The network with the weights of ``path`` (checked against the architecture), in eval mode on ``device``."""
    tensors, _ = read_weights(path, help_text)
    check_weights(tensors, path, help_text)
    with torch.device("meta"):
        model = FIDInceptionV3()
    state = {k: v.to(torch.float32) for k, v in tensors.items() if not k.endswith(_OPTIONAL_SUFFIX)}
    for k, v in model.state_dict().items():
        if k.endswith(_OPTIONAL_SUFFIX):
            state[k] = torch.zeros((), dtype=torch.long)
    model.load_state_dict(state, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


# -- features ------------------------------------------------------------------------------------------------
def image_tensor(image: Image.Image) -> torch.Tensor:
    """``[3, 299, 299]``: the RGB picture in [0, 1], bilinearly resized to 299x299 (pytorch-fid's resize)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)[0]


class InceptionFeatures:
    """Loads the FID Inception from a local weights file and gives pool3 features of PIL images."""

    def __init__(self, path: str | os.PathLike, device: str | torch.device = "cpu", help_text: str = ""):
        self.path = Path(path).expanduser()
        self.device = torch.device(device)
        self.model = load_inception(self.path, self.device, help_text)
        self.sha256 = file_sha256(self.path)

    def info(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "features": FEATURES, "resize": RESIZE}

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``[N, 2048]`` float64 pool3 features of ``images`` (any sizes; each is resized to 299x299 on its own)."""
        if not images:
            return np.zeros((0, FEATURE_DIM))
        x = torch.stack([image_tensor(im) for im in images]).to(self.device)
        # already 299x299, so the model's own (identical) resize is a no-op; scale to [-1, 1] and run
        return self.model.pool3(2 * x - 1).double().cpu().numpy()


# -- conversion ----------------------------------------------------------------------------------------------
def convert_to_safetensors(src: str | os.PathLike, dst: str | os.PathLike | None = None, *,
                           overwrite: bool = False) -> Path:
    """Write the checked weights of ``src`` (a ``.pth`` read with ``weights_only=True``) as ``.safetensors``,
    atomically, with the source's name and SHA-256 in the metadata. Returns the written path."""
    from safetensors.torch import save_file

    from ..errors import SafetyDPOError
    from ..utils.atomic import atomic_path

    src = Path(src).expanduser()
    dst = Path(dst).expanduser() if dst else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise SafetyDPOError(f"The converted file would replace its source {src}; give another destination.")
    if dst.exists() and not overwrite:
        raise SafetyDPOError(f"{dst} already exists; pass --overwrite to replace it, or give another destination.")
    tensors, _ = read_weights(src)
    check_weights(tensors, src)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()
             if not k.endswith(_OPTIONAL_SUFFIX)}
    meta = {"format": "pt", "model": "FID Inception-v3 (pt_inception-2015-12-05)", "source": src.name,
            "source_sha256": file_sha256(src)}
    with atomic_path(dst, "Inception weights") as tmp:
        save_file(state, str(tmp), metadata=meta)
    return dst


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    """``python -m safetydpo_core.eval.inception SRC.pth [DST.safetensors] [--overwrite]``."""
    from ..errors import SafetyDPOError

    ap = argparse.ArgumentParser(prog="python -m safetydpo_core.eval.inception",
                                 description="Convert pytorch-fid's Inception weights (pt_inception-2015-12-05-"
                                             "6726825d.pth, read with torch.load(weights_only=True)) to .safetensors, "
                                             "after checking every tensor's name and shape.")
    ap.add_argument("src", help="the .pth file")
    ap.add_argument("dst", nargs="?", help="the .safetensors file to write (default: SRC with .safetensors)")
    ap.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    args = ap.parse_args(argv)
    try:
        dst = convert_to_safetensors(args.src, args.dst, overwrite=args.overwrite)
    except SafetyDPOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out(f"wrote {dst} ({len(expected_shapes())} tensors); put it at <weights>/{INCEPTION_CANDIDATES[0]} or pass it "
        f"with --inception")
    return 0


if __name__ == "__main__":
    sys.exit(main())
