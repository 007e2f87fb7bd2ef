"""bitsandbytes bases (QLoRA's `Linear4bit`, LLM.int8's `Linear8bitLt`): what differs from a float base.

The adapted layer calls a quantised base through `call_module` (`base_kinds.can_inline` only
inlines exact torch classes), so the forward needs nothing here. Three things do:

- **Training after an eval pass.** bitsandbytes 0.50, on a CPU with AVX512-BF16, repacks a
  `Linear4bit` weight *in place* on its first eval-mode forward without grad into a CPU-only
  layout whose matmul has no backward; `model.train()` does not undo it, so every later step
  silently gives the adapters no gradient (peft 0.21 has the same fault). `unpack` restores the
  standard layout (bitsandbytes' own inverse, which it runs before saving); `AdaptedLayer.train`
  calls it on entering training, the fold step before reading the weight, and `keep_trainable`
  hooks it before every forward that needs gradients, on the frozen 4-bit layers too (a packed
  `o_proj` between two adapters cuts the gradient of every adapter before it).
- **Merge.** A quantised weight cannot take a delta in place: `float_weight` dequantises it (as
  peft's `dequantize_bnb_weight`), the method folds in fp32, and `write_weight` quantises the
  result into a new parameter exactly as peft's bnb `merge`/`unmerge` do. The error against the
  unmerged forward is the quantiser's (peft warns "may get different generations due to
  rounding errors"); `tests/quantized` measures it.
- **What peft adapts.** peft 0.21 has bnb layers for LoRA (DoRA too), IA3 and AdaLoRA. DoRA
  takes its weight norm, and its dropout path's base output, from the dequantised weight
  (`float_weight`, each forward, as peft; `methods/lora/dora.py`). LoHa and LoKr treat a
  `Linear4bit` as a plain Linear and fail in peft itself (they read the packed weight's
  shape). `check_supported` refuses those with a clear `QuantizedBaseError`.

bitsandbytes is imported only when a quantised module is actually met; classes are recognised
by their parameter class name, as peft's `get_bnb_param_type` does, so importing surgeon never
loads bitsandbytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from surgeon.errors import UserError

if TYPE_CHECKING:
    from surgeon.planning.site import Site

Quant = Literal["4bit", "8bit"]
_BNB_LAYERS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layer classes (and subclasses)
_HOOK = "_surgeon_unpack_hook"  # where `keep_trainable` keeps its hook handle on the module

# methods whose adapted bnb layer peft 0.21 builds and runs; ("method", quant) -> why not
_REFUSED: dict[tuple[str, Quant | None], str] = {
    ("loha", "4bit"): "peft 0.21's LoHa treats a Linear4bit as a plain Linear and fails on its "
                      "packed weight",
    ("lokr", "4bit"): "peft 0.21's LoKr treats a Linear4bit as a plain Linear and fails on its "
                      "packed weight",
}


class QuantizedBaseError(UserError):
    """An adapter or operation that cannot be exact on a bitsandbytes-quantised base."""


def quant_of(module: nn.Module) -> Quant | None:
    """'4bit' / '8bit' for a bitsandbytes layer (by its weight's class, as peft decides), else None."""
    weight = module._parameters.get("weight")
    name = type(weight).__name__
    return "4bit" if name == "Params4bit" else "8bit" if name == "Int8Params" else None


def check_supported(base: nn.Module, site: Site) -> None:
    """Refuse an adapter peft 0.21 cannot build on this quantised base (see module docstring)."""
    quant = quant_of(base)
    if quant is None:
        return
    why = _REFUSED.get((site.method, quant))
    if why is not None:
        raise QuantizedBaseError(
            f"Cannot add `{site.adapter}` ({site.method}) to `{site.path}`, a bitsandbytes "
            f"{quant} layer: {why}. Use LoRA, DoRA, rsLoRA, IA3 or AdaLoRA on quantised layers, or "
            "exclude this module.")


def unpack(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU eval repacking of a `Linear4bit` weight; True if it was packed.

    The weight's nibbles are a permutation (restored exactly). The repacking rounded the block
    scales (absmax) to bf16, which no inverse recovers, and bitsandbytes' inverse leaves them
    transposed unless double-quantised; here they are put back in order, in fp32."""
    if quant_of(module) != "4bit":
        return False
    weight = module.weight
    state = weight.quant_state
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if state.absmax.dim() == 2:  # not double-quantised: still (in/blocksize, out), bf16
        state.absmax = state.absmax.T.reshape(-1).float().contiguous()
    weight.quant_state = module.quant_state = state
    return True


def _unpack_for_grad(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: a call that trains or needs an input gradient runs on the standard
    layout (bitsandbytes repacks only when neither holds)."""
    if module.training or any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        unpack(module)


def keep_trainable(model: nn.Module) -> int:
    """Keep every `Linear4bit` of `model` in the layout gradients flow through: adapted bases
    *and* the frozen layers between them (a packed `o_proj` cuts the gradient of every adapter
    before it). Turns bitsandbytes' eval repacking off (`support_avx512bf16_for_cpu`), so eval
    and training run the same base weights, exactly; a layer packed already is unpacked (its
    bf16-rounded scales stay), and a pre-hook unpacks again before any forward that needs
    gradients should something repack it. Idempotent; returns how many layers it changed."""
    changed = 0
    for _, module in quantized_modules(model):
        if quant_of(module) != "4bit" or _HOOK in module.__dict__:
            continue
        module.support_avx512bf16_for_cpu = False
        unpack(module)
        module.__dict__[_HOOK] = module.register_forward_pre_hook(_unpack_for_grad)
        changed += 1
    return changed


def float_weight(module: nn.Module) -> torch.Tensor:
    """The dequantised `(out, in)` weight (peft's `dequantize_bnb_weight`), unpacked first."""
    import bitsandbytes as bnb

    unpack(module)
    weight = module.weight
    if quant_of(module) == "4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    state = module.state
    if state.SCB is None:
        state.SCB = weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, state.SCB.to(weight.device))


def write_weight(module: nn.Module, new: torch.Tensor) -> None:
    """Quantise `new` into a fresh weight parameter, as peft's bnb merge and unmerge do."""
    import bitsandbytes as bnb

    weight = module.weight
    if quant_of(module) == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        module.weight = bnb.nn.Params4bit(new.to("cpu"), **kwargs).to(weight.device)
        return
    module.weight = bnb.nn.Int8Params(new.to("cpu"), requires_grad=False,
                                      has_fp16_weights=weight.has_fp16_weights).to(weight.device)
    module.state.reset_grads()


def float_stand_ins(copy: nn.Module) -> int:
    """Replace, in `copy` (a meta copy made for graph capture), every bitsandbytes layer by an
    `nn.Linear` of its shape on the meta device: the dataflow, and so the roles, of a quantised
    model are its float model's, and tracing never meets a quantised tensor subclass. Returns
    how many layers were replaced. By class here: the copy's weights are plain meta tensors."""
    found = [(path, m) for path, m in copy.named_modules()
             if any(c.__name__ in _BNB_LAYERS for c in type(m).__mro__)]
    for path, module in found:
        parent, _, name = path.rpartition(".")
        bias = module.bias is not None
        dtype = module.bias.dtype if bias else torch.float32
        stand_in = nn.Linear(module.in_features, module.out_features, bias=bias, device="meta",
                             dtype=dtype)
        setattr(copy.get_submodule(parent) if parent else copy, name, stand_in)
    return len(found)


def quantized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every bitsandbytes layer of `model`, by path."""
    return [(name, m) for name, m in model.named_modules() if quant_of(m) is not None]


def prepare_kbit(model: nn.Module, use_gradient_checkpointing: bool = True,
                 gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """peft's `prepare_model_for_kbit_training`, plus `keep_trainable`; call it before `apply`.

    As peft: every parameter frozen; fp16/bf16 parameters that are not 4-bit weights (norms,
    embeddings, the head) cast to fp32 for stable training; on a quantised model with gradient
    checkpointing, the input embedding's output made to require grad (reentrant checkpointing
    needs an input that does) and checkpointing enabled. Returns the same model.

    Example:
        >>> model = surgeon.prepare_kbit(AutoModelForCausalLM.from_pretrained(d, quantization_config=q))
        >>> surgeon.apply("adapter default = lora(r=16) { target all-linear }", model)
    """
    from surgeon.layer_kinds import input_embedding, is_transformers_model

    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad = False
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    quantised = bool(quantized_modules(model))
    if quantised and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            embedding = input_embedding(model)
            if embedding is not None:
                embedding.register_forward_hook(_require_grad)
        if is_transformers_model(model):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    keep_trainable(model)
    return model


def _require_grad(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    """peft's `make_inputs_require_grad` (transformers' `enable_input_require_grads`)."""
    output.requires_grad_(True)
