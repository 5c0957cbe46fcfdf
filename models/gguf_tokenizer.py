"""A GGUF's tokenizer as a Hugging Face ``tokenizers`` Tokenizer, plus its generation settings.

GGUF stores the tokenizer as metadata: ``tokenizer.ggml.model`` ('gpt2' = byte-level BPE), the token
strings (already in GPT-2's byte-to-unicode alphabet, 'Ġ' for a space), the merges in rank order,
a type per token (1 normal, 3 control, 4 user-defined, ...), the special ids, and
``tokenizer.ggml.pre``, the name llama.cpp uses to pick the regexes that split text into words before
BPE. The Tokenizer built here reproduces llama.cpp's ``llama_tokenize``:

    pre-tokenizer   [Split(regex, isolated) ...] + ByteLevel   the regexes llama.cpp uses for that ``pre``
    model           BPE(vocab, merges)                         ``ignore_merges`` where llama.cpp sets it
    added tokens    control tokens as special, user-defined as normal (both split out of the text first)
    post-processor  prepends BOS / appends EOS when ``tokenizer.ggml.add_bos_token``/``add_eos_token``
    decoder         ByteLevel

Control tokens are matched in text the way llama.cpp's ``parse_special=True`` does; HF's
``encode_special_tokens = True`` gives ``parse_special=False``.
"""

from __future__ import annotations

from typing import Any

from edgec.errors import InputError
from edgec.models.gguf import GGUFModel

# llama.cpp's token types (llama_token_type in llama.h).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# The word-splitting regexes of llama.cpp's llm_tokenizer_bpe (src/llama-vocab.cpp), per family of
# ``tokenizer.ggml.pre`` names, written as Hugging Face's own tokenizer.json files write them
# (llama.cpp spells ``(?i:'s|...)`` out as ``'[sS]|...`` for its regex engine; same matches).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

#: family -> (regexes applied in order before byte-level BPE, ignore_merges)
_FAMILIES: dict[str, tuple[list[str], bool]] = {
    "gpt2": ([_GPT2], False),
    "digits+gpt2": ([r"\p{N}", _GPT2], False),  # every digit its own word, then GPT-2's split
    "llama3": ([_LLAMA3], True),
    "qwen2": ([_QWEN2], False),
}
#: ``tokenizer.ggml.pre`` -> family, as llama.cpp's llama_vocab::impl::load maps them.
PRE_TOKENIZERS = {
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"], "gpt2"),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"], "digits+gpt2"),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"],
                    "llama3"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2"], "qwen2"),
}


def _meta(model: GGUFModel, key: str, default: Any = None) -> Any:
    return model.metadata.get(f"tokenizer.ggml.{key}", default)


def build_tokenizer(model: GGUFModel):
    """The GGUF's tokenizer as a ``tokenizers.Tokenizer`` (byte-level BPE models only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _meta(model, "model")
    if kind != "gpt2":
        raise InputError(
            f"{model.path}: tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE) GGUF tokenizers "
            "can be converted so far"
        )
    pre = _meta(model, "pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(
            f"{model.path}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer this converter does not know; "
            f"known: {', '.join(sorted(PRE_TOKENIZERS))}"
        )
    regexes, ignore_merges = _FAMILIES[PRE_TOKENIZERS[pre]]
    tokens: list[str] = _meta(model, "tokens") or []
    merges: list[str] = _meta(model, "merges") or []
    types: list[int] = _meta(model, "token_type") or [_NORMAL] * len(tokens)
    if not tokens or not merges or len(types) != len(tokens):
        raise InputError(f"{model.path}: the tokenizer metadata is incomplete (tokens, merges or token types missing)")

    vocab = {token: i for i, token in enumerate(tokens)}  # later duplicates win, as in llama.cpp's token_to_id
    pairs = [tuple(m.split(" ", 1)) for m in merges]  # byte-level tokens never contain a real space
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, byte_fallback=False))
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    if regexes == [_GPT2]:  # ByteLevel's own regex is exactly GPT-2's
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()

    # Added tokens are matched on the raw text before the pre-tokenizer runs, as llama.cpp's
    # tokenizer_st_partition does. Added in id order so that HF keeps the GGUF ids.
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    bos, eos = _meta(model, "bos_token_id"), _meta(model, "eos_token_id")
    add_bos = bool(_meta(model, "add_bos_token", False)) and bos is not None
    add_eos = bool(_meta(model, "add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        first = [f"{tokens[bos]}:0"] if add_bos else []
        last = [f"{tokens[eos]}:0"] if add_eos else []
        used = [(tokens[i], i) for i in ([bos] if add_bos else []) + ([eos] if add_eos else [])]
        tok.post_processor = processors.TemplateProcessing(
            single=[*first, "$A:0", *last], pair=[*first, "$A:0", *last, *first, "$B:1", *last],
            special_tokens=sorted(set(used)),
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for i, t in enumerate(tokens[: min(len(tokens), 64)]):  # cheap guard: ids must be the GGUF's
        if tok.token_to_id(t) not in (i, vocab[t]):
            raise InputError(f"{model.path}: token {t!r} got id {tok.token_to_id(t)} instead of {i}; duplicate tokens?")
    return tok


#: llama.cpp's end-of-generation texts (llama-vocab.cpp): a control token spelled so ends a turn
END_OF_GENERATION = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>",
                               "_<EOT>", "<｜end▁of▁sentence｜>"})


def generation_config(model: GGUFModel) -> dict[str, Any]:
    """What a generation loop needs from the GGUF: special ids and strings, chat template, context length.

    ``eos_token_id`` lists every id that ends a turn: the EOS, llama.cpp's EOT/EOM ids when the file
    names them, and control tokens whose text llama.cpp treats as end-of-generation (it stops on any).
    """
    tokens: list[str] = _meta(model, "tokens") or []

    def token(i: int | None) -> str | None:
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos, pad = _meta(model, "bos_token_id"), _meta(model, "eos_token_id"), _meta(model, "padding_token_id")
    stops = [i for i in (eos, _meta(model, "eot_token_id"), _meta(model, "eom_token_id")) if i is not None]
    types = _meta(model, "token_type") or []
    stops += [i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == _CONTROL and text in END_OF_GENERATION]
    stops = list(dict.fromkeys(stops))
    hp = model.hparams
    return {
        "model": model.name,
        "architecture": model.architecture,
        "source": model.path.name,
        "context_length": hp.context_length,
        "vocab_size": hp.vocab,
        "bos_token_id": bos,
        "bos_token": token(bos),
        "eos_token_id": stops,
        "eos_tokens": [token(i) for i in stops],
        "pad_token_id": pad if pad is not None else eos,
        "add_bos_token": bool(_meta(model, "add_bos_token", False)),
        "chat_template": model.metadata.get("tokenizer.chat_template"),
        "decoder": {"layers": hp.n_layers, "kv_heads": hp.n_kv_heads, "head_dim": hp.head_dim},
    }
