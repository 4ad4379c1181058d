"""The one contract every alteration of upstream code (megatron-core, torch) follows.

A patch states TARGET (what it alters, in which versions), WHY, and OBSOLETE_WHEN (how to tell
it can be deleted), and its ``is_needed()`` probes the installed upstream code, never a version
number. Its changes are attribute swaps: ``apply()`` saves each upstream object and installs
the replacement; ``revert()`` puts back the very same objects (or removes an attribute upstream
never had), so a test can check a revert by identity.
"""

from __future__ import annotations

from typing import Callable, Iterable


class _Absent:
    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()  # what `original()` answers for an attribute upstream does not define


class Patch:
    """One alteration of upstream code: metadata, a probe, and revertible attribute swaps.

    ``probe(original)`` gets :meth:`original` so that it judges upstream's objects even while
    the patch is applied; ``swaps()`` is called at apply time and returns ``(owner, attribute,
    replacement)`` triples (a replacement may close over the upstream object it wraps).
    """

    def __init__(self, name: str, *, target: str, why: str, obsolete_when: str,
                 probe: Callable[[Callable], bool], swaps: Callable[[], Iterable[tuple]]):
        self.name, self.target, self.why, self.obsolete_when = name, target, why, obsolete_when
        self._probe, self._swaps = probe, swaps
        self._saved = None  # [(owner, attribute, original, replacement)] while applied

    def __repr__(self) -> str:
        return f"<Patch {self.name} ({'applied' if self.is_applied() else 'not applied'})>"

    def original(self, owner, attribute: str):
        """Upstream's ``owner.attribute``: the saved object while applied, else the current one."""
        for saved_owner, saved_attribute, original, _ in self._saved or ():
            if saved_owner is owner and saved_attribute == attribute:
                return original
        return vars(owner).get(attribute, ABSENT)

    def is_needed(self) -> bool:
        """Whether the installed upstream code has what this patch handles (applied or not)."""
        return bool(self._probe(self.original))

    def is_applied(self) -> bool:
        return self._saved is not None

    def targets(self) -> list[tuple]:
        """``(owner, attribute)`` of every swap in effect; empty while not applied."""
        return [(owner, attribute) for owner, attribute, _, _ in self._saved or ()]

    def apply(self) -> bool:
        """Install the replacements if needed and not yet applied; True if anything changed."""
        if self.is_applied() or not self.is_needed():
            return False
        saved = []
        for owner, attribute, replacement in self._swaps():
            saved.append((owner, attribute, vars(owner).get(attribute, ABSENT), replacement))
            setattr(owner, attribute, replacement)
        self._saved = saved
        return True

    def revert(self) -> bool:
        """Put upstream's objects back; True if anything changed."""
        if not self.is_applied():
            return False
        for owner, attribute, _, replacement in self._saved:
            if vars(owner).get(attribute, ABSENT) is not replacement:
                # Restoring would silently drop whatever was installed over our replacement.
                raise RuntimeError(f"patch {self.name}: {owner!r}.{attribute} was replaced "
                                   f"after apply(); revert that change first.")
        for owner, attribute, original, _ in reversed(self._saved):
            if original is ABSENT:
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)
        self._saved = None
        return True
