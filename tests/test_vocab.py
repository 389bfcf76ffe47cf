"""Vocabulary alignment and chat templates (spec mergekit_compat.md M10, M11, A1, A2, A5, A6, A11,
A12): every row of M10's golden tables through ``Vocabulary.align``, with linear w = 1 (the merged
row is the mean of the aligned rows), the spec's errors, and the written tokenizer loaded back by
transformers."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mergekit_ortho.chat_templates import BUILTIN, builtin_template, check_jinja, resolve_chat_template
from mergekit_ortho.errors import UserError
from mergekit_ortho.vocab import (TokenizerSpec, VocabModel, build_vocabulary, set_config_vocab_size,
                                  truncate_vocab_rows, vocab_mismatch_message)

BASE_TOKENS = "<unk> <s> </s> a b c d e".split()
B_TOKENS = "<unk> <s> </s> a c b x y".split()
SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tokenizer(d: Path, tokens, added=(), vocab_size=None, template=None, kind="BPE", config=True):
    """A tiny tokenizer directory: ``tokens`` as the model vocabulary (ids by position), the
    first three special, ``added`` appended as special added tokens; config.json's vocab_size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    d.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    model = (models.BPE(vocab=vocab, merges=[], unk_token="<unk>") if kind == "BPE"
             else models.WordLevel(vocab=vocab, unk_token="<unk>") if kind == "WordLevel"
             else models.Unigram([(t, -1.0) for t in tokens], 0))
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL + list(added))
    tok.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "model_max_length": 64}
    if template is not None:
        cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if config:
        (d / "config.json").write_text(json.dumps({"vocab_size": vocab_size or len(tokens) + len(added)}))
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    return {
        "tokA": make_tokenizer(root / "tokA", BASE_TOKENS, template="{{ 'A-template' }}"),
        "tokB": make_tokenizer(root / "tokB", B_TOKENS, template="{{ 'B-template' }}"),
        "tokC": make_tokenizer(root / "tokC", BASE_TOKENS, added=["<im_start>", "<im_end>"]),
        "tokA2": make_tokenizer(root / "tokA2", BASE_TOKENS, template="  {{ 'B-template' }}\n"),
    }


def vm(dirs, label, vocab_size=None):
    return VocabModel(label, dirs[label], vocab_size or {"tokC": 10}.get(label, 8), refs=(f"./{label}",))


def embed(label, lm_head=False):
    """The fixture rows: embed row r = 100 + r (tokA), 200 + r (tokB), 300 + r (tokC); lm_head
    adds 0.5. Four columns, all equal."""
    start = {"tokA": 100.0, "tokB": 200.0, "tokC": 300.0}[label] + (0.5 if lm_head else 0.0)
    n = 10 if label == "tokC" else 8
    return (start + torch.arange(n, dtype=torch.float32))[:, None].repeat(1, 4)


def merged(vocab, labels, lm_head=False, name="model.embed_tokens.weight"):
    """linear with w = 1: the mean of the aligned rows (column 0)."""
    aligned = vocab.align(name, {k: embed(k, lm_head) for k in labels})
    assert all(t.shape == (vocab.size, 4) for t in aligned.values())
    return torch.stack(list(aligned.values())).mean(0)[:, 0], aligned


def build(dirs, spec, labels, base="tokA", **kw):
    return build_vocabulary(spec, [vm(dirs, k) for k in labels], base=base, **kw)


def close(got, want):
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-4)


# --- M10 golden: sources ------------------------------------------------------------------------


def test_no_setting_equal_rows_merge_by_index():
    assert vocab_mismatch_message("model.embed_tokens.weight", [(8, 4), (8, 4)]) is None
    rows = {"tokA": embed("tokA"), "tokB": embed("tokB")}
    close(torch.stack(list(rows.values())).mean(0)[:, 0], [150 + r for r in range(8)])


