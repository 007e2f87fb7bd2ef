"""Inputs made up from a transformers model's forward signature and config.

Every input kind transformers uses has a maker (surgeon.capture.makers), keyed by the forward parameter's name:
text (`input_ids`, `decoder_input_ids`, `bbox`), images (`pixel_values` in the tower's size,
with grid/size metadata when required), audio (`input_values` as raw samples or spectrogram,
`input_features` as log-mel frames), hidden states (`encoder_hidden_states` for a decoder
loaded alone, `inputs_embeds` or `query_embeds` for towers that take no ids) and masks.
A parameter is filled when the forward requires it, or when it is one of the inputs that
decide which code runs (a decoder's cross-attention is dead without its encoder states).

Beyond the names: inputs sized by another input of the call come last (surgeon.capture.
derived_inputs: the lengths of the frames passed, the grid of the pixels); a parameter typed
`list[Tensor]` gets a list (a feature pyramid); a required one whose type hint allows None gets
None; a required one no maker knows gets zeros in the shape its docstring gives
(surgeon.models.documented), if it gives one.

`input_candidates` returns the calls to try, most complete first: a vision-language (or audio-
language) model is tried with pixels (audio) and text, then with text alone (its tower is then
captured on its own, surgeon.capture.towers), then with embeddings for ids. After each call come
its variants with one input in another layout, read from the layer that consumes it or from the
docstring (surgeon.models.layouts): configs often do not say whether a spectrogram is mels-first
or how wide a flattened patch is, the first layer does. `missing_inputs` names the required
inputs nothing can make, with their type where that is an object (a video session), for errors.
"""


from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from surgeon.capture.derived_inputs import AFTER_WITHOUT, DERIVED
from surgeon.capture.inputs import ExampleInputs
from surgeon.capture.makers import LISTS, MAKERS, SEQ_LEN, hidden_width
from surgeon.models.documented import documented_tensor
from surgeon.models.layouts import variants

_TRAJECTORY = ("states", "actions", "rewards", "returns_to_go", "timesteps")
# Optional inputs worth passing: each decides whether a part of the model runs at all.
_WANTED = ("input_ids", "bbox", "pixel_values", "input_values", "input_features", "flattened_patches",
           "lang_ids", "last_hidden_state")
# Mask -> the input it masks: passed with that input, left out without it.
_MASKS = {"input_features_mask": "input_features", "feature_attention_mask": "input_features"}
# Pixels or audio beside text: tried first, then text alone (media tokens must match features).
_MODALITIES = ("pixel_values", "image", "images", "image_sizes", "input_features", "input_values")


