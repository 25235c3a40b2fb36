"""LoRA on the language model of an HF VLM instance, through peft (the adapter GlimpsePrune+
trains in its GRPO stage): r 32, alpha 64, dropout 0.05 on every Linear of the LLM's decoder
layers by default (the official ``peft_target_modules()``: q/k/v/o and gate/up/down; not
lm_head, the ViT, the merger or the glimpse modules).

peft's ``inject_adapter_in_model`` puts the LoRA layers into the model in place, so the model
stays the plain HF instance the pruning hooks attach to (a ``PeftModel`` would wrap it). The
handle can switch the adapter off for a block (the KL reference), merge it into the base
weights (W += alpha / r * B @ A, peft's merge) and save or load it in PEFT's file format
(``adapter_config.json`` + ``adapter_model.safetensors``) with the module names of
transformers 5.x; ``read_adapter`` also maps the names transformers 4.x wrote (the official
release's) onto 5.x's.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .adapters import adapter_for

LLM_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module name
# transformers 4.x module names of the LLM -> 5.x's (the official adapter was trained on 4.51)
NAME_RULES_4_TO_5 = (
    (re.compile(r"^model\.layers\."), "model.language_model.layers."),  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    (re.compile(r"^language_model\.model\.layers\."), "model.language_model.layers."),  # LLaVA family, InternVL
)


def _require_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("glimpse_ops.hf.lora needs peft: pip install peft (or 'glimpse-ops[rl]')") from exc
    return peft


def llm_linear_names(model: nn.Module, names: tuple[str, ...] = LLM_LINEAR_NAMES) -> list[str]:
    """The full module names of the decoder layers' Linear layers whose last name is in ``names``."""
    layers = adapter_for(model).layers
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [
        name
        for name, module in model.named_modules()
        if id(module) in inside and isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
    ]


