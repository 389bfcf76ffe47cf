"""Text tasks for the real-model quality benchmark (all-MiniLM-L6-v2), built without a download.

Every example comes from the docstrings of the running Python's standard library, read with
``inspect`` (same Python version -> same data). Six classification tasks, each a list of
``(text, label)`` pairs, shuffled and split with a fixed seed:

- ``module``: which of 8 stdlib modules a docstring sentence comes from (8 classes);
- ``kind``: is the docstring's owner a module, a class or a function (3 classes);
- ``arity``: a function's positional-parameter count, 0/1/2/3+, from its docstring alone;
- ``order``: are two consecutive docstring sentences in their original order (2 classes);
- ``shuffled``: has a sentence's word order been scrambled (2 classes);
- ``family``: which package family (email, http, xml, unittest, logging, json) a sentence is from.

None is keyword-trivial: sentences are short, module names are masked out of the text, and
``order``/``shuffled`` keep the bag of words. No model is run here. Status: the task builders
only; the fine-tune/merge/evaluate driver is not written yet (see the README).
"""
from __future__ import annotations

import importlib
import inspect
import random
import re

MODULES = ["os", "re", "json", "collections", "itertools", "functools", "pathlib", "subprocess"]
FAMILIES = {
    "email": ["email", "email.message", "email.utils", "email.parser"],
    "http": ["http", "http.client", "http.server", "http.cookies"],
    "xml": ["xml.dom.minidom", "xml.etree.ElementTree", "xml.sax"],
    "unittest": ["unittest", "unittest.mock", "unittest.case"],
    "logging": ["logging", "logging.handlers", "logging.config"],
    "json": ["json", "json.decoder", "json.encoder"],
}
_SPLIT = re.compile(r"(?<=[.!?])\s+")


def _objects(modname):
    """(qualname, object, docstring) for the module and its public members, sorted by name."""
    mod = importlib.import_module(modname)
    out = [(modname, mod, inspect.getdoc(mod) or "")]
    for name in sorted(vars(mod)):
        obj = getattr(mod, name)
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((f"{modname}.{name}", obj, inspect.getdoc(obj) or ""))
    return out


def _sentences(doc, mask=()):
    text = " ".join(doc.split())
    for word in mask:
        text = re.sub(rf"\b{re.escape(word)}\b", "[X]", text)
    return [s for s in _SPLIT.split(text) if 4 <= len(s.split()) <= 40]


def _module_task(rng):
    return [(s, i) for i, m in enumerate(MODULES) for _, _, d in _objects(m)
            for s in _sentences(d, mask=m.split("."))]


def _family_task(rng):
    ex = []
    for i, (fam, mods) in enumerate(FAMILIES.items()):
        for m in mods:
            ex += [(s, i) for _, _, d in _objects(m) for s in _sentences(d, mask=(fam, *m.split(".")))]
    return ex


def _all_objects():
    return [o for fam in FAMILIES.values() for m in fam for o in _objects(m)] + \
        [o for m in MODULES for o in _objects(m)]


def _kind_task(rng):
    ex = []
    for _, obj, d in _all_objects():
        first = _sentences(d)[:2]
        if first:
            ex.append((" ".join(first), 0 if inspect.ismodule(obj) else 1 if inspect.isclass(obj) else 2))
    return ex


def _arity_task(rng):
    ex = []
    for _, obj, d in _all_objects():
        if not inspect.isfunction(obj) or not _sentences(d):
            continue
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        ex.append((" ".join(_sentences(d)[:2]), min(len(params), 3)))
    return ex


def _order_task(rng):
    ex = []
    for _, _, d in _all_objects():
        s = _sentences(d)
        for a, b in zip(s, s[1:]):
            ex.append((f"{a} [SEP] {b}", 1) if rng.random() < 0.5 else (f"{b} [SEP] {a}", 0))
    return ex


def _shuffled_task(rng):
    ex = []
    for _, _, d in _all_objects():
        for s in _sentences(d):
            words = s.split()
            if rng.random() < 0.5:
                rng.shuffle(words)
                ex.append((" ".join(words), 1 if words != s.split() else 0))
            else:
                ex.append((s, 0))
    return ex


BUILDERS = {"module": _module_task, "kind": _kind_task, "arity": _arity_task,
            "order": _order_task, "shuffled": _shuffled_task, "family": _family_task}


def build_task(name, seed=0, n_train=512, n_test=256):
    """Return (train, test) lists of (text, label) for one task, deterministic given the seed."""
    rng = random.Random(f"{name}-{seed}")
    ex = sorted(set(BUILDERS[name](rng)))
    rng.shuffle(ex)
    n_test = min(n_test, len(ex) // 3)
    return ex[n_test:n_test + n_train], ex[:n_test]
