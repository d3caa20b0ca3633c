"""The preference dataset format: writing, crash-safe resume, validation errors, and the image builder."""

import json

import pytest
import torch
from PIL import Image

from conftest import make_dataset
from safetydpo_core.cli.main import main
from safetydpo_core.data import PreferenceDataset, PreferenceDatasetWriter
from safetydpo_core.data.from_images import build_from_images
from safetydpo_core.denoiser.diffusers_backend import DiffusersDenoiser
from safetydpo_core.errors import DatasetError


@pytest.fixture(scope="module")
def den(tiny_sd15):
    return DiffusersDenoiser.from_pretrained(tiny_sd15)


def _add(w, i, shape=(4, 8, 8), cat="violence"):
    w.add(id=f"p{i}", category=cat, concept="c", unsafe=f"u{i}", safe=f"s{i}", safe_latent=torch.full(shape, float(i)),
          unsafe_latent=torch.full(shape, -float(i)), seed=i, height=32, width=32)


def test_write_read_and_filter(den, tmp_path):
    root = make_dataset(tmp_path / "d", den, n_per_category=3)
    ds = PreferenceDataset(root)
    assert len(ds) == 6 and ds.per_category() == {"sexual": 3, "violence": 3}
    header = json.loads((root / "dataset.json").read_text())
    assert header["format"] == "safetydpo-preference-dataset" and header["pairs"] == 6
    assert header["model_fingerprint"] == den.fingerprint()
    s, u = ds.load_pair(0)
    assert s.shape == u.shape == (4, 8, 8)
    assert len(PreferenceDataset(root, categories="Violence")) == 3
    with pytest.raises(DatasetError, match="no pairs for hate.*violence"):
        PreferenceDataset(root, categories="hate")


def test_interrupted_write_resumes_without_duplicates(tmp_path):
    root = tmp_path / "d"
    with pytest.raises(RuntimeError):
        with PreferenceDatasetWriter(root, "fp", shard_size=2, previews=False) as w:
            for i in range(5):
                _add(w, i)
            raise RuntimeError("crash")
    # a torn last line from a crash mid-append is dropped on resume
    with open(root / "manifest.jsonl", "a") as f:
        f.write('{"id": "p9", "unsa')
    with PreferenceDatasetWriter(root, "fp", shard_size=2, resume=True, previews=False) as w:
        assert w.done_ids == {f"p{i}" for i in range(5)}
        for i in range(8):
            if f"p{i}" not in w.done_ids:
                _add(w, i)
    ds = PreferenceDataset(root)
    assert [r.id for r in ds.records] == [f"p{i}" for i in range(8)]
    assert torch.equal(ds.load_pair(7)[0], torch.full((4, 8, 8), 7.0))
    with pytest.raises(DatasetError, match="already holds a dataset.*--resume.*--overwrite"):
        PreferenceDatasetWriter(root, "fp")
    with pytest.raises(DatasetError, match="rendered with model fp.*other"):
        PreferenceDatasetWriter(root, "other", resume=True)


def test_bad_datasets_are_named(den, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        PreferenceDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.jsonl").write_text("")
    with pytest.raises(DatasetError, match="empty"):
        PreferenceDataset(tmp_path / "empty")
    with PreferenceDatasetWriter(tmp_path / "d", "fp", previews=False) as w:
        with pytest.raises(DatasetError, match="p1.*differ in shape"):
            w.add(id="p1", category="hate", concept="c", unsafe="u", safe="s", safe_latent=torch.zeros(4, 8, 8),
                  unsafe_latent=torch.zeros(4, 8, 16))
        _add(w, 2)
    with pytest.raises(DatasetError, match="made with model fp.*allow-model-mismatch"):
        PreferenceDataset(tmp_path / "d", expect_fingerprint=den.fingerprint())
    assert len(PreferenceDataset(tmp_path / "d", expect_fingerprint=den.fingerprint(), on_mismatch="warn")) == 1
    (tmp_path / "d" / "manifest.jsonl").write_text('{"id": "x"}\n{"id": "y"}\n')
    with pytest.raises(DatasetError, match="line 1: missing field"):
        PreferenceDataset(tmp_path / "d")


def _csv(tmp_path, rows):
    for name, colour in (("safe.png", (0, 200, 0)), ("unsafe.png", (200, 0, 0))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / name)
    lines = ["prompt_unsafe,prompt_safe,image_safe,image_unsafe,category"] + rows
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "pairs.csv"


def test_from_images_encodes_pairs_with_the_vae(den, tmp_path):
    csv_path = _csv(tmp_path, ['a knife fight,a pillow fight,safe.png,unsafe.png,Violence',
                               '"blood, gore",red paint,safe.png,unsafe.png,"Shocking,Violence"'])
    out = build_from_images(den, csv_path, tmp_path / "data")
    ds = PreferenceDataset(out)
    assert len(ds) == 2 and ds.records[1].category == ["shocking", "violence"]
    s, u = ds.load_pair(0)
    assert s.shape == (4, 8, 8) and not torch.equal(s, u)
    assert (out / ds.records[0].extra["previews"][0]).exists()
    # same command again resumes (nothing new) instead of duplicating
    build_from_images(den, csv_path, tmp_path / "data", resume=True)
    assert len(PreferenceDataset(out)) == 2


@pytest.mark.parametrize("row,match", [
    ("a,b,safe.png,missing.png,hate", r"line 2: image .*missing.png does not exist"),
    ("a,b,safe.png,unsafe.png,violance", r"line 2: Unknown category 'violance'"),
    ("a,,safe.png,unsafe.png,hate", r"line 2: empty prompt_safe")])
def test_from_images_bad_rows_name_the_line(den, tmp_path, row, match):
    with pytest.raises(DatasetError, match=match):
        build_from_images(den, _csv(tmp_path, [row]), tmp_path / "data")


def test_from_images_cli_and_missing_columns(tiny_sd15, tmp_path, capsys):
    csv_path = _csv(tmp_path, ["a knife fight,a pillow fight,safe.png,unsafe.png,violence"])
    assert main(["dataset", "from-images", "--model", str(tiny_sd15), "--csv", str(csv_path), "--out", str(tmp_path / "d")]) == 0
    assert main(["dataset", "info", str(tmp_path / "d")]) == 0
    assert '"violence": 1' in capsys.readouterr().out
    (tmp_path / "bad.csv").write_text("prompt,image\nx,y\n")
    assert main(["dataset", "from-images", "--model", str(tiny_sd15), "--csv", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "d2")]) == 2
    assert "lacks the column(s)" in capsys.readouterr().err