def test_no_setting_unequal_rows_is_mergekits_error():
    msg = vocab_mismatch_message("lm_head.weight", [(8, 4), (10, 4)])
    assert msg.startswith("Tensor size mismatch for lm_head.weight: [(8, 4), (10, 4)]. Align vocabulary axes "
                          "with tokenizer configuration before merging (for example, tokenizer: {source: base})")
    assert "\n" not in msg


def test_unsafe_truncate_embeddings():
    cut = truncate_vocab_rows({"tokA": embed("tokA"), "tokC": embed("tokC")})
    assert {k: tuple(t.shape) for k, t in cut.items()} == {"tokA": (8, 4), "tokC": (8, 4)}
    close(torch.stack(list(cut.values())).mean(0)[:, 0], [200 + r for r in range(8)])


def test_source_base(dirs):
    vocab = build(dirs, TokenizerSpec.from_recipe("base"), ["tokA", "tokB"])
    assert vocab.tokens == BASE_TOKENS and vocab.size == vocab.config_vocab_size == 8
    got, _ = merged(vocab, ["tokA", "tokB"])
    close(got, [150, 151, 152, 153, 154.5, 154.5, 106, 107])
    got, _ = merged(vocab, ["tokA", "tokB"], lm_head=True, name="lm_head.weight")
    close(got, [150.5, 151.5, 152.5, 153.5, 155, 155, 106.5, 107.5])


def test_source_union(dirs):
    vocab = build(dirs, TokenizerSpec.from_recipe("union"), ["tokA", "tokB"])
    assert vocab.tokens == BASE_TOKENS + ["x", "y"] and vocab.size == 10  # deterministic (A2)
    got, _ = merged(vocab, ["tokA", "tokB"])
    close(got, [150, 151, 152, 153, 154.5, 154.5, 106, 107, 206, 207])


def test_union_of_three(dirs):
    vocab = build(dirs, TokenizerSpec(source="union"), ["tokA", "tokB", "tokC"])
    assert vocab.tokens == BASE_TOKENS + ["x", "y", "<im_start>", "<im_end>"] and vocab.size == 12
    got, aligned = merged(vocab, ["tokA", "tokB", "tokC"])
    close(got, [200, 201, 202, 203, 613 / 3, 614 / 3, 518 / 3, 521 / 3, 206, 207, 308, 309])
    assert torch.equal(aligned["tokA"][8], embed("tokB")[6])  # one owner: its row, bit for bit


def test_union_order_follows_recipe_order(dirs):
    """tokC before tokB: its added tokens still come after every plain token (A2's order)."""
    vocab = build(dirs, TokenizerSpec(), ["tokA", "tokC", "tokB"])
    assert vocab.tokens[8:] == ["x", "y", "<im_start>", "<im_end>"]
    d = {"tokA": dirs["tokA"], "tokB": make_tokenizer(dirs["tokA"].parent / "tokB2", "<unk> <s> </s> y x".split())}
    v2 = build_vocabulary(TokenizerSpec(), [VocabModel("tokA", d["tokA"], 8), VocabModel("tokB", d["tokB"], 5)],
                          base="tokA")
    assert v2.tokens[8:] == ["y", "x"]  # by increasing id in the model that brings them


def test_source_model_ref(dirs):
    vocab = build(dirs, TokenizerSpec.from_recipe("./tokB"), ["tokA", "tokB"])
    assert vocab.tokens == B_TOKENS and vocab.size == 8
    got, _ = merged(vocab, ["tokA", "tokB"])
    close(got, [150, 151, 152, 153, 154.5, 154.5, 206, 207])


def test_source_model_not_merged(dirs):
    spec = TokenizerSpec.from_recipe(None, {"source": "elsewhere/tokB"})
    with pytest.raises(UserError, match="not one of the merged models"):
        build(dirs, spec, ["tokA"])
    vocab = build(dirs, spec, ["tokA"], source_dir=dirs["tokB"])
    assert vocab.tokens == B_TOKENS
    aligned = vocab.align("lm_head.weight", {"tokA": embed("tokA")})
    close(aligned["tokA"][:, 0], [100, 101, 102, 103, 105, 104, 0, 0])  # x, y: in no merged model
    assert any("2 token(s) are in no model" in n for n in vocab.notes)


