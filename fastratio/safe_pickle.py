"""Reading third-party pickles (CIFAR-10 batches, EDM snapshots) as data, never as code.

``pickle.load`` calls any global a file names and lets the file set attributes on whatever object it
builds (``BUILD``), including the very functions and classes an allow-list hands it: a pickle could
rewrite ``torch._utils._rebuild_tensor_v2.__defaults__`` and change every later ``torch.load`` in the
process. So this module does not use ``pickle.Unpickler`` at all. ``load`` runs its own small pickle
machine over ``pickletools.genops``:

- ``GLOBAL``/``STACK_GLOBAL`` push an inert ``Global(module, name)`` token; a name outside the
  caller's handler table is refused on sight, naming it.
- ``REDUCE``/``NEWOBJ``/``copyreg`` reconstruction call the table's *handler* for that name with
  arguments that are already plain data; handlers return fresh values (a dict, a tensor, a record).
- ``BUILD`` only reaches ``Record`` objects this load created (``Record.build``); ``SETITEM`` only
  dicts, ``APPEND`` only lists, ``ADDITEMS`` only sets, all made by this load. Nothing live in the
  process is ever handed to the file, so loading changes nothing outside its own result.
- Persistent ids go to the caller's ``persistent`` (refused without one); extension codes and
  out-of-band buffers are refused.

The machine is iterative (no recursion), so deep nesting cannot overflow the interpreter stack;
consumers that walk the result recursively must bound their own depth.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import math
import pickle
import pickletools
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch


class UnsafePickleError(ValueError):
    """The pickle names a global outside the table or builds something this reader refuses."""


class MalformedPickleError(UnsafePickleError):
    """Not a well-formed pickle: truncated, unknown opcodes, inconsistent stack or memo."""


class Global(NamedTuple):
    """A name the pickle refers to; never called or mutated by the reader."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


class Record:
    """A fresh object made by a handler that accepts the pickle's ``BUILD`` state. ``build`` returns the
    finished value (which replaces the record on the stack and in the memo) or the record itself."""

    def build(self, state: Any) -> Any:
        raise UnsafePickleError(f"{type(self).__name__} takes no BUILD state")


# (module, name) -> what a call of that name returns; None admits the name only as an argument.
Handlers = dict[tuple[str, str], Callable[..., Any] | None]

# -- numpy ----------------------------------------------------------------------------------------
_PLAIN_KINDS = "biuf"  # bool, signed, unsigned, float: fixed-size numbers only


def _plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype) or dtype.kind not in _PLAIN_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafePickleError(f"numpy dtype {dtype!s:.40} refused (plain numbers only)")
    return dtype


class _DtypeRecord(Record):
    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        if not isinstance(code, str) or len(code) > 8:
            raise UnsafePickleError("numpy dtype code must be a short string")
        try:
            self.dtype = np.dtype(code)
        except TypeError as err:
            raise UnsafePickleError(f"numpy dtype {code!r}: {err}") from None
        _plain_dtype(self.dtype)

    def build(self, state: Any) -> np.dtype:
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError("numpy dtype state refused")
        if len(state) > 2 and (state[2] is not None or (len(state) > 3 and state[3] is not None)):
            raise UnsafePickleError("structured numpy dtypes are refused")
        return self.dtype.newbyteorder(state[1]) if state[1] in "<>" else self.dtype


class _ArrayRecord(Record):
    def __init__(self, cls: Any, shape: Any, code: Any):
        if cls != Global("numpy", "ndarray"):
            raise UnsafePickleError(f"numpy reconstruction of {cls!s:.60} refused")

    def build(self, state: Any) -> np.ndarray:
        if not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError("numpy array state refused")
        _, shape, dtype, fortran, raw = state
        dtype = _plain_dtype(dtype)
        if not isinstance(shape, tuple) or not all(isinstance(s, int) and 0 <= s < 2**40 for s in shape) or len(shape) > 32:
            raise UnsafePickleError("numpy array shape refused")
        if isinstance(raw, str):
            raw = raw.encode("latin-1")
        if not isinstance(raw, bytes | bytearray):
            raise UnsafePickleError("numpy array data must be bytes (object arrays are refused)")
        count = int(np.prod(shape, dtype=np.float64))
        if count * dtype.itemsize != len(raw):
            raise UnsafePickleError(f"numpy array of shape {shape} needs {count * dtype.itemsize} bytes, has {len(raw)}")
        return np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


def _numpy_scalar(dtype: Any, raw: Any = None) -> Any:
    dtype = _plain_dtype(dtype)
    if isinstance(raw, str):
        raw = raw.encode("latin-1")
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise UnsafePickleError("numpy scalar data refused")
    return np.frombuffer(raw, dtype=dtype)[0].item()


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    # Python 3 writes bytes at protocol <= 2 as _codecs.encode(text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode: only latin-1 text is accepted")
    return codecs.encode(text, "latin1")


