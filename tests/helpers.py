"""Test helpers shared by every test file (fixtures live in conftest.py).

* ``backend_device_params(op)`` yields one pytest param per (backend, device) that can run
  the op here, with ids like ``native-cpu`` and marks ``cuda`` / ``triton_interpreter``.
* ``assert_close(name, actual, expected, tolerance)`` compares with an ``(atol, rtol)`` pair
  taken from the calling file's own tolerance table (``tolerance_for`` looks it up by
  backend, device and dtype) and prints a diff that says where; ``scale=`` makes atol
  relative to the magnitude of the terms each entry sums (``soft_mask_term_scales``);
  ``assert_equal`` is exact (indices, masks, copied values). ``tests/error_survey.py``
  measures the errors the tables are set from.
* Input builders: tie-free keep scores, ragged keep indices, KV layers, q/k/v, padding masks
  and non-contiguous copies.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from glimpse_ops._backend import REGISTRY
from glimpse_ops.reference import keep_index_reference

REPO_ROOT = Path(__file__).resolve().parent.parent
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
Tolerance = tuple[float, float]


def backend_device_params(op: str) -> list:
    params = []
    for device in DEVICES:
        for backend in REGISTRY[op].available(device):
            marks = []
            if device == "cuda":
                marks.append(pytest.mark.cuda)
            if backend == "triton" and device == "cpu":
                marks.append(pytest.mark.triton_interpreter)
            params.append(pytest.param((backend, device), id=f"{backend}-{device}", marks=marks))
    return params


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The Triton interpreter's bf16 dot is unreliable: fp32/fp16 only there."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16]


def tolerance_for(table: dict[str, dict[torch.dtype, Tolerance]], bd: tuple[str, str], dtype: torch.dtype) -> Tolerance:
    """``table[f"{backend}-{device}"][dtype]``: a test file's tolerance table keyed like the
    (backend, device) param ids. A missing entry is an error, never a default: measure the
    new backend with tests/error_survey.py and add it."""
    key = f"{bd[0]}-{bd[1]}"
    if dtype not in table.get(key, {}):
        raise KeyError(f"no tolerance for {key} {dtype}: measure it with tests/error_survey.py and add it")
    return table[key][dtype]


def assert_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerance: Tolerance,
    *,
    scale: torch.Tensor | float | None = None,
    floor: float = 0.0,
) -> None:
    """|actual - expected| <= atol * scale + rtol * |expected| elementwise (same-signed
    infinities and NaNs in the same places count as equal), with a diff that says where.
    ``scale`` (default 1): a number, or a tensor broadcastable to ``expected`` holding the
    magnitude of the terms each entry sums (``soft_mask_term_scales``): an entry that is small
    by cancellation still carries the rounding error of its terms. A result in a floating
    dtype is also allowed the spacing of that dtype's subnormals (fp16: 6e-8): rounding a tiny
    entry into it is an absolute error no relative bound covers. ``floor``: a further absolute
    allowance the caller derives (e.g. for sums of terms rounded into subnormals)."""
    atol, rtol = tolerance
    subnormal_spacing = (
        torch.finfo(actual.dtype).smallest_normal * torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    )
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is not None:
        atol = atol * (scale.detach().cpu().double() if isinstance(scale, torch.Tensor) else float(scale))
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) == torch.sign(expected))
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    diff = torch.where(both_inf | (torch.isnan(actual) & torch.isnan(expected)), 0.0, (actual - expected).abs())
    bound = atol + rtol * expected.abs().nan_to_num(0, 0, 0) + subnormal_spacing + floor
    bad = nan_mismatch | (diff > bound) | diff.isnan()
    if bad.any():
        where = bad.nonzero()[:5].tolist()
        atol_text = f"{atol:g}" if not isinstance(atol, torch.Tensor) else f"{tolerance[0]:g} x scale"
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (atol={atol_text}, rtol={rtol:g}); "
            f"max abs diff {diff.nan_to_num(float('inf')).max().item():.3g}; NaN mismatches {int(nan_mismatch.sum())}; "
            f"first at {where}: got {[actual[tuple(i)].item() for i in where]}, "
            f"expected {[expected[tuple(i)].item() for i in where]}"
        )


def soft_mask_term_scales(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_weight: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
) -> tuple[torch.Tensor, ...]:
    """fp64 magnitudes of the terms that soft_mask_attention's out, dq, dk, dv and dw sum: the
    same formulas as ``soft_mask_attention_backward_reference`` on absolute values (dP by
    |dO| |V|^T, dP - delta by |dP| + |delta|). Rounding error of a sum is bounded by a multiple
    of the sum of its terms' magnitudes, so ``assert_close(..., scale=T)`` holds every entry,
    however small by cancellation, to its own bound: dw entries of keys with a tiny weight
    (E = P / w is large) get theirs, and the other keys are not held to it."""
    from glimpse_ops.reference import _repeat_kv, _soft_mask_terms

    q, k, v, w, do = (t.detach().double() for t in (q, k, v, key_weight, grad_out))
    B, H, N, D = q.shape
    unweighted, weights, scale, _ = _soft_mask_terms(q, k, w, key_mask, causal, None)
    probs = weights * unweighted
    k_abs, v_abs = _repeat_kv(k, H).abs(), _repeat_kv(v, H).abs()
    d_probs = do.abs() @ v_abs.transpose(-1, -2)
    spread = d_probs + (probs * d_probs).sum(-1, keepdim=True)
    group = (B, k.shape[1], H // k.shape[1], N, D)
    out = probs @ v_abs
    dq = scale * (probs * spread) @ k_abs
    dk = (scale * (probs * spread).transpose(-1, -2) @ q.abs()).view(group).sum(2)
    dv = (probs.transpose(-1, -2) @ do.abs()).view(group).sum(2)
    dw = (unweighted * spread).sum(dim=(1, 2))
    return out, dq, dk, dv, dw


def assert_equal(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Exact equality for indices and masks."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int((actual != expected).sum())} entries differ, first at {bad}")


def random_keep_scores(batch: int, seq: int, device: str) -> torch.Tensor:
    """Tie-free fp32 scores: a random permutation per row, scaled into (0, 1)."""
    return torch.stack([torch.randperm(seq, device=device) for _ in range(batch)]).float() / seq


def non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a tensor whose last-but-one dims are strided (a sliced buffer)."""
    wide = torch.empty(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    view = wide[..., ::2] if t.dim() == 1 else wide[..., : t.shape[-1]]
    view.copy_(t)
    return view


def ragged_index(
    batch: int, seq: int, device: str, padding_side: str = "left", max_len: int | None = None
) -> torch.Tensor:
    """A keep index [B, L] int64 from rows that keep 5% .. 100% of their tokens."""
    ratios = torch.linspace(0.05, 1.0, batch)[:, None].to(device)
    keep = torch.rand(batch, seq, device=device) < ratios
    keep[:, -1] = True
    return keep_index_reference(keep, max_len, padding_side)[0]


def kv_layers(
    n_layers: int, batch: int, kv_heads: int, seq: int, dim: int, dtype: torch.dtype, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random keys and values, each [B, Hkv, S, D] of ``dtype``, one per layer."""

    def make() -> torch.Tensor:
        return torch.randn(batch, kv_heads, seq, dim, device=device).to(dtype)

    return [make() for _ in range(n_layers)], [make() for _ in range(n_layers)]


def glimpse_qk(
    batch: int, heads: int, kv_heads: int, glimpses: int, seq: int, dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Glimpse queries [B, H, G, D] and keys [B, Hkv, S, D]."""
    q = torch.randn(batch, heads, glimpses, dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, device=device).to(dtype)
    return q, k


def left_padding_mask(batch: int, seq: int, device: str) -> torch.Tensor:
    """[B, S] bool: left padding of different lengths; with seq > 1 the last row is half padding."""
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    for b in range(batch):
        mask[b, : (b * seq) // max(batch - 1, 1) // 2] = False
    return mask


def attention_qkv(
    batch: int, heads: int, kv_heads: int, seq: int, dim: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, H, S, D], k and v [B, Hkv, S, D]."""

    def make(h: int) -> torch.Tensor:
        return torch.randn(batch, h, seq, dim, device=device).to(dtype)

    return make(heads), make(kv_heads), make(kv_heads)


def centered_predictor(model, predictor, inputs: dict, image_token_id: int | None = None):
    """A trained-mode GlimpsePredictor (changed in place) whose output bias is moved so that
    about half of ``inputs``' visual tokens have sigmoid > 0.5 (a random VIP puts them all on
    one side of the release's default threshold). Needs transformers."""
    from glimpse_ops import hf
    from glimpse_ops.hf import testing

    image_token_id = testing.IMAGE if image_token_id is None else image_token_id
    with hf.pruned(model, predictor=predictor, fixed_keep_ratio=1.0) as handle:
        with torch.no_grad():
            model(**inputs)
        probs = handle.last_scores[inputs["input_ids"] == image_token_id]
    # the threshold midway (in logits) between the two middle tokens, not on one of them: a
    # token exactly at the threshold would flip on rounding noise (a different summation order)
    middle = torch.logit(probs.double().sort().values[[len(probs) // 2 - 1, len(probs) // 2]])
    with torch.no_grad():
        predictor.vip.attn_out_projs[-1].bias -= middle.mean().float()
    return predictor


def _pruned_masks(kept_prompt: torch.Tensor, valid: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, 1, T, T] for layers 0..K and for layers K+1.. (True: may attend)."""
    B, T = valid.shape
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    kept = valid.clone()
    kept[:, :prompt_len] &= kept_prompt
    query_is_prompt = (torch.arange(T) < prompt_len)[None, :, None]
    early = causal & torch.where(query_is_prompt, valid[:, None, :], kept[:, None, :])
    late = causal & kept[:, None, :]
    eye = torch.eye(T, dtype=torch.bool)  # dropped and padding rows see themselves (finite, unused)
    return (early | eye)[:, None], (late | eye)[:, None]


def recompute_pruned(model, x: dict, sequences: torch.Tensor, kept_prompt: torch.Tensor, K: int) -> torch.Tensor:
    """Logits [B, T, V] of the stock HF model over ``sequences`` (prompt + generated, no cache)
    with per-layer masks that say what a model pruned after layer K attends to: in layers
    0..K prompt tokens see the whole prompt and later tokens the kept prompt tokens
    (``kept_prompt`` bool [B, prompt_len]) and the generated ones; in layers K+1.. every
    token sees only those. Positions (and DeepStack injections) are the original ones."""
    from glimpse_ops import hf
    from glimpse_ops.hf import testing

    prompt_len = x["input_ids"].shape[1]
    grown = sequences.shape[1] - prompt_len
    valid = torch.cat([x["attention_mask"].bool(), torch.ones(len(sequences), grown, dtype=torch.bool)], dim=1)
    early, late = _pruned_masks(kept_prompt, valid, prompt_len)
    layers = hf.adapters.adapter_for(model).layers

    def use(mask):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs

        return hook

    hooks = [layer.register_forward_pre_hook(use(early if i <= K else late), with_kwargs=True)
             for i, layer in enumerate(layers)]  # fmt: skip
    try:
        inputs = dict(x, input_ids=sequences, attention_mask=valid.long())
        if "mm_token_type_ids" in x:  # the processor's types: 1 image, 2 video
            inputs["mm_token_type_ids"] = (sequences == testing.IMAGE).long() + 2 * (sequences == testing.VIDEO).long()
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits
    finally:
        for hook in hooks:
            hook.remove()