def test_task_arithmetic_union(dirs):
    vocab = build(dirs, TokenizerSpec(source="union"), ["tokA", "tokB"])
    aligned = vocab.align("model.embed_tokens.weight", {"tokA": embed("tokA"), "tokB": embed("tokB")})
    base, m = aligned["tokA"], aligned["tokB"]
    close((base + 1.0 * (m - base))[:, 0], [200, 201, 202, 203, 205, 204, 106, 107, 206, 207])


def test_pad_to_multiple_of(dirs):
    vocab = build(dirs, TokenizerSpec.from_recipe(None, {"source": "union", "pad_to_multiple_of": 4}),
                  ["tokA", "tokB"])
    assert len(vocab.tokens) == 10 and vocab.size == 12
    got, aligned = merged(vocab, ["tokA", "tokB"])
    close(got, [150, 151, 152, 153, 154.5, 154.5, 106, 107, 206, 207, 154.1, 154.1])
    close(aligned["tokA"][10:, 0], [124.1, 124.1])  # per model: the mean of its own first V rows


def test_padded_model_with_source_base_drops_padding(dirs, tmp_path):
    d = make_tokenizer(tmp_path / "padded", BASE_TOKENS, vocab_size=10)
    vocab = build_vocabulary(TokenizerSpec(source="base"), [VocabModel("p", d, 10)], base="p")
    rows = (100 + torch.arange(10.0))[:, None].repeat(1, 4)
    out = vocab.align("lm_head.weight", {"p": rows})["p"]
    assert vocab.size == 8 and out.shape == (8, 4)
    close(out[:, 0], [100 + r for r in range(8)])


def test_no_change_returns_same_tensor(dirs):
    vocab = build(dirs, TokenizerSpec(source="base"), ["tokA", "tokC"])
    rows = {"tokA": embed("tokA"), "tokC": embed("tokC")}
    out = vocab.align("lm_head.weight", rows)
    assert out["tokA"] is rows["tokA"] and out["tokC"].shape == (8, 4)


# --- M10 golden: token configuration ---------------------------------------------------------------


TOKENS = {
    "a": {"source": "./tokB", "force": True},
    "b": {"source": {"kind": "zero"}},
    "d": {"source": {"kind": "zero"}, "force": True},
    "x": {"source": {"kind": "model_token", "model": "./tokA", "token": "e"}},
    "y": {"source": {"kind": "model_token", "model": "tokA", "token_id": 1}},
    "<new>": {"source": {"kind": "model_token", "model": "./tokB", "token": "c"}},
}


def test_token_configuration(dirs):
    vocab = build(dirs, TokenizerSpec.from_recipe(None, {"source": "union", "tokens": TOKENS}), ["tokA", "tokB"])
    assert vocab.tokens == BASE_TOKENS + ["x", "y", "<new>"] and vocab.size == 11
    got, aligned = merged(vocab, ["tokA", "tokB"])
    idx = {t: j for j, t in enumerate(vocab.tokens)}
    want = {"a": 203, "b": 154.5, "d": 0, "x": 156.5, "y": 154, "<new>": 204}
    close(torch.stack([got[idx[t]] for t in want]), list(want.values()))
    close(aligned["tokA"][idx["a"], :1], [203])  # forced: every model gets tokB's row
    ta = aligned["tokA"] + (aligned["tokB"] - aligned["tokA"])  # task arithmetic: forced rows stay
    close(ta[[idx["a"], idx["d"]], 0], [203, 0])