NUMPY_HANDLERS: Handlers = {
    ("numpy", "dtype"): _DtypeRecord,
    ("_codecs", "encode"): _latin1_encode,
}
# numpy 1.x writes "numpy.core", 2.x "numpy._core".
for _core in ("numpy.core.multiarray", "numpy._core.multiarray"):
    NUMPY_HANDLERS[(_core, "_reconstruct")] = _ArrayRecord
    NUMPY_HANDLERS[(_core, "scalar")] = _numpy_scalar


# -- torch tensors ------------------------------------------------------------------------------
def _load_storage(raw: Any) -> Any:
    """torch.storage._load_from_bytes: a storage pickled by plain pickle is a small torch.save archive,
    read by torch's weights-only unpickler; what it refuses (a global such as os.system) it raises as
    pickle.UnpicklingError, which is this reader's refusal too."""
    if not isinstance(raw, bytes):
        raise UnsafePickleError("storage payload is not bytes")
    try:
        storage = torch.load(io.BytesIO(raw), weights_only=True)
    except pickle.UnpicklingError as err:
        refused = next((line.strip() for line in str(err).splitlines() if "global" in line.lower()), str(err).splitlines()[0] if str(err) else "")
        raise UnsafePickleError(f"storage payload refused by torch's weights-only reader ({refused[:160]})") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"storage payload holds a {type(storage).__name__}")
    return storage


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or len(value) > 16 or not all(type(v) is int and 0 <= v < 2**40 for v in value):
        raise UnsafePickleError(f"tensor {what} must be a short tuple of non-negative ints")
    return tuple(value)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 with every argument checked (the view must lie inside the storage)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError("tensor storage is not a storage")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0 or len(size) != len(stride):
        raise UnsafePickleError("tensor offset/stride refused")
    tensor = torch.empty((0,), dtype=storage.dtype)
    elements = storage._untyped_storage.nbytes() // tensor.element_size()
    if math.prod(size) and offset + sum((n - 1) * st for n, st in zip(size, stride)) >= elements:
        raise UnsafePickleError(f"tensor of size {size} reaches past its storage of {elements} elements")
    return tensor.set_(storage._untyped_storage, offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter data is not a tensor")
    return data  # the values only: a reader decides what becomes a parameter


TORCH_HANDLERS: Handlers = {
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}
# Storage classes named by torch.save's persistent ids (zip archives, TorchScript): tokens only.
STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16, "CharStorage": torch.int8,
    "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
for _name in STORAGE_DTYPES:
    TORCH_HANDLERS[("torch", _name)] = None


def _ordered_dict(items: Any = ()) -> dict:
    return dict(items)


def _fresh_set(items: Any = ()) -> set:
    return set(items)


# Containers every reader accepts: they come out as fresh built-in objects.
BUILTIN_HANDLERS: Handlers = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _fresh_set,
    ("builtins", "frozenset"): lambda items=(): frozenset(items),
    # Names a pickle may mention as arguments but never call (None = token only).
    ("builtins", "object"): None,
    ("numpy", "ndarray"): None,
}

# -- the machine ----------------------------------------------------------------------------------
_MARK = object()
_REFUSED_OPS = {"EXT1", "EXT2", "EXT4", "NEXT_BUFFER", "READONLY_BUFFER"}
_RECONSTRUCTORS = {Global("copyreg", "_reconstructor"), Global("copyreg", "__newobj__"), Global("copyreg", "__newobj_ex__")}


