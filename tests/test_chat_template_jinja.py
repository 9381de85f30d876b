"""A model's own Jinja chat template, checked against transformers' apply_chat_template.

Tokenizers are built here with the `tokenizers` library in the styles of Qwen (ChatML), Llama 3
and Gemma, wrapped in transformers' PreTrainedTokenizerFast with a template written here (each
with and without {% generation %} blocks); the text must be the same byte for byte, the ids the
same, and the loss masks equal to transformers' assistant masks.
"""

import json
import string
import time

import numpy as np
import pytest

from data_pipelines import chat_template as ct
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core.errors import UserError

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is 12 + 30? It is 42.",
    "Hello there!\n\n  Indented\tand tabbed text.", "naïve café 日本語のテキスト 🤖🤖",
    "You are a helpful assistant. Answer briefly.", "def f(x):\n    return x * 2\n",
] * 30

# Byte-level BPE pre-tokenizer patterns (Llama 3's; Qwen 2's differs in digits: one each).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def Backend(tk, bos: str | None, eos: str, folder) -> tokenizer_lib.Tokenizer:
    """The project's tokenizer.json backend over `tk`, with the special tokens named in the
    tokenizer_config.json transformers writes beside it."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos or eos,
                                         eos_token=eos).save_pretrained(folder)
    return tokenizer_lib.load(str(folder))


def text_of(tok, ids) -> str:
    """Decoded with the special tokens written out (decode() leaves them out)."""
    return tok.tk.decode([int(i) for i in ids], skip_special_tokens=False)


def byte_level(pattern: str, specials: list[str]):
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def metaspace(specials: list[str]):
    """SentencePiece-like (Gemma/Llama 2 style): spaces as ▁, a prefix space at the start
    (every character of the tests is in its alphabet)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.train_from_iterator(CORPUS + [string.printable], trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials + ["<unk>"], show_progress=False))
    return tk


CHATML = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'assistant' %}\n"
    "    {{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}\n"
    "  {%- elif message.role != 'system' %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}"
    "{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}{%- set system_message = '' %}{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}\n"
    "{%- if tools is not none %}{{- 'Tools: ' + tools | tojson(indent=4) + '\\n\\n' }}{%- endif %}\n"
    "{{- system_message }}{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message['role'] == 'assistant' %}{% generation %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}\n"
    "    {%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}\n")

GEMMA = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}\n"
    "{%- if documents %}{{ 'Documents: ' + documents | tojson + '\\n' }}{% endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/"
    "assistant/...') }}\n"
    "    {%- endif -%}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\n"
    "    {%- if role == 'model' -%}{% generation %}"
    "{{ message['content'] | trim }}<end_of_turn>{% endgeneration %}\n"
    "    {%- else -%}{{ message['content'] | trim }}<end_of_turn>{%- endif %}\n"
    "\n"
    "{% endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}\n")

# Earlier assistant turns are rendered differently from the last one (as Qwen 3 drops earlier
# reasoning): rendering a prefix does not give the start of the whole conversation.
UNSTABLE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.role == 'assistant' and not loop.last %} (earlier){% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def without_generation(source: str) -> str:
    return source.replace("{% generation %}", "").replace("{% endgeneration %}", "")


STYLES = {
    "chatml": (lambda: byte_level(QWEN_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
               CHATML, None, "<|im_end|>", "<|im_end|>"),
    "llama3": (lambda: byte_level(LLAMA3_PATTERN, [
        "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eot_id|>"]), LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "gemma": (lambda: metaspace(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]),
              GEMMA, "<bos>", "<eos>", "<end_of_turn>"),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request, tmp_path_factory):
    """(name, our tokenizer, transformers tokenizer with markers, the same without markers,
    the end-of-turn token)."""
    make, source, bos, eos, end = STYLES[request.param]
    tk = make()
    hf = {}
    for marked in (True, False):
        hf[marked] = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tk, bos_token=bos, eos_token=eos,
            chat_template=source if marked else without_generation(source))
    tok = Backend(tk, bos, eos, tmp_path_factory.mktemp(request.param))
    return request.param, tok, hf[True], hf[False], end


def template_of(hf_tok, tok, tmp_path) -> ct.JinjaTemplate:
    """What `data.chat_template=model` gives for the model folder transformers saves."""
    hf_tok.save_pretrained(tmp_path)
    return ct.use(tok, ct.load("model", str(tmp_path), tok)).template


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "It is 42."},
     {"role": "user", "content": "Hello there!\n\n  Indented\tand tabbed."},
     {"role": "assistant", "content": "naïve café 日本語 🤖\n\nbye"}],
    [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  spaced  "}, {"role": "assistant", "content": " x\t"},
     {"role": "user", "content": "12345 67"}],
]


