"""Reading a third-party pickle that should hold weights, and refusing anything else.

cxrtool's rule: checkpoints never unpickle arbitrary objects (they are safetensors). The one
exception is the one-time import of another library's weight file that is a pickle
(TorchXRayVision's DenseNet files are whole pickled modules), and even there nothing
arbitrary is unpickled:

- :func:`globals_asked` lists what a file's pickles would import, by reading their opcodes,
  without unpickling anything; a file that asks for anything outside the admitted list
  (``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) is refused before it is read.
- :func:`reader` is a ``pickle_module`` for ``torch.load`` whose unpickler builds only the
  admitted names: some may be called by the pickle (the tensor rebuild functions, an
  ``OrderedDict``), the others (the network's module classes) may only be created empty and
  given their saved attributes, never called, so no constructor runs with the file's
  arguments. Anything else stops the read with :class:`RefusedGlobal`.
"""

from __future__ import annotations

import _compat_pickle
import importlib
import io
import pickle
import pickletools
import types
import zipfile
from collections.abc import Iterable
from pathlib import Path

Name = tuple[str, str]  # (module, name), as a pickle's GLOBAL opcode names it

_STRING_OPS = frozenset({"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                         "SHORT_BINSTRING"})
_MEMO_GETS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_LARGEST_PICKLE = 256 * 2**20  # bytes a zip's pickle may unpack to before it is read


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for something outside the admitted list (``name``, as ``module.name``)."""

    def __init__(self, name: str, how: str = "asks for") -> None:
        module, _, short = name.rpartition(".")
        if module in ("posix", "nt"):  # os.system is pickled under the module that defines it
            name = f"os.{short}"
        super().__init__(f"the pickle {how} {name}, which a weights file never needs")
        self.name = name


def _python3_name(module: str, name: str) -> Name:
    """A protocol-2 pickle's Python 2 name (``__builtin__.set``) as Python 3 knows it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _globals_of_one_pickle(stream: io.BufferedIOBase) -> list[Name]:
    """The names one pickle imports (GLOBAL, INST, and STACK_GLOBAL whose two strings it can
    follow), read from its opcodes; raises ValueError on bytes that are not a pickle."""
    asked: list[Name] = []
    memo: dict[int, str | None] = {}
    strings: list[str | None] = []  # the values of the latest string pushes, for STACK_GLOBAL
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in ("GLOBAL", "INST"):
            module, _, name = str(arg).partition(" ")
            asked.append(_python3_name(module, name))
        elif opcode.name == "STACK_GLOBAL":
            if len(strings) >= 2 and strings[-2] is not None and strings[-1] is not None:
                asked.append((strings[-2], strings[-1]))
            # else: names built in ways this reading does not follow; the unpickler still
            # refuses them, should the file be read
        if opcode.name in _STRING_OPS:
            strings.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif opcode.name in _MEMO_GETS:
            strings.append(memo.get(arg))
        elif opcode.name in _MEMO_PUTS:
            memo[len(memo) if opcode.name == "MEMOIZE" else arg] = strings[-1] if strings else None
        elif opcode.name not in ("FRAME", "PROTO"):
            strings.clear()
    return asked


def globals_asked(path: str | Path) -> list[Name] | None:
    """What a PyTorch file's pickles import, in order, read without unpickling anything; None
    when it holds no pickle at all (not a PyTorch file, or one cut short).

    Reads torch's zip format (``*/data.pkl``) and its older format (pickles one after
    another, then the raw storages), which a plain pickle looks like too.
    """
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pickles = [name for name in archive.namelist() if name.endswith(".pkl")]
                if not pickles or any(archive.getinfo(name).file_size > _LARGEST_PICKLE for name in pickles):
                    return None  # no pickle; or one no weights file has (a module's is kilobytes)
                return [name for entry in pickles for name in _globals_of_one_pickle(io.BytesIO(archive.read(entry)))]
        asked: list[Name] = []
        with open(path, "rb") as stream:
            # magic number, protocol version, system info, the object, its storages' keys
            for index in range(5):
                try:
                    asked += _globals_of_one_pickle(stream)
                except ValueError:
                    if index == 0:
                        return None  # not even one pickle
                    break  # the raw storages (or the end of a plain pickle) follow
        return asked
    except (OSError, zipfile.BadZipFile, EOFError, KeyError):
        return None


def reader(*, calls: Iterable[Name], classes: Iterable[Name]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` that builds only what is admitted.

    Args:
        calls: names the pickle may call (REDUCE): functions that rebuild tensors,
            containers. Whatever arguments the file gives them, they build data.
        classes: names the pickle may only create empty (``cls.__new__``, as pickle's
            protocol 2 does) and give their saved attributes: module classes, whose
            constructors (which may download or read files) never run.

    Example:
        >>> torch.load(path, weights_only=False, pickle_module=reader(calls=[...], classes=[...]))
    """
    callable_names = frozenset(calls)
    admitted = callable_names | frozenset(classes)

    class Unpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be narrowed one by one
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module: str, name: str):
            if self.proto < 3 and self.fix_imports:
                module, name = _python3_name(module, name)
            if (module, name) not in admitted:
                raise RefusedGlobal(f"{module}.{name}")
            return _resolve(module, name)

        def _callable(self, function) -> bool:
            return any(function is _resolve(*name, missing=_ABSENT) for name in callable_names)

        def _class(self, cls) -> bool:
            return any(cls is _resolve(*name, missing=_ABSENT) for name in admitted)

        def load_build(self):
            if self._class(self.stack[-2]):  # state set on a class or function itself, not on an object built
                raise RefusedGlobal(_describe(self.stack[-2]), "changes")
            super().load_build()

        dispatch[pickle.BUILD[0]] = load_build

        def load_reduce(self):
            stack = self.stack
            args = stack.pop()
            function = stack[-1]
            if not self._callable(function):
                raise RefusedGlobal(_describe(function), "calls")
            stack[-1] = function(*args)

        dispatch[pickle.REDUCE[0]] = load_reduce

        def load_newobj(self):
            args = self.stack.pop()
            cls = self.stack.pop()
            if not self._class(cls):
                raise RefusedGlobal(_describe(cls), "creates")
            self.append(cls.__new__(cls, *args))

        dispatch[pickle.NEWOBJ[0]] = load_newobj

        def load_newobj_ex(self):
            kwargs = self.stack.pop()
            args = self.stack.pop()
            cls = self.stack.pop()
            if not self._class(cls):
                raise RefusedGlobal(_describe(cls), "creates")
            self.append(cls.__new__(cls, *args, **kwargs))

        dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

        def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
            if self._callable(klass):
                self.append(klass(*args))
            elif self._class(klass) and not args:
                self.append(klass.__new__(klass))
            else:
                raise RefusedGlobal(_describe(klass), "calls")

    def load(file, **kwargs):
        return Unpickler(file, **kwargs).load()

    module = types.ModuleType("cxrtool_restricted_pickle")
    module.Unpickler = Unpickler
    module.load = load
    module.UnpicklingError = pickle.UnpicklingError
    return module


_RAISE, _ABSENT = object(), object()


def _resolve(module: str, name: str, missing=_RAISE):
    """An admitted name's object (its module is imported: it is one of the admitted ones);
    ``missing`` where this version of the library has no such name, if given."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        if missing is _RAISE:
            raise
        return missing


def _describe(thing) -> str:
    if isinstance(thing, type) or callable(thing):
        return f"{getattr(thing, '__module__', '?')}.{getattr(thing, '__qualname__', type(thing).__name__)}"
    return f"a {type(thing).__name__}"


__all__ = ["RefusedGlobal", "globals_asked", "reader"]