class _Machine:
    def __init__(self, handlers: Handlers, source: str, encoding: str, persistent: Callable[[Any], Any] | None,
                 fallback: Callable[[str, str], Callable[..., Any] | None] | None):
        self.handlers, self.source, self.encoding = handlers, source, encoding
        self.persistent, self.fallback = persistent, fallback
        self.stack: list[Any] = []
        self.marks: list[list[Any]] = []
        self.memo: dict[int, Any] = {}
        self.memo_keys: dict[int, list[int]] = {}  # id(object) -> memo slots, to swap a built record
        self.proto = 0

    def fail(self, message: str) -> UnsafePickleError:
        return UnsafePickleError(f"{self.source}: {message}")

    def malformed(self, message: str) -> MalformedPickleError:
        return MalformedPickleError(f"{self.source}: {message}")

    # stack helpers
    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.malformed("no MARK")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def pop(self) -> Any:
        if not self.stack:
            raise self.malformed("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise self.malformed("stack underflow")
        return self.stack[-1]

    def remember(self, key: int, value: Any) -> None:
        self.memo[key] = value
        self.memo_keys.setdefault(id(value), []).append(key)

    # resolving names and calls
    def global_(self, module: str, name: str) -> Global:
        if self.proto < 3:
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        ref = Global(module, name)
        if (module, name) not in self.handlers and ref not in _RECONSTRUCTORS:
            handler = self.fallback(module, name) if self.fallback is not None else None
            if handler is None:
                raise self.fail(f"refusing to load global {module}.{name} (not plain data)")
            self.handlers[(module, name)] = handler
        return ref

    def call(self, func: Any, args: Any, kwargs: dict | None = None) -> Any:
        if not isinstance(func, Global):
            raise self.fail(f"pickle calls a {type(func).__name__}, not a known global")
        if not isinstance(args, tuple):
            raise self.fail(f"arguments of {func} are not a tuple")
        if func == Global("copyreg", "_reconstructor"):  # protocols 0-1: (cls, base, state)
            if len(args) != 3 or args[1] != Global("builtins", "object") or args[2] is not None:
                raise self.fail("copyreg._reconstructor only rebuilds plain objects")
            return self.call(args[0], ())
        if func == Global("copyreg", "__newobj__"):
            if not args:
                raise self.fail("copyreg.__newobj__ without a class")
            return self.call(args[0], args[1:])
        if func == Global("copyreg", "__newobj_ex__"):
            if len(args) != 3:
                raise self.fail("copyreg.__newobj_ex__ takes (cls, args, kwargs)")
            return self.call(args[0], tuple(args[1]), args[2])
        handler = self.handlers.get((func.module, func.name))
        if handler is None:
            raise self.fail(f"refusing to call {func}")
        if kwargs is not None and (not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs)):
            raise self.fail(f"keyword arguments of {func} refused")
        try:
            return handler(*args, **(kwargs or {}))
        except UnsafePickleError as err:
            raise self.fail(f"{func}: {err}") from None
        except Exception as err:  # noqa: BLE001 - whatever a handler's library raises on the file's arguments is a refusal
            raise self.fail(f"{func}: bad arguments ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})") from None

    def build(self, state: Any) -> None:
        target = self.pop()
        if not isinstance(target, Record):
            raise self.fail(f"BUILD on a {type(target).__name__} refused (only objects this load created take state)")
        try:
            value = target.build(state)
        except UnsafePickleError as err:
            raise self.fail(str(err)) from None
        except Exception as err:  # noqa: BLE001 - as in call: the file's state made a library raise
            raise self.fail(f"BUILD of {type(target).__name__} refused ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]})") from None
        self.stack.append(value)
        if value is not target:
            for key in self.memo_keys.pop(id(target), ()):
                self.memo[key] = value
                self.memo_keys.setdefault(id(value), []).append(key)

    def text(self, arg: str) -> Any:
        # Python 2 str (STRING/BINSTRING) arrives latin-1-decoded from genops.
        return arg.encode("latin-1") if self.encoding == "bytes" else arg.encode("latin-1").decode(self.encoding)

    def run(self, stream: BinaryIO) -> Any:
        for op, arg, _ in pickletools.genops(stream):
            name = op.name
            if name == "PROTO":
                self.proto = arg
            elif name == "FRAME":
                pass
            elif name == "STOP":
                if len(self.stack) != 1 or self.marks:
                    raise self.malformed("stack not empty at STOP")
                return self.stack[0]
            elif name == "MARK":
                self.marks.append(self.stack)
                self.stack = []
            elif name == "NONE":
                self.stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                self.stack.append(name == "NEWTRUE")
            # Values genops already decoded (protocol 0 writes True/False as INT 01/00, decoded to bools).
            elif name in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
                          "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"):
                self.stack.append(arg)
            elif name in ("STRING", "BINSTRING", "SHORT_BINSTRING"):
                self.stack.append(self.text(arg))
            elif name == "BYTEARRAY8":
                self.stack.append(bytearray(arg))
            elif name == "EMPTY_TUPLE":
                self.stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                if len(self.stack) < n:
                    raise self.malformed("stack underflow")
                items = tuple(self.stack[-n:])
                del self.stack[-n:]
                self.stack.append(items)
            elif name == "TUPLE":
                items = self.pop_mark()  # before naming self.stack: pop_mark replaces it
                self.stack.append(tuple(items))
            elif name == "EMPTY_LIST":
                self.stack.append([])
            elif name == "LIST":
                items = self.pop_mark()
                self.stack.append(items)
            elif name == "EMPTY_DICT":
                self.stack.append({})
            elif name == "DICT":
                items = self.pop_mark()
                self.stack.append(self.to_dict({}, items))
            elif name == "EMPTY_SET":
                self.stack.append(set())
            elif name == "FROZENSET":
                items = self.pop_mark()
                self.stack.append(frozenset(self.hashable(items)))
            elif name == "APPEND":
                value = self.pop()
                self.list_target().append(value)
            elif name == "APPENDS":
                items = self.pop_mark()
                self.list_target().extend(items)
            elif name == "SETITEM":
                value, key = self.pop(), self.pop()
                self.to_dict(self.dict_target(), [key, value])
            elif name == "SETITEMS":
                items = self.pop_mark()
                self.to_dict(self.dict_target(), items)
            elif name == "ADDITEMS":
                items = self.pop_mark()
                target = self.top()
                if type(target) is not set:
                    raise self.fail(f"ADDITEMS on a {type(target).__name__} refused")
                target.update(self.hashable(items))
            elif name == "POP":
                if self.stack:
                    self.stack.pop()
                else:
                    self.pop_mark()
            elif name == "POP_MARK":
                self.pop_mark()
            elif name == "DUP":
                self.stack.append(self.top())
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                self.remember(int(arg), self.top())
            elif name == "MEMOIZE":
                self.remember(len(self.memo), self.top())
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                if int(arg) not in self.memo:
                    raise self.malformed(f"memo slot {arg} unset")
                self.stack.append(self.memo[int(arg)])
            elif name == "GLOBAL":
                module, _, qual = arg.partition(" ")
                self.stack.append(self.global_(module, qual))
            elif name == "STACK_GLOBAL":
                qual, module = self.pop(), self.pop()
                if not isinstance(module, str) or not isinstance(qual, str):
                    raise self.malformed("STACK_GLOBAL of non-strings")
                self.stack.append(self.global_(module, qual))
            elif name == "REDUCE":
                args, func = self.pop(), self.pop()
                self.stack.append(self.call(func, args))
            elif name == "NEWOBJ":
                args, cls = self.pop(), self.pop()
                self.stack.append(self.call(cls, args))
            elif name == "NEWOBJ_EX":
                kwargs, args, cls = self.pop(), self.pop(), self.pop()
                self.stack.append(self.call(cls, args, kwargs))
            elif name == "OBJ":
                items = self.pop_mark()
                if not items:
                    raise self.malformed("OBJ without a class")
                self.stack.append(self.call(items[0], tuple(items[1:])))
            elif name == "INST":
                module, _, qual = arg.partition(" ")
                items = self.pop_mark()
                self.stack.append(self.call(self.global_(module, qual), tuple(items)))
            elif name == "BUILD":
                state = self.pop()
                self.build(state)
            elif name in ("PERSID", "BINPERSID"):
                pid = arg if name == "PERSID" else self.pop()
                if self.persistent is None:
                    raise self.fail("refusing pickle opcode PERSID (external references)")
                try:
                    self.stack.append(self.persistent(pid))
                except UnsafePickleError as err:
                    raise self.fail(f"persistent id: {err}") from None
            elif name in _REFUSED_OPS:
                raise self.fail(f"refusing pickle opcode {name} (external references)")
            else:
                raise self.fail(f"unsupported pickle opcode {name}")
        raise self.malformed("truncated (no STOP)")

    def list_target(self) -> list:
        target = self.top()
        if type(target) is not list:
            raise self.fail(f"APPEND on a {type(target).__name__} refused")
        return target

    def dict_target(self) -> dict:
        target = self.top()
        if type(target) is not dict:
            raise self.fail(f"SETITEM on a {type(target).__name__} refused")
        return target

    def hashable(self, items: list[Any]) -> list[Any]:
        for item in items:
            try:
                hash(item)
            except TypeError:
                raise self.fail(f"unhashable {type(item).__name__} used as a key or set item") from None
        return items

    def to_dict(self, target: dict, items: list[Any]) -> dict:
        if len(items) % 2:
            raise self.malformed("odd number of dict items")
        keys = self.hashable(items[0::2])
        target.update(zip(keys, items[1::2]))
        return target


def load(data: bytes | BinaryIO, handlers: Handlers, source: str, encoding: str = "ASCII",
         persistent: Callable[[Any], Any] | None = None, fallback: Callable[[str, str], Callable[..., Any] | None] | None = None) -> Any:
    """The pickle's object graph, built only from plain values and what ``handlers`` return; ``source``
    names the file in errors. ``encoding`` decodes Python 2 strings (``"bytes"`` keeps them bytes).
    ``persistent(pid)`` answers persistent ids (refused without it) with the id as plain data;
    ``fallback(module, name)`` may supply a handler for a name outside the table (e.g. a family of
    generated class names). Raises ``UnsafePickleError`` for anything refused or malformed."""
    stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    machine = _Machine({**BUILTIN_HANDLERS, **handlers}, source, encoding, persistent, fallback)
    try:
        return machine.run(stream)
    except UnsafePickleError:
        raise
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        # genops' own parse errors: truncated data, unknown opcodes, bad lengths.
        raise MalformedPickleError(f"{source}: {type(err).__name__}: {str(err)[:120]}") from None
