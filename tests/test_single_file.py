"""Single-file (original LDM layout) checkpoints: loading through diffusers with local configs, the shipped
SD1.5/SDXL configs, and refusals."""

import json

import pytest
import torch

from ldm_checkpoint import write_ldm_checkpoint
from safetydpo_core.cli.main import main
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.denoiser.single_file import CONFIG_DIR, detect_family, find_tokenizer
from safetydpo_core.errors import ModelError


@pytest.fixture(scope="module")
def ckpt(tiny_sd15, tmp_path_factory):
    return write_ldm_checkpoint(tiny_sd15, tmp_path_factory.mktemp("sf") / "tiny-sd15.safetensors")


def test_single_file_loads_like_the_folder(tiny_sd15, ckpt):
    assert detect_family(ckpt) == "sd15"
    a = DiffusersDenoiser.from_pretrained(tiny_sd15)
    b = DiffusersDenoiser.from_pretrained(ckpt, config=tiny_sd15)
    assert a.fingerprint() == b.fingerprint()
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([400])
    with torch.no_grad():
        pa = a.predict(x, t, a.encode_prompts(["a red cat"]))
        pb = b.predict(x, t, b.encode_prompts(["a red cat"]))
    torch.testing.assert_close(pa, pb)
    img = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(img), b.encode_images(img), rtol=1e-4, atol=1e-5)


def test_train_cli_accepts_a_single_file(tiny_sd15, ckpt, tmp_path):
    from conftest import make_dataset

    data = make_dataset(tmp_path / "d", DiffusersDenoiser.from_pretrained(tiny_sd15))
    assert main(["train", "--model", str(ckpt), "--model-config", str(tiny_sd15), "--data", str(data),
                 "--out", str(tmp_path / "e.safetensors"), "--steps", "1"]) == 0


@pytest.mark.parametrize("family,unet,text,vae", [
    ("sd15", 859_520_964, [123_060_480], 83_653_863),
    ("sdxl", 2_567_463_684, [123_060_480, 694_659_840], 83_653_863)])
def test_shipped_configs_describe_the_real_architectures(family, unet, text, vae):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = CONFIG_DIR / family
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(json.loads((d / "unet/config.json").read_text()))) == unet
        assert count(AutoencoderKL.from_config(json.loads((d / "vae/config.json").read_text()))) == vae
        for sub, n in zip(["text_encoder", "text_encoder_2"], text):
            cfg = CLIPTextConfig.from_pretrained(d / sub)
            cls = CLIPTextModelWithProjection if sub == "text_encoder_2" else CLIPTextModel
            assert count(cls(cfg)) == n


def test_refusals(tmp_path, monkeypatch):
    (tmp_path / "x.ckpt").write_bytes(b"pickle")
    with pytest.raises(ModelError, match="refused"):
        DiffusersDenoiser.from_pretrained(tmp_path / "x.ckpt")
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(1)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        DiffusersDenoiser.from_pretrained(tmp_path / "y.safetensors")
    monkeypatch.delenv("SAFETYDPO_CLIP_TOKENIZER", raising=False)
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ModelError, match="SAFETYDPO_CLIP_TOKENIZER"):
        find_tokenizer()
