"""Wrapping a model's or an optimizer's method while a fit runs, in one order however many
callbacks wrap it.

:class:`gradtools.GradientMonitor` and :class:`gradtools.SpikeGuard` both wrap
``optimizer.apply`` (and ``model.compute_loss``) for the length of ``model.fit``. Which
wrapper sits outside must not depend on the order of the callbacks: the monitor records the
gradients the step computed, the guard decides what is applied, so the monitor's wrapper is
always outside the guard's. Each wrapper has a rank; higher ranks wrap lower ones.
"""

from __future__ import annotations

import sys
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


_ON_ERROR, _WATCHED, _FIT, _FIT_OF = "_gradtools_on_error", "_gradtools_watched", "_gradtools_fit", "_gradtools_fit_of"


class FitEndedUnseen(RuntimeError):
    """A ``model.fit`` that raised where no probe saw it, found by the next monitored fit."""
#: The callback list's hooks that ``fit`` calls between steps.
_CALLBACK_HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end")


def retrace_watched(model, on_error: Callable, callback_list=None) -> None:
    """``model.make_train_function(force=True)``, so that the wrappers now installed are in the
    traced step, and ``on_error(error)`` called when ``fit`` raises: Keras calls no
    ``on_train_end`` then (Ctrl-C, an error in a step or in any callback). The new train
    function, and the callback list ``fit`` calls each hook through, call every ``on_error``
    registered on the model, so a second callback that traces again keeps the first one's."""
    hooks = model.__dict__.setdefault(_ON_ERROR, [])
    if on_error not in hooks:
        hooks.append(on_error)
    if callback_list is not None:
        model.__dict__.setdefault(_FIT_OF, {})[on_error] = callback_list.__dict__.setdefault(_FIT, object())
    model.make_train_function(force=True)
    model.train_function = _calling_on_error(model.train_function, hooks)
    if callback_list is not None and not callback_list.__dict__.get(_WATCHED):
        callback_list.__dict__[_WATCHED] = True
        for hook in _CALLBACK_HOOKS:
            setattr(callback_list, hook, _calling_on_error(getattr(callback_list, hook), hooks))


def end_runs_of_other_fits(model, callback_list) -> None:
    """Called first in ``on_train_begin``. A fit that raised outside the train step and the four
    watched hooks (in validation, or in another callback's ``on_train_begin``) got no
    ``on_train_end`` and no ``on_error``: its probes are still installed. Each run it left is
    ended now (as failed: :class:`FitEndedUnseen`), before this fit installs its own."""
    if callback_list is None:
        return
    fit = callback_list.__dict__.setdefault(_FIT, object())
    fit_of = model.__dict__.setdefault(_FIT_OF, {})
    for hook in list(model.__dict__.get(_ON_ERROR, [])):
        if fit_of.get(hook, fit) is not fit:
            hook(FitEndedUnseen("model.fit raised where gradtools did not see it (in validation, or in a "
                                "callback's on_train_begin): its run was ended when the next fit began"))
    live = model.__dict__.get(_ON_ERROR, [])
    for hook in [h for h in fit_of if h not in live]:
        del fit_of[hook]


def calling_callback_list():
    """Called from a callback's ``on_train_begin``: the ``keras.callbacks.CallbackList`` that
    ``fit`` calls each hook through (that method's caller), or None when Keras called the
    callback some other way."""
    import keras  # noqa: PLC0415 - only the callbacks that watch a fit need it

    caller = sys._getframe(2).f_locals.get("self")
    return caller if isinstance(caller, keras.callbacks.CallbackList) else None


def unwatch(model, on_error: Callable) -> None:
    hooks = model.__dict__.get(_ON_ERROR, [])
    if on_error in hooks:
        hooks.remove(on_error)


def _calling_on_error(function, hooks: list):
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            for hook in list(hooks):
                hook(error)
            raise
    return call
