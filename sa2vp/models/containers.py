"""`nn.ModuleList` and `nn.ModuleDict` that say what they hold.

torch types every item of its containers as `nn.Module`, so a call of an item's own method (a cross block's
forward, an adapter's `attach`) is either unchecked or an error to mypy. These subclasses only narrow the item
type: registration, iteration order and state_dict keys are torch's own.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, Mapping, ValuesView
from typing import Generic, TypeVar, cast, overload

from torch import nn

M = TypeVar("M", bound=nn.Module)


class ModuleListOf(nn.ModuleList, Generic[M]):
    """An `nn.ModuleList` whose items are all `M`."""

    def __init__(self, modules: Iterable[M] | None = None) -> None:
        super().__init__(modules)

    def __iter__(self) -> Iterator[M]:
        return cast(Iterator[M], super().__iter__())

    @overload
    def __getitem__(self, idx: slice) -> ModuleListOf[M]: ...

    @overload
    def __getitem__(self, idx: int) -> M: ...

    def __getitem__(self, idx: int | slice) -> M | ModuleListOf[M]:
        return cast("M | ModuleListOf[M]", super().__getitem__(idx))


class ModuleDictOf(nn.ModuleDict, Generic[M]):
    """An `nn.ModuleDict` whose values are all `M`."""

    def __init__(self, modules: Mapping[str, M] | None = None) -> None:
        super().__init__(modules)

    def __getitem__(self, key: str) -> M:
        return cast(M, super().__getitem__(key))

    def values(self) -> ValuesView[M]:
        return cast(ValuesView[M], super().values())

    def items(self) -> ItemsView[str, M]:
        return cast(ItemsView[str, M], super().items())