def test_entry_without_source_uses_default_rule(dirs):
    """A6: mergekit raises NotImplementedError; here x (tokB only) keeps tokB's row."""
    vocab = build(dirs, TokenizerSpec.from_recipe(None, {"tokens": {"x": {}, "e": {"force": True}}}),
                  ["tokA", "tokB"])
    got, aligned = merged(vocab, ["tokA", "tokB"])
    close(got[[8, 7]], [206, 107])  # forced e: the default rule (only tokA has it) for both
    close(aligned["tokB"][7, :1], [107])


def test_token_source_lacking_token(dirs):
    spec = TokenizerSpec.from_recipe(None, {"tokens": {"d": {"source": "./tokB"}}})
    vocab = build(dirs, spec, ["tokA", "tokB"])
    with pytest.raises(UserError, match=r"^model.embed_tokens.weight: Token 'd' not found in model tokB$"):
        vocab.align("model.embed_tokens.weight", {"tokA": embed("tokA"), "tokB": embed("tokB")})


def test_token_source_weight_missing(dirs):
    spec = TokenizerSpec.from_recipe(None, {"tokens": {"d": {"source": {"kind": "model_token", "model": "tokC",
                                                                       "token": "d"}}}})
    vocab = build(dirs, spec, ["tokA", "tokB", "tokC"])
    with pytest.raises(UserError, match="Token 'd' requires a vocabulary weight from model tokC, but that weight is missing"):
        vocab.check("lm_head.weight", {"tokA": 8, "tokB": 8})
    vocab.check("lm_head.weight", {"tokA": 8, "tokC": 10})  # both have d, not forced: no effect


def test_model_token_errors(dirs):
    spec = TokenizerSpec.from_recipe(None, {"tokens": {"x": {"source": {"kind": "model_token", "model": "tokA",
                                                                       "token_id": 8}}}})
    vocab = build(dirs, spec, ["tokA", "tokB"])
    with pytest.raises(UserError, match="Token ID 8 out of range for model tokA"):
        vocab.check("lm_head.weight", {"tokA": 8, "tokB": 8})
    spec = TokenizerSpec.from_recipe(None, {"tokens": {"x": {"source": {"kind": "model_token", "model": "tokA",
                                                                       "token": "zz"}}}})
    with pytest.raises(UserError, match="Token 'zz' not found in model tokA"):
        build(dirs, spec, ["tokA", "tokB"]).check("lm_head.weight", {"tokA": 8, "tokB": 8})
    spec = TokenizerSpec.from_recipe(None, {"tokens": {"x": {"source": "nowhere"}}})
    with pytest.raises(UserError, match="Model nowhere referenced but not part of merge"):
        build(dirs, spec, ["tokA", "tokB"])


@pytest.mark.parametrize("src, message", [
    ({"kind": "model_token", "model": "tokA"}, "token_id or token must be specified"),
    ({"kind": "model_token", "model": "tokA", "token": "a", "token_id": 1}, "only one of token_id or token may be specified"),
    ({"kind": "other"}, "kind must be model_token or zero"),
    ({"kind": "zero", "model": "tokA"}, "unknown key 'model'"),
    ({"kind": "model_token", "model": "tokA", "token_id": -1}, "non-negative integer"),
])
def test_spec_errors(src, message):
    with pytest.raises(UserError, match=message):
        TokenizerSpec.from_recipe(None, {"tokens": {"x": {"source": src}}})


@pytest.mark.parametrize("args, message", [
    (("union", {"source": "base"}), "Cannot specify both tokenizer_source and tokenizer"),
    ((None, {"sorce": "base"}), "did you mean 'source'"),
    ((None, {"pad_to_multiple_of": "4"}), "positive integer"),
    ((None, {"tokens": {"x": {"force": "yes"}}}), "force must be true or false"),
    ((None, {"tokens": ["x"]}), "must map tokens"),
    ((3, None), "must be union, base or a model reference"),
])
def test_recipe_setting_errors(args, message):
    with pytest.raises(UserError, match=message):
        TokenizerSpec.from_recipe(*args)


