"""Write a tiny Llama (config.json and seeded random weights) that vLLM can serve offline.

Run with the vLLM virtualenv's Python (it needs torch, safetensors and tokenizers): `python
tests/vllm_tiny_llama.py DIR`. Nothing is downloaded. Prompts may be token ids
(`--skip-tokenizer-init`) or text: a word-level tokenizer over the same 512 ids, with a chat
template, is written beside the weights so that chat and text completions work too. vLLM's
`--load-format dummy` draws weights from +-1e-3, which leaves attention almost uniform and its
output too small to steer the next token; these weights are scaled so that scores are O(1) and
the tokens depend on what attention returns.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

HIDDEN, LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 256, 2, 4, 1, 64, 512, 512

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": Q_HEADS,
    "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM,
    "vocab_size": VOCAB,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    narrow = HIDDEN**-0.5
    w = {
        "model.embed_tokens.weight": normal(VOCAB, HIDDEN, std=1.0),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": normal(VOCAB, HIDDEN, std=narrow),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": torch.ones(HIDDEN),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN),
            p + "self_attn.q_proj.weight": normal(Q_HEADS * HEAD_DIM, HIDDEN, std=0.1),
            p + "self_attn.k_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN, std=0.1),
            p + "self_attn.v_proj.weight": normal(KV_HEADS * HEAD_DIM, HIDDEN, std=narrow),
            p + "self_attn.o_proj.weight": normal(HIDDEN, Q_HEADS * HEAD_DIM, std=narrow),
            p + "mlp.gate_proj.weight": normal(FFN, HIDDEN, std=narrow),
            p + "mlp.up_proj.weight": normal(FFN, HIDDEN, std=narrow),
            p + "mlp.down_proj.weight": normal(HIDDEN, FFN, std=FFN**-0.5),
        }
    return w


SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: CONFIG's bos and eos
WORDS = [
    "user", "assistant", "system", ":", ".", ",", "?", "!", "hello", "hi", "the", "a", "is",
    "what", "how", "you", "say", "tell", "me", "about", "count", "to", "one", "two", "three",
]  # fmt: skip
# Turns are "role : text </s>"; the reply is prompted by "assistant :".
CHAT_TEMPLATE = (
    "<s>{% for m in messages %} {{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
    "{% if add_generation_prompt %} assistant :{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Exactly VOCAB entries, so that every id the model samples decodes to a word."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = SPECIALS + WORDS + [a + b for a in syllables for b in syllables]
    return {w: i for i, w in enumerate(words[:VOCAB])}


def tokenizer(out: Path) -> None:
    """tokenizer.json and tokenizer_config.json, read by vLLM through transformers' fast
    tokenizer; words it does not know become <unk>."""
    tok = Tokenizer(WordLevel(vocabulary(), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    save_file(weights(), str(out / "model.safetensors"))
    tokenizer(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
