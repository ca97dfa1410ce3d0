"""A tiny Llama-architecture model and byte-level BPE tokenizer, built offline.

Used by the offline demo and by the tests: no download anywhere. The tokenizer splits every digit
into its own token (so arithmetic is learnable), has the ChatML tokens, and pads with a token
distinct from eos. Llama, not Qwen2: Qwen2's tokenizer class re-splits digits on load.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from posttrain.templates import CHATML

SPECIAL = {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 320):
    """Train a byte-level BPE tokenizer on `texts` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["bos"], SPECIAL["pad"], *CHAT_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        additional_special_tokens=CHAT_TOKENS,
    )
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, hidden: int = 64, layers: int = 2, heads: int = 4, ffn: int | None = None,
                max_positions: int = 256, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized for `tokenizer`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def init_tiny(directory: str | Path, texts: Iterable[str], hidden: int = 64, layers: int = 2,
              heads: int = 4, seed: int = 0) -> Path:
    """Build and save the tiny tokenizer and model into `directory` (loadable by from_pretrained)."""
    directory = Path(directory)
    tok = build_tokenizer(texts)
    model = build_model(tok, hidden=hidden, layers=layers, heads=heads, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
