"""Which layers' keys 2-bit KIVI should widen: a per-model measure of key-quantization sensitivity.

At 2 bits most layers of a model tolerate quantized keys, but a few do not: on the embedded
SmolLM2-135M, quantizing layer 18's keys alone turns the needle's answer 89920 into 8920 while any
other single layer costs almost nothing (``benchmarks/results/quant_2bit.md``). Retrieval is copying
from the context, so the measure is copying:

1. :func:`measure` takes ``probes`` windows of real text (the King James Bible haystack by default),
   each ``context`` tokens long, with ``span`` tokens drawn at random from the window inserted into
   it (at depths spread over the probes), and appends a second copy of that random span. Nothing but
   the first copy predicts the second, so the model has to read the context's keys to predict it.
   (Copying a span of the text itself gave a far weaker signal: language predicts much of it.)
2. For every layer alone, the context's keys of that layer are quantized as KIVI would store them
   (values kept at 8 bits, so only the keys are tested), and the copy is teacher-forced over the
   cache. The sensitivity of the layer is the mean increase of the copy's negative log-likelihood
   (nats per token) over the exact cache.
3. :func:`ensure_sensitivity` caches the result per model fingerprint and quantization setting under
   the calibration folder (``calibration.calibration_dir``) as JSON, measuring it first - logging
   that it does - when nothing valid is cached.

``slimkv calibrate kivi`` measures again with other settings.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ...cache import QuantizedLayer, QuantSpec, SlimCache
from ...errors import InputError
from ..base import ModelAccess

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what is measured changes, so old files are measured again
DEFAULT_TEXT = "bible"
DEFAULT_CONTEXT = 768
DEFAULT_SPAN = 32
DEFAULT_PROBES = 4


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer cost of quantizing one layer's keys alone.

    nll_increase: [layers] mean increase of the copy's negative log-likelihood, nats per token
    base_nll: the copy's negative log-likelihood with the exact cache
    model: fingerprint of the model; key: the quantization setting measured (``setting_key``)
    """

    nll_increase: list[float]
    base_nll: float
    model: str
    key: str
    text: str
    probes: int

    def most_sensitive(self, count: int) -> list[int]:
        """The ``count`` layers whose keys cost the most when quantized, most costly first."""
        order = sorted(range(len(self.nll_increase)), key=lambda i: -self.nll_increase[i])
        return order[:count]


def setting_key(spec: QuantSpec) -> str:
    return f"b{spec.kbits}g{spec.group}s{spec.sinks}r{int(spec.rotate)}"


def sensitivity_path(fingerprint: str, spec: QuantSpec) -> Path:
    from ..calibration import calibration_dir

    return calibration_dir() / f"kivi-{fingerprint}-{setting_key(spec)}.json"


def _probe_ids(tokenizer, text: str, probes: int, context: int, span: int) -> list[tuple[list[int], list[int]]]:
    """``probes`` (context, copy) pairs from consecutive windows of ``text``.

    Each copy is ``span`` tokens drawn at random (seeded) from its window, so it cannot be predicted
    from language alone; it is inserted into the window at a depth spread over the probes, and the
    window is cut back to ``context`` tokens.
    """
    from ..calibration import calibration_ids

    if span < 4 or context < 2 * span:
        raise InputError(f"kivi calibration needs span >= 4 and context >= 2 x span, got {span} and {context}")
    ids = calibration_ids(tokenizer, text, probes * context)
    if len(ids) < probes * context:
        raise InputError(f"calibration text {text!r} holds {len(ids)} tokens; {probes * context} are needed")
    gen = torch.Generator().manual_seed(0)
    out = []
    for p in range(probes):
        window = ids[p * context : (p + 1) * context]
        copy = [window[i] for i in torch.randperm(context, generator=gen)[:span].tolist()]
        at = int((p + 1) / (probes + 1) * (context - span))
        out.append((window[:at] + copy + window[at : context - span], copy))
    return out


def _copy_nll(model: ModelAccess, cache: SlimCache, copy: list[int]) -> float:
    """Teacher-force ``copy`` over ``cache`` (which it extends); mean NLL of its tokens after the first."""
    logits = model.extend(cache, copy, all_logits=True)
    logp = logits[0, :-1].float().log_softmax(-1)  # [span - 1, vocab]
    target = torch.tensor(copy[1:], device=logp.device)[:, None]
    return float(-logp.gather(1, target).mean())


@torch.inference_mode()
def measure(model: ModelAccess, spec: QuantSpec, text: str = DEFAULT_TEXT, probes: int = DEFAULT_PROBES,
            context: int = DEFAULT_CONTEXT, span: int = DEFAULT_SPAN) -> Sensitivity:
    """Key-quantization sensitivity of every layer of ``model`` (see the module docstring)."""
    adapter = model.adapter
    layers = adapter.spec.layers
    context = min(context, adapter.max_positions - span - 1)
    keys_only = QuantSpec(bits=8, key_bits=spec.kbits, group=spec.group, sinks=spec.sinks, rotate=spec.rotate)
    increase = [0.0] * layers
    base_total = 0.0
    pairs = _probe_ids(model.tokenizer, text, probes, context, span)
    for window, copy in pairs:
        cache = model.new_cache()
        model.prefill(cache, window)
        trial = cache.clone()
        base = _copy_nll(model, trial, copy)
        base_total += base
        for i in range(layers):
            trial = cache.clone()
            trial.layers[i] = QuantizedLayer.from_layer(cache.layers[i], keys_only)  # type: ignore[arg-type]
            increase[i] += _copy_nll(model, trial, copy) - base
    n = len(pairs)
    return Sensitivity([x / n for x in increase], base_total / n, adapter.fingerprint(), setting_key(spec),
                       str(text), n)


def save(result: Sensitivity, spec: QuantSpec) -> Path:
    """Write the measurement atomically; returns its path."""
    from ..calibration import write_atomically

    path = sensitivity_path(result.model, spec)
    text = json.dumps({"format": FORMAT, **result.__dict__}, indent=1)
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))
    return path


def load(fingerprint: str, spec: QuantSpec, layers: int) -> Sensitivity | None:
    """A valid cached measurement for this model and setting, or None."""
    path = sensitivity_path(fingerprint, spec)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.warning("cached kivi layer sensitivity %s is unreadable; measuring it again", path)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    data.pop("format")
    try:
        result = Sensitivity(**data)
    except TypeError:
        log.warning("cached kivi layer sensitivity %s is malformed; measuring it again", path)
        return None
    valid = (result.model == fingerprint and result.key == setting_key(spec)
             and len(result.nll_increase) == layers
             and all(isinstance(x, (int, float)) for x in result.nll_increase))
    if not valid:
        log.warning("cached kivi layer sensitivity %s does not match this model; measuring it again", path)
        return None
    return result


def ensure_sensitivity(model: ModelAccess, spec: QuantSpec) -> Sensitivity:
    """The cached measurement for ``model``, measured (with the defaults) and cached if needed."""
    adapter = model.adapter
    found = load(adapter.fingerprint(), spec, adapter.spec.layers)
    if found is not None:
        return found
    log.info("kivi: measuring which layers' keys are most sensitive to %d-bit quantization on %d copies "
             "in %r (once per model; `slimkv calibrate kivi` redoes it)", spec.kbits, DEFAULT_PROBES, DEFAULT_TEXT)
    result = measure(model, spec)
    path = save(result, spec)
    log.info("kivi: layer sensitivity cached at %s (most sensitive: %s)", path, result.most_sensitive(3))
    return result
