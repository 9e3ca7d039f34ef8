"""Backend registry and dispatch shared by every op in :mod:`msclip_fast.ops`.

An op validates its inputs in ONE place, its ``validate(*args, **kwargs)`` step (raises
:class:`ValueError` naming the field and its value), run before any backend is selected; the
public ``*_ref`` functions call the same step. Each backend then states only its own limits with
a ``supports(*args, **kwargs) -> list[str]`` check that returns the reasons it cannot run those
(already valid) inputs (empty list: it can). The backends of ``<op>_<backend>.py`` modules name
these checks ``<backend>_supports``, ``<backend>_available`` and ``<backend>_auto_skip``.  ``"auto"``
walks the op's preference order and takes the first backend with no reasons; an explicit
backend that cannot run raises :class:`ValueError` naming every reason.  Falling back past a
preferred backend is logged at INFO in ONE line per process, the first time any op falls back:
every registered op that this machine makes fall back (its preferred backends' ``available``
reasons), with what it falls back to and why (a line per op would repeat the same reasons for
every op); each other op's own line follows at DEBUG when it actually falls back.  A later
fallback that line did not foresee (one caused by the inputs, e.g. a head dim a kernel does not
support) gets its own INFO line, once per (op, backend).  The environment variable
``MSCLIP_FAST_BACKEND`` overrides ``"auto"`` for every op that has that backend (xformers-style
explicit status); ops without it keep ``"auto"``.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

logger = logging.getLogger(__name__)

# Every Op, for the one-line fallback summary (weak: tests build throwaway ops).
_OPS: list = []
_summary_lock = threading.Lock()
_summary_logged = False


def host_readable(t) -> bool:
    """Whether a ``validate`` step may read ``t``'s values on the host: a real CPU tensor (not a
    fake/meta one traced by ``torch.compile``, whose values do not exist; the custom op's real
    implementation runs the same check eagerly, see :mod:`.custom_ops`)."""
    if t.device.type != "cpu":
        return False
    if type(t) is torch.Tensor:  # a plain tensor (the eager path): real values, no further check
        return True
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


BACKEND_NAMES = ("reference", "sdpa", "xformers", "triton", "cpu", "cuda")


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    ``fn`` computes the op (on inputs the op's ``validate`` step accepted); ``supports``
    returns why this backend cannot run the given inputs (its own limits only: device, dtypes,
    sizes; never a re-check of what ``validate`` checks);
    ``available`` returns why it cannot run at all on this machine (missing package...);
    ``auto_skip`` returns why ``"auto"`` should pass over it for these inputs although an
    explicit request may run it (e.g. Triton on CPU tensors through the interpreter: correct
    but far slower than the reference, so only tests select it by name).
    """

    name: str
    fn: Callable
    supports: Callable[..., list[str]] = lambda *a, **k: []
    available: Callable[[], list[str]] = lambda: []
    auto_skip: Callable[..., list[str]] = lambda *a, **k: []


