"""Model assembly from part packages, on small fake parts installed as real distributions (dist-info on sys.path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

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
                                dists)
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
    bad = models.BundledModel(model.name, "", model.filename, model.size, "0" * 64, model.distributions)
    with pytest.raises(PonderError, match="sha256"):
        models.assemble(bad)
    assert not models.cache_path(bad).exists()
    assert not list(models.cache_path(bad).parent.glob("*"))


def test_missing_package_names_it(fake_model):
    model, _ = fake_model
    missing = models.BundledModel(model.name, "", model.filename, model.size, model.sha256,
                                  model.distributions + ("ponder-test-model-part12",))
    with pytest.raises(PonderError, match=r"ponder-test-model-part12 is not installed.*reinstall ponder"):
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


def test_a_derived_models_file_is_named_by_its_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_HOME", str(tmp_path))
    q4 = models.DERIVED["qwen2.5-0.5b-q4_0"]
    assert q4.source is models.CATALOG["qwen2.5-0.5b"] and q4.source.sha256 in q4.recipe
    other_source = models.DerivedModel(q4.name, models.CATALOG["qwen2.5-1.5b"], "q4_0")
    paths = {models.derived_path(m) for m in (q4, other_source, models.DERIVED["qwen2.5-0.5b-q8_0"])}
    assert len(paths) == 3 and all(p.parent == tmp_path / "models" for p in paths)
    assert models.derived_record(q4) is None  # nothing made yet
    models.derived_path(q4).parent.mkdir()
    models.derived_path(q4).write_bytes(b"GGUF and the rest")
    models.derived_path(q4).with_suffix(".json").write_text('{"recipe": "an older one", "size": 17, "sha256": "0"}')
    assert models.derived_record(q4) is None  # a file made by another recipe is not this model


@pytest.mark.model
def test_a_derived_model_is_made_once_the_same_way_and_answers(tmp_path, monkeypatch):
    """Made from the verified shipped file (linked into a fresh PONDER_HOME): the quantizer is deterministic, so the
    recorded sha256 is the same on every machine with this llama.cpp, and a second resolve reuses the file."""
    import asyncio

    from ponder.engine import SamplingParams
    from ponder.models import load_engine

    shipped = models.resolve_model("qwen2.5-0.5b").path
    monkeypatch.setenv("PONDER_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / models.CATALOG["qwen2.5-0.5b"].filename).symlink_to(shipped)
    first = models.resolve_model("qwen2.5-0.5b-q4_0")
    assert first.sha256 == models.file_sha256(Path(first.path))
    made = Path(first.path).stat().st_mtime_ns
    assert models.resolve_model("qwen2.5-0.5b-q4_0") == first and Path(first.path).stat().st_mtime_ns == made
    Path(first.path).with_suffix(".json").unlink()  # unfinished: made again, to the same bytes
    assert models.resolve_model("qwen2.5-0.5b-q4_0").sha256 == first.sha256
    assert not list((tmp_path / "models").glob("*.partial"))

    async def answer(engine):
        root = await engine.open([{"role": "user", "content": "What is 12 times 7? Answer with the number."}])
        await root.extend(SamplingParams(temperature=0.0, max_tokens=8))
        root.release()
        return root.text

    with load_engine("qwen2.5-0.5b-q4_0", n_ctx=512, n_seq_max=2) as engine:
        assert engine.model.name == "qwen2.5-0.5b-q4_0"
        assert "84" in asyncio.run(answer(engine))