def test_setting_forms():
    assert TokenizerSpec.from_recipe(None, None) is None
    assert TokenizerSpec.from_recipe(None, {}) == TokenizerSpec(source="union")
    spec = TokenizerSpec.from_recipe(None, {"source": "m1", "tokens": TOKENS, "pad_to_multiple_of": 0})
    assert spec.pad_to_multiple_of is None and spec.model_refs() == ["m1", "./tokB", "./tokA", "tokA"]


# --- A1, A5, stripping -----------------------------------------------------------------------------


def test_without_base_first_model_is_tokenizer_base(dirs):
    """A1: the tokenizer base is the first model; no model is the default donor, so d (tokA and
    tokC have it) is their mean for tokB."""
    vocab = build(dirs, TokenizerSpec(), ["tokC", "tokB", "tokA"], base=None)
    assert vocab.donor == "tokC" and vocab.tokens == BASE_TOKENS + ["<im_start>", "<im_end>", "x", "y"]
    aligned = vocab.align("e", {k: embed(k) for k in ["tokC", "tokB", "tokA"]})
    close(aligned["tokB"][6, :1], [(306 + 106) / 2])


def test_base_not_among_inputs_is_not_preferred(dirs):
    vocab = build(dirs, TokenizerSpec(), ["tokA", "tokB", "tokC"])
    aligned = vocab.align("e", {"tokB": embed("tokB"), "tokC": embed("tokC")})
    close(aligned["tokB"][6, :1], [306])  # only tokC among the inputs has d
    aligned = vocab.align("e", {k: embed(k) for k in ["tokA", "tokB", "tokC"]})
    close(aligned["tokB"][6, :1], [106])  # the base has it: the base's row


def test_id_at_or_above_vocab_size_is_absent(dirs, tmp_path):
    """A5: tokB2 has x at id 8 but vocab_size 8 (8 rows): x counts as absent there."""
    d = make_tokenizer(tmp_path / "tokB2", B_TOKENS[:6] + ["y", "z", "x"])
    models = [VocabModel("tokA", dirs["tokA"], 8), VocabModel("tokB2", d, 8)]
    vocab = build_vocabulary(TokenizerSpec(), models, base="tokA")
    assert vocab.tokens == BASE_TOKENS + ["y", "z"]
    assert vocab.perm["tokB2"].tolist() == [0, 1, 2, 3, 5, 4, -1, -1, 6, 7]
    out = vocab.align("e", {"tokA": embed("tokA"), "tokB2": embed("tokB")})
    close(out["tokA"][8:, 0], [206, 207])


@pytest.mark.parametrize("kind", ["BPE", "WordLevel"])
def test_base_stripped_of_unused_ids(tmp_path, kind):
    d = make_tokenizer(tmp_path / "big", BASE_TOKENS + ["f", "g"], vocab_size=8, kind=kind)
    vocab = build_vocabulary(TokenizerSpec(source="base"), [VocabModel("m", d, 8)], base="m")
    assert vocab.tokens == BASE_TOKENS and vocab.size == 8
    out = tmp_path / "out"
    vocab.save(out)
    assert len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) == 8


def test_strip_refuses_other_models(tmp_path):
    d = make_tokenizer(tmp_path / "uni", BASE_TOKENS + ["f"], vocab_size=8, kind="Unigram")
    with pytest.raises(UserError, match="Tokenizer for m has type Unigram, but only BPE is currently supported"):
        build_vocabulary(TokenizerSpec(source="base"), [VocabModel("m", d, 8)], base="m")


def test_too_few_rows_for_tokenizer(dirs):
    vocab = build(dirs, TokenizerSpec(), ["tokA", "tokC"])
    with pytest.raises(UserError, match="model tokC has 8 rows, but its tokenizer uses id 9"):
        vocab.align("e", {"tokA": embed("tokA"), "tokC": embed("tokA")})


