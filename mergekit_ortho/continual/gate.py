"""The gate against diverged checkpoints (issue 16): refuse a model whose task vector is far from
the ones merged before, and optionally let a user's evaluation command veto the candidate.

Norms, in the same streaming pass as the fold: for each tensor group g (a tensor name with its
layer indices replaced by ``*``: ``model.layers.*.mlp.up_proj.weight``) the candidate's task-vector
norm ``n_g = sqrt(sum over the group's tensors of ||x - base||_F^2)`` (float64 sums of float32
differences of the inputs as read, after the recipe's ``dtype`` rounding). Each merged model's
norms are kept in its history entry. With ``max_norm_ratio = r`` the candidate is refused when,
for some group, ``n_g / median_g > r`` or ``median_g / n_g > r``, the median being over the models
already merged that have norms for g (none yet: nothing to compare, accepted). A refusal happens
before the version is put in place, so the state is untouched; the queue moves the model to its
quarantine list.

``command``: run (through the shell, ``{path}`` replaced by the quoted path and ``MERGE_CANDIDATE``
set) on the candidate's export once the version is written but before ``state.json`` is
committed; anything but exit 0 refuses it and removes the version.

The groups and the norms are `merge analyze`'s (:func:`..analysis.names.group_of`,
:func:`..analysis.stats.task_vector_sq_norm`), so the two report the same numbers.
"""
from __future__ import annotations

import math
import os
import shlex
import statistics
import subprocess
from pathlib import Path

from ..analysis.names import group_of
from ..errors import UserError


class GateRefused(UserError):
    """The gate refused the model; the state is unchanged."""


def check_config(config: dict) -> dict:
    """The gate settings, checked: ``max_norm_ratio`` (a number > 1, or None: off), ``command``."""
    unknown = sorted(set(config) - {"max_norm_ratio", "command"})
    if unknown:
        raise UserError(f"gate: unknown setting '{unknown[0]}' (max_norm_ratio, command)")
    r = config.get("max_norm_ratio")
    if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 1 or math.isinf(r)):
        raise UserError(f"gate.max_norm_ratio must be a finite number above 1 (e.g. 5), got {r!r}")
    cmd = config.get("command")
    if cmd is not None and (not isinstance(cmd, str) or not cmd.strip()):
        raise UserError("gate.command must be a non-empty shell command")
    return {k: v for k, v in (("max_norm_ratio", r), ("command", cmd)) if v is not None}


class Gate:
    def __init__(self, config: dict, history: list[dict]):
        self.ratio = config.get("max_norm_ratio")
        self.command = config.get("command")
        self.history = history
        self._sq: dict[str, float] = {}

    def observe(self, name: str, x, base) -> None:
        """Add tensor ``name``'s squared task-vector norm to its group (``x``, ``base`` as read)."""
        if self.ratio is None:
            return
        from ..analysis.stats import task_vector_sq_norm

        if not x.is_floating_point():
            return
        g = group_of(name)
        self._sq[g] = self._sq.get(g, 0.0) + task_vector_sq_norm(x, base)

    @property
    def norms(self) -> dict[str, float]:
        return {g: math.sqrt(v) for g, v in sorted(self._sq.items())}

    def check(self, label: str) -> None:
        if self.ratio is None:
            return
        r = float(self.ratio)
        for g, n in self.norms.items():
            past = [h["norms"][g] for h in self.history
                    if isinstance(h.get("norms"), dict) and isinstance(h["norms"].get(g), (int, float))]
            if not past:
                continue
            med = statistics.median(past)
            far = n / med if med > 0 else (math.inf if n > 0 else 1.0)
            if far > r or (n > 0 and med / n > r) or (n == 0 and med > 0):
                how = f"{far:.3g}x" if far >= 1 else f"1/{(med / n if n else math.inf):.3g} of"
                raise GateRefused(f"gate: {label}'s task-vector norm in '{g}' is {n:.4g}, {how} the running "
                                  f"median {med:.4g} of {len(past)} model(s) (max_norm_ratio {r:g}); "
                                  "refused, the state is unchanged")

    def run_command(self, label: str, path: Path) -> None:
        cmd = self.command.replace("{path}", shlex.quote(str(path)))
        proc = subprocess.run(cmd, shell=True, env=dict(os.environ, MERGE_CANDIDATE=str(path)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = " ".join((proc.stdout or "").strip().splitlines()[-1:])[:200]
            raise GateRefused(f"gate: the evaluation command exited {proc.returncode} on {label}'s candidate"
                              + (f" ({tail})" if tail else "") + "; refused, the state is unchanged")