def learned(tok, ids, weights) -> list[str]:
    runs, start = [], None
    for k in range(len(ids) + 1):
        on = k < len(ids) and weights[k] > 0
        if on and start is None:
            start = k
        if not on and start is not None:
            runs.append(text_of(tok, ids[start:k]))
            start = None
    return runs


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_text_ids_and_masks_equal_transformers(style, conversation, tmp_path):
    name, tok, hf_marked, hf_plain, _ = style
    messages = CONVERSATIONS[conversation]
    for hf_tok in (hf_marked, hf_plain):
        template = template_of(hf_tok, tok, tmp_path / str(hf_tok is hf_marked))
        for gen in (False, True):
            text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ct.render(messages, tok, add_generation_prompt=gen) == text
            ids = hf_tok.apply_chat_template(messages, add_generation_prompt=gen)["input_ids"]
            assert ct.encode(tok, messages, generation_prompt=gen)[0].tolist() == ids
        assert ct.prompt(tok, messages) == hf_tok.apply_chat_template(
            messages, add_generation_prompt=True)["input_ids"]
    # Masks: transformers' own where the template has {% generation %}; the prefix method on
    # the same text without the blocks gives the same mask (the blocks hold reply + end).
    out = hf_marked.apply_chat_template(messages, return_assistant_tokens_mask=True)
    template_of(hf_marked, tok, tmp_path / "m")
    ids, weights = ct.encode(tok, messages)
    assert ids.tolist() == out["input_ids"]
    assert weights.tolist() == [float(m) for m in out["assistant_masks"]]
    template_of(hf_plain, tok, tmp_path / "p")
    ids2, weights2 = ct.encode(tok, messages)
    assert ids2.tolist() == ids.tolist() and weights2.tolist() == weights.tolist()


@pytest.mark.parametrize("marked", [True, False])
def test_loss_on_and_end_of_turn(style, marked, tmp_path):
    name, tok, hf_marked, hf_plain, end = style
    template_of(hf_marked if marked else hf_plain, tok, tmp_path)
    messages = CONVERSATIONS[1]
    ids, weights = ct.encode(tok, messages)
    end_id = tok.tk.token_to_id(end)
    assert ct.end_id(tok) == end_id
    assert learned(tok, ids, weights) == ["It is 42." + end, "naïve café 日本語 🤖\n\nbye" + end]
    last = ct.encode(tok, messages, loss_on="last_assistant")[1]
    assert learned(tok, ids, last) == ["naïve café 日本語 🤖\n\nbye" + end]
    everything = ct.encode(tok, messages, loss_on="all")[1]
    assert everything[0] == 0 and everything[1:].min() == 1.0
    # An empty reply still learns to end its turn.
    ids, weights = ct.encode(tok, CONVERSATIONS[2])
    assert learned(tok, ids, weights) == [end]
    stops = ct.reply_stop_ids(tok)
    assert stops[0] == end_id and tok.eos_id in stops
    generated = tok.encode("It is") + [end_id] + tok.encode(" junk")
    assert ct.reply(tok, generated) == "It is"


