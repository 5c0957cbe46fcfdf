"""Driving an ONNX decoder step by step, with its key/value cache kept inside ONNX Runtime.

The decoder has the layout Hugging Face optimum and onnxruntime-genai export (see
``edgec.models.llama``): ``past_key_values.{i}.key/value`` in, ``present.{i}.key/value`` out, where
present = past + this step's keys and values. ``DecoderSession.forward`` runs one chunk of tokens
through ORT's IOBinding:

    past_key_values.*  <- the OrtValues the previous step produced (no numpy round trip)
    present.*          -> OrtValues ORT allocates; they become the next step's past
    logits             -> decode steps write straight into a preallocated numpy buffer

A cache is anything with ``length``, ``bind(io, new_tokens)`` and ``update(outputs, new_tokens)``:

    DynamicCache  the concat-style cache of plain optimum graphs: present = Concat(past, new) is one
                  position longer each step, allocated by ORT, and becomes the next step's past.
    StaticCache   for graphs whose attention is GroupQueryAttention (what the cpu target lowers
                  decoders to, see ``edgec.targets.cpu.decoder``): one preallocated buffer of
                  [1, kv_heads, max_length, head_dim] per tensor is bound as both past and present
                  (onnxruntime-genai's ``past_present_share_buffer``); GQA writes the new positions
                  in place, so a step allocates and copies nothing but ``length`` grows.

A bundle's runtime settings say which one its graph takes (``"kv_cache": "shared-buffer"``).
"""

from __future__ import annotations

import re
from typing import Callable, Protocol, Sequence

import numpy as np
import onnxruntime as ort

from edgec.errors import InputError, RuntimeFailure

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


class KVCache(Protocol):
    """What ``DecoderSession.forward`` needs from a cache."""

    length: int  #: positions already in the cache

    def bind(self, io: ort.IOBinding, new_tokens: int) -> list[str]:
        """Bind past inputs, the attention mask and present outputs; return the bound output names."""

    def update(self, outputs: dict[str, ort.OrtValue], new_tokens: int) -> None:
        """Take this step's outputs; ``length`` grows by ``new_tokens``."""


class DynamicCache:
    """past = the previous step's present OrtValues; ORT allocates a longer present each step."""

    def __init__(self, pairs: list[tuple[str, str]], kv_heads: int, head_dim: int, dtype: type) -> None:
        self.pairs = pairs  #: (past input name, present output name)
        self.length = 0
        self._empty = np.zeros((1, kv_heads, 0, head_dim), dtype)  # referenced: the OrtValues below borrow it
        empty = ort.OrtValue.ortvalue_from_numpy(self._empty)
        self.values: dict[str, ort.OrtValue] = {past: empty for past, _ in pairs}

    def bind(self, io: ort.IOBinding, new_tokens: int) -> list[str]:
        for past, present in self.pairs:
            io.bind_ortvalue_input(past, self.values[past])
            io.bind_output(present, "cpu")
        io.bind_cpu_input("attention_mask", np.ones((1, self.length + new_tokens), np.int64))
        return [present for _, present in self.pairs]

    def update(self, outputs: dict[str, ort.OrtValue], new_tokens: int) -> None:
        self.values = {past: outputs[present] for past, present in self.pairs}
        self.length += new_tokens


class StaticCache:
    """One [1, kv_heads, max_length, head_dim] buffer per cache tensor, bound as past and present alike.

    Sized once per generation (prompt + tokens to generate), so memory follows the request rather
    than the model's whole context.
    """

    def __init__(self, pairs: list[tuple[str, str]], kv_heads: int, head_dim: int, dtype: type,
                 max_length: int) -> None:
        self.pairs = pairs
        self.length = 0
        self.max_length = max_length
        # numpy owns the memory (OrtValues borrow it): freed with the cache, where buffers from ORT's
        # allocator would stay in its arena and grow it with every differently sized generation.
        self._arrays = [np.zeros((1, kv_heads, max_length, head_dim), dtype) for _ in pairs]
        self.buffers = {past: ort.OrtValue.ortvalue_from_numpy(a) for (past, _), a in zip(pairs, self._arrays)}
        self._mask = np.ones((1, max_length), np.int64)

    def bind(self, io: ort.IOBinding, new_tokens: int) -> list[str]:
        total = self.length + new_tokens
        if total > self.max_length:
            raise InputError(f"{total} positions do not fit the key/value cache of {self.max_length}; "
                             "start a new cache sized for the whole generation")
        for past, present in self.pairs:
            io.bind_ortvalue_input(past, self.buffers[past])
            io.bind_ortvalue_output(present, self.buffers[past])
        io.bind_cpu_input("attention_mask", self._mask[:, :total])
        return [present for _, present in self.pairs]

    def update(self, outputs: dict[str, ort.OrtValue], new_tokens: int) -> None:
        del outputs  # GroupQueryAttention wrote the new positions into the shared buffers
        self.length += new_tokens


