"""Wrapping a model's or an optimizer's method while a fit runs, in one order however many
callbacks wrap it.

:class:`gradtools.GradientMonitor` and :class:`gradtools.SpikeGuard` both wrap
``optimizer.apply`` (and ``model.compute_loss``) for the length of ``model.fit``. Which
wrapper sits outside must not depend on the order of the callbacks: the monitor records the
gradients the step computed, the guard decides what is applied, so the monitor's wrapper is
always outside the guard's. Each wrapper has a rank; higher ranks wrap lower ones.
"""

from __future__ import annotations

from collections.abc import Callable

#: Ranks: the guard next to the method, the monitor outside it.
GUARD, MONITOR = 0, 1

_ATTRIBUTE = "_gradtools_probes"


def wrap(owner, name: str, make_wrapper: Callable, rank: int) -> object:
    """Wrap ``owner.<name>`` with ``make_wrapper(inner)`` (``inner`` is the method, or the
    wrapper of the next lower rank) until :func:`unwrap` is called with the returned token."""
    probes = owner.__dict__.setdefault(_ATTRIBUTE, {})
    if name not in probes:
        probes[name] = {"original": owner.__dict__.get(name), "wrappers": []}
    token = object()
    probes[name]["wrappers"].append((rank, token, make_wrapper))
    _rebuild(owner, name)
    return token


def unwrap(owner, name: str, token) -> None:
    """Take away one wrapper (the others stay, in their order); without any, the method is
    the owner's own again."""
    entry = owner.__dict__.get(_ATTRIBUTE, {}).get(name)
    if entry is None:
        return
    entry["wrappers"] = [w for w in entry["wrappers"] if w[1] is not token]
    if entry["wrappers"]:
        _rebuild(owner, name)
        return
    del owner.__dict__[_ATTRIBUTE][name]
    if entry["original"] is not None:
        setattr(owner, name, entry["original"])
    elif name in owner.__dict__:
        delattr(owner, name)


def _rebuild(owner, name: str) -> None:
    entry = owner.__dict__[_ATTRIBUTE][name]
    method = entry["original"] or getattr(type(owner), name).__get__(owner)
    for _, _, make_wrapper in sorted(entry["wrappers"], key=lambda w: w[0]):
        method = make_wrapper(method)
    setattr(owner, name, method)
