"""Find every adapter in a peft model, per (layer, module): the one module that knows peft's internals.

Both trackers call :func:`discover_adapters`. It walks ``model.named_modules()``, recognises
peft's real layer types (never attribute guesses), keeps the *active* adapter only (TRL may add a
``"ref"`` adapter) and returns one :class:`AdapterModule` per adapted module, which knows

- its coordinates: ``layer`` (transformer block index parsed from the name, ``-1`` outside the
  numbered blocks, e.g. the final norm) and ``module`` (``q_proj``, ``down_proj``, ...: the last
  name component, or the path inside the block when that would be ambiguous);
- ``components``: the trainable tensors by gradient component (``A``, ``B``, ``magnitude``,
  ``E``, ``lambda_b``, ``lambda_d``, ``ia3``, ``ln``, ``miss``). A component may hold several
  tensors (LoRA's ``B`` with ``lora_bias``, LayerNorm weight and bias): its norm is the norm of
  their concatenation;
- ``factors()``: the adapter's weight change as ``(B, A, scale)`` with ``delta_W = scale * B @ A``
  (``B``: out x k, ``A``: k x in), exactly as peft's ``get_delta_weight`` computes it;
- ``vector()`` for IA3 / LayerNorm tuning, ``magnitude()`` and ``base_weight()`` for DoRA.

Method by method (``delta_W`` is out x in, the orientation of ``nn.Linear.weight``):

- LoRA and its variants (DoRA, rsLoRA, PiSSA, MiLoRA, LoRA+, LoRA-FA): ``B = lora_B``,
  ``A = lora_A``, ``scale = layer.scaling`` (alpha/r, alpha/sqrt(r) for rsLoRA).
- AdaLoRA: ``B = lora_B``, ``A = diag(E) lora_A``, ``scale = scaling / (ranknum + 1e-5)``.
- VeRA: ``B = diag(lambda_b) vera_B[:out]``, ``A = diag(lambda_d) vera_A[:, :in]``, scale 1.
- MiSS (default and ``"mini"`` init): ``B = miss_block^T`` (repeated for mini), ``A`` = the r x in
  matrix of stacked identities that sums the input in blocks of r; scale 1. MiSS ``"bat"`` has no
  low-rank form: ``dense_delta()`` builds it with peft's ``get_delta_weight`` (O(out*in) memory).
- HRA: ``W' = W0 H`` with ``H = H_1 ... H_r`` the product of the Householder reflections
  ``H_i = I - 2 u_i u_i^T / |u_i|^2`` (peft's order), so ``delta_W = W0 (H - I)``. ``H - I`` vanishes
  on the complement of span(u), so with ``Q`` an orthonormal basis of span(u) (in x r, from QR)
  ``delta_W = [W0 (H Q - Q)] Q^T``: ``B = W0 (H Q - Q)`` (out x r), ``A = Q^T``, scale 1, rank <= r.
  ``H Q`` applies the r reflections to Q (O(in r^2)); all in float64, because ``H Q - Q`` cancels.
  peft's ``apply_GS`` variant is one reflection across span(u): ``B = -2 W0 Q``, ``A = Q^T``.
- SliceFine (:mod:`perl.adapters.slicefine`): column slice ``B = T - W0[:, p:p+r]``, ``A`` = rows
  p..p+r-1 of the identity; row slice ``B`` = columns p..p+r-1 of the identity, ``A = T - W0[p:p+r]``.
- IA3, LayerNorm tuning: vectors, no factors.

Full fine-tuning has no adapter: :func:`discover_full_weights` returns the weights of the
modules that ``target_modules`` names (kind ``"full"``, component ``weight``), so that the trackers
follow the same modules as they would for an adapter; their change since init is measured densely
by the spectral tracker, which keeps ``W0``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from . import sharding
from .sharding import resolve as _r

__all__ = [
    "AdapterModule",
    "discover_adapters",
    "discover_full_weights",
    "active_adapter_name",
    "peft_config_of",
    "select_layers",
    "DiscoveryError",
    "materialized",
    "parameters_to_gather",
    "walk",
]

# kinds, in the order they are tested (AdaLoraLayer subclasses LoraLayer: test it first)
KINDS = ("adalora", "lora", "vera", "ia3", "ln_tuning", "miss", "hra", "slicefine")
#: kinds whose weight change has a factored low-rank form (``factors()``), MiSS "bat" aside
FACTORED_KINDS = ("lora", "adalora", "vera", "miss", "hra", "slicefine")


class DiscoveryError(ValueError):
    """The model holds no adapter the trackers understand."""


@dataclass
class AdapterModule:
    """One adapted module of the active adapter.

    Attributes:
        name (str): module path without peft's wrapper prefix, e.g. ``model.layers.0.self_attn.q_proj``.
        layer (int): transformer block index; -1 for modules outside the numbered blocks.
        module (str): module type within a block, e.g. ``q_proj``.
        kind (str): ``lora``, ``adalora``, ``vera``, ``ia3``, ``ln_tuning``, ``miss``, ``hra``, ``slicefine``,
            or ``full`` (a plain weight of full fine-tuning, from :func:`discover_full_weights`).
        adapter (str): the adapter name (``default`` unless configured otherwise).
        peft_module (nn.Module): the peft layer itself.
        rank (int | None): the configured rank r (None for vector methods).
        components (dict[str, list[torch.Tensor]]): trainable tensors by gradient component.
        is_dora (bool): LoRA layer with a DoRA magnitude vector.
    """

    name: str
    layer: int
    module: str
    kind: str
    adapter: str
    peft_module: nn.Module
    rank: int | None = None
    components: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    is_dora: bool = False
    _block_sum: torch.Tensor | None = field(default=None, repr=False)
    # copies of factors() / vector() / dense_delta() gathered by `materialized` (sharded parameters)
    _cache: dict | None = field(default=None, repr=False)

    # ---------------------------------------------------------------- sharded parameters
    def adapter_parameters(self) -> list[torch.Tensor]:
        """Every parameter of the peft layer except its base layer's (factors, magnitude, AdaLoRA's ranknum)."""
        return [p for n, p in self.peft_module.named_parameters() if not n.startswith("base_layer.")]

    def base_parameters(self) -> list[torch.Tensor]:
        """The frozen base layer's parameters (W0; dense: gather one module at a time). None for
        full fine-tuning, whose weight is the trained parameter itself."""
        if self.kind == "full":
            return []
        return list(self.peft_module.get_base_layer().parameters())

    @property
    def needs_base(self) -> bool:
        """Whether the weight change is read through the base weight W0 (HRA's ``W0 (H - I)``, MiSS
        "bat"; SliceFine keeps its own copy of W0's slice): gathered with the factors when sharded."""
        return self.kind == "hra" or (self.kind == "miss" and not self.has_factors)

    def weight(self) -> torch.Tensor:
        """Full fine-tuning: the trained weight as out x in, detached (gathered when sharded)."""
        w = _r(self.peft_module.weight).detach()
        return w.reshape(w.shape[0], -1)

    # ---------------------------------------------------------------- factored weight change
    @property
    def has_factors(self) -> bool:
        """True when ``factors()`` gives the weight change in low-rank form."""
        if self.kind == "miss":
            return self.peft_module.miss_fn != "bat"
        return self.kind in ("lora", "adalora", "vera", "hra", "slicefine")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B, A, scale)`` with ``delta_W = scale * B @ A`` for the current weights (detached views)."""
        if self._cache is not None and "factors" in self._cache:
            return self._cache["factors"]
        m, ad = self.peft_module, self.adapter
        if self.kind == "lora":
            if ad in m.lora_A:
                a, b = _r(m.lora_A[ad].weight), _r(m.lora_B[ad].weight)
                return b.detach().reshape(b.shape[0], -1), a.detach().reshape(a.shape[0], -1), float(m.scaling[ad])
            # embedding LoRA: delta = (lora_embedding_A^T lora_embedding_B^T) in (vocab x dim)
            a, b = _r(m.lora_embedding_A[ad]), _r(m.lora_embedding_B[ad])
            return a.detach().T, b.detach().T, float(m.scaling[ad])
        if self.kind == "adalora":
            scale = float(m.scaling[ad]) / (float(_r(m.ranknum[ad])) + 1e-5)
            return _r(m.lora_B[ad]).detach(), (_r(m.lora_A[ad]) * _r(m.lora_E[ad])).detach(), scale
        if self.kind == "vera":
            lb, ld = _r(m.vera_lambda_b[ad]).detach(), _r(m.vera_lambda_d[ad]).detach()
            b = lb.unsqueeze(-1) * m.vera_B[ad][: m.out_features, :].to(lb.device)
            a = ld.unsqueeze(-1) * m.vera_A[ad][:, : m.in_features].to(ld.device)
            return b, a, 1.0
        if self.kind == "miss" and self.has_factors:
            block = _r(m.miss_block[ad]).detach()
            if m.miss_fn == "mini":
                block = block.repeat(1, m.out_features // m.miss_mini_r[ad])
            return block.T, self._miss_block_sum(block), 1.0
        if self.kind == "hra":
            return self._hra_factors()
        if self.kind == "slicefine":
            change = m.slice_change(ad, read=_r).detach()
            start, width = m.slicefine_start[ad], m.slicefine_r[ad]
            n = m.in_features if m.slicefine_mode[ad] == "column" else m.out_features
            select = torch.eye(n, dtype=change.dtype, device=change.device)[start : start + width]
            if m.slicefine_mode[ad] == "column":
                return change, select, 1.0
            return select.T, change, 1.0
        raise DiscoveryError(f"{self.name} ({self.kind}) has no low-rank factors; use dense_delta() or vector().")

    def _hra_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        m, ad = self.peft_module, self.adapter
        raw = _r(m.hra_u[ad]).detach()
        u = raw.double()
        u = u / u.norm(dim=0)
        q = torch.linalg.qr(u).Q
        if m.hra_apply_GS[ad]:
            # peft's Gram-Schmidt variant: H = I - 2 Q Q^T (Q spans u; QR's Q equals Gram-Schmidt's up to signs)
            return -2.0 * (self.base_weight().double() @ q), q.T, 1.0
        hq = q
        # note: H = H_1 H_2 ... H_r (peft multiplies on the right), so H_r acts on Q first
        i = u.shape[1] - 1
        while i >= 0:
            if i >= 1 and torch.equal(raw[:, i], raw[:, i - 1]):
                # two equal reflections are exactly I (peft's init pairs them): skip, so that the
                # change at init is exactly 0 instead of rounding noise with noise "ranks"
                i -= 2
                continue
            ui = u[:, i : i + 1]
            hq = hq - 2.0 * ui @ (ui.T @ hq)
            i -= 1
        return self.base_weight().double() @ (hq - q), q.T, 1.0

    def dense_delta(self) -> torch.Tensor:
        """The weight change as a dense out x in matrix, through peft's own code (costs O(out*in))."""
        if self._cache is not None and "dense_delta" in self._cache:
            return self._cache["dense_delta"]
        m, ad = self.peft_module, self.adapter
        if self.kind == "miss":
            w0 = self.base_weight()
            if m.miss_fn == "bat":
                return self._miss_bat_delta(w0)
            return (m.get_delta_weight_miss(ad, w0.clone()) - w0).detach()
        b, a, s = self.factors()
        return s * (b @ a)

    def _miss_bat_delta(self, w0: torch.Tensor) -> torch.Tensor:
        # MiSS "bat" holds one r x r matrix B_i per block row of W0 and changes each r x r block
        # W0_ij to W0_ij @ B_i + B_i (peft's get_delta_weight). Computed here from the block as read
        # by _r: peft's own code reads the parameter itself, a DTensor shard under FSDP2
        block = _r(self.peft_module.miss_block[self.adapter]).detach()  # (out / r, r, r)
        rows, r = block.shape[0], block.shape[-1]
        w0 = w0.to(block.dtype).reshape(rows, r, -1, r).transpose(1, 2)  # [i, j] = W0_ij
        delta = w0 @ block.unsqueeze(1) + block.unsqueeze(1)
        return delta.transpose(1, 2).reshape(rows * r, -1)

    def _miss_block_sum(self, block: torch.Tensor) -> torch.Tensor:
        # MiSS adds sum_j x[j*r:(j+1)*r] @ block (input zero-padded to a multiple of r): the r x in
        # matrix [I_r, I_r, ..., I_r[:, :rem]]; constant, so built once
        n_in, r = self.peft_module.in_features, block.shape[0]
        if self._block_sum is None or self._block_sum.device != block.device or self._block_sum.dtype != block.dtype:
            idx = torch.arange(n_in, device=block.device) % r
            self._block_sum = (idx.unsqueeze(0) == torch.arange(r, device=block.device).unsqueeze(1)).to(block.dtype)
        return self._block_sum

    # ---------------------------------------------------------------- vectors, DoRA
    def vector(self) -> torch.Tensor:
        """IA3 scaling vector or the LayerNorm-tuning parameters, flattened (detached)."""
        if self._cache is not None and "vector" in self._cache:
            return self._cache["vector"]
        if self.kind == "ia3":
            return _r(self.peft_module.ia3_l[self.adapter]).detach().reshape(-1)
        if self.kind == "ln_tuning":
            return torch.cat([_r(p).detach().reshape(-1) for p in self.components["ln"]])
        raise DiscoveryError(f"{self.name} ({self.kind}) is not a vector adapter.")

    def magnitude(self) -> torch.Tensor:
        """DoRA's magnitude vector m (one entry per output feature)."""
        return _r(self.peft_module.lora_magnitude_vector[self.adapter].weight).detach()

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W0 as out x in (fan_in_fan_out undone), detached."""
        base = self.peft_module.get_base_layer()
        w = _r(base.weight).detach()
        if getattr(self.peft_module, "fan_in_fan_out", False):
            w = w.T
        return w.reshape(w.shape[0], -1)


# -------------------------------------------------------------------- sharded parameters
def walk(adapters: list[AdapterModule], with_base: bool = False, compute: bool = True) -> Iterator[AdapterModule]:
    """Each adapter in turn with its parameters gathered (and its base weight with ``with_base``).

    Under ZeRO-3 / FSDP2 every rank must run the same walks in the same order (each module is a
    collective gather); ranks that only take part pass ``compute=False`` and get nothing yielded.
    Without sharding this is plain iteration (nothing yielded when ``compute`` is False).
    """
    for a in adapters:
        params = parameters_to_gather(a, with_base)
        if not sharding.any_sharded(params):
            if compute:
                yield a
            continue
        with sharding.gathered(params):
            if compute:
                yield a


def parameters_to_gather(a: AdapterModule, with_base: bool = False) -> list[torch.Tensor]:
    """What reading ``a`` needs gathered: its own parameters, and W0 when asked or when its change is
    read through W0 (the base may be partitioned while the adapter's own parameters are not yet)."""
    return a.adapter_parameters() + (a.base_parameters() if with_base or a.needs_base else [])


@contextlib.contextmanager
def materialized(adapters: list[AdapterModule], keep: bool = True) -> Iterator[None]:
    """Detached copies of each adapter's factors / vector, gathered one module at a time, read by
    ``factors()`` / ``vector()`` inside the block. A no-op for unsharded adapters.

    Every rank enters it (the gathers are collective); ranks with ``keep=False`` keep nothing.
    The copies are the adapter's size (r x (m + n) per module), never the base weights (those that
    the factors are read through, HRA's and SliceFine's, are gathered with them, one module at a time).
    Adapters without a low-rank form (full fine-tuning, MiSS "bat") are read in a `walk` instead.
    """
    if not any(sharding.any_sharded(parameters_to_gather(a)) for a in adapters):
        yield
        return
    try:
        for a in walk([a for a in adapters if a.has_factors or a.kind in ("ia3", "ln_tuning")], compute=keep):
            cache = {}
            if a.has_factors:
                b, a_, s = a.factors()
                cache["factors"] = (b.clone(), a_.clone(), s)
            elif a.kind in ("ia3", "ln_tuning"):
                cache["vector"] = a.vector().clone()
            a._cache = cache
        yield
    finally:
        for a in adapters:
            a._cache = None


# -------------------------------------------------------------------- discovery
def _layer_types():
    from peft.tuners.adalora import AdaLoraLayer
    from peft.tuners.hra import HRALayer
    from peft.tuners.ia3 import IA3Layer
    from peft.tuners.ln_tuning.layer import LNTuningLayer
    from peft.tuners.lora import LoraLayer
    from peft.tuners.miss import MissLayer
    from peft.tuners.vera import VeraLayer

    from perl.adapters.slicefine import SliceFineLayer

    return {
        "adalora": AdaLoraLayer,
        "lora": LoraLayer,
        "vera": VeraLayer,
        "ia3": IA3Layer,
        "ln_tuning": LNTuningLayer,
        "miss": MissLayer,
        "hra": HRALayer,
        "slicefine": SliceFineLayer,
    }


def peft_config_of(model: nn.Module) -> dict:
    """The ``{adapter_name: PeftConfig}`` dict of a peft model (also through DDP/accelerate wrappers)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        config = getattr(candidate, "peft_config", None)
        if isinstance(config, dict) and config:
            return config
    return {}


def active_adapter_name(model: nn.Module) -> str:
    """The adapter being trained: peft's active adapter (the first if several are active)."""
    model = getattr(model, "module", model)
    active = getattr(model, "active_adapters", None)
    if callable(active):  # some versions expose a method
        active = active()
    if isinstance(active, (list, tuple)) and active:
        return active[0]
    active = getattr(model, "active_adapter", None)
    if isinstance(active, str):
        return active
    config = peft_config_of(model)
    if config:
        return next(iter(config))
    raise DiscoveryError("The model has no peft adapter: expected a peft model (get_peft_model) to track.")


_PREFIXES = ("module.", "base_model.model.")
_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _clean_name(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _layer_and_rest(name: str) -> tuple[int, str]:
    match = _INDEX.search(name)
    if match is None:
        return -1, name.split(".")[-1]
    return int(match.group(1)), name[match.end() :]


def _components(kind: str, m: nn.Module, ad: str) -> dict[str, list[torch.Tensor]]:
    if kind == "lora":
        if ad in m.lora_A:
            comps = {"A": list(m.lora_A[ad].parameters()), "B": list(m.lora_B[ad].parameters())}
        else:
            comps = {"A": [m.lora_embedding_A[ad]], "B": [m.lora_embedding_B[ad]]}
        if ad in m.lora_magnitude_vector:
            comps["magnitude"] = [m.lora_magnitude_vector[ad].weight]
        return comps
    if kind == "adalora":
        return {"A": [m.lora_A[ad]], "B": [m.lora_B[ad]], "E": [m.lora_E[ad]]}
    if kind == "vera":
        return {"lambda_b": [m.vera_lambda_b[ad]], "lambda_d": [m.vera_lambda_d[ad]]}
    if kind == "ia3":
        return {"ia3": [m.ia3_l[ad]]}
    if kind == "ln_tuning":
        return {"ln": list(m.ln_tuning_layers[ad].parameters())}
    if kind == "miss":
        return {"miss": [m.miss_block[ad]]}
    if kind == "hra":
        return {"u": [m.hra_u[ad]]}
    if kind == "slicefine":
        return {"slice": [m.slicefine_slice[ad]]}
    raise AssertionError(kind)


def _holds_adapter(kind: str, m: nn.Module, ad: str) -> bool:
    if kind == "lora":
        return ad in m.lora_A or ad in m.lora_embedding_A
    attr = {
        "adalora": "lora_A",
        "vera": "vera_lambda_b",
        "ia3": "ia3_l",
        "ln_tuning": "ln_tuning_layers",
        "miss": "miss_block",
        "hra": "hra_u",
        "slicefine": "slicefine_slice",
    }[kind]
    return ad in getattr(m, attr)


def _rank(kind: str, m: nn.Module, ad: str) -> int | None:
    if kind in ("lora", "adalora", "vera"):
        return int(m.r[ad])
    if kind == "miss":
        return int(m.miss_r[ad])
    if kind == "hra":
        return int(m.hra_r[ad])
    if kind == "slicefine":
        return int(m.slicefine_r[ad])
    return None


def discover_adapters(
    model: nn.Module, adapter_name: str | None = None, max_layers_to_track: int | None = None
) -> list[AdapterModule]:
    """Every module of the active adapter, sorted by (layer, module).

    Usage:
        for am in discover_adapters(peft_model):
            print(am.layer, am.module, am.kind, {c: len(ps) for c, ps in am.components.items()})
            if am.has_factors:
                B, A, s = am.factors()

    Args:
        model (nn.Module): a peft model (``PeftModel``, the tuner model, or a DDP-wrapped one).
        adapter_name (str, optional): which adapter; default the active one.
        max_layers_to_track (int, optional): keep only this many transformer blocks, evenly
            spaced, always the first and the last (modules outside blocks are always kept).

    Raises:
        DiscoveryError: the model holds no adapter layer of a type the trackers understand.
    """
    model = getattr(model, "module", model)
    adapter = adapter_name or active_adapter_name(model)
    types = _layer_types()
    found: list[AdapterModule] = []
    for raw_name, m in model.named_modules():
        kind = next((k for k in KINDS if isinstance(m, types[k])), None)
        if kind is None or not _holds_adapter(kind, m, adapter):
            continue
        found.append(
            _module_at(
                _clean_name(raw_name),
                m,
                kind=kind,
                adapter=adapter,
                rank=_rank(kind, m, adapter),
                components=_components(kind, m, adapter),
                is_dora=kind == "lora" and adapter in m.lora_magnitude_vector,
            )
        )
    if not found:
        raise DiscoveryError(
            f"No adapter layers for adapter {adapter!r} in {type(model).__name__}: expected a peft model with "
            "LoRA/DoRA/AdaLoRA/VeRA/IA3/LN-tuning/MiSS/HRA/SliceFine layers; wrap the model with "
            "peft.get_peft_model first (for full fine-tuning use discover_full_weights)."
        )
    return _finish(found, max_layers_to_track)


def _module_at(name: str, m: nn.Module, **fields) -> AdapterModule:
    """The :class:`AdapterModule` of module path ``name``: its layer and module read from the path."""
    layer, rest = _layer_and_rest(name)
    return AdapterModule(name=name, layer=layer, module=rest, peft_module=m, **fields)


def _finish(found: list[AdapterModule], max_layers_to_track: int | None) -> list[AdapterModule]:
    _name_module_types(found)
    if max_layers_to_track is not None:
        keep = set(select_layers(sorted({a.layer for a in found if a.layer >= 0}), max_layers_to_track))
        found = [a for a in found if a.layer < 0 or a.layer in keep]
    return sorted(found, key=lambda a: (a.layer, a.name))


def discover_full_weights(
    model: nn.Module, target_modules=None, max_layers_to_track: int | None = None
) -> list[AdapterModule]:
    """The weights full fine-tuning is tracked on: every ``nn.Linear`` that ``target_modules`` names.

    The modules an adapter with the same ``target_modules`` would adapt (peft's rule: the module path
    equals a name or ends with ``.<name>``), as :class:`AdapterModule` of kind ``"full"`` with one
    component ``weight``, so that adapter runs and full runs share (layer, module) coordinates.

    Usage:
        for wm in discover_full_weights(model, ["q_proj", "v_proj"]):
            print(wm.layer, wm.module, wm.components["weight"][0].shape)

    Args:
        model (nn.Module): the model being fully fine-tuned (plain transformers model, maybe DDP-wrapped).
        target_modules (list[str] | str, optional): module names; None or ``"all-linear"`` = every
            ``nn.Linear`` except the output head.
        max_layers_to_track (int, optional): as in :func:`discover_adapters`.

    Raises:
        DiscoveryError: no ``nn.Linear`` matches.
    """
    from perl.adapters.registry import matches_target

    model = getattr(model, "module", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if target_modules is not None and list(target_modules) == ["all-linear"]:
        target_modules = None
    targets = None if target_modules is None else [str(t) for t in target_modules]
    found: list[AdapterModule] = []
    for raw_name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        name = _clean_name(raw_name)
        if targets is not None and not any(matches_target(name, t) for t in targets):
            continue
        found.append(_module_at(name, m, kind="full", adapter="", components={"weight": [m.weight]}))
    if not found:
        raise DiscoveryError(
            f"No nn.Linear of {type(model).__name__} matches target_modules {target_modules}; "
            "list the module names to track, e.g. [q_proj, v_proj]."
        )
    return _finish(found, max_layers_to_track)


def _name_module_types(found: list[AdapterModule]) -> None:
    # module type = last name component, unless two modules of one block share it (MoE experts, ...)
    last = {id(a): a.module.split(".")[-1] for a in found}
    seen: dict[tuple[int, str], int] = {}
    for a in found:
        seen[(a.layer, last[id(a)])] = seen.get((a.layer, last[id(a)]), 0) + 1
    ambiguous = any(n > 1 for n in seen.values())
    for a in found:
        if not ambiguous:
            a.module = last[id(a)]
        elif a.layer < 0:
            a.module = a.name


def select_layers(layers: list[int], k: int) -> list[int]:
    """``k`` evenly spaced entries of ``layers`` (sorted), always the first and the last.

    Args:
        layers (list[int]): the available block indices, sorted.
        k (int): how many to keep (>= 1); all when k >= len(layers).
    """
    if k is None or k >= len(layers):
        return list(layers)
    if k < 1:
        raise ValueError(f"max_layers_to_track must be a positive integer or None, got {k}.")
    if k == 1:
        return [layers[0]]
    positions = sorted({round(i * (len(layers) - 1) / (k - 1)) for i in range(k)})
    return [layers[p] for p in positions]


def _derive_peft_type(model, adapter: str) -> str:
    config = peft_config_of(model).get(adapter)
    if config is None:
        return "unknown"
    kind = str(getattr(config.peft_type, "value", config.peft_type)).lower()
    if kind == "lora":
        init = getattr(config, "init_lora_weights", True)
        if getattr(config, "use_dora", False):
            return "dora"
        if isinstance(init, str) and init.lower().startswith("pissa"):
            return "pissa"
        if getattr(config, "use_rslora", False):
            return "rslora"
    return kind


def adapter_rank(config) -> int | None:
    """The rank a peft config's run is labelled with: AdaLoRA's ``init_r`` (its ``r`` is unused), else
    ``r``; None for a config without one."""
    return getattr(config, "init_r", None) or getattr(config, "r", None)


def target_modules_of(config) -> list[str] | str | None:
    """A peft config's ``target_modules`` as a run's attrs store it: sorted names (peft keeps a set),
    a regular expression string, or None."""
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = sorted(str(t) for t in targets)
    return targets