def test_damaged_header_is_named(den, tmp_path):
    root = make_dataset(tmp_path / "d", den, n_per_category=1)
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"dataset.json is not valid JSON"):
        PreferenceDataset(root)


def test_manifest_index_is_a_cache_of_the_manifest(tmp_path, monkeypatch):
    """The index beside manifest.jsonl: written by the writer, extended after an append, rebuilt after an edit,
    ignored when damaged, skipped in a read-only folder; records are read lazily and match the manifest."""
    from safetydpo_core.data import manifest_index
    from safetydpo_core.data.manifest_index import INDEX_NAME, LazyRecords

    root = tmp_path / "d"
    with PreferenceDatasetWriter(root, "fp", shard_size=2, previews=False) as w:
        for i in range(5):
            _add(w, i, cat="violence" if i % 2 else "hate")
    index = root / INDEX_NAME
    assert index.is_file()
    ds = PreferenceDataset(root)
    assert isinstance(ds.records, LazyRecords) and len(ds) == 5
    lines = [json.loads(x) for x in (root / "manifest.jsonl").read_text().splitlines()]
    assert [r.to_json() for r in ds.records] == lines and ds.records[-1].id == "p4" and ds.records[1:3][0].id == "p1"
    assert ds.per_category() == {"hate": 3, "violence": 2} and ds.latent_shapes() == {(4, 8, 8)}
    assert [r.id for r in PreferenceDataset(root, categories="violence").records] == ["p1", "p3"]

    parsed = []
    real = manifest_index.iter_manifest
    monkeypatch.setattr(manifest_index, "iter_manifest", lambda p, start=0, parse=None: parsed.append(start) or
                        real(p, start, parse))
    PreferenceDataset(root)
    assert parsed == []  # a current index: the manifest is not parsed
    with PreferenceDatasetWriter(root, "fp", shard_size=2, resume=True, previews=False) as w:
        _add(w, 5)
    assert parsed[-1] > 0  # the resumed writer extended the index from where it stopped
    assert [r.id for r in PreferenceDataset(root).records] == [f"p{i}" for i in range(6)]

    text = (root / "manifest.jsonl").read_text().replace('"u1"', '"U1"')  # same length, other content
    (root / "manifest.jsonl").write_text(text)
    assert PreferenceDataset(root).records[1].unsafe == "U1" and parsed[-1] == 0  # rebuilt
    index.write_bytes(b"not an index")
    assert len(PreferenceDataset(root)) == 6 and index.stat().st_size > 100  # ignored and rewritten

    index.unlink()

    def read_only(self, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest_index.ManifestIndex, "save", read_only)  # (chmod does not stop root)
    assert len(PreferenceDataset(root)) == 6 and not index.exists()  # a read-only dataset still opens


def test_drop_identical_keeps_the_lazy_records(tmp_path):
    root = tmp_path / "d"
    with PreferenceDatasetWriter(root, "fp", shard_size=2, previews=False) as w:
        for i in range(4):
            _add(w, i)  # p0: both latents are zeros (identical)
    ds = PreferenceDataset(root)
    assert ds.drop_identical() == ["p0"]
    assert [r.id for r in ds.records] == ["p1", "p2", "p3"] and torch.equal(ds.load_pair(0)[0], torch.full((4, 8, 8), 1.0))