def test_missing_tokenizer_assumes_base_vocabulary(dirs, tmp_path):
    (tmp_path / "lora").mkdir()
    vocab = build_vocabulary(TokenizerSpec(), [vm(dirs, "tokA"), VocabModel("l", tmp_path / "lora", 8)], "tokA")
    assert vocab.perm["l"].tolist() == list(range(8)) and "assuming the same vocabulary" in vocab.notes[0]


def test_config_vocab_key():
    cfg = {"vocab_size": 8, "text_config": {"vocab_size": 8}}
    set_config_vocab_size(cfg, 12)
    set_config_vocab_size(cfg, 12, "text_config.vocab_size")
    assert cfg == {"vocab_size": 12, "text_config": {"vocab_size": 12}}


# --- the written tokenizer ---------------------------------------------------------------------------


def test_saved_union_loads_in_transformers(dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = TokenizerSpec.from_recipe(None, {"source": "union", "tokens": {"<new>": {"source": {"kind": "zero"}}}})
    vocab = build(dirs, spec, ["tokA", "tokB", "tokC"])
    out = tmp_path / "out"
    names = vocab.save(out, chat_template=resolve_chat_template("chatml", []))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(names)
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(vocab.tokens) == 13
    assert tok.get_vocab() == {t: j for j, t in enumerate(vocab.tokens)}
    ids = tok("a x y <im_start> <im_end> <new> d", add_special_tokens=False)["input_ids"]
    assert ids == [vocab.tokens.index(t) for t in ["a", "x", "y", "<im_start>", "<im_end>", "<new>", "d"]]
    assert "<|im_start|>" in tok.chat_template
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok.convert_ids_to_tokens(11) == "<im_end>" and tok.added_tokens_decoder[11].special
    assert not tok.added_tokens_decoder[8].special  # x: appended as mergekit's add_tokens does


def test_saved_keeps_source_template_and_generation_config(dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    (dirs["tokA"] / "generation_config.json").write_text('{"max_length": 7}')
    try:
        vocab = build(dirs, TokenizerSpec(source="base"), ["tokA", "tokB"])
        names = vocab.save(tmp_path / "o")
    finally:
        (dirs["tokA"] / "generation_config.json").unlink()
    assert "generation_config.json" in names  # A12: mergekit skips it
    assert (tmp_path / "o" / "chat_template.jinja").read_text() == "{{ 'A-template' }}"
    assert "chat_template" not in json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "o"))
    assert tok.chat_template == "{{ 'A-template' }}" and len(tok) == 8


# --- M11 chat templates ------------------------------------------------------------------------------


def test_chat_template_golden(dirs):
    order = [dirs[k] for k in ("tokA", "tokB", "tokA2")]  # base first
    assert resolve_chat_template("auto", order) == "{{ 'B-template' }}"
    assert resolve_chat_template("auto", [dirs["tokA"], dirs["tokB"]]) == "{{ 'A-template' }}"  # tie: first
    assert resolve_chat_template("auto", [dirs["tokC"]]) is None
    assert "<|im_start|>" in resolve_chat_template("chatml", order)
    literal = "{{ messages[0]['content'] }}"
    assert resolve_chat_template(literal, order) == literal
    assert resolve_chat_template(None, order) is None
    with pytest.raises(UserError, match="^Invalid chat template: 'nonexistent'"):
        resolve_chat_template("nonexistent", order)
    with pytest.raises(UserError, match="Invalid chat template"):
        resolve_chat_template("x" * 30, order)  # no '{'
    with pytest.raises(UserError, match="not valid Jinja"):
        resolve_chat_template("{% for m in messages %}{{ m }}", order)