def test_literal_control_tokens_stay_text(style, tmp_path):
    """A control token typed inside a message is plain text (transformers'
    sanitize_control_tokens=True), so a user cannot end a turn or fake a role."""
    name, tok, hf_marked, _, end = style
    template_of(hf_marked, tok, tmp_path)
    messages = [{"role": "user", "content": f"Type {end} to stop, {end}x"},
                {"role": "assistant", "content": f"I typed {end}."}]
    ids = ct.encode(tok, messages)[0].tolist()
    assert ids == hf_marked.apply_chat_template(messages, sanitize_control_tokens=True)[
        "input_ids"]
    end_id = tok.tk.token_to_id(end)
    typed = sum(m["content"].count(end) for m in messages)
    assert ids.count(end_id) == ct.render(messages, tok).count(end) - typed  # the template's
    assert f"Type {end} to stop, {end}x" in text_of(tok, ids)


def test_tools_documents_and_kwargs_render_as_transformers(tmp_path):
    make, source, bos, eos, _ = STYLES["llama3"]
    tk = make()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos,
                                                  eos_token=eos, chat_template=source)
    tok = Backend(tk, bos, eos, tmp_path / "tok")
    template = template_of(hf_tok, tok, tmp_path)
    messages = CONVERSATIONS[0]
    tools = [{"type": "function", "function": {"name": "add", "description": "a <b> & 'c' 日",
                                               "parameters": {"type": "object"}}}]
    for kwargs in ({"tools": tools}, {"date_string": "01 Jan 2025"}, {}):
        assert template.render(messages, add_generation_prompt=True, **kwargs) == \
            hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       **kwargs)
    gemma = transformers.PreTrainedTokenizerFast(
        tokenizer_object=STYLES["gemma"][0](), bos_token="<bos>", eos_token="<eos>",
        chat_template=GEMMA)
    docs = [{"title": "<a&b>", "text": "日本 'q'"}]
    assert ct.JinjaTemplate(GEMMA, special_tokens={"bos_token": "<bos>"}).render(
        messages, documents=docs) == gemma.apply_chat_template(messages, tokenize=False,
                                                               documents=docs)
    with pytest.raises(ct.TemplateError, match="roles must alternate"):
        ct.JinjaTemplate(GEMMA).render([{"role": "assistant", "content": "x"}])


def test_a_context_goes_before_the_content_unless_the_template_reads_it(tmp_path):
    make, source, bos, eos, _ = STYLES["chatml"]
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=make(), eos_token=eos,
                                                  chat_template=source)
    template = ct.JinjaTemplate(source)
    messages = [{"role": "user", "content": "Who won?", "context": "The home side won."},
                {"role": "assistant", "content": "The home side."}]
    folded = [{"role": "user", "content": "The home side won.\n\nWho won?"}, messages[1]]
    assert template.render(messages) == hf_tok.apply_chat_template(folded, tokenize=False)


def test_not_prefix_stable_is_refused_naming_the_turn(tmp_path):
    tk = STYLES["chatml"][0]()
    tok = Backend(tk, None, "<|im_end|>", tmp_path / "tok")
    added = {t: (tk.token_to_id(t), True) for t in ("<|im_start|>", "<|im_end|>")}
    ct.use(tok, ct.JinjaTemplate(UNSTABLE, added_tokens=added, where="unstable.jinja"))
    messages = CONVERSATIONS[1][1:]
    with pytest.raises(ct.TemplateError, match=r"unstable.jinja is not prefix-stable at "
                                               r"message 1 \(assistant\)"):
        ct.encode(tok, messages)
    # Only the last reply: its prefix renders as the whole does.
    ids, weights = ct.encode(tok, messages, loss_on="last_assistant")
    assert learned(tok, ids, weights) == ["naïve café 日本語 🤖\n\nbye<|im_end|>"]
    assert ct.encode(tok, messages, loss_on="all")[1].sum() == len(ids) - 1


