"""Format versions of what a run folder holds: the one place that says which are current.

Later versions of lsm-registry add keys to recipes (new parameters, always with a
default that keeps the earlier behaviour), so files written today must still load
tomorrow. Each file a run writes carries the version of its format; a file without
one is format 1 (written before versions were recorded). A file whose format is
newer than this library knows is refused with one line naming it; an older one is
*migrated* on load: a recipe key it lacks takes its default (see
:func:`lsm_registry.recipe.migrate`), so an older run resumes and compares with
newer ones instead of counting as a different recipe.

Versions
--------
``RECIPE_FORMAT`` (``recipe.toml``, written by :meth:`lsm_registry.recipe.Recipe.to_toml`):
    1. no version; every key lives in a table ([run], [data], ...).
    2. an optional top-level ``format = N`` before the first table (what a resolved
       recipe writes first). A recipe without it, e.g. one a user wrote, is read as
       the current format; keys it lacks take their defaults, as always.

``SUMMARY_FORMAT`` (``summary.json``, written by :class:`lsm_registry.runfolder.reporter.RunReporter`):
    1. no version.
    2. a ``"format"`` key.

``CHECKPOINT_FORMAT`` (``checkpoints/*.pt``, written by the engine's ``Trainer``):
    1. ``"format": 1``: model, optimizer, scaler, RNG states, history and the resolved
       recipe as a plain dict.
    2. adds ``"recipe_format"``, the recipe format of the stored recipe dict; a stored
       recipe that lacks keys added since is migrated (the keys take their defaults)
       before it is compared with the recipe that resumes it.
"""

from __future__ import annotations

from typing import Any, Optional

RECIPE_FORMAT = 2
SUMMARY_FORMAT = 2
CHECKPOINT_FORMAT = 2

#: The format of a file that does not say (written before formats were recorded).
UNVERSIONED = 1


def format_problem(value: Any, current: int, where: str) -> Optional[str]:
    """One line saying what is wrong with a file's ``format`` value, or None when it can be read.

    ``value`` None (the key is absent) is fine; so is any integer from 1 to ``current``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"{where}: format must be a whole number >= 1 (got {value!r})"
    if value > current:
        return f"{where}: written by a newer lsm-registry (format {value} > {current}); upgrade"
    return None