def test_auto_reads_template_list_and_jinja_file(tmp_path):
    a = make_tokenizer(tmp_path / "a", BASE_TOKENS, template=[{"name": "default", "template": "{{ 'D' }}"},
                                                              {"name": "tool_use", "template": "{{ 'T' }}"}])
    b = make_tokenizer(tmp_path / "b", BASE_TOKENS)
    (b / "chat_template.jinja").write_text("{{ 'D' }}\n")
    assert resolve_chat_template("auto", [b, a]) == "{{ 'D' }}"


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_templates_render(name):
    jinja2 = pytest.importorskip("jinja2")
    text = builtin_template(name)
    check_jinja(text)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}]
    out = env.from_string(text).render(messages=msgs, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert "U" in out and "A" in out and "V" in out
    expect = {"chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA"
                        "<|im_end|>\n<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n",
              "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
                        "<|end_header_id|>\n\nU<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nV<|eot_id|><|start_header_id|>assistant"
                        "<|end_header_id|>\n\n",
              "mistral": "<s>[INST] S\n\nU [/INST] A</s>[INST] V [/INST]"}
    if name in expect:
        assert out == expect[name]


# --- size: a 152K vocabulary (timing printed, not asserted) -------------------------------------------


def test_large_vocabulary_is_vectorised(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    n = 152_000
    for name, shift in (("big1", 0), ("big2", 1000)):
        d = tmp_path / name
        d.mkdir()
        toks = [f"t{i + shift}" for i in range(n)]  # big2 lacks t0..t999 and brings t152000..t152999
        Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="t1000")).save(str(d / "tokenizer.json"))
    t0 = time.perf_counter()
    vocab = build_vocabulary(TokenizerSpec(), [VocabModel("a", tmp_path / "big1", n), VocabModel("b", tmp_path / "big2", n)],
                             base="a")
    t1 = time.perf_counter()
    rows = {"a": torch.randn(n, 64), "b": torch.randn(n, 64)}
    out = vocab.align("lm_head.weight", rows)
    t2 = time.perf_counter()
    assert vocab.size == n + 1000 and out["a"].shape == (n + 1000, 64)
    torch.testing.assert_close(out["a"][n:], rows["b"][n - 1000:])
    torch.testing.assert_close(out["b"][:1000], rows["a"][:1000])
    torch.testing.assert_close(out["b"][1000:n], rows["b"][: n - 1000])
    with capsys.disabled():
        print(f"\n[vocab timing] 152K union build {t1 - t0:.2f}s, align 2 x 152K x 64 {t2 - t1:.3f}s")
    np.testing.assert_array_equal(vocab.perm["b"][1000:n], np.arange(n - 1000))


# --- streaming: one model at a time ----------------------------------------------------------------


@pytest.mark.parametrize("spec", [
    TokenizerSpec(source="union"),
    TokenizerSpec.from_recipe(None, {"source": "union", "tokens": TOKENS}),
    TokenizerSpec.from_recipe(None, {"source": "union", "pad_to_multiple_of": 4}),
])
def test_aligner_one_model_at_a_time_equals_align(dirs, spec):
    """The streaming form (what a merge uses) gathers the stored rows (bf16 here) and converts
    them: bit-equal to ``align`` on rows converted first; it reads a model only when that model
    gives default or configured rows, and once."""
    vocab = build(dirs, spec, ["tokA", "tokB", "tokC"])
    g = torch.Generator().manual_seed(0)
    stored = {k: torch.randn(10 if k == "tokC" else 8, 5, generator=g).to(torch.bfloat16)
              for k in ["tokA", "tokB", "tokC"]}
    want = vocab.align("lm_head.weight", {k: v.float() for k, v in stored.items()})
    reads = []
    one = vocab.aligner("lm_head.weight", {k: tuple(v.shape) for k, v in stored.items()},
                        lambda k: reads.append(k) or stored[k], torch.float32)
    assert len(reads) == len(set(reads))
    for k, v in stored.items():
        got = one(k, v)
        assert got.dtype == torch.float32 and torch.equal(got, want[k]), k


def test_aligner_reads_no_model_when_every_model_has_every_token(dirs):
    vocab = build(dirs, TokenizerSpec(source="union"), ["tokA", "tokA2"])
    reads = []
    vocab.aligner("e", {"tokA": (8, 4), "tokA2": (8, 4)}, lambda k: reads.append(k), torch.float32)
    assert reads == []
