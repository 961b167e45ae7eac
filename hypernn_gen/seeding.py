"""Seeded random number generators while a target file is imported.

A target written as a module instance (``target = MyNet()`` at module level) draws its initial
values when the file is imported. :func:`seeded_import` seeds Python's ``random``, NumPy and
PyTorch (those installed) with 0 for the duration, so those values, and any init statistic
measured from them, are the same in every run and process. The previous generator states are
restored afterwards, so a caller's own random streams are left as they were.
"""

from __future__ import annotations

import contextlib
import importlib.util
import random
from collections.abc import Iterator

__all__ = ["IMPORT_SEED", "seeded_import"]

IMPORT_SEED = 0


@contextlib.contextmanager
def seeded_import() -> Iterator[None]:
    """Seed ``random``, NumPy and PyTorch with :data:`IMPORT_SEED`; restore their states on exit."""
    py_state = random.getstate()
    random.seed(IMPORT_SEED)
    np = _optional("numpy")
    np_state = np.random.get_state() if np is not None else None
    if np is not None:
        np.random.seed(IMPORT_SEED)
    torch = _optional("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    if torch is not None:
        torch.manual_seed(IMPORT_SEED)
    try:
        yield
    finally:
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        if torch is not None:
            torch.random.set_rng_state(torch_state)


def _optional(name: str):  # noqa: ANN202 - a module or None
    """The package if it is installed (imported on first use), else ``None``."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install is treated as absent
        return None
