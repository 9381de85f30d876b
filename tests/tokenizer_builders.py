"""Tokenizers like the published ones, built offline with the `tokenizers` and `sentencepiece`
libraries (tests/test_tokenizer.py, tests/test_hf.py): byte-level BPE in the styles of Llama 3
and Qwen 2.5 (their pre-tokenizer regexes, normalizer, special tokens, post-processor and the
tokenizer_config.json / generation_config.json fields their releases ship), and SentencePiece
BPE the Llama 2 way (dummy-prefix space) and the t5x_like way."""

import io
import json
import os

import sentencepiece as spm

# Text the tokenizers learn from, and the corpus every parity check encodes: whitespace runs,
# tabs, newlines, digits, emoji (multi-codepoint too), CJK, NFC/NFD forms, marker-like text.
TRAIN = [
    "The quick brown fox jumps over the lazy dog. What is 12 + 30? It is 42.",
    "Pack my box with five dozen liquor jugs! Sphinx of black quartz, judge my vow.",
    "日本語のテキスト。中文文本。한국어 텍스트. naïve café résumé.",
    "def f(x):\n    return x ** 2\n\n    pass\t\tdone", "emoji 🤖🚀 👍 and more text here",
    "I'm sure you're right, we'll see; they'd know. ALL CAPS HERE.",
] * 30
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces,   three   and\ttabs\t\tdouble\n\nnewlines\r\nCRLF  ",
    " leading space", "trailing space ", "   ", "\n", "\t", "",
    "What is 12 + 30? It is 42; 3.14159, 1,000,000 and 2024-12-03.",
    "naïve café résumé Zürich", "日本語のテキストと中文文本。", "한국어 텍스트",
    "emoji 🤖🚀 and 👩‍👩‍👧 family, flags 🇫🇷, skin 👍🏽",
    "Type <|end|> to stop.", "<|user|>hi<|end|>", " <|assistant|> 5 <|end|>\n",
    "a <|im_start|> b <|im_end|> c", "<|eot_id|> <|begin_of_text|> <end_of_turn>",
    "<| end |> <|end| |end|> <<|user|>> <|end|><|end|>",
    "code: def f(x):\n    return x ** 2  # comment\n\n\n\tpass",
    "Ünïcödé ½ ² ﬁ Å, e\u0301 vs é, \u00a0nbsp\u2009thin",
    "ALL CAPS I'M HERE, you're, we'll, they'd've",
]

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
                   "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
                   "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
STYLES = {
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                            "<|end_header_id|>", "<|eot_id|>"], "split": LLAMA3_SPLIT},
    "qwen": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "split": QWEN_SPLIT},
}


def _write(path, content):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)


def byte_level_bpe(folder, style: str, *, vocab_size: int = 600, config: bool = True) -> str:
    """A `style` ("llama3" or "qwen") release's tokenizer files in `folder` (config.json too,
    with its model_type, unless config=False); returns the folder."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

    os.makedirs(folder, exist_ok=True)
    spec = STYLES[style]
    tk = Tokenizer(models.BPE())
    if style == "qwen":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["split"]), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(TRAIN, trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in spec["specials"]])
    ids = {t: tk.token_to_id(t) for t in spec["specials"]}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    if style == "llama3":
        bos = "<|begin_of_text|>"
        tk.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, ids[bos])])])
        config_json = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
                      "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
                      "model_input_names": ["input_ids", "attention_mask"],
                      "model_max_length": 131072, "added_tokens_decoder": decoder,
                      "chat_template": LLAMA3_TEMPLATE}
        generation = {"bos_token_id": ids[bos],
                      "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        config_json = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
        tok_config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
                      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
                      "errors": "replace", "split_special_tokens": False,
                      "add_prefix_space": False, "clean_up_tokenization_spaces": False,
                      "model_max_length": 32768, "added_tokens_decoder": decoder,
                      "chat_template": CHATML}
        generation = {"bos_token_id": ids["<|endoftext|>"],
                      "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                      "pad_token_id": ids["<|endoftext|>"]}
    tk.save(os.path.join(folder, "tokenizer.json"))
    _write(os.path.join(folder, "tokenizer_config.json"), tok_config)
    _write(os.path.join(folder, "generation_config.json"), generation)
    if config:
        _write(os.path.join(folder, "config.json"), config_json)
    return str(folder)


def sentencepiece_bpe(path, *, dummy_prefix: bool = True, model_type: str = "bpe") -> str:
    """A SentencePiece model with Llama 2's conventions: unk 0, bos 1, eos 2, no pad, no chat
    markers, a dummy-prefix space (unless dummy_prefix=False), whitespace kept, digits split,
    byte fallback."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN), model_writer=buf, vocab_size=400, model_type=model_type,
        byte_fallback=True, hard_vocab_limit=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=dummy_prefix, minloglevel=2)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)