class DecoderSession:
    """An ORT session of a decoder, run chunk by chunk with the cache bound through IOBinding.

    Not thread-safe: callers serialize (``LLM`` holds a lock); each generation uses its own cache.
    """

    def __init__(self, session: ort.InferenceSession, *, shared_kv: bool = False) -> None:
        """``shared_kv``: the graph's attention takes one buffer as past and present (``StaticCache``)."""
        self.session = session
        self.shared_kv = shared_kv
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        missing = [n for n in ("input_ids",) if n not in inputs] + [n for n in ("logits",) if n not in outputs]
        layers: dict[int, dict[str, str]] = {}
        for name in inputs:
            if m := _PAST.match(name):
                layers.setdefault(int(m.group(1)), {})[m.group(2)] = name
        if missing or not layers:
            raise InputError(
                "the model is not a decoder with a key/value cache: it needs inputs input_ids and "
                "past_key_values.N.key/value and outputs logits and present.N.key/value"
                + (f" (missing {', '.join(missing)})" if missing else " (no past_key_values.N inputs)")
            )
        self.pairs: list[tuple[str, str]] = []
        for layer in sorted(layers):
            for kind in ("key", "value"):
                past = layers[layer].get(kind)
                present = f"present.{layer}.{kind}"
                if past is None or present not in outputs:
                    raise InputError(f"decoder layer {layer} lacks past_key_values.{layer}.{kind} or {present}")
                self.pairs.append((past, present))
        first = inputs[self.pairs[0][0]]
        dtype = _NUMPY_TYPES.get(first.type)
        if dtype is None:
            raise InputError(f"{first.name} is {first.type}; the runtime handles float32 and float16 caches")
        shape = first.shape
        if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])):
            raise InputError(f"{first.name} has shape {shape}; expected [batch, kv_heads, past_length, head_dim] "
                             "with fixed kv_heads and head_dim")
        if isinstance(shape[2], int):
            raise InputError(f"{first.name} has a fixed past length {shape[2]} (a static, preallocated cache); "
                             "this runtime drives growing caches only so far")
        self.kv_heads, self.head_dim, self.kv_dtype = int(shape[1]), int(shape[3]), dtype
        self.has_positions = "position_ids" in inputs
        if "attention_mask" not in inputs:
            raise InputError("the decoder has no attention_mask input; the runtime needs one")
        logits = outputs["logits"]
        self.vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        self.logits_dtype = _NUMPY_TYPES.get(logits.type) or np.float32

    @property
    def layers(self) -> int:
        return len(self.pairs) // 2

    def new_cache(self, max_length: int) -> KVCache:
        """An empty cache for a generation of at most ``max_length`` positions (prompt included)."""
        if self.shared_kv:
            return StaticCache(self.pairs, self.kv_heads, self.head_dim, self.kv_dtype, max_length)
        return DynamicCache(self.pairs, self.kv_heads, self.head_dim, self.kv_dtype)

    def cache_bytes_per_token(self) -> int:
        return len(self.pairs) * self.kv_heads * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def forward(self, ids: Sequence[int] | np.ndarray, cache: KVCache, *, all_logits: bool = False,
                logits_out: np.ndarray | None = None) -> np.ndarray:
        """Run ``ids`` after what ``cache`` holds; returns the logits of every position if ``all_logits``
        ([n, vocab]) else of the last one ([vocab]), as float32.

        ``logits_out``, a C-contiguous [1, n, vocab] array of the logits' dtype, receives the logits
        (decode steps reuse one buffer). Otherwise ORT writes them into a numpy array made here, so
        a prefill chunk's [n, vocab] logits exist once, not also in ORT's arena.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        n = ids.shape[1]
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if self.has_positions:
            io.bind_cpu_input("position_ids", np.arange(cache.length, cache.length + n, dtype=np.int64)[None])
        names = cache.bind(io, n)
        given = logits_out
        if logits_out is None and self.vocab is not None:
            logits_out = np.empty((1, n, self.vocab), self.logits_dtype)
        if logits_out is not None:
            io.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits_out))
        else:
            io.bind_output("logits", "cpu")
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # ORT's exception types have no public common base
            raise RuntimeFailure(f"onnxruntime failed to run the decoder: {str(exc).strip()[:400]}") from None
        values = io.get_outputs()
        bound = dict(zip([*names, "logits"], values))
        cache.update(bound, n)
        logits = logits_out if logits_out is not None else bound["logits"].numpy()
        logits = logits[0] if all_logits else logits[0, -1]
        return logits.astype(np.float32, copy=given is not None or not all_logits)

    def prefill(self, ids: Sequence[int], cache: KVCache, *, chunk: int, all_logits: bool = False,
                stop: Callable[[], bool] | None = None) -> np.ndarray | None:
        """Run the prompt in chunks of ``chunk`` tokens (bounds the attention and logits memory).

        Returns the last position's logits (or all positions' with ``all_logits``), or ``None`` when
        ``stop()`` said to stop between chunks.
        """
        pieces = []
        for start in range(0, len(ids), chunk):
            if stop is not None and stop():
                return None
            pieces.append(self.forward(ids[start:start + chunk], cache, all_logits=all_logits))
        return np.concatenate(pieces) if all_logits else pieces[-1]
