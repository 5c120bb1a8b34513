"""ComfyUI operations for INT8 ConvRot models (passed as `model_options["custom_operations"]`).

`make_ops(mode)` returns a `comfy.ops.manual_cast` subclass whose `Linear` keeps a quantized layer
as int8 codes + float32 row scales (+ group size) and runs `kernels.int8_linear`; every other layer
(and a Linear the file keeps in bf16/fp16/fp32) behaves exactly like ComfyUI's manual_cast.

How it cooperates with ComfyUI's model management (0.8.0's comfy/ops.py and model_patcher.py):
- Memory: the state dict holds the int8 codes, so `module_size` (and --lowvram / partial offload
  decisions) count one byte per weight. Offloaded layers move to the compute device as int8.
- LoRA, three exact paths, none of which modifies the codes:
  1. `Int8ModelPatcher.patch_weight_to_device` turns plain LoRA patches into low-rank terms added
     to the INT8 output (the GEMM stays int8; no dense weight is materialized);
  2. lowvram: `LowVramPatch` entries in `weight_function` are turned into the same low-rank terms
     per call; other weight functions run on the dequantized float32 weight;
  3. anything else (LoHa, LoKr, DoRA, diffs, model merges, `force_patch_weights` for saving)
     goes through ComfyUI's own `convert_weight` → `calculate_weight` → `set_weight`: the weight is
     dequantized in float32, patched, and stored densely in the layer's dtype.
  Saving (0.29+ reads `model_state_dict_for_saving` instead of loading with `force_patch_weights`): a
  patched quantized layer is written as its folded dense weight, lazily, an unpatched one as its codes.
  Unpatching reassigns the original codes tensor (`ModelPatcher.backup`), which clears the low-rank
  terms and the dense weight: the codes come back bit for bit. The CPU prepack of those codes is
  kept across LoRA changes (it is the same tensor, unwritten); it goes when the codes change or
  ComfyUI unloads the model (`Int8ModelPatcher.detach(unpatch_all=True)`).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import contextvars
import logging

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.utils

from .. import kernels
from ..engine.errors import Int8ConvRotError
from ..engine.linear import LowRankSet, LowRankTerm, PrepackCache, int8_forward, join_lowrank, pop_int8_layer

log = logging.getLogger(__name__)

# Set by the loaders while a state dict is loaded: called once per Linear layer (progress bar),
# and the file path used in error messages.
_LOAD_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("int8_convrot_load_context", default=None)


@dataclasses.dataclass
class LoadContext:
    path: object = None
    on_layer: object = None                                # called once per loaded Linear (progress)
    consumed: set = dataclasses.field(default_factory=set)  # "<prefix>weight" of every int8 layer loaded


@contextlib.contextmanager
def load_context(path=None, on_layer=None):
    ctx = LoadContext(path, on_layer)
    token = _LOAD_CONTEXT.set(ctx)
    try:
        yield ctx
    finally:
        _LOAD_CONTEXT.reset(token)


_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # ModelPatcher.backup's record type
_FLOAT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)
_MISSING = object()


def _run_every_op():
    hook = getattr(comfy.ops, "run_every_op", None)
    if hook is not None:
        hook()


def lowrank_terms(patches, out_features: int):
    """ModelPatcher patch entries → [LowRankTerm], or None if any entry is not a plain LoRA.

    Exactness contract (comfy/weight_adapter/lora.py): a LoRA adds strength·(alpha/rank)·up·down
    to the weight, or to the rows [start, start+len) of it when the patch has an offset on dim 0.
    """
    try:
        from comfy.weight_adapter.lora import LoRAAdapter
    except ImportError:  # older ComfyUI: only the dense path
        return None
    terms = []
    for entry in patches:
        strength, adapter, strength_model, offset, function = (tuple(entry) + (None,) * 5)[:5]
        if not isinstance(adapter, LoRAAdapter) or function is not None or strength_model != 1.0:
            return None
        up, down, alpha, mid, dora_scale, reshape = adapter.weights
        if mid is not None or dora_scale is not None or reshape is not None or up.dim() != 2 or down.dim() != 2:
            return None
        rows = None
        if offset is not None:
            if offset[0] != 0:
                return None
            rows = (int(offset[1]), int(offset[2]))
            if up.shape[0] != rows[1]:
                return None
        elif up.shape[0] != out_features:
            return None
        if strength == 0.0:
            continue
        scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        terms.append(LowRankTerm(down, up, scale, rows))
    return terms


class _Int8Weight:
    """What an INT8-capable layer of our ops shares (mixed into comfy.ops.manual_cast layers): the
    stored weight is either float (behaves exactly like ComfyUI's layer) or int8 codes with their
    `weight_scale`, group size and `comfy_quant` JSON (kept as a buffer, so saving, ModelPatcher key
    lookups and merges see it; compute reads `self.quant`)."""

    def _init_placeholders(self, device, dtype):
        # Placeholders until the state dict arrives: a quantized layer never allocates a float weight.
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.register_parameter("weight_scale", None)
        self.register_buffer("comfy_quant", None)
        self._init_device, self._init_dtype = device, dtype
        self.group_size = None
        self.quant = None            # LayerQuant of a quantized layer
        self._lowrank = ()           # low-rank LoRA terms (set by Int8ModelPatcher)
        self._lvp_cache = None       # (weight_function identity, terms) for lowvram patches
        self._pack = PrepackCache()

    def __setattr__(self, name, value):
        if name == "weight" and "_pack" in self.__dict__:
            # A (re)assignment of the weight (load, set_weight, ModelPatcher's unpatch) ends the LoRA
            # terms of the previous patch set. The CPU pack stays only where the codes are unchanged:
            # unpatching gives back the very tensor it was built from (same storage, view, version), and
            # a dense patch (set_weight) leaves the codes in ModelPatcher's backup for that unpatch.
            # Anything else (a load, a new Parameter, other codes) drops it.
            if not (self.__dict__.get("_dense_patching") or self._pack.packed_from(value)):
                self._pack.clear()
            object.__setattr__(self, "_lowrank", ())
            object.__setattr__(self, "_lvp_cache", None)
        super().__setattr__(name, value)

    @property
    def is_quantized(self) -> bool:
        return self.weight is not None and self.weight.dtype == torch.int8

    @property
    def dense_dtype(self) -> torch.dtype:
        """dtype of a dequantized-and-patched weight: the model's dtype, else the file's original."""
        for dt in (self._init_dtype, getattr(self.quant, "orig_dtype", None)):
            if dt in _FLOAT_STORAGE:
                return dt
        return torch.bfloat16

    def _load_weight(self, state_dict, prefix, missing_keys, out_features, in_features) -> None:
        """weight (+ weight_scale, comfy_quant) from the state dict: int8 codes or a float weight."""
        ctx = _LOAD_CONTEXT.get()
        path = ctx.path if ctx else None
        device = self._init_device
        layer = pop_int8_layer(state_dict, prefix, out_features=out_features, in_features=in_features, path=path)
        if layer is not None:
            self.quant = layer.quant
            self.group_size = layer.group_size
            self.weight = torch.nn.Parameter(layer.codes.to(device=device), requires_grad=False)
            self.weight_scale = torch.nn.Parameter(layer.scale.to(device=device), requires_grad=False)
            self.comfy_quant = layer.quant.to_tensor()
            if ctx is not None:
                ctx.consumed.add(prefix + "weight")
            return
        weight = state_dict.pop(prefix + "weight", None)
        if weight is None:
            missing_keys.append(prefix + "weight")
        else:
            dtype = self._init_dtype if self._init_dtype is not None else weight.dtype
            self.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.is_quantized:
            destination[prefix + "comfy_quant"] = self.quant.to_tensor()
        else:  # a float layer, or a quantized one whose weight is dense-patched: no scale belongs to it
            destination.pop(prefix + "weight_scale", None)
            destination.pop(prefix + "comfy_quant", None)

    def _weight_fns(self) -> tuple:
        """Weight patches applied per call: ComfyUI's `weight_function` list and the single
        `weight_lowvram_function` its dynamic-VRAM patcher (0.29) sets instead. Both are honoured, so a
        LoRA is never dropped whichever patcher drives the layer."""
        lowvram = getattr(self, "weight_lowvram_function", None)
        return tuple(self.weight_function) + ((lowvram,) if lowvram is not None else ())

    def _dequantized(self, codes, scale, dtype=torch.float32):
        return kernels.dequantize_weight(codes, scale, self.group_size, dtype)

    # -- the hooks ModelPatcher uses for full-load patches ----------------------------------------

    def convert_weight(self, weight, inplace=False, **kwargs):
        """ModelPatcher hands over the stored weight cast to a float dtype: dequantize the codes."""
        if self.weight_scale is None:
            return weight
        return self._dequantized(weight, self.weight_scale.to(weight.device))

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        """Store a patched weight densely; the int8 codes stay in ModelPatcher's backup, untouched."""
        if self.weight_scale is None:  # a float layer: what ComfyUI would do
            dtype = self.weight.dtype
            if dtype in _FLOAT_STORAGE:
                weight = weight.to(dtype)
            else:
                import comfy.float
                weight = comfy.float.stochastic_rounding(weight, dtype, seed=seed)
            if return_weight:
                return weight
            if inplace_update:
                self.weight.data.copy_(weight)
            else:
                self.weight = torch.nn.Parameter(weight, requires_grad=False)
            return None
        weight = weight.to(self.dense_dtype)
        if return_weight:
            return weight
        if inplace_update:
            raise Int8ConvRotError(
                "in-place weight patching (ComfyUI hook/scheduled LoRA) is not supported on INT8 ConvRot layers",
                hint="apply the LoRA with LoraLoader / LoraLoaderModelOnly instead")
        object.__setattr__(self, "_dense_patching", True)
        try:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
        finally:
            object.__setattr__(self, "_dense_patching", False)
        return None

    def _cast_codes(self, device, bias_dtype=None):
        """codes, scale (and bias in bias_dtype) on `device` (async offload stream where ComfyUI has one)."""
        mm = comfy.model_management
        stream = None
        if self.weight.device != device and hasattr(mm, "get_offload_stream"):
            stream = mm.get_offload_stream(device)
        non_blocking = mm.device_supports_non_blocking(device)
        codes = mm.cast_to(self.weight, None, device, non_blocking=non_blocking, stream=stream)
        scale = mm.cast_to(self.weight_scale, None, device, non_blocking=non_blocking, stream=stream)
        bias = None
        if self.bias is not None and bias_dtype is not None:
            bias = mm.cast_to(self.bias, bias_dtype, device, non_blocking=non_blocking,
                              copy=len(self.bias_function) > 0, stream=stream)
        if stream is not None and hasattr(mm, "sync_stream"):
            mm.sync_stream(device, stream)
        return codes, scale, bias, stream

    def _uncast(self, codes, bias, handle):
        uncast = getattr(comfy.ops, "uncast_bias_weight", None)
        if uncast is not None and handle[0] is not None:
            uncast(self, codes, bias, handle)


class Int8ConvRotLinear(_Int8Weight, comfy.ops.manual_cast.Linear):
    """manual_cast.Linear that can hold an INT8 ConvRot layer (see the module docstring)."""

    compute_mode = "auto"
    # ComfyUI ≥ 0.36's comfy.ops.linear_input_act casts a non-QuantizedTensor Linear's weight itself for its
    # fp16-accumulation GEMM (fp16 CUDA activations with --fast fp16_accumulation), which would read our
    # int8 codes as plain numbers; this flag sends it to our forward instead (its "full precision" route).
    _full_precision_mm = True

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self._init_placeholders(device, dtype)
        self._bias_expected = bias

    def set_lowrank(self, terms, device=None) -> None:
        """Attach LoRA terms, kept where the LoRA was loaded and in their own dtype. The first forward
        stacks them into one down/up pair on the compute device in the compute dtype (one rounding of
        an fp32 LoRA), cached in the LowRankSet until the next patch set replaces it: the device holds
        that one copy, not the terms too. (`device`: ModelPatcher's target, unused since the stack
        follows the activations.)"""
        object.__setattr__(self, "_lowrank", LowRankSet(terms))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ctx = _LOAD_CONTEXT.get()
        device = self._init_device
        self._load_weight(state_dict, prefix, missing_keys, self.out_features, self.in_features)
        bias = state_dict.pop(prefix + "bias", None)
        if self._bias_expected:
            if bias is None:
                missing_keys.append(prefix + "bias")
            else:
                dtype = self._init_dtype if self._init_dtype in _FLOAT_STORAGE else bias.dtype
                self.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        elif bias is not None:
            unexpected_keys.append(prefix + "bias")
        for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
            unexpected_keys.append(key)
        if ctx is not None and ctx.on_layer is not None:
            ctx.on_layer()

    # -- forward ---------------------------------------------------------------------------------

    def _cast_to(self, x):
        codes, scale, bias, stream = self._cast_codes(x.device, x.dtype)
        bias_a = bias
        for f in self.bias_function:
            bias = f(bias)
        return codes, scale, bias, (stream, codes, bias_a)

    def _lowvram_lowrank(self):
        """Low-rank terms for lowvram LowVramPatch functions, or None if a function needs the dense path.

        Cached while the same function objects see the same patch lists (identity and length: a
        ModelPatcher appends to its lists in place); the cache holds the objects, so no id is reused."""
        fns = self._weight_fns()
        lists = tuple(getattr(f, "patches", {}).get(getattr(f, "key", None)) for f in fns)
        lens = tuple(len(p) if p is not None else -1 for p in lists)
        c = self._lvp_cache
        if (c is not None and len(c[0]) == len(fns) and all(a is b for a, b in zip(c[0], fns))
                and all(a is b for a, b in zip(c[1], lists)) and c[2] == lens):
            return c[3]
        terms = []
        for f, patches in zip(fns, lists):
            t = lowrank_terms(patches, self.out_features) if isinstance(f, comfy.model_patcher.LowVramPatch) \
                else None
            if t is None:
                terms = None
                break
            terms.extend(t)
        terms = None if terms is None else LowRankSet(terms, keep=False)   # offloaded: no device copies kept
        object.__setattr__(self, "_lvp_cache", (fns, lists, lens, terms))
        return terms

    def forward(self, input, *args, **kwargs):
        if self.weight is None:
            raise Int8ConvRotError(f"Linear({self.in_features}, {self.out_features}) has no weight: the file lacks "
                                   "this layer", hint="the file is incomplete or belongs to another model")
        if not self.is_quantized:
            _run_every_op()
            return self.forward_comfy_cast_weights(input, *args, **kwargs)
        _run_every_op()
        codes, scale, bias, handle = self._cast_to(input)
        lowrank = self._lowrank
        fns = self._weight_fns()
        if not fns and self._lvp_cache is not None:
            object.__setattr__(self, "_lvp_cache", None)   # lowvram patches were wiped: drop their references
        if fns:
            extra = self._lowvram_lowrank()
            if extra is None:  # any other weight function: the dequantized (and LoRA-patched) weight, float32
                w = self._dequantized(codes, scale)
                for t in lowrank:   # functions see the patched weight, as with ComfyUI's own layers
                    w += t.delta(self.out_features).to(w.device)
                for f in fns:
                    w = f(w)
                y = F.linear(input, w.to(input.dtype), bias)
                self._uncast(codes, bias, handle)
                return y
            lowrank = join_lowrank(lowrank, extra)
        y = int8_forward(input, codes, scale, bias, self.group_size, self.compute_mode,
                         self._pack if codes is self.weight else None, lowrank)
        self._uncast(codes, bias, handle)
        return y

    def extra_repr(self) -> str:
        q = f", int8 group_size={self.group_size}, mode={self.compute_mode}" if self.is_quantized else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{q}"


class Int8ConvRotEmbedding(_Int8Weight, comfy.ops.manual_cast.Embedding):
    """manual_cast.Embedding that can hold an INT8 ConvRot table (ctq quantizes Qwen3's
    `embed_tokens` with the seed's text-encoder recipe): a lookup gathers and dequantizes only the
    looked-up rows (`kernels.embedding_lookup`); memory stays one byte per value. A float table
    behaves exactly like ComfyUI's Embedding. Patches on the table (LoRA, merges) take the dense
    path: full loads through convert_weight/set_weight, lowvram weight functions per call."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None):
        torch.nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        self._init_placeholders(device, dtype)
        if _weight is not None:
            self.weight = torch.nn.Parameter(_weight, requires_grad=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._load_weight(state_dict, prefix, missing_keys, self.num_embeddings, self.embedding_dim)
        for key in [k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]]:
            unexpected_keys.append(key)

    def forward(self, input, *args, out_dtype=None, **kwargs):
        if self.weight is None:
            raise Int8ConvRotError(f"Embedding({self.num_embeddings}, {self.embedding_dim}) has no weight: the file "
                                   "lacks this table", hint="the file is incomplete or belongs to another model")
        if not self.is_quantized:
            return super().forward(input, *args, out_dtype=out_dtype, **kwargs)
        _run_every_op()
        dtype = out_dtype if out_dtype is not None else self.dense_dtype
        fns = self._weight_fns()
        if fns or self.max_norm is not None:
            # Patched table (lowvram LoRA/merge) or renormalisation: the dense table, as ComfyUI does.
            codes, scale, _, stream = self._cast_codes(input.device)
            w = self._dequantized(codes, scale)
            for f in fns:
                w = f(w)
            self._uncast(codes, None, (stream, codes, None))
            return F.embedding(input, w, self.padding_idx, self.max_norm, self.norm_type).to(dtype)
        # The gather runs where the table lives (offloaded: on the CPU) and only those rows travel.
        return kernels.embedding_lookup(input, self.weight, self.weight_scale, self.group_size, dtype)

    def extra_repr(self) -> str:
        q = f", int8 group_size={self.group_size}" if self.is_quantized else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{q}"


def make_ops(mode: str = "auto"):
    """A fresh operations class whose quantized Linears compute in `mode` (auto | w8a8 | w8a16)."""
    if mode not in kernels.MODES:
        raise ValueError(f"unknown INT8 compute mode {mode!r}; choose one of {kernels.MODES}")

    class Int8ConvRotOps(comfy.ops.manual_cast):
        class Linear(Int8ConvRotLinear):
            compute_mode = mode

        class Embedding(Int8ConvRotEmbedding):
            pass

    Int8ConvRotOps.__name__ = Int8ConvRotOps.__qualname__ = f"Int8ConvRotOps_{mode}"
    return Int8ConvRotOps


class Int8ModelPatcher(comfy.model_patcher.ModelPatcher):
    """ModelPatcher that applies plain LoRA patches to INT8 ConvRot layers as low-rank terms.

    Only `patch_weight_to_device` differs, and only for quantized Linear weights whose patches are
    all plain LoRAs: the codes go to `backup` by reference (as ModelPatcher does for non in-place
    updates) and the terms go to the layer. When `force_patch_weights` is asked (saving a model),
    the patches are folded into a dense weight instead so that the saved state dict carries them.
    """

    _fold_patches = False

    @classmethod
    def adopt(cls, patcher: comfy.model_patcher.ModelPatcher) -> "Int8ModelPatcher":
        """Take over a freshly built ModelPatcher (same model, options and state) as this class."""
        if isinstance(patcher, cls):
            return patcher
        n = cls(patcher.model, patcher.load_device, patcher.offload_device, patcher.model_size(),
                weight_inplace_update=patcher.weight_inplace_update)
        n.__dict__.update(patcher.__dict__)
        return n

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        self._fold_patches = force_patch_weights
        try:
            return super().load(device_to, lowvram_model_memory=lowvram_model_memory,
                                force_patch_weights=force_patch_weights, full_load=full_load)
        finally:
            self._fold_patches = False

    def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
        self._fold_patches = force_patch_weights
        try:
            return super().partially_unload(device_to, memory_to_free=memory_to_free,
                                            force_patch_weights=force_patch_weights)
        finally:
            self._fold_patches = False

    def detach(self, unpatch_all=True):
        # unpatch_all: ComfyUI unloads the model to free memory (model_unload, unload_all_models); a
        # LoRA change detaches the previous patcher with unpatch_all=False and keeps the packs.
        model = super().detach(unpatch_all)
        if unpatch_all:
            drop_packs(self.model)
        return model

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
        # kwargs: 0.29+ adds return_weight (the patched weight for saving, nothing stored or backed up)
        # and force_cast; both go to ComfyUI's own path, which folds our patches densely.
        if key in self.patches and key.endswith(".weight") and not self._fold_patches \
                and not kwargs.get("return_weight"):
            module = comfy.utils.get_attr(self.model, key[: -len(".weight")])
            if isinstance(module, Int8ConvRotLinear) and module.is_quantized:
                terms = lowrank_terms(self.patches[key], module.out_features)
                if terms is not None:
                    if key not in self.backup:
                        self.backup[key] = _Backup(module.weight, False)
                    module.set_lowrank(terms, device_to)
                    return
        return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update, **kwargs)

    def model_state_dict_for_saving(self, model=None, prefix=""):
        """The state dict ComfyUI 0.29+ saves (save_checkpoint loads the model without force_patch_weights,
        then reads this): a quantized layer with patches is saved as its folded dense weight (no scale, no
        comfy_quant), computed lazily when the file is written; an unpatched one keeps its int8 codes.
        ComfyUI's own lazy cast would wrap the int8 codes in a Parameter (impossible for integers) and
        would save codes with the LoRA left out, as our patches live beside the codes."""
        model = self.model if model is None else model
        ours = [(n, m) for n, m in model.named_modules() if isinstance(m, _Int8Weight) and m.is_quantized]
        marked = []
        for _, m in ours:   # ComfyUI leaves modules it sees as patched alone: ours are handled below
            if getattr(m, "comfy_patched_weights", False) is not True:
                marked.append((m, m.__dict__.get("comfy_patched_weights", _MISSING)))
                m.comfy_patched_weights = True
        try:
            sd = super().model_state_dict_for_saving(model, prefix)
        finally:
            for m, old in marked:
                if old is _MISSING:
                    del m.comfy_patched_weights
                else:
                    m.comfy_patched_weights = old
        was_marked = {id(m) for m, _ in marked}
        for name, m in ours:
            key = f"{name}.weight" if name else "weight"
            if prefix + key in self.patches:
                sd[key] = comfy.model_patcher.LazyCastingParam(
                    self, prefix + key, torch.empty(m.weight.shape, dtype=m.dense_dtype, device="meta"))
                for extra in ("weight_scale", "comfy_quant"):
                    sd.pop(key[: -len("weight")] + extra, None)
            bias_key = key[: -len("weight")] + "bias"
            if id(m) in was_marked and prefix + bias_key in self.patches and bias_key in sd:
                sd[bias_key] = self.patch_weight_to_device(prefix + bias_key, device_to=self.load_device,
                                                           return_weight=True)
        return sd


def drop_packs(model: torch.nn.Module) -> int:
    """Free every CPU packed copy in `model` (ComfyUI frees the model's memory; the next CPU forward
    re-packs); returns how many there were."""
    n = 0
    for m in model.modules():
        if isinstance(m, _Int8Weight):
            n += m._pack.is_packed
            m._pack.clear()
    return n


def count_quantized(model: torch.nn.Module) -> tuple[int, int]:
    """(quantized layers, all INT8-capable layers of our ops: Linear and Embedding) in a model."""
    q = n = 0
    for m in model.modules():
        if isinstance(m, _Int8Weight):
            n += 1
            q += m.is_quantized
    return q, n


__all__ = ["Int8ConvRotEmbedding", "Int8ConvRotLinear", "Int8ModelPatcher", "count_quantized", "drop_packs",
           "load_context", "lowrank_terms", "make_ops"]