def test_project_template_in_jinja_is_the_project_template(tmp_path):
    """PROJECT_JINJA (what an export ships) renders and masks as the project template."""
    from data_pipelines import synthetic
    from data_pipelines import tokenizer as tokenizer_lib

    texts = [m["content"] for i in range(200) for m in synthetic.dialogue(i)]
    tok = tokenizer_lib.train(texts, str(tmp_path / "t.model"), vocab_size=300)
    jinja = ct.load(str(_write(tmp_path / "p.jinja", ct.PROJECT_JINJA)), "", tok)
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "What is 2 + 3?", "context": "retrieved: 5"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 1+1?"},
                {"role": "assistant", "content": ""}]
    assert jinja.render(messages) == "<s>" + ct.render(messages)
    assert jinja.render(messages, add_generation_prompt=True) == \
        "<s>" + ct.render(messages, add_generation_prompt=True)
    for loss_on in ct.LOSS_ON:
        ours = ct.encode(tok, messages, loss_on=loss_on)
        ct.use(tok, jinja)
        theirs = ct.encode(tok, messages, loss_on=loss_on)
        ct.use(tok, None)
        assert ours[0].tolist() == theirs[0].tolist()
        assert ours[1].tolist() == theirs[1].tolist(), loss_on
    ct.use(tok, jinja)
    assert ct.reply_stop_ids(tok)[0] == tok.marker_ids[ct.END]
    assert ct.prompt(tok, messages[:2])[-1] == tok.marker_ids[ct.ASSISTANT]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_choosing_a_template(tmp_path):
    make, source, bos, eos, _ = STYLES["chatml"]
    tk = make()
    tok = Backend(tk, bos, eos, tmp_path / "tok")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos,
                                                  chat_template=source)
    hf_tok.save_pretrained(tmp_path / "model")
    (tmp_path / "bare").mkdir()
    assert ct.load("project", str(tmp_path / "model"), tok) is ct.PROJECT
    assert ct.load("auto", str(tmp_path / "bare"), tok) is ct.PROJECT
    assert ct.load("auto", str(tmp_path / "model"), tok).source == source
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"},
                               {"name": "default", "template": source}]
    _write(tmp_path / "named" / "tokenizer_config.json", json.dumps(config)) if (
        tmp_path / "named").mkdir() is None else None
    assert ct.load("model", str(tmp_path / "named"), tok).source == source
    assert ct.load(str(_write(tmp_path / "t.jinja", UNSTABLE)), str(tmp_path / "model"),
                   tok).source == UNSTABLE
    with pytest.raises(UserError, match="data.chat_template.*has no chat template"):
        ct.load("model", str(tmp_path / "bare"), tok)
    with pytest.raises(UserError, match="neither auto, project, model"):
        ct.load("nonsense", "", tok)
    with pytest.raises(UserError, match="not a valid Jinja template"):
        ct.load(str(_write(tmp_path / "bad.jinja", "{% for %}")), "", tok)
    # A run records the template it trained with; loading it from the run renders the same.
    template = ct.load("model", str(tmp_path / "model"), tok)
    ct.use(tok, template)
    (tmp_path / "run").mkdir()
    ct.install(tok, str(tmp_path / "run"))
    again = ct.load("model", str(tmp_path / "run"), tok)
    messages = CONVERSATIONS[1]
    assert again.render(messages) == template.render(messages)
    assert again.controls == template.controls


def test_masks_are_fast(tmp_path):
    """Prefix rendering costs a render and an encode per reply boundary: a 16-turn
    conversation takes milliseconds."""
    make, source, bos, eos, _ = STYLES["llama3"]
    tk = make()
    tok = Backend(tk, bos, eos, tmp_path / "tok")
    ct.use(tok, ct.JinjaTemplate(without_generation(source), special_tokens={"bos_token": bos},
                                 added_tokens={t: (tk.token_to_id(t), True) for t in
                                               ("<|begin_of_text|>", "<|eot_id|>",
                                                "<|start_header_id|>", "<|end_header_id|>")}))
    messages = [{"role": r, "content": CORPUS[i % 6] * 3}
                for i, r in enumerate(["user", "assistant"] * 16)]
    ct.encode(tok, messages)
    start = time.perf_counter()
    ids, weights = ct.encode(tok, messages)
    assert time.perf_counter() - start < 0.5
    assert len(learned(tok, ids, weights)) == 16 and np.count_nonzero(weights) > 100
