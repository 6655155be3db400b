"""User code in raykd's processes: `run.imports` and `module.path:factory` models.

The driver imports `run.imports` when it validates the config, so a model, dataset or method they
register is a known name there. Ray workers are fresh processes: every job (a teacher, the professor, a
student, a sweep trial, a cache actor) imports the same modules again before it builds anything, from
the folder the driver found each in (`job_imports`). On a cluster those folders reach the other nodes
with the job's runtime env (`py_modules`, `raysetup.init_ray`); installed packages are expected there.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import site
import sys
import sysconfig

Imports = tuple[tuple[str, "str | None"], ...]  # (module, the sys.path folder it came from)


def import_user_module(name: str, what: str = "run.imports"):
    """Import a user's module; ValueError (a config error) naming `what` if it raises anything, or calls
    sys.exit() while it is imported (which would otherwise end raykd silently, with its status)."""
    try:
        return importlib.import_module(name)
    except SystemExit as e:
        raise ValueError(f"{what}: importing {name!r} called sys.exit({e.code!r}); a module raykd imports must "
                         "not exit") from None
    except ImportError as e:
        if e.name and name.startswith(e.name):  # the module itself is missing, not one it imports
            raise ValueError(f"{what}: cannot import {name!r} ({e}); it must be importable from the folder raykd "
                             "runs in, PYTHONPATH or an installed package") from None
        raise ValueError(f"{what}: importing {name!r} failed: {e.__class__.__name__}: {e}") from None
    except Exception as e:  # a user's module may raise anything while it registers
        raise ValueError(f"{what}: importing {name!r} failed: {e.__class__.__name__}: {e}") from None


def import_modules(names: list[str]) -> None:
    """Import `names` here; ValueError (a config error) naming a module that fails."""
    for name in names:
        import_user_module(name)


def _root(name: str) -> str | None:
    """The sys.path folder `name` (imported) was found in."""
    top = sys.modules.get(name.split(".")[0]) or importlib.import_module(name.split(".")[0])
    locations = list(getattr(top, "__path__", []) or [])
    origin = locations[0] if locations else getattr(top, "__file__", None)
    return os.path.dirname(os.path.abspath(origin)) if origin else None


def _installed(path: str) -> bool:
    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    return any(os.path.abspath(path).startswith(os.path.abspath(d) + os.sep) for d in dirs)


def job_imports(cfg) -> Imports:
    """What a job's worker must import: `run.imports`, then the modules of `module:factory` models."""
    names = list(cfg.run.imports)
    archs = [t.arch for t in cfg.teachers.models] + [cfg.distill.student.arch]
    from raykd.pipeline.models.sources import worker_imports

    names += [m for a in archs for m in worker_imports(a)]
    names = list(dict.fromkeys(names))
    import_modules(names)
    return tuple((n, _root(n)) for n in names)


def ship(imports: Imports) -> list[str]:
    """`py_modules` for a cluster's runtime env: each imported top-level module's file or package
    folder, unless it is installed (site-packages) and so expected on every node."""
    out = []
    for name, _ in imports:
        top = sys.modules.get(name.split(".")[0])
        path = (list(getattr(top, "__path__", []) or []) or [getattr(top, "__file__", None)])[0] if top else None
        if path and not _installed(path):
            out.append(os.path.abspath(path))
    return list(dict.fromkeys(out))


def load(imports: Imports) -> None:
    """In a worker: make each module's folder importable (appended: never shadows) and import it."""
    for name, root in imports:
        if name in sys.modules:
            continue
        if root and root not in sys.path:
            sys.path.append(root)
        try:
            importlib.import_module(name)
        except SystemExit as e:  # a worker that exits would look like a crash, and be retried
            raise RuntimeError(f"importing {name!r} called sys.exit({e.code!r})") from None
