"""Tied heads per family that ties (issue 15; mergekit_compat.md, tied heads): GPT-2, Qwen2, Gemma 3,
Mamba and T5 (and BERT's masked-LM head). If any input stores a head, the tied inputs contribute
their embeddings as their head and config.json says untied; if none does, the output stays tied.
Gemma scales its embeddings by sqrt(hidden) at run time (not in the weights), so its untied head
is its embeddings as stored;
T5 scales the decoder output by d_model^-0.5 when tied, so a tied T5's head is its embeddings
times d_model^-0.5 once untied. Tiny random models from configs (seeded, built once per module),
merged through the CLI with task_arithmetic, loaded with transformers; the expected logits are
computed by hand from the inputs' tensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_recipe

FAMILIES = {  # family: (embeddings, model class, config class, config)
    "gpt2": ("transformer.wte.weight", "GPT2LMHeadModel", "GPT2Config",
             dict(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=16, bos_token_id=1, eos_token_id=2)),
    "qwen2": ("model.embed_tokens.weight", "Qwen2ForCausalLM", "Qwen2Config",
              dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=32, tie_word_embeddings=True)),
    "gemma3": ("model.embed_tokens.weight", "Gemma3ForCausalLM", "Gemma3TextConfig",
               dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=1, head_dim=8, vocab_size=32, max_position_embeddings=32,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "mamba": ("backbone.embeddings.weight", "MambaForCausalLM", "MambaConfig",
              dict(hidden_size=16, state_size=4, num_hidden_layers=1, vocab_size=32, expand=2, conv_kernel=2,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "t5": ("shared.weight", "T5ForConditionalGeneration", "T5Config",
           dict(d_model=16, d_ff=24, num_layers=1, num_heads=2, d_kv=8, vocab_size=32)),
}
HEAD = "lm_head.weight"
IDS = torch.tensor([[3, 1, 4, 1, 5, 9]])
DEC = torch.tensor([[0, 2, 7, 1]])
W1, W2 = 0.6, 0.3


def _save(d, tensors, config_dir):
    d.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    for f in config_dir.iterdir():
        if f.suffix == ".json" and not (d / f.name).exists():
            (d / f.name).write_text(f.read_text())
    return d


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    import transformers

    name = request.param
    embed, cls, cfg_cls, kw = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw))
    model.save_pretrained(root / "saved")
    assert json.loads((root / "saved" / "config.json").read_text()).get("tie_word_embeddings", True) is True
    base = load_file(str(root / "saved" / "model.safetensors"))
    assert HEAD not in base and embed in base  # transformers stores a tied head nowhere
    gen = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(2)]
    dirs = {}
    for label, sd in (("base", base), ("ft1", fts[0]), ("ft2", fts[1])):
        dirs[label] = _save(root / label, sd, root / "saved")
        dirs[label + "_stored"] = _save(root / (label + "_stored"), {**sd, HEAD: sd[embed].clone()}, root / "saved")
    return {"name": name, "embed": embed, "cls": cls, "cfg": kw, "dirs": dirs, "sd": [base, *fts]}


def _run(cli, tmp_path, fam, base, ft1, ft2):
    d = fam["dirs"]
    text = (f"merge_method: task_arithmetic\nbase_model: {d[base]}\nmodels:\n"
            f"  - model: {d[ft1]}\n    parameters: {{weight: {W1}}}\n"
            f"  - model: {d[ft2]}\n    parameters: {{weight: {W2}}}\n")
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert code == 0, out + err
    return tmp_path / "out"


def _merged(fam, heads):
    """base + W1 (ft1 - base) + W2 (ft2 - base) for every tensor; ``heads``: each input's head
    (None: the output is tied and stores none)."""
    b, f1, f2 = fam["sd"]
    out = {k: b[k] + W1 * (f1[k] - b[k]) + W2 * (f2[k] - b[k]) for k in b}
    if heads is not None:
        hb, h1, h2 = heads
        out[HEAD] = hb + W1 * (h1 - hb) + W2 * (h2 - hb)
    return out


def _head_of(fam, i):
    """Input i's head as an untied model computes with it: its embeddings (T5: times d^-0.5)."""
    e = fam["sd"][i][fam["embed"]]
    return e * fam["cfg"]["d_model"] ** -0.5 if fam["name"] == "t5" else e


