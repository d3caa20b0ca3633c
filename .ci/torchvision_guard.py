"""Make PyPI's CUDA-built torchvision importable beside the CPU torch (ComfyUI needs its Python parts).

torchvision registers fake kernels for its compiled ``nms``/``qnms`` ops unconditionally, so importing it
fails ("operator torchvision::nms does not exist") when its compiled ops cannot load, as with the CPU
torch here. This applies the guard of the upstream fix (pytorch/vision#9649) to the installed file:
register them only when the ops loaded. Idempotent; does nothing when torchvision already imports.
"""

import importlib.util
import pathlib
import subprocess
import sys

if subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0:
    sys.exit(0)
spec = importlib.util.find_spec("torchvision")
if spec is None:
    sys.exit(0)
path = pathlib.Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
for op in ("nms", "qnms"):
    text = text.replace(
        f'@torch.library.register_fake("torchvision::{op}")\n',
        f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda fn: fn))\n')
path.write_text(text)
print(f"patched {path}")