def input_candidates(model: nn.Module, device: torch.device | str = "meta") -> list[ExampleInputs]:
    """The calls worth trying for a transformers model, most complete first; [] for others."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    params = _parameters(model)
    lists = _list_typed(model)
    names = [n for n in (*MAKERS, *LISTS) if n in params and _wanted(n, params, config, model)]
    names = list(dict.fromkeys(n for n in names if n in MAKERS or n in lists))
    names += _documented_only(model, params, lists)
    if not names:
        return []
    options = (("use_cache", False),) if "use_cache" in params else ()
    options += tuple((n, None) for n in _nullable_required(model) if n not in names and n not in DERIVED)
    derived = [n for n in DERIVED if n in params and (params[n] or all(d in params for d in DERIVED[n][0]))]
    calls = [names]
    optional = [n for n in _MODALITIES if n in names and not params[n]]
    if "input_ids" in names and optional:
        calls.append([n for n in names if n not in optional])
    if "input_values" in names and "input_features" in names and not params["input_features"]:
        calls += [[n for n in call if n != "input_features"] for call in list(calls)]  # either audio form
    if "grid_thw" in names and not params["grid_thw"]:
        calls += [[n for n in call if n != "grid_thw"] for call in list(calls)]
    if "encoder_hidden_states" in names and not params["encoder_hidden_states"]:
        calls += [[n for n in call if n != "encoder_hidden_states"] for call in list(calls)]
    if "input_ids" in names and not params["input_ids"] and "inputs_embeds" in params:
        calls.append([n if n != "input_ids" else "inputs_embeds" for n in calls[-1]])  # embeddings-only
    found = []
    for call in calls:
        call = [n for n in call if _MASKS.get(n, n) in call]
        tensors = tuple((n, t) for n in call if (t := _make(model, n, n in lists, device)) is not None)
        for kwargs in (_beside_prompt(tensors), *variants(model, _beside_prompt(tensors))):
            kwargs = _with_query_tokens(config, kwargs)
            made = dict(kwargs)
            extra = {n: DERIVED[n][1](config, made) for n in derived
                     if n not in made and all(d in made for d in DERIVED[n][0])}
            extra = {n: v for n, v in extra.items() if v is not None}
            if any(params[n] and n not in made and n not in extra for n in derived):
                continue  # a required input with nothing to size it by
            if any(n in AFTER_WITHOUT for n in extra):  # the call without them first, as before
                found.append(_call(kwargs, options, {n: v for n, v in extra.items() if n not in AFTER_WITHOUT}))
            found.append(_call(kwargs, options, extra))
    if "use_cache" not in params and getattr(config, "use_cache", False) and _takes_kwargs(model):
        # Last: the same calls without a cache, through **kwargs (a hybrid LM whose cache holds
        # only linear-attention layers cannot say how long it is: GraniteMoeHybrid's)
        found += [ExampleInputs(c.args, c.kwargs, (*c.options, ("use_cache", False))) for c in list(found)]
    if "attention_mask" in params:
        found += [c for c in map(_with_mask, found) if c is not None]
    return found


def _with_mask(call: ExampleInputs) -> ExampleInputs | None:
    """The call with an all-ones `attention_mask` for its tokens, tried after the calls without:
    some forwards build the default mask only outside tracing (LongT5's local attention reads it
    under export, where `is_torchdynamo_compiling()` skips making it)."""
    made = dict(call.kwargs)
    tokens = made.get("input_ids", made.get("inputs_embeds"))
    if "attention_mask" in made or not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
        return None
    mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    return ExampleInputs(call.args, (*call.kwargs, ("attention_mask", mask)), call.options)


def _call(kwargs: tuple[tuple[str, Any], ...], options: tuple[tuple[str, Any], ...],
          extra: dict[str, Any]) -> ExampleInputs:
    """One call: the made inputs, the derived ones (tensors and lists of them as inputs, other
    values as constant options)."""
    tensors = {n: v for n, v in extra.items() if isinstance(v, torch.Tensor | list)}
    return ExampleInputs((), (*kwargs, *tensors.items()),
                         (*options, *((n, v) for n, v in extra.items() if n not in tensors)))


def _beside_prompt(inputs: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """SegGPT stacks a prompt image (and its mask) over the input image into its configured
    `image_size`: each of the three is then half as high."""
    if "prompt_pixel_values" not in dict(inputs):
        return inputs
    halve = ("pixel_values", "prompt_pixel_values", "prompt_masks")
    return tuple((n, t[..., : t.shape[-2] // 2, :].contiguous() if n in halve else t) for n, t in inputs)


def _with_query_tokens(config: Any, inputs: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, Any], ...]:
    """BLIP-2-style models put their `num_query_tokens` query outputs (per frame of a clip:
    InstructBLIP-Video) where `input_ids` hold the image (video) token: the prompt leads with
    that many of them, then SEQ_LEN text tokens."""
    made = dict(inputs)
    queries, pixels = getattr(config, "num_query_tokens", None), made.get("pixel_values")
    if not isinstance(queries, int) or pixels is None or "input_ids" not in made:
        return inputs
    video = pixels.dim() == 5 and isinstance(getattr(config, "video_token_id", None), int)
    token = getattr(config, "video_token_id" if video else "image_token_id", None)
    if not isinstance(token, int):
        return inputs
    count = queries * (pixels.shape[1] if video else 1)
    ids = torch.zeros(1, count + SEQ_LEN, dtype=torch.long, device=made["input_ids"].device)
    ids[:, :count] = token
    return tuple((n, ids if n == "input_ids" else t) for n, t in inputs)


def _make(model: nn.Module, name: str, as_list: bool, device: Any) -> Any:
    config = model.config
    if name not in MAKERS and name not in LISTS:
        return documented_tensor(model, name, _documented_sizes(config), device)
    if as_list:
        return LISTS[name](config, device) if name in LISTS else [MAKERS[name](config, device)]
    return MAKERS[name](config, device)


def _documented_sizes(config: Any) -> dict[str, int]:
    """What the usual dimension names of a docstring shape mean for synthesized inputs."""
    return {"batch_size": 1, "sequence_length": SEQ_LEN, "seq_len": SEQ_LEN,
            "dim": hidden_width(config), "hidden_size": hidden_width(config)}


def _documented_only(model: nn.Module, params: dict[str, bool], lists: set[str]) -> list[str]:
    """Required inputs no maker knows whose docstring gives their shape (Molmo 2's adapter:
    `image_features`, `pooled_patches_idx`): zeros in that shape (surgeon.models.documented)."""
    known = {*MAKERS, *DERIVED, *lists}
    sizes = _documented_sizes(model.config)
    return [n for n, required in params.items() if required and n not in known
            and documented_tensor(model, n, sizes, "meta") is not None]


def _list_typed(model: nn.Module) -> set[str]:
    """Parameters whose type hint is a list of tensors (`backbone_features: list[torch.Tensor]`)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if str(p.annotation).startswith("list[")}


