"""Settings objects: one frozen dataclass per command, each field declared once with its
default, help text, choices and range; the command line's flags, the checks and the defaults
table of ``docs/cli.md`` are all generated from those declarations.

A field is ``name: type = setting(default, "help", ...)``. :func:`add_flags` turns a settings
class into argparse flags (``--name-with-dashes``; bool fields become ``--name/--no-name``),
whose values are parsed and range-checked by the same rule that :meth:`Settings.__post_init__`
applies to objects built in Python, so ``buildseg predict --overlap 2`` and
``PredictSettings(overlap=2)`` fail with the same one line. Cross-field rules live in each
class's :meth:`Settings.check`. Imports nothing heavy: ``buildseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, ClassVar

from buildseg.errors import BuildsegError
from buildseg.runtime.packaged import PACKAGED_PREFIX


@dataclass(frozen=True)
class Spec:
    """What a field means to the user: everything but its default and its type."""

    help: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # value > low (else >=)
    high_open: bool = False  # value < high (else <=)
    flag: str | None = None  # default: --field-name
    metavar: str | tuple[str, ...] | None = None
    nargs: int | str | None = None  # e.g. 2 for --shape H W, "+" for lists
    repeat: bool = False  # the flag may be given several times (action=append)
    required: bool = False
    parse: Callable[[str], Any] | None = None  # a custom text -> value (e.g. I/N); raises ValueError with the reason
    cli: bool = True  # False: a Python-only setting


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its user-facing declaration; lists need ``default=()`` or None."""
    return field(default=default, metadata={"spec": Spec(help=help, **spec)})


def spec_of(f) -> Spec:
    return f.metadata.get("spec") or Spec(help=f.name.replace("_", " "))


def flag_of(f) -> str:
    return spec_of(f).flag or "--" + f.name.replace("_", "-")


def _base_kind(annotation: str) -> str:
    """'int' of 'int | None', 'list[str]' -> 'str', 'tuple[int, int]' -> 'int'."""
    kind = str(annotation).replace(" | None", "")
    for wrapper in ("list[", "tuple["):
        if kind.startswith(wrapper):
            kind = kind[len(wrapper):-1].split(",")[0].strip()
    return kind


def range_text(spec: Spec) -> str:
    parts = []
    if spec.low is not None:
        parts.append(f"{'>' if spec.low_open else '>='} {spec.low:g}")
    if spec.high is not None:
        parts.append(f"{'<' if spec.high_open else '<='} {spec.high:g}")
    return " and ".join(parts)


def _in_range(value: Any, spec: Spec) -> bool:
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return False
    return not (spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high))


def _scalar_parser(kind: str, spec: Spec) -> Callable[[str], Any]:
    """text -> value for argparse: the kind's conversion, then the field's range."""

    def parse(text: str) -> Any:
        if spec.parse is not None:
            try:
                return spec.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        try:
            if kind == "int":
                value: Any = int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
            elif kind == "float":
                value = float(text)
            else:
                return text
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
        if not _in_range(value, spec):
            raise argparse.ArgumentTypeError(f"{text} is out of range; expected {range_text(spec)}")
        return value

    return parse


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per CLI field of the settings class ``cls``, its help ending in its default."""
    for f in fields(cls):
        spec = spec_of(f)
        if not spec.cli or f.name in skip:
            continue
        default = None if f.default is MISSING else f.default
        shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = f"{spec.help} (default: {shown})" if not spec.required else spec.help
        kind = str(f.type)
        common: dict[str, Any] = dict(dest=f.name, help=text, default=default)
        if spec.metavar is not None:
            common["metavar"] = spec.metavar
        if kind.replace(" | None", "") == "bool":
            parser.add_argument(flag_of(f), action=argparse.BooleanOptionalAction, **common)
            continue
        if spec.choices is not None:
            common["choices"] = list(spec.choices)
        if spec.required:
            common["required"] = True
        parse = _scalar_parser(_base_kind(kind), spec)
        if spec.repeat:
            parser.add_argument(flag_of(f), action="append", type=parse, **common)
        else:
            parser.add_argument(flag_of(f), type=parse, nargs=spec.nargs, **common)




def model_setting() -> Any:
    """The ``--model NAME`` field of every command that takes ``--checkpoint``."""
    return setting(None, "a packaged model by name instead of --checkpoint (`buildseg models` lists them; the "
                   "default one is 'buildings')", metavar="NAME")


class Settings:
    """Base of every command's settings: fields are checked on construction (types as
    declared, choices, ranges) and then by the class's cross-field :meth:`check`.

    A class with ``checkpoint`` and ``model`` fields takes either: ``--model NAME`` becomes the
    checkpoint spec ``model:NAME``, which the checkpoint loader resolves (runtime/packaged.py),
    so the commands downstream see one checkpoint spec whatever the user named."""

    COMMAND: ClassVar[str] = ""
    CHECKPOINT_REQUIRED: ClassVar[bool] = False  # one of --checkpoint / --model must be given

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            spec = spec_of(f)
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in items:
                if spec.choices is not None and item not in spec.choices:
                    raise BuildsegError(f"{flag_of(f)} {item!r} is not a valid choice; use one of "
                                        f"{', '.join(map(str, spec.choices))}")
                if isinstance(item, (int, float)) and not isinstance(item, bool) and not _in_range(item, spec):
                    raise BuildsegError(f"{flag_of(f)} {item} is out of range; expected {range_text(spec)}")
        self._packaged_model()
        self.check()

    def _packaged_model(self) -> None:
        names = {f.name: f for f in fields(self)}
        if "model" not in names or "checkpoint" not in names:
            return
        model, checkpoint = self.model, self.checkpoint
        if model:
            from buildseg.runtime.packaged import find

            find(model)  # an unknown name fails here, before any data is read
            spec = PACKAGED_PREFIX + model
            resolved = [spec] if "list" in str(names["checkpoint"].type) else spec
            # A copy of resolved settings (dataclasses.replace, a job's own settings) carries both
            # fields; it is the same choice, so resolving is idempotent. Only a user's --checkpoint
            # beside --model is two choices.
            if checkpoint and checkpoint != resolved:
                raise BuildsegError("give --checkpoint or --model, not both (--model names a packaged model)")
            object.__setattr__(self, "checkpoint", resolved)
        elif not checkpoint and self.CHECKPOINT_REQUIRED:
            raise BuildsegError(f"{self.COMMAND} needs --checkpoint (a .pt or run folder) or --model NAME "
                                "(a packaged model: `buildseg models` lists them)")

    def check(self) -> None:
        """Rules between fields (one line naming the flags and the fix); none by default."""

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The settings from parsed flags (attributes named like the fields)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
