"""Model assembly from part packages, on small fake parts installed as real distributions (dist-info on sys.path)."""

from __future__ import annotations

import hashlib

import pytest

from ponder import models
from ponder.engine import PonderError


def _install_fake_parts(site, prefix: str, blobs: list[bytes]) -> tuple[str, ...]:
    """Write one distribution per part, the way the real model packages are laid out."""
    names = []
    for i, blob in enumerate(blobs, start=1):
        dist, module = f"{prefix}-part{i}", f"{prefix.replace('-', '_')}_part{i}"
        (site / module / "data").mkdir(parents=True)
        (site / module / "data" / f"part{i:02d}.bin").write_bytes(blob)
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{module}/data/part{i:02d}.bin,,\n")
        names.append(dist)
    return tuple(names)


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    blobs = [bytes([i]) * (100 + i) for i in range(1, 12)]  # eleven parts: part10 must follow part9, not part1
    dists = _install_fake_parts(site, "ponder-test-model", blobs)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PONDER_HOME", str(tmp_path / "home"))
    joined = b"".join(blobs)
    model = models.BundledModel("tiny", "test model", "tiny.gguf", len(joined), hashlib.sha256(joined).hexdigest(),
                                dists, extra=None)
    return model, joined


def test_parts_join_in_numeric_order_and_verify(fake_model):
    model, joined = fake_model
    path = models.assemble(model)
    assert path.read_bytes() == joined
    assert path.parent == models.ponder_home() / "models"
    assert not list(path.parent.glob("*.partial"))
    assert models.status(model).assembled


def test_wrong_hash_leaves_no_file(fake_model):
    model, _ = fake_model
    bad = models.BundledModel(model.name, "", model.filename, model.size, "0" * 64, model.distributions, None)
    with pytest.raises(PonderError, match="sha256"):
        models.assemble(bad)
    assert not models.cache_path(bad).exists()
    assert not list(models.cache_path(bad).parent.glob("*"))


def test_missing_package_names_it(fake_model):
    model, _ = fake_model
    missing = models.BundledModel(model.name, "", model.filename, model.size, model.sha256,
                                  model.distributions + ("ponder-test-model-part12",), extra="large")
    with pytest.raises(PonderError, match=r"ponder-test-model-part12 is not installed.*ponder\[large\]"):
        models.assemble(missing)


def test_resolve_model_errors(tmp_path):
    with pytest.raises(PonderError, match="unknown model 'nope'"):
        models.resolve_model("nope")
    with pytest.raises(PonderError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing.gguf"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"hello")
    with pytest.raises(PonderError, match="not a GGUF file"):
        models.resolve_model(str(not_gguf))


def test_the_real_catalog_matches_the_design_notes():
    small, large = models.CATALOG["qwen2.5-0.5b"], models.CATALOG["qwen2.5-1.5b"]
    assert small.size == 491_400_064 and len(small.distributions) == 6
    assert large.size == 1_117_320_768 and len(large.distributions) == 22
