"""Where merged items go. Each sink is atomic: nothing appears at its target until ``commit``,
and a failure (an error, Ctrl-C) leaves no partial output behind.

* ``FullModel``: sharded safetensors + index, config/tokenizer files, model card, merge report;
* ``Adapter``: a LoRA as PEFT (directory) or kohya (directory, or one ``.safetensors`` file);
* ``Bundle``: an RMM bundle (basis tensors + manifest);
* ``StateVersion``: one tensor version of a continual state (the state's ``state.json`` is the
  commit point, written by ``continual`` after the version is in place);
* ``UnitShards``: one unit's shards of a sharded run, each tensor's receipt entry recorded (the
  unit's directory and receipt are :mod:`.stage`'s, its commit :mod:`.schedule`'s).

Usage: ``with sink: execute(...); sink.commit()``. ``put(name, value, report)`` takes one item in
execution order; ``report`` is the item's JSON facts (None: nothing to report). Sinks know no math.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


def merge_metadata(recipe, method: str) -> dict[str, str]:
    """The safetensors ``__metadata__`` of everything `merge run` writes."""
    from . import __version__

    return {
        "format": "pt",
        "merge_tool": f"mergekit-ortho {__version__}",
        "merge_method": method,
        "merge_recipe": json.dumps(recipe._raw if recipe._raw is not None else recipe.model_dump(), sort_keys=False),
    }


def recipe_yaml(recipe) -> str:
    import yaml

    data = recipe._raw if recipe._raw is not None else recipe.model_dump()
    return yaml.safe_dump(data, sort_keys=False)


@dataclass
class Card:
    """The README.md model card of an output directory."""

    method: str
    base: str | None
    models: list[tuple[str, str]]
    recipe_yaml: str = ""
    extra: str = ""

    def write(self, directory: Path, extra: str | None = None) -> None:
        from .writer import write_model_card

        write_model_card(directory, self.method, self.base, self.models, self.recipe_yaml,
                         self.extra if extra is None else extra)


def json_safe(report: dict) -> dict:
    """A report as JSON: small tensors as lists, large ones described, NaN as null."""
    import torch

    def conv(v):
        if isinstance(v, torch.Tensor):
            return v.tolist() if v.numel() <= 4096 else f"<tensor {list(v.shape)}>"
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, float) and v != v:
            return None
        return v

    return conv(report)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """A whole (small) safetensors file at once: adapters and bundles, never full models."""
    from safetensors.torch import save_file

    from .stable_header import fix_order

    try:
        save_file(tensors, str(path), metadata=metadata)
        fix_order(path, metadata)  # the same bytes in every process
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


class _AtomicDirSink:
    """Shared lifecycle: an AtomicDirectory opened on enter, removed unless committed."""

    def __init__(self, target: Path, overwrite: bool, inputs, force_replace: bool):
        from .placement import AtomicDirectory

        self.atomic = AtomicDirectory(target, overwrite, inputs=inputs, force_replace=force_replace)
        self.tmp: Path | None = None

    def check(self) -> None:
        """Refuse the target (an input, a user's directory) before any work."""
        self.atomic.check()

    def __enter__(self):
        self.tmp = self.atomic.__enter__()
        self._opened()
        return self

    def _opened(self) -> None:
        pass

    def __exit__(self, exc_type, exc, tb) -> None:
        self.atomic.__exit__(exc_type, exc, tb)

    def _commit(self) -> Path:
        self.atomic.commit()
        return self.atomic.target


class FullModel(_AtomicDirSink):
    """A model directory: tensors streamed into planned shards, cast to each one's output dtype.
    ``staged`` (shard file name -> verified file, from `merge finalize`): the shards are already
    written; they are linked (else copied) into the output and nothing is ``put``."""

    def __init__(self, target: Path, shards, metadata: dict[str, str], card: Card, *, donor: Path | None = None,
                 config_dtype: str | None = None, config_updates: dict | None = None, overwrite: bool = False,
                 inputs=(), force_replace: bool = False, report_head: dict | None = None, vocab=None,
                 chat_template: str | None = None, staged: dict[str, Path] | None = None, fp8=None):
        super().__init__(target, overwrite, inputs, force_replace)
        self.staged, self.fp8 = staged, fp8  # fp8: fp8_out.Fp8Output, the weights written as codes + scales
        # an aligned vocabulary writes its own tokenizer; a chat template is written beside it
        self.vocab, self.chat_template = vocab, chat_template
        self.shards, self.metadata, self.card = shards, metadata, card
        self.donor, self.config_dtype, self.config_updates = donor, config_dtype, dict(config_updates or {})
        self.dtypes = {t.name: t.dtype for s in shards for t in s}
        self.report_head, self.reports = report_head, {}
        self.writer = None

    def order(self) -> list[str]:
        return _order(self.shards, self.fp8)

    def _opened(self) -> None:
        from .writer import ShardedWriter

        if self.staged is not None:
            for name, src in self.staged.items():
                _link_or_copy(src, self.tmp / name)
            return
        self.writer = ShardedWriter(self.tmp, self.shards, self.metadata)

    def prepare(self, name: str, value):
        """``value`` as ``put`` will write it: cast to the tensor's output dtype (refusing values
        beyond its range). ``execute`` calls this on the thread that computed the item, so the
        cast of one item overlaps the writing of another; ``put`` then has nothing to convert."""
        import torch

        from .dtypes import cast_checked

        if self.fp8 is not None and name in self.fp8.weights:
            return value
        dtype = getattr(torch, self.dtypes[name])
        return value if value.dtype == dtype else cast_checked(value, dtype, name)

    def put(self, name: str, value, report: dict | None = None) -> None:
        if self.fp8 is not None and name in self.fp8.weights:
            self.fp8.put(self.writer.write, name, value)
        else:
            self.writer.write(name, self.prepare(name, value))
        if report is not None:
            self.reports[name] = json_safe(report)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.writer is not None:
            self.writer.abort()
        super().__exit__(exc_type, exc, tb)

    def commit(self) -> Path:
        from .writer import copy_model_files, shard_names, write_index

        if self.staged is None:
            if self.fp8 is not None:
                self.fp8.finish(self.writer.write, self.shards)
            self.writer.finish()
        elif len(self.shards) > 1:
            write_index(self.tmp, self.shards, shard_names(len(self.shards)))
        from .writer import TOKENIZER_FILES

        skip = TOKENIZER_FILES if self.vocab is not None else ()
        copy_model_files(self.donor, self.tmp, self.config_dtype, self.config_updates, skip=skip)
        if self.vocab is not None:
            self.vocab.save(self.tmp, chat_template=self.chat_template)
        elif self.chat_template is not None:
            (self.tmp / "chat_template.json").unlink(missing_ok=True)
            (self.tmp / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        self.card.write(self.tmp)
        if self.reports:
            write_json(self.tmp / "merge_report.json", {**(self.report_head or {}), "modules": self.reports})
        return self._commit()


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where ``src`` is on the same file system (no bytes copied), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class Adapter:
    """A LoRA: ``put`` takes each module's (A, B) factors; ``pack(modules)`` turns them into
    ``(tensors, safetensors metadata, adapter_config or None)`` at commit (PEFT or kohya layout).
    A kohya target ending in ``.safetensors`` is one file; otherwise a directory with the weights,
    the config, the merge report (``report_head`` given) and the card (``card`` given)."""

    def __init__(self, target: Path, fmt: str, pack: Callable[[dict], tuple[dict, dict, dict | None]], *,
                 card: Card | None = None, card_extra: Callable[[dict], str] | None = None,
                 report_head: dict | None = None, overwrite: bool = False, inputs=(), force_replace: bool = False):
        from .placement import AtomicDirectory, AtomicFile

        self.target, self.fmt, self.pack = Path(target), fmt, pack
        self.card, self.card_extra, self.report_head = card, card_extra, report_head
        self.modules: dict[str, tuple[Any, Any]] = {}
        self.reports: dict[str, dict] = {}
        self.single_file = fmt == "kohya" and self.target.suffix == ".safetensors"
        if self.single_file:  # checks the target at once, before any work
            self.atomic = AtomicFile(self.target, overwrite, inputs=inputs, force_replace=force_replace)
        else:
            self.atomic = AtomicDirectory(self.target, overwrite, inputs=inputs, force_replace=force_replace)
            self.atomic.check()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass  # nothing is on disk before commit

    def order(self) -> list[str]:
        return []  # any order

    def put(self, name: str, value, report: dict | None = None) -> None:
        self.modules[name] = (value.A.contiguous(), value.B.contiguous())
        if report is not None:
            self.reports[name] = json_safe(report)

    def commit(self) -> Path:
        tensors, metadata, config = self.pack(self.modules)
        if self.single_file:
            with self.atomic as tmp:
                save_safetensors(tensors, tmp, metadata)
            return self.atomic.target
        with self.atomic as tmp:
            weights = "adapter_model.safetensors" if self.fmt == "peft" else f"{self.target.name}.safetensors"
            save_safetensors(tensors, tmp / weights, metadata)
            if config is not None:
                write_json(tmp / "adapter_config.json", config)
            if self.report_head is not None:
                write_json(tmp / "merge_report.json", {**self.report_head, "modules": self.reports})
            if self.card is not None:
                self.card.write(tmp, self.card_extra(self.modules) if self.card_extra else None)
            self.atomic.commit()
        return self.atomic.target


class Bundle(_AtomicDirSink):
    """An RMM bundle: ``put`` takes each module's basis tensors; ``manifest(reports)`` builds the
    manifest at commit; the card states the storage ratio the bundle achieved."""

    def __init__(self, target: Path, manifest: Callable[[dict], dict], card: Card, describe: Callable[[dict], str],
                 *, overwrite: bool = False, inputs=(), force_replace: bool = False):
        super().__init__(target, overwrite, inputs, force_replace)
        self.check()
        self.manifest, self.card, self.describe = manifest, card, describe
        self.tensors: dict[str, dict] = {}
        self.reports: dict[str, dict] = {}

    def order(self) -> list[str]:
        return []

    def put(self, name: str, value, report: dict | None = None) -> None:
        self.tensors[name] = value.tensors
        self.reports[name] = json_safe(report or {})

    def commit(self) -> Path:
        from . import bundle

        try:
            written = bundle.write_bundle(self.tmp, self.tensors, self.manifest(self.reports))
        except OSError as e:
            raise UserError(f"cannot write the bundle into {self.atomic.target}: {e.strerror or e}") from None
        self.card.write(self.tmp, self.describe(written))
        return self._commit()


def tensor_record(name: str, t) -> dict:
    """The receipt entry of one tensor as written (bytes hashed exactly as the writer stores them)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else b""
    finite = bool(torch.isfinite(flat).all()) if flat.is_floating_point() and flat.numel() else True
    return {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": flat.numel() * flat.element_size(),
            "finite": finite}


def _order(shards, fp8) -> list[str]:
    """The items in shard order; an FP8 weight's scale is written by the weight's ``put``."""
    skip = fp8.scales if fp8 is not None else ()
    return [t.name for s in shards for t in s if t.name not in skip]


class UnitShards:
    """One unit of a sharded run (`merge run --shard`, :mod:`.schedule`): its planned shards, each
    tensor cast to its output dtype, written under their names in the whole output; each tensor's
    receipt entry (:func:`tensor_record`) recorded as it is written."""

    def __init__(self, directory: Path, shards, names: list[str], metadata: dict[str, str]):
        self.directory, self.shards, self.names, self.metadata = Path(directory), shards, names, metadata
        self.dtypes = {t.name: t.dtype for s in shards for t in s}
        self.records: dict[str, dict] = {}
        self.reports: dict[str, dict] = {}
        self.writer = None

    def order(self) -> list[str]:
        return [t.name for s in self.shards for t in s]

    def __enter__(self):
        from .writer import ShardedWriter

        self.writer = ShardedWriter(self.directory, self.shards, self.metadata, names=self.names, index=False)
        return self

    def put(self, name: str, value, report: dict | None = None) -> None:
        import torch

        from .dtypes import cast_checked

        dtype = getattr(torch, self.dtypes[name])
        value = value if value.dtype == dtype else cast_checked(value, dtype, name)
        self.records[name] = tensor_record(name, value)
        self.writer.write(name, value)
        if report is not None:
            self.reports[name] = json_safe(report)

    def finish(self) -> list[dict]:
        """All shards written and synced: the receipt's ``files``."""
        self.writer.finish()
        return [{"name": fname, "bytes": (self.directory / fname).stat().st_size,
                 "tensors": [self.records[t.name] for t in shard]} for fname, shard in zip(self.names, self.shards)]

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.writer is not None:
            self.writer.abort()


class StateVersion:
    """One tensor version ``root/version`` of a continual state, sharded: a one-tensor state as
    float32, a state of parts (``put`` of {stored name: tensor}) as its fold lays it out. ``put``'s
    reports (a fold's per-tensor statistics) are summed into ``stats``. ``commit`` moves the
    version into place; the caller then commits ``state.json``, which names it."""

    def __init__(self, root: Path, version: str, shards, metadata: dict[str, str]):
        self.root, self.version, self.shards, self.metadata = Path(root), version, shards, metadata
        self.tmp = self.root / f".{version}.partial-{os.getpid()}"
        self.stats: dict[str, float] = {}
        self.writer = None
        self._committed = False

    def order(self) -> list[str]:
        return [t.name for s in self.shards for t in s]

    def __enter__(self):
        from .writer import ShardedWriter

        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.writer = ShardedWriter(self.tmp, self.shards, self.metadata)
        return self

    def put(self, name: str, value, report: dict | None = None) -> None:
        import torch

        for stored, t in (value.items() if isinstance(value, dict) else [(name, value.to(torch.float32))]):
            self.writer.write(stored, t.contiguous())
        for k, v in (report or {}).items():
            self.stats[k] = self.stats.get(k, 0.0) + float(v)

    def finish(self) -> None:
        """All tensors written and synced; the version is not yet in place."""
        self.writer.finish()

    def write_json(self, name: str, data: dict) -> None:
        """A small JSON file beside the tensors (a version's description), synced before ``commit``."""
        with open(self.tmp / name, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> Path:
        from .placement import fsync_path

        os.rename(self.tmp, self.root / self.version)
        fsync_path(self.root)
        self._committed = True
        return self.root / self.version

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._committed:
            return
        if self.writer is not None:
            self.writer.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)
