"""mergekit recipes run unchanged and give mergekit's tensors: parameter forms and precedence (M3),
gradients and t (M4), tied heads (M5), which inputs each method sees (M6), slices (M7), modules
(M8) and dtypes (M9). Every number below is a golden of ../shared/specs/mergekit_compat.md,
produced by mergekit 0.1.5 itself on the spec's fixtures (zero, one, two, codeK)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import write_recipe
from test_run import load_dir

from mergekit_ortho.testing.checkpoints import code_value, spec_llama

L = "model.layers.{}."
Q, UP, LN = "self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    out = {name: spec_llama(root / name, lambda n, v=v: v) for name, v in (("zero", 0), ("one", 1), ("two", 2))}
    for k in (1, 2, 3):
        out[f"code{k}"] = spec_llama(root / f"code{k}", code_value(k))
    out["tied1"] = spec_llama(root / "tied1", code_value(1), tied=True)
    out["tied2"] = spec_llama(root / "tied2", code_value(2), tied=True)
    return out


def merge(cli, tmp_path, fx, recipe: dict, expect_code=0):
    text = yaml.safe_dump(recipe, sort_keys=False)
    for name, path in fx.items():
        text = text.replace(f"@{name}@", str(path))
    r = write_recipe(tmp_path / "r.yaml", text)
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == expect_code, (code, out, err)
    if code:
        return err
    return load_dir(tmp_path / "out"), json.loads((tmp_path / "out" / "config.json").read_text()), err


def value(t: torch.Tensor) -> float:
    assert torch.all(t == t.flatten()[0]), t  # the fixtures are constant per tensor
    return float(t.flatten()[0])


def ta_probe(**kw):
    return {"merge_method": "task_arithmetic", "base_model": "@zero@", **kw}


# --- M3 parameters: forms, precedence, filters ------------------------------------------------------


def test_m3a_per_model_filters_first_match_and_gradient(cli, tmp_path, fx):
    w = [{"filter": "self_attn", "value": 0.25}, {"filter": "mlp", "value": [0, 1]},
         {"filter": "layers.1.", "value": 9}, {"value": 0.75}]
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {"weight": w}}]))
    assert value(t[EMBED]) == 0.75
    assert value(t[L.format(0) + Q]) == 0.25 and value(t[L.format(1) + Q]) == 0.25
    assert value(t[L.format(1) + LN]) == 9
    assert value(t[L.format(0) + UP]) == 0 and value(t[L.format(3) + UP]) == 1
    assert value(t[L.format(2) + LN]) == 0.75 and value(t[NORM]) == 0.75 and value(t[HEAD]) == 0.75


def test_m3b_global_per_model_default_and_global_lambda_filters(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(
        models=[{"model": "@one@", "parameters": {"weight": [{"filter": "mlp", "value": 0.1}]}}],
        parameters={"weight": 0.5, "lambda": [{"filter": "lm_head", "value": 3}, {"filter": "embed", "value": 2}]}))
    assert value(t[EMBED]) == 1.0 and value(t[L.format(0) + Q]) == 0.5
    assert value(t[L.format(0) + UP]) == pytest.approx(0.1) and value(t[NORM]) == 0.5
    assert value(t[HEAD]) == 1.5


def test_m3c_method_parameter_under_a_model_is_ignored_with_a_warning(cli, tmp_path, fx):
    t, _, err = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {"lambda": 5}}]))
    assert value(t[L.format(0) + Q]) == 1
    assert "ignored" in err and "lambda" in err


def test_m3d_star_matches_first(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {
        "weight": [{"filter": "*", "value": 0.3}, {"filter": "mlp", "value": 0.1}]}}]))
    assert value(t[L.format(0) + UP]) == pytest.approx(0.3)


def test_m3e_required_parameter_missing_for_a_tensor_is_one_line(cli, tmp_path, fx):
    err = merge(cli, tmp_path, fx, {"merge_method": "slerp", "base_model": "@one@", "models": [{"model": "@two@"}],
                                    "parameters": {"t": [{"filter": "mlp", "value": 0.1}]}}, expect_code=2)
    assert "missing required parameter 't'" in err and "at tensor" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_m3f_filters_see_input_names_per_model_and_output_names_for_the_method(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {
        "merge_method": "task_arithmetic", "base_model": "@zero@",
        "slices": [{"sources": [
            {"model": "@zero@", "layer_range": [2, 4]},
            {"model": "@one@", "layer_range": [2, 4],
             "parameters": {"weight": [{"filter": "layers.2.", "value": 7}, {"value": 1}]}}]}],
        "parameters": {"lambda": [{"filter": "layers.0.", "value": 10}, {"value": 1}]}})
    assert value(t[L.format(0) + Q]) == 70 and value(t[L.format(1) + Q]) == 1
    assert cfg["num_hidden_layers"] == 2 and L.format(2) + Q not in t


def test_unknown_parameter_is_an_error_with_a_suggestion_and_another_methods_a_warning(cli, tmp_path, fx):
    err = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@"}], parameters={"lamda": 1}), expect_code=2)
    assert "did you mean 'lambda'" in err
    t, _, err = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@"}], parameters={"t": 0.5}))
    assert "ignored" in err and "parameters.t" in err


def test_legacy_keys_are_accepted_and_named(cli, tmp_path, fx):
    # M1 golden (without the unknown 'bogus', an error here): linear of code1 and code2
    t, _, err = merge(cli, tmp_path, fx, {"merge_method": "linear", "name": "foo", "embed_slerp": True,
                                          "models": [{"model": "@code1@"}, {"model": "@code2@"}],
                                          "parameters": {"weight": 1.0}})
    assert [value(t[L.format(i) + Q]) for i in range(4)] == [150, 151, 152, 153]
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (200, 210, 220)
    assert "embed_slerp" in err and "'name'" in err


# --- M4 gradients ------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, layers, outside", [
    ({"weight": [0, 1]}, [0, 1 / 3, 2 / 3, 1], 0),
    ({"weight": [0, 1, 0.5]}, [0, 2 / 3, 5 / 6, 0.5], 0),
])
def test_m4_numeric_gradients(cli, tmp_path, fx, setting, layers, outside):
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": setting}]))
    assert [value(t[L.format(i) + Q]) for i in range(4)] == pytest.approx(layers, abs=1e-6)
    assert value(t[EMBED]) == outside and value(t[HEAD]) == outside


def test_m4_bool_gradient_is_a_step_function(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {"weight": 2}}],
                                                parameters={"normalize": [False, True]}))
    assert [value(t[L.format(i) + Q]) for i in range(4)] == [2, 2, 2, 1]
    assert value(t[EMBED]) == 2


def test_m4_two_slices_gradient_restarts_per_slice(cli, tmp_path, fx):
    src = lambda a, b: [{"model": "@code1@", "layer_range": [a, b], "parameters": {"weight": [1, 0]}},  # noqa: E731
                        {"model": "@code2@", "layer_range": [a, b], "parameters": {"weight": [0, 1]}}]
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "linear",
                                          "slices": [{"sources": src(0, 3)}, {"sources": src(3, 4)}]})
    assert [value(t[L.format(i) + Q]) for i in range(4)] == pytest.approx([100, 151, 202, 203])
    # mergekit takes the post-weights from the last slice at t = 0: code1 alone
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (150, 160, 170)
    assert cfg["num_hidden_layers"] == 4


def test_m4_classic_gradient_slerp(cli, tmp_path, fx):
    tt = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
          {"value": 0.5}]
    t, _, _ = merge(cli, tmp_path, fx, {"merge_method": "slerp", "base_model": "@one@",
                                        "models": [{"model": "@one@"}, {"model": "@two@"}], "parameters": {"t": tt}})
    assert [value(t[L.format(i) + Q]) for i in range(4)] == pytest.approx([1, 1.433333, 1.566667, 2], abs=1e-5)
    assert [value(t[L.format(i) + UP]) for i in range(4)] == pytest.approx([2, 1.566667, 1.433333, 1], abs=1e-5)
    assert value(t[L.format(1) + LN]) == pytest.approx(1.5) and value(t[HEAD]) == pytest.approx(1.5)


# --- M5 tied heads -------------------------------------------------------------------------------------


def test_m5_tied_plus_untied_writes_the_head_from_the_tied_models_embeddings(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "linear", "parameters": {"weight": 1},
                                          "models": [{"model": "@tied1@"}, {"model": "@code2@"}]})
    assert value(t[HEAD]) == 210 and value(t[EMBED]) == 200
    assert cfg["tie_word_embeddings"] is False


def test_m5_tied_plus_tied_writes_no_head(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "linear", "parameters": {"weight": 1},
                                          "models": [{"model": "@tied1@"}, {"model": "@tied2@"}]})
    assert HEAD not in t and cfg["tie_word_embeddings"] is True


def test_m5_tied_base_with_untied_models_task_arithmetic(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "task_arithmetic", "base_model": "@tied1@",
                                          "models": [{"model": "@code2@"}]})
    # the base's head is its embeddings (150): 150 + (270 - 150)
    assert value(t[HEAD]) == 270 and cfg["tie_word_embeddings"] is False


# --- M6 inputs per method ---------------------------------------------------------------------------------


def test_m6_linear_averages_a_base_that_is_not_listed(cli, tmp_path, fx):
    t, _, err = merge(cli, tmp_path, fx, {"merge_method": "linear", "base_model": "@code3@",
                                          "models": [{"model": "@code1@"}, {"model": "@code2@"}],
                                          "parameters": {"weight": 1}})
    assert value(t[L.format(0) + Q]) == 200 and value(t[EMBED]) == 250
    assert value(t[NORM]) == 260 and value(t[HEAD]) == 270
    assert "one of the inputs" in err


def test_m6_task_arithmetic_ignores_the_weight_of_a_listed_base(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@zero@", "parameters": {"weight": 5}},
                                                        {"model": "@one@", "parameters": {"weight": 1}}]))
    assert value(t[L.format(0) + Q]) == 1 and value(t[HEAD]) == 1


def test_m6_input_counts(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, {"merge_method": "linear", "base_model": "@one@",
                                        "models": [{"model": "@one@"}]})
    assert value(t[EMBED]) == 1  # the base listed once is one input, not two
    (tmp_path / "x").mkdir()
    err = merge(cli, tmp_path / "x", fx, {"merge_method": "slerp", "base_model": "@zero@", "parameters": {"t": 0.5},
                                    "models": [{"model": "@one@"}, {"model": "@two@"}]}, expect_code=2)
    assert "exactly 1 model" in err


# --- M7 slices -------------------------------------------------------------------------------------


def test_m7_linear_frankenmerge_uses_every_source_of_the_last_slice(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "linear", "parameters": {"weight": 1}, "slices": [
        {"sources": [{"model": "@code1@", "layer_range": [0, 2]}]},
        {"sources": [{"model": "@code2@", "layer_range": [2, 4]}, {"model": "@code3@", "layer_range": [2, 4]}]}]})
    assert [value(t[L.format(i) + Q]) for i in range(4)] == [100, 101, 252, 253]
    # mergekit pairs the last slice's post-weights with one source only (260 / 270, its A3 bug);
    # every source of the last slice is merged here: (260 + 360) / 2 and (270 + 370) / 2
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (150, 310, 320)
    assert cfg["num_hidden_layers"] == 4


def test_m7_slices_over_the_full_range_equal_the_models_form(cli, tmp_path, fx):
    models = {"merge_method": "task_arithmetic", "base_model": "@code1@", "parameters": {"lambda": 0.5},
              "models": [{"model": "@code2@", "parameters": {"weight": [0, 1]}}, {"model": "@code3@"}]}
    (tmp_path / "a").mkdir()
    a, _, _ = merge(cli, tmp_path / "a", fx, models)
    sliced = {"merge_method": "task_arithmetic", "base_model": "@code1@", "parameters": {"lambda": 0.5},
              "slices": [{"sources": [{"model": "@code1@", "layer_range": [0, 4]},
                                      {"model": "@code2@", "layer_range": [0, 4], "parameters": {"weight": [0, 1]}},
                                      {"model": "@code3@", "layer_range": [0, 4]}]}]}
    (tmp_path / "b").mkdir()
    b, _, _ = merge(cli, tmp_path / "b", fx, sliced)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_m7_bad_layer_ranges_are_one_line_errors(cli, tmp_path, fx):
    err = merge(cli, tmp_path, fx, {"merge_method": "linear", "slices": [
        {"sources": [{"model": "@code1@", "layer_range": [3, 1]}]}]}, expect_code=2)
    assert "reversed" in err
    err = merge(cli, tmp_path, fx, {"merge_method": "linear", "slices": [
        {"sources": [{"model": "@code1@", "layer_range": [2, 6]}]}]}, expect_code=2)
    assert "goes past" in err
    err = merge(cli, tmp_path, fx, {"merge_method": "linear", "slices": [
        {"sources": [{"model": "@code1@", "layer_range": [0, 2]}, {"model": "@code2@", "layer_range": [0, 3]}]}]},
        expect_code=2)
    assert "same number of layers" in err
    err = merge(cli, tmp_path, fx, {"merge_method": "task_arithmetic", "base_model": "@zero@", "slices": [
        {"sources": [{"model": "@one@", "layer_range": [0, 2]}]}]}, expect_code=2)
    assert "not among its sources" in err
    assert not (tmp_path / "out").exists()


# --- M8 modules ------------------------------------------------------------------------------------


def test_m8_modules_default_with_slices(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "linear", "modules": {"default": {
        "slices": [{"sources": [{"model": "@code1@", "layer_range": [0, 2]},
                                {"model": "@code2@", "layer_range": [0, 2]}]}],
        "parameters": {"weight": 1}}}})
    assert [value(t[L.format(i) + Q]) for i in range(2)] == [150, 151]
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (200, 210, 220)
    assert cfg["num_hidden_layers"] == 2 and L.format(2) + Q not in t


# --- M9 dtypes -------------------------------------------------------------------------------------


def test_m9_dtype_sets_the_output_dtype_unless_out_dtype(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@"}], dtype="bfloat16"))
    assert t[EMBED].dtype == torch.bfloat16 and cfg["torch_dtype"] == "bfloat16"
    (tmp_path / "x").mkdir()
    t, cfg, _ = merge(cli, tmp_path / "x", fx, ta_probe(models=[{"model": "@one@"}], dtype="float32",
                                                         out_dtype="float16"))
    assert t[EMBED].dtype == torch.float16 and cfg["torch_dtype"] == "float16"


# --- M10 vocabulary alignment, end to end ---------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from test_vocab import B_TOKENS, BASE_TOKENS, make_tokenizer

    root = tmp_path_factory.mktemp("tok")

    def rows(start):
        def value(name):
            if name == EMBED:
                return (start + torch.arange(8.0))[:, None].repeat(1, 4)
            if name == HEAD:
                return (start + 0.5 + torch.arange(8.0))[:, None].repeat(1, 4)
            return start
        return value

    out = {"tokA": spec_llama(root / "tokA", rows(100.0)), "tokB": spec_llama(root / "tokB", rows(200.0))}
    make_tokenizer(out["tokA"], BASE_TOKENS, config=False)
    make_tokenizer(out["tokB"], B_TOKENS, config=False)
    return out


@pytest.mark.parametrize("source, rows, size", [
    ("base", [150, 151, 152, 153, 154.5, 154.5, 106, 107], 8),
    ("union", [150, 151, 152, 153, 154.5, 154.5, 106, 107, 206, 207], 10),
])
def test_m10_tokenizer_source_aligns_rows_config_and_tokenizer(cli, tmp_path, tok, source, rows, size):
    from transformers import AutoTokenizer

    t, cfg, _ = merge(cli, tmp_path, tok, {"merge_method": "linear", "base_model": "@tokA@",
                                           "models": [{"model": "@tokB@"}], "parameters": {"weight": 1},
                                           "tokenizer_source": source})
    assert t[EMBED][:, 0].tolist() == pytest.approx(rows)
    assert t[HEAD][:, 0].tolist() == pytest.approx([r + 0.5 for r in rows])
    assert cfg["vocab_size"] == size
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(loaded) == size
    if source == "union":
        assert loaded.convert_tokens_to_ids(["x", "y"]) == [8, 9]


def test_m10_unequal_rows_without_a_tokenizer_setting_is_one_line(cli, tmp_path, fx):
    big = spec_llama(tmp_path / "big", lambda n: 1, vocab=10)
    err = merge(cli, tmp_path, {**fx, "big": big}, {"merge_method": "linear", "models": [
        {"model": "@code1@"}, {"model": "@big@"}]}, expect_code=2)
    assert "vocabulary rows" in err and "tokenizer_source" in err and len(err.strip().splitlines()) == 1


def test_m11_chat_template_is_written_and_loads(cli, tmp_path, tok):
    from transformers import AutoTokenizer

    merge(cli, tmp_path, tok, {"merge_method": "linear", "models": [{"model": "@tokA@"}, {"model": "@tokB@"}],
                               "chat_template": "chatml"})
    loaded = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


# --- M2 model references ---------------------------------------------------------------------------


def test_m2_model_plus_lora_applies_the_lora_before_merging(cli, tmp_path, fx):
    from mergekit_ortho.testing.loras import write_peft_dir

    A = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]])
    B = torch.tensor([[0.5, 0], [0, 0.25], [0, 0], [1, 1]])
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    lora = write_peft_dir(tmp_path / "lora1", {f"{key}.lora_A.weight": A, f"{key}.lora_B.weight": B},
                          {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]})
    expect = torch.tensor([[101, 100, 100, 100], [100, 100.5, 100, 100], [100, 100, 100, 100], [102, 102, 100, 100.]])
    for i, ref in enumerate(["@code1@+@lora1@", {"model": {"path": "@code1@"}, "lora": {"path": "@lora1@"}}]):
        (tmp_path / str(i)).mkdir()
        t, _, _ = merge(cli, tmp_path / str(i), {**fx, "lora1": lora}, {
            "merge_method": "linear", "parameters": {"weight": 1}, "models": [{"model": ref}]})
        assert torch.equal(t[L.format(0) + Q], expect)
        assert value(t[L.format(1) + Q]) == 101  # not adapted


def test_a_filter_that_matches_nothing_is_named(cli, tmp_path, fx):
    t, _, err = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {
        "weight": [{"filter": "self_atn", "value": 0.5}, {"value": 1}]}}]))
    assert "self_atn" in err and "matches no tensor" in err
    assert value(t[L.format(0) + Q]) == 1


def test_slerp_t_outside_0_1_is_refused_in_one_line(cli, tmp_path, fx):
    err = merge(cli, tmp_path, fx, {"merge_method": "slerp", "base_model": "@one@", "models": [{"model": "@two@"}],
                                    "parameters": {"t": [0, 1.2]}}, expect_code=2)
    assert "'t' must be <= 1" in err and len(err.strip().splitlines()) == 1


def test_m7_passthrough_frankenmerge(cli, tmp_path, fx):
    t, cfg, _ = merge(cli, tmp_path, fx, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "@code1@", "layer_range": [0, 2]}]},
        {"sources": [{"model": "@code2@", "layer_range": [1, 4]}]},
        {"sources": [{"model": "@code1@", "layer_range": [3, 4]}]}]})
    assert [value(t[L.format(i) + Q]) for i in range(6)] == [100, 101, 201, 202, 203, 103]
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (150, 160, 170)
    assert cfg["num_hidden_layers"] == 6 and L.format(6) + Q not in t


def test_m7_passthrough_scale_gradient_and_global_filter(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "@code2@", "layer_range": [0, 2], "parameters": {"scale": [1, 0.5]}}]},
        {"sources": [{"model": "@code1@", "layer_range": [2, 4]}]}],
        "parameters": {"scale": [{"filter": "lm_head", "value": 0}]}})
    assert [value(t[L.format(i) + Q]) for i in range(4)] == [200, 100.5, 102, 103]
    assert (value(t[EMBED]), value(t[NORM]), value(t[HEAD])) == (250, 160, 0)


def test_m6_karcher_averages_the_base_in(cli, tmp_path, fx):
    t, _, _ = merge(cli, tmp_path, fx, {"merge_method": "karcher", "base_model": "@one@",
                                        "models": [{"model": "@two@"}]})
    assert value(t[L.format(0) + Q]) == pytest.approx(1.5) and value(t[HEAD]) == pytest.approx(1.5)


def test_m6_passthrough_with_a_base_is_two_inputs(cli, tmp_path, fx):
    err = merge(cli, tmp_path, fx, {"merge_method": "passthrough", "base_model": "@one@",
                                    "models": [{"model": "@two@"}]}, expect_code=2)
    assert "exactly 1 model" in err and "ordinary input" in err


def test_a_method_parameter_at_the_top_level_is_ignored_with_a_warning(cli, tmp_path, fx):
    t, _, err = merge(cli, tmp_path, fx, {**ta_probe(models=[{"model": "@one@"}]), "lambda": 3})
    assert value(t[L.format(0) + Q]) == 1 and "top-level 'lambda'" in err


def test_m9_dtype_rounds_the_inputs_as_mergekit_loads_them(cli, tmp_path, fx):
    # 1.00390625 is not a bfloat16: mergekit loads it as 1.0 under dtype: bfloat16, so the task
    # vector is 1 and the result 1 (here too); without dtype the output keeps float32 and the config
    fine = spec_llama(tmp_path / "fine", lambda n: 1.00390625)
    t, cfg, _ = merge(cli, tmp_path, {**fx, "fine": fine}, ta_probe(models=[{"model": "@fine@"}], dtype="bfloat16"))
    assert value(t[EMBED]) == 1.0
    (tmp_path / "x").mkdir()
    t, cfg, _ = merge(cli, tmp_path / "x", {**fx, "fine": fine}, ta_probe(models=[{"model": "@fine@"}]))
    assert value(t[EMBED]) == 1.00390625 and cfg["torch_dtype"] == "float32"


def test_linear_weights_that_cancel_are_refused_in_one_line(cli, tmp_path, fx):
    # mergekit M14: w = [1, -1] writes inf (its A9); here an error naming the tensor, no output
    err = merge(cli, tmp_path, fx, {"merge_method": "linear", "models": [
        {"model": "@code1@", "parameters": {"weight": 1}}, {"model": "@code2@", "parameters": {"weight": -1}}]},
        expect_code=2)
    assert "sum to 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_gradient_longer_than_the_layers_is_named(cli, tmp_path, fx):
    _, _, err = merge(cli, tmp_path, fx, ta_probe(models=[{"model": "@one@", "parameters": {
        "weight": [0, 0.2, 0.4, 0.6, 0.8, 1]}}]))
    assert "6 values over 4 layers" in err


@pytest.mark.parametrize("method", ["magmax", "ties", "task_arithmetic"])
def test_per_layer_lambda_serves_our_own_methods(cli, tmp_path, tiny_models, method):
    """A gradient lambda [0, 1] over two layers: layer 0 is the base, layer 1 the lambda = 1 merge."""
    from test_run import recipe_text

    models = [tiny_models[k] for k in "ab"]
    runs = {}
    for tag, lam in (("grad", "[0, 1]"), ("one", "1.0")):
        r = write_recipe(tmp_path / f"{tag}.yaml", recipe_text(models, method, tiny_models["base"], f"{{lambda: {lam}}}"))
        code, _, err = cli("run", r, "--out", tmp_path / tag)
        assert code == 0, err
        runs[tag] = load_dir(tmp_path / tag)
    base = load_dir(tiny_models["base"])
    k0, k1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(runs["grad"][k0], base[k0].to(runs["grad"][k0].dtype))
    assert torch.equal(runs["grad"][k1], runs["one"][k1])
    assert not torch.equal(runs["grad"][k1], base[k1].to(runs["grad"][k1].dtype))


def test_dtype_rounds_the_inputs_of_a_sequential_method_too(cli, tmp_path, tiny_models):
    """opcm folds every model in one pass of its own (sequential.py): `dtype: bfloat16` over fp32
    models must give what the same recipe gives on models stored in bf16 already."""
    import shutil

    from safetensors.torch import load_file, save_file

    from test_run import recipe_text

    bf = {}
    for k in ("base", "a", "b"):
        d = tmp_path / f"bf16-{k}"
        shutil.copytree(tiny_models[k], d)
        f = d / "model.safetensors"
        save_file({n: t.to(torch.bfloat16) for n, t in load_file(str(f)).items()}, str(f))
        bf[k] = d
    runs = {}
    for tag, src in (("fp32", tiny_models), ("bf16", bf)):
        r = write_recipe(tmp_path / f"{tag}.yaml", recipe_text([src["a"], src["b"]], "opcm", src["base"],
                                                               extra="dtype: bfloat16\n"))
        code, _, err = cli("run", r, "--out", tmp_path / tag)
        assert code == 0, err
        runs[tag] = load_dir(tmp_path / tag)
    assert set(runs["fp32"]) == set(runs["bf16"])
    for k, v in runs["fp32"].items():
        assert torch.equal(v, runs["bf16"][k]), k


# --- M12 multi-document recipes ------------------------------------------------------------------------


def _multi(tmp_path, fx, *docs) -> object:
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)
    for name, path in fx.items():
        text = text.replace(f"@{name}@", str(path))
    return write_recipe(tmp_path / "mm.yaml", text)


M12_STEP1 = {"name": "step1", "merge_method": "linear",
             "models": [{"model": "@code1@", "parameters": {"weight": 1}}, {"model": "@code2@", "parameters": {"weight": 1}}]}
M12_FINAL = {"merge_method": "task_arithmetic", "base_model": "@code1@",
             "models": [{"model": "step1", "parameters": {"weight": 2}}]}


def test_m12_multi_document_recipe_runs_in_dependency_order_and_reuses_intermediates(cli, tmp_path, fx):
    r = _multi(tmp_path, fx, M12_FINAL, M12_STEP1)  # the final merge first: order comes from references
    code, out, err = cli("validate", r, "--out", tmp_path / "out")
    assert code == 0 and "checked once step1 is written" in out + err, (out, err)
    code, out, err = cli("run", r, "--out", tmp_path / "out")
    assert code == 0, err
    t = load_dir(tmp_path / "out")
    code2 = load_dir(fx["code2"])
    assert set(t) == set(code2)
    assert value(t[L.format(0) + Q]) == 200 and value(t[EMBED]) == 250
    assert all(torch.equal(t[k], code2[k]) for k in t)  # 100 + 2 * (150 - 100): exactly code2
    assert (tmp_path / "out.intermediates" / "step1" / "config.json").is_file()
    # a second run reuses the finished intermediate (mergekit-multi's --lazy) and says so
    code, out, err = cli("run", r, "--out", tmp_path / "out", "--overwrite")
    assert code == 0 and "reusing" not in err  # --overwrite recomputes every merge
    code, out, err = cli("run", r, "--out", tmp_path / "out2", "--intermediates", tmp_path / "mid")
    code, out, err = cli("run", r, "--out", tmp_path / "out3", "--intermediates", tmp_path / "mid")
    assert code == 0 and "reusing" in err and "step1" in err
    assert torch.equal(load_dir(tmp_path / "out3")[EMBED], t[EMBED])
    code, out, err = cli("validate", r, "--out", tmp_path / "out3", "--intermediates", tmp_path / "mid")
    assert code == 0 and out.count("ok") == 2, out


@pytest.mark.parametrize("docs,message", [
    ([M12_STEP1, M12_STEP1], "two documents are named 'step1'"),
    ([M12_FINAL, M12_FINAL], "have no 'name'"),
    ([{**M12_STEP1, "models": [{"model": "step2", "parameters": {"weight": 1}}]},
      {**M12_STEP1, "name": "step2", "models": [{"model": "step1", "parameters": {"weight": 1}}]}, M12_FINAL],
     "in a circle: step1 -> step2 -> step1"),
])
def test_m12_bad_multi_document_recipes_are_one_line(cli, tmp_path, fx, docs, message):
    code, out, err = cli("run", _multi(tmp_path, fx, *docs), "--out", tmp_path / "out")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.intermediates").exists()


def test_m12_final_merge_needs_an_output(cli, tmp_path, fx):
    code, out, err = cli("run", _multi(tmp_path, fx, M12_STEP1, M12_FINAL))
    assert code == 2 and "no output path" in err, err
