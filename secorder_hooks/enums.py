"""The one way the package turns user-facing option strings into enums.

Every option of the public API that names one of a fixed set of choices (``reduction``,
``loss_type``, ``fisher_type``, the function API's backend) is an enum derived from
:class:`ChoiceEnum` and parsed with :meth:`ChoiceEnum.parse`: the member itself, its
value or one of its aliases, case-insensitively. Anything else raises the enum's
:meth:`~ChoiceEnum.invalid_choice_error` type with a message that names the argument and
lists the accepted values.
"""

from __future__ import annotations

import enum
from typing import TypeVar

from secorder_hooks.errors import InvalidChoiceError, SecorderError

__all__ = ["ChoiceEnum"]

_E = TypeVar("_E", bound="ChoiceEnum")


class ChoiceEnum(enum.Enum):
    """An enum of string values, parsed from user input by :meth:`parse`.

    Subclasses may override :meth:`aliases` (other accepted names) and
    :meth:`invalid_choice_error` (the error type for an unknown name).

    Example:
        >>> class Color(ChoiceEnum):
        ...     RED = "red"
        ...     GREEN = "green"
        >>> Color.parse(" Red ", "color")
        <Color.RED: 'red'>
        >>> Color.parse("blue", "color")
        Traceback (most recent call last):
        ...
        secorder_hooks.errors.InvalidChoiceError: color='blue' is not supported; accepted: 'red', 'green'.
    """

    @classmethod
    def aliases(cls: type[_E]) -> dict[str, _E]:
        """Accepted names besides the members' values (lower case), default none."""
        return {}

    @classmethod
    def invalid_choice_error(cls) -> type[SecorderError]:
        """The error type :meth:`parse` raises (an :class:`~secorder_hooks.errors.InvalidChoiceError` by default)."""
        return InvalidChoiceError

    @classmethod
    def hint(cls, value: object) -> str:
        """Advice appended to the error message for the rejected ``value`` (default none)."""
        return ""

    @classmethod
    def parse(cls: type[_E], value: object, argument: str = "") -> _E:
        """The member named ``value``: a member, its value or an alias, case-insensitively.

        Args:
            value: What the user passed.
            argument: The argument's name, for the error message (e.g. ``"reduction"``;
                default: the enum's name).

        Raises:
            InvalidChoiceError: (or the type :meth:`invalid_choice_error` returns) ``value``
                names no member; the message lists the accepted names.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key:
                    return member
            found = cls.aliases().get(key)
            if found is not None:
                return found
        accepted = ", ".join(repr(name) for name in (*(m.value for m in cls), *cls.aliases()))
        raise cls.invalid_choice_error()(
            f"{argument}={value!r} is not supported; accepted: {accepted}.{cls.hint(value)}"
        )