def _expected_logits(fam, tensors):
    """Logits of the merged tensors computed by hand: the model's body with the merged weights,
    then hidden @ head^T with the merged head (tied: the merged embeddings, T5 scaled)."""
    import transformers

    kw = dict(fam["cfg"])
    model = getattr(transformers, fam["cls"])(getattr(transformers, FAMILIES[fam["name"]][2])(**kw)).eval()
    body = {k: v for k, v in tensors.items() if k != HEAD}
    missing = model.load_state_dict(body, strict=False).missing_keys
    assert set(missing) <= {HEAD, "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}, missing
    head = tensors.get(HEAD)
    with torch.no_grad():
        if fam["name"] == "t5":
            enc = model.encoder(input_ids=IDS).last_hidden_state
            h = model.decoder(input_ids=DEC, encoder_hidden_states=enc).last_hidden_state
            if head is None:
                head = tensors[fam["embed"]] * kw["d_model"] ** -0.5
        else:
            h = model(IDS, output_hidden_states=True).hidden_states[-1]
            if head is None:
                head = tensors[fam["embed"]]
        return h @ head.T


def _logits(out):
    import transformers

    cfg = json.loads((out / "config.json").read_text())
    model = getattr(transformers, cfg["architectures"][0]).from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        if "T5" in cfg["architectures"][0]:
            return model(input_ids=IDS, decoder_input_ids=DEC).logits
        return model(IDS).logits


def test_a_base_storing_its_head_with_fine_tunes_that_do_not(cli, tmp_path, family):
    out = _run(cli, tmp_path, family, "base_stored", "ft1", "ft2")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert HEAD in load_file(str(out / "model.safetensors"))
    want = _merged(family, [_head_of(family, i) for i in range(3)])
    torch.testing.assert_close(_logits(out), _expected_logits(family, want), rtol=1e-5, atol=1e-5)


def test_fine_tunes_storing_their_heads_with_a_base_that_does_not(cli, tmp_path, family):
    out = _run(cli, tmp_path, family, "base", "ft1_stored", "ft2_stored")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    want = _merged(family, [_head_of(family, i) for i in range(3)])
    torch.testing.assert_close(_logits(out), _expected_logits(family, want), rtol=1e-5, atol=1e-5)


def test_one_fine_tune_stores_its_head(cli, tmp_path, family):
    out = _run(cli, tmp_path, family, "base", "ft1_stored", "ft2")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    want = _merged(family, [_head_of(family, i) for i in range(3)])
    torch.testing.assert_close(_logits(out), _expected_logits(family, want), rtol=1e-5, atol=1e-5)


def test_all_tied_stays_tied(cli, tmp_path, family):
    out = _run(cli, tmp_path, family, "base", "ft1", "ft2")
    assert HEAD not in load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True
    torch.testing.assert_close(_logits(out), _expected_logits(family, _merged(family, None)), rtol=1e-5, atol=1e-5)


def test_all_storing_their_heads_merge_them_by_name(cli, tmp_path, family):
    out = _run(cli, tmp_path, family, "base_stored", "ft1_stored", "ft2_stored")
    # a merged head says untied: a method may make it differ from the embeddings (DARE's masks)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    want = _merged(family, [_head_of(family, i) for i in range(3)])
    torch.testing.assert_close(_logits(out), _expected_logits(family, want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exclude", ["lm_head", "embed|wte|shared"])
def test_excluding_the_head_or_the_embeddings_never_writes_a_wrong_model(cli, tmp_path, family, exclude):
    """What the old message advised (exclude: lm_head): the output either is exactly what its
    files and config say, or the run stops with one line."""
    d = family["dirs"]
    text = (f"merge_method: task_arithmetic\nbase_model: {d['base_stored']}\nmodels:\n"
            f"  - model: {d['ft1']}\n    parameters: {{weight: {W1}}}\n"
            f"  - model: {d['ft2']}\n    parameters: {{weight: {W2}}}\nexclude: ['{exclude}']\n")
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    if code != 0:
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists(), err
        return
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    # an untied model computes with its files as they are (T5: no d^-0.5 on an untied head)
    torch.testing.assert_close(_logits(tmp_path / "out"), _expected_logits(family, written), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("saved_by", ["transformers4", "transformers5"])
def test_t5_an_untied_fine_tune_with_tied_ones(cli, tmp_path, family, saved_by):
    """A T5 v1.1-style input (its own head, no d^-0.5 scale) merged with tied T5s: the tied ones'
    heads are their embeddings x d^-0.5, the untied one's head is used as stored."""
    if family["name"] != "t5":
        pytest.skip("T5 only")
    base, f1, f2 = family["sd"]
    gen = torch.Generator().manual_seed(7)
    own_head = 0.3 * torch.randn(f1["shared.weight"].shape, generator=gen)
    d = _save(tmp_path / "ft1_untied", {**f1, HEAD: own_head}, family["dirs"]["ft1"])
    cfg = json.loads((d / "config.json").read_text())
    if saved_by == "transformers4":
        cfg.pop("scale_decoder_outputs", None)
        cfg["tie_word_embeddings"] = False
    else:
        cfg["tie_word_embeddings"], cfg["scale_decoder_outputs"] = True, False
    (d / "config.json").write_text(json.dumps(cfg))
    text = (f"merge_method: task_arithmetic\nbase_model: {family['dirs']['base']}\nmodels:\n"
            f"  - model: {d}\n    parameters: {{weight: {W1}}}\n"
            f"  - model: {family['dirs']['ft2']}\n    parameters: {{weight: {W2}}}\n")
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert code == 0, out + err
    want = _merged(family, [_head_of(family, 0), own_head, _head_of(family, 2)])
    torch.testing.assert_close(_logits(tmp_path / "out"), _expected_logits(family, want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored_by", ["base", "fine-tunes"])
def test_a_bert_masked_lm_head_stored_by_some_inputs_only(cli, tmp_path, stored_by):
    """BERT's tied MLM decoder (and its bias, tied to cls.predictions.bias): stored by checkpoints
    saved with transformers 4, by none saved with 5. Mixed, the tied inputs contribute their word
    embeddings; the output says untied and loads to the hand-computed merge."""
    import transformers

    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "saved")
    base = load_file(str(tmp_path / "saved" / "model.safetensors"))
    emb, dec, bias = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias"
    assert dec not in base
    gen = torch.Generator().manual_seed(1)
    ft = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    stored = lambda sd: {**sd, dec: sd[emb].clone(), "cls.predictions.decoder.bias": sd[bias].clone()}  # noqa: E731
    b = _save(tmp_path / "b", stored(base) if stored_by == "base" else base, tmp_path / "saved")
    f = _save(tmp_path / "f", ft if stored_by == "base" else stored(ft), tmp_path / "saved")
    text = (f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {f}\n"
            f"    parameters: {{weight: {W1}}}\n")
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert code == 0, out + err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    want = {k: base[k] + W1 * (ft[k] - base[k]) for k in base}
    want[dec], want["cls.predictions.decoder.bias"] = want[emb], want[bias]
    cfg.tie_word_embeddings = False
    ref = transformers.BertForMaskedLM(cfg).eval()
    assert not ref.load_state_dict(want, strict=False).missing_keys
    got = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(got(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_tied_head_whose_embeddings_are_unknown_is_refused_without_advising_exclude(cli, tmp_path):
    """A tied input that stores no head, of a family whose embeddings name is not known: one
    line that does not advise `exclude` (which would keep a head not matching the merged
    embeddings), exit 2, no output."""
    torch.manual_seed(0)
    emb, body = torch.randn(32, 16), torch.randn(16, 16)
    cfg = {"model_type": "newfamily", "tie_word_embeddings": True, "architectures": ["NewForCausalLM"]}
    for name, tensors in (("base", {"net.tok.weight": emb, "net.body.weight": body, HEAD: emb.clone()}),
                          ("ft", {"net.tok.weight": emb + 0.1, "net.body.weight": body + 0.1})):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(cfg))
    text = (f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
            f"  - model: {tmp_path / 'ft'}\n    parameters: {{weight: 1.0}}\n")
    code, out, err = cli("run", write_recipe(tmp_path / "r.yaml", text), "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "tied head" in err and "exclude it" not in err, err
    assert not (tmp_path / "out").exists()