def synthesize_inputs(model: nn.Module, device: torch.device | str = "meta") -> ExampleInputs | None:
    """The most complete call `input_candidates` finds, or None."""
    found = input_candidates(model, device)
    return found[0] if found else None


def missing_inputs(model: nn.Module) -> tuple[str, ...]:
    """Required forward parameters no maker knows how to make (named in capture errors)."""
    params = _parameters(model)
    lists = set(LISTS) & _list_typed(model)
    known = {*MAKERS, *DERIVED, *lists, *_nullable_required(model), *_documented_only(model, params, lists)}
    return tuple(_described(model, n) for n, required in params.items() if required and n not in known)


def _described(model: nn.Module, name: str) -> str:
    """`name`, with its type where that is an object no config can size (SAM 2 video's
    `inference_session`, which its processor makes and updates frame by frame)."""
    hint = inspect.signature(model.forward).parameters[name].annotation
    if isinstance(hint, type) and not hint.__module__.startswith(("torch", "builtins", "inspect")):
        return f"{name} (of type {hint.__name__}, not a tensor)"
    return name


def _takes_kwargs(model: nn.Module) -> bool:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _nullable_required(model: nn.Module) -> tuple[str, ...]:
    """Required parameters whose type hint allows None (`mask: Tensor | None`): passed as None."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.default is inspect.Parameter.empty
                 and p.annotation is not inspect.Parameter.empty and "None" in str(p.annotation))


def _parameters(model: nn.Module) -> dict[str, bool]:
    """Forward parameter name -> whether it is required (no default, not *args/**kwargs)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {p.name: p.default is inspect.Parameter.empty for p in params if p.kind not in variadic}


def _wanted(name: str, params: dict[str, bool], config: Any, model: nn.Module) -> bool:
    if params[name]:
        return True
    if name in _WANTED:
        return True
    if name in _MASKS:
        return _MASKS[name] in params
    if name in ("context_input_ids", "context_attention_mask", "doc_scores"):
        return "context_input_ids" in params and "doc_scores" in params
    if name in _TRAJECTORY:
        return "states" in params and "returns_to_go" in params
    if name in ("visual_feats", "visual_pos"):  # LXMERT: its vision stream needs both
        return "visual_feats" in params and "visual_pos" in params
    if name == "grid_thw":  # patches need their grid (PaddleOCR-VL's tower takes it optionally)
        return "pixel_values" in params
    if name in ("spatial_shapes", "pixel_attention_mask"):  # NaFlex (SigLIP 2): patches need their grid
        return "spatial_shapes" in params and "pixel_values" in params
    if name == "decoder_input_ids":
        return bool(getattr(config, "is_encoder_decoder", False))
    if name == "encoder_hidden_states":
        return _decoder_alone(config, model)
    if name in ("inputs_embeds", "query_embeds", "pixel_values_videos"):  # a tower fed by another tower
        return not any(n in params for n in ("input_ids", *_WANTED))
    if name == "image_sizes":
        return "pixel_values" in params and "image_sizes" in params and params["image_sizes"]
    return False


def _decoder_alone(config: Any, model: nn.Module) -> bool:
    """A decoder (or a Q-Former) loaded without its encoder: its cross-attention runs only when
    given the encoder's states. The config says so where it can (`add_cross_attention`: GPT-2
    refuses the states without it); otherwise the states are tried first, then left out."""
    if "decoder_input_ids" in _parameters(model):
        return False
    return bool(getattr(config, "add_cross_attention", True))