@dataclass
class LoRAHandle:
    """Returned by ``apply_lora``; ``remove()`` takes the adapter out (unmerged) and restores
    every parameter's ``requires_grad``."""

    model: nn.Module
    config: object  # peft.LoraConfig
    targets: list[str]
    frozen: list[bool] = field(default_factory=list)  # requires_grad of the model's parameters before

    def named_layers(self) -> dict[str, nn.Module]:
        """The injected LoRA layers by module name (the base Linear is each one's ``base_layer``)."""
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)}

    def layers(self) -> Iterator[nn.Module]:
        return iter(self.named_layers().values())

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.layers() for n, p in m.named_parameters() if "lora_" in n]

    def modules(self) -> nn.ModuleDict:
        """The LoRA weights as one module (what a trainer optimizes and checkpoints); keys are
        the target names with "." as "/"."""
        return nn.ModuleDict(
            {name.replace(".", "/"): nn.ModuleList([m.lora_A["default"], m.lora_B["default"]])
             for name, m in self.named_layers().items()}
        )  # fmt: skip

    @contextlib.contextmanager
    def disabled(self):
        """The base model inside the block (the adapter's output is skipped). The flag the LoRA
        layers' forward reads is set directly: peft's ``enable_adapters`` also flips
        ``requires_grad``, which must not change between a DDP forward and its backward."""
        layers = list(self.layers())
        before = [m._disable_adapters for m in layers]
        for m in layers:
            m._disable_adapters = True
        try:
            yield
        finally:
            for m, flag in zip(layers, before):
                m._disable_adapters = flag

    def state_dict(self) -> dict[str, Tensor]:
        """PEFT's file keys (``base_model.model.<module>.lora_A.weight``, 5.x names)."""
        out = {}
        for name, m in self.named_layers().items():
            out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A["default"].weight.detach().cpu().contiguous()
            out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B["default"].weight.detach().cpu().contiguous()
        return out

    def save(self, folder: str | Path) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` in ``folder`` (PEFT's format)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(folder))
        save_file(self.state_dict(), str(folder / "adapter_model.safetensors"))

    def merge(self) -> None:
        """Fold the adapter into the base weights (peft's merge) and take the LoRA layers out:
        the model is a plain HF model again, with the merged weights; the handle is spent."""
        for name, m in self.named_layers().items():
            m.merge()
            _set_submodule(self.model, name, m.get_base_layer())
        self._restore_grad()

    def remove(self) -> None:
        """Take the adapter out without merging (the model as before ``apply_lora``)."""
        for name, m in self.named_layers().items():
            if m.merged:
                m.unmerge()
            _set_submodule(self.model, name, m.get_base_layer())
        self._restore_grad()

    def _restore_grad(self) -> None:
        for p, flag in zip(self.model.parameters(), self.frozen):
            p.requires_grad_(flag)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply_lora(
    model: nn.Module,
    r: int = 32,
    alpha: int = 64,
    dropout: float = 0.05,
    target_names: tuple[str, ...] = LLM_LINEAR_NAMES,
    seed: int | None = None,
) -> LoRAHandle:
    """Inject a LoRA adapter into the LLM's Linear layers (``target_names`` among them); the
    base weights are frozen, the LoRA weights trainable (B starts at zero: the model's outputs
    are unchanged until it trains). ``seed`` seeds the A matrices' initialization."""
    peft = _require_peft()
    if r < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"glimpse_ops.hf.apply_lora: need r >= 1, alpha > 0, 0 <= dropout < 1; got {r}, {alpha}, {dropout}"
        )
    targets = llm_linear_names(model, target_names)
    if not targets:
        raise ValueError(f"glimpse_ops.hf.apply_lora: no Linear named {target_names} in the decoder layers")
    frozen = [p.requires_grad for p in model.parameters()]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    if seed is not None:
        torch.manual_seed(seed)
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    handle = LoRAHandle(model, config, targets, frozen)
    for p in handle.parameters():
        p.requires_grad_(True)
    return handle


def map_adapter_names(keys: list[str], model: nn.Module) -> dict[str, str]:
    """PEFT file keys -> this model's module names (5.x): ``base_model.model.`` stripped, the
    4.x names of ``NAME_RULES_4_TO_5`` rewritten. A KeyError names the first key that matches
    no Linear of the decoder layers."""
    wanted = set(llm_linear_names(model, tuple({n.rsplit(".", 1)[-1] for n in _module_names(keys)})))
    out = {}
    for key in keys:
        module = _module_of(key)
        mapped = module
        for pattern, replacement in NAME_RULES_4_TO_5:
            if mapped not in wanted and pattern.match(mapped):
                mapped = pattern.sub(replacement, mapped)
        if mapped not in wanted:
            raise KeyError(
                f"glimpse_ops.hf.lora: the adapter's module {module!r} is no Linear of this model's decoder layers"
            )
        out[key] = mapped
    return out


def _module_of(key: str) -> str:
    name = key.removeprefix(PREFIX)
    return re.sub(r"\.lora_[AB](\.default)?\.weight$", "", name)


def _module_names(keys: list[str]) -> list[str]:
    return sorted({_module_of(k) for k in keys})


def read_adapter(model: nn.Module, folder: str | Path, trainable: bool = False) -> LoRAHandle:
    """Load a PEFT-format LoRA adapter from ``folder`` into ``model`` (names mapped by
    ``map_adapter_names``). Refused: other PEFT types, DoRA, biases, ``modules_to_save``,
    rank/alpha patterns (this loader does not implement them)."""
    from safetensors.torch import load_file

    peft = _require_peft()
    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"glimpse_ops.hf.read_adapter: {folder} has no {name}")
    raw = json.loads((folder / "adapter_config.json").read_text())
    problems = [
        what
        for what, bad in (
            (f"peft_type {raw.get('peft_type')}", raw.get("peft_type", "LORA") != "LORA"),
            ("use_dora", bool(raw.get("use_dora"))),
            (f"bias {raw.get('bias')}", raw.get("bias", "none") != "none"),
            ("modules_to_save", bool(raw.get("modules_to_save"))),
            ("rank_pattern/alpha_pattern", bool(raw.get("rank_pattern")) or bool(raw.get("alpha_pattern"))),
        )
        if bad
    ]
    if problems:
        raise ValueError(f"glimpse_ops.hf.read_adapter: {folder}: not supported: {', '.join(problems)}")
    weights = load_file(str(folder / "adapter_model.safetensors"))
    names = map_adapter_names(list(weights), model)
    targets = sorted(set(names.values()))
    frozen = [p.requires_grad for p in model.parameters()]
    config = peft.LoraConfig(
        r=raw["r"], lora_alpha=raw["lora_alpha"], lora_dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets, bias="none", use_rslora=bool(raw.get("use_rslora")),
    )  # fmt: skip
    model.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    handle = LoRAHandle(model, config, targets, frozen)
    modules = handle.named_layers()
    with torch.no_grad():
        for key, tensor in weights.items():
            part = "lora_A" if ".lora_A." in key else "lora_B"
            target = getattr(modules[names[key]], part)["default"].weight
            if target.shape != tensor.shape:
                raise ValueError(
                    f"glimpse_ops.hf.read_adapter: {key} is {tuple(tensor.shape)}, "
                    f"the model needs {tuple(target.shape)}"
                )
            target.copy_(tensor)
    for p in handle.parameters():
        p.requires_grad_(trainable)
    return handle