@dataclass
class Op:
    """An op with its input validation and its backends, in ``auto`` preference order.

    ``validate`` (optional) takes the op's arguments (without ``backend``) and raises
    ValueError for inputs no backend may see; it must not read device values back (no host
    syncs on CUDA tensors): range checks that need the data run on CPU tensors only.
    """

    name: str
    validate: Callable[..., None] | None = None
    backends: dict[str, Backend] = field(default_factory=dict)
    _warned: set = field(default_factory=set)  # (chosen, first skipped) reported at INFO
    _seen: set = field(default_factory=set)  # ... and those that actually happened

    def __post_init__(self) -> None:
        _OPS.append(weakref.ref(self))

    def register(self, backend: Backend, before: str | None = None) -> None:
        """Add ``backend``; ``before`` names a registered backend that ``"auto"`` should try
        after it (default: last in the preference order)."""
        if backend.name not in BACKEND_NAMES:
            raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {backend.name!r}")
        if before is None:
            self.backends[backend.name] = backend
            return
        if before not in self.backends:
            raise ValueError(f"{self.name}: before={before!r} is not a registered backend {list(self.backends)}")
        items = [(n, b) for n, b in self.backends.items() if n != backend.name]
        i = [n for n, _ in items].index(before)
        items.insert(i, (backend.name, backend))
        self.backends = dict(items)

    def status(self) -> dict[str, list[str]]:
        """Backend name -> reasons it is unavailable here (empty: available)."""
        return {name: list(b.available()) for name, b in self.backends.items()}

    def select(self, backend: str, *args, **kwargs) -> Backend:
        """Validate the inputs (the op's ``validate`` step), then resolve ``backend`` (a name
        or ``"auto"``) for them.

        Raises:
            ValueError: invalid inputs, an unknown backend name, or an explicit backend that
                cannot run these inputs (the message lists every reason).
        """
        if self.validate is not None:
            self.validate(*args, **kwargs)
        if backend == "auto":
            env = os.environ.get("MSCLIP_FAST_BACKEND", "auto") or "auto"
            if env != "auto" and env not in BACKEND_NAMES:
                raise ValueError(f"MSCLIP_FAST_BACKEND={env!r} is not one of {('auto', *BACKEND_NAMES)}")
            # an op without that backend keeps "auto" (e.g. =sdpa leaves the loss alone)
            if env in self.backends:
                backend = env
        if backend != "auto":
            if backend not in self.backends:
                raise ValueError(
                    f"{self.name}: backend={backend!r} is not one of "
                    f"{['auto', *self.backends]}"
                )
            b = self.backends[backend]
            reasons = list(b.available()) or list(b.supports(*args, **kwargs))
            if reasons:
                raise ValueError(f"{self.name}: backend {backend!r} cannot run: " + "; ".join(reasons))
            return b
        skipped = []
        for b in self.backends.values():
            reasons = (
                list(b.available()) or list(b.supports(*args, **kwargs)) or list(b.auto_skip(*args, **kwargs))
            )
            if not reasons:
                if skipped:
                    key = (b.name, skipped[0][0])
                    if key not in self._seen or key not in self._warned:
                        self._log_fallback(key, b.name, skipped)
                return b
            skipped.append((b.name, reasons))
        raise ValueError(
            f"{self.name}: no backend can run these inputs: "
            + "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped)
        )

    def machine_fallback(self) -> tuple[str, list[tuple[str, list[str]]]] | None:
        """What ``"auto"`` falls back to on this machine whatever the inputs: (backend, [(passed
        over backend, its ``available`` reasons)]), or None when the first backend is available."""
        skipped = []
        for b in self.backends.values():
            reasons = list(b.available())
            if not reasons:
                return (b.name, skipped) if skipped else None
            skipped.append((b.name, reasons))
        return None

    def _log_fallback(self, key: tuple[str, str], chosen: str, skipped: list) -> None:
        global _summary_logged
        first_seen = key not in self._seen
        self._seen.add(key)
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in skipped)
        with _summary_lock:
            if key in self._warned:
                if first_seen:
                    logger.debug("%s: auto backend falls back to %r (%s)", self.name, chosen, detail)
                return
            if not _summary_logged:
                _summary_logged = True
                logger.info("%s", _fallback_summary(self, chosen, skipped))
                return
            self._warned.add(key)
        logger.info("%s: auto backend falls back to %r (%s)", self.name, chosen, detail)

    def __call__(self, *args, backend: str = "auto", **kwargs):
        return self.select(backend, *args, **kwargs).fn(*args, **kwargs)


def _fallback_summary(op: Op, chosen: str, skipped: list) -> str:
    """The one INFO line: ``op``'s actual fallback plus every other op's machine fallback, ops
    grouped by the backend they fall back to, each passed-over backend's reasons said once
    (with the ops they concern when they differ between ops). Marks the entries reported."""
    entries = []  # (op, chosen, skipped)
    for ref in list(_OPS):
        o = ref()
        if o is None:
            _OPS.remove(ref)
            continue
        if o is op:
            entries.append((o, chosen, skipped))
        elif (fb := o.machine_fallback()) is not None:
            entries.append((o, *fb))
    if not any(o is op for o, _, _ in entries):  # built outside the registry list (should not happen)
        entries.append((op, chosen, skipped))
    by_target: dict[str, list[str]] = {}
    why: dict[str, dict[str, list[str]]] = {}  # passed-over backend -> reasons -> ops
    for o, target, passed in entries:
        o._warned.add((target, passed[0][0]))
        by_target.setdefault(target, []).append(o.name)
        for name, reasons in passed:
            why.setdefault(name, {}).setdefault(", ".join(reasons), []).append(o.name)
    targets = "; ".join(f"{', '.join(names)} -> {t!r}" for t, names in by_target.items())
    reasons = "; ".join(
        f"{name}: {text}" if len(texts) == 1 else f"{name} ({', '.join(ops)}): {text}"
        for name, texts in why.items() for text, ops in texts.items()
    )
    return f"auto backend falls back: {targets} ({reasons})"
