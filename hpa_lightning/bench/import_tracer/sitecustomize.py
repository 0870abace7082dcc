"""Records what every Python process of a run imports, for the device bundle (bench/device_wheels.py), and hides
what the lent machine's image would not have where the code that asks for it can do without.

Put this folder first on PYTHONPATH and set HPA_TRACE_IMPORTS=<folder> (and HPA_TRACE_IMAGE=<the image's package
list>): every interpreter started so (subprocesses, the synthetic generator's workers, Hydra's jobs) writes
`<folder>/<pid>.txt`, one line per module it loads:

    module <TAB> file <TAB> importer file <TAB> unguarded | guarded | hidden | ?

The last two fields are filled where a module may enter another distribution (a top-level module, or the child of a
namespace package such as hydra_plugins): the first file up the stack outside the standard library, and whether the
nearest handler of ImportError on the stack swallows it (`try: import wandb / except ImportError: pass`). When a
package of the image asks so for a distribution that the image lacks (timm's `try: import wandb`), the import fails
here as it will there (`hidden`): the rehearsal then runs as the lent machine will, and what it loads is what the
bundle must hold. `?`: loaded before this file ran, or without the import system (Hydra's plugin scan executes plugin
modules itself): the bundle keeps those.

A meta-path finder, each line written as the module is found, because processes may end by os._exit (forked workers)
or be killed at a timeout. Standard library only, nothing of the project: it runs first in each process.
"""

from __future__ import annotations

import ast
import atexit
import os
import re
import sys
import sysconfig

ENV = "HPA_TRACE_IMPORTS"
ENV_IMAGE = "HPA_TRACE_IMAGE"
_PATHS = sysconfig.get_paths()
_STDLIB = tuple({os.path.normpath(_PATHS[key]) + os.sep for key in ("stdlib", "platstdlib")})
_SITE = tuple({os.path.normpath(_PATHS[key]) + os.sep for key in ("purelib", "platlib")})
_CATCHING = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
_TRY = (ast.Try, ast.TryStar) if sys.version_info >= (3, 11) else (ast.Try,)


def normalize(name: str) -> str:
    """PEP 503: `Pillow`, `typing_extensions` and `lazy-loader` as pip compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _in_stdlib(path: str) -> bool:
    path = os.path.normpath(path)
    return path.startswith(_STDLIB) and not path.startswith(_SITE)  # a venv's site-packages can sit below stdlib


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    for kind in kinds:
        if kind is None:
            return True  # bare except
        name = kind.attr if isinstance(kind, ast.Attribute) else getattr(kind, "id", "")
        if name in _CATCHING:
            return True
    return False


class ImportRecorder:
    """First on sys.meta_path: asks the finders after it where a module is, writes that down, and returns None so
    that the import goes on exactly as it would without it (or raises ModuleNotFoundError where it hides one)."""

    def __init__(self, folder: str, image: set[str] | None) -> None:
        self.folder = folder
        self.image = image  # normalized names of the lent image's distributions; None: hide nothing
        self.seen: set[str] = set()
        self.busy = False
        self.trees: dict[str, list[ast.Try] | None] = {}  # file -> its try statements (None: no source)
        self._top_level: dict[str, list[str]] | None = None
        self.handle = None
        self.pid = 0

    def write(self, entries: list[tuple[str, str, str, str]]) -> None:
        try:  # a file per process (a forked child opens its own), line-buffered: each line is on disk as written
            if self.handle is None or self.pid != os.getpid():
                self.pid = os.getpid()
                self.handle = open(os.path.join(self.folder, f"{self.pid}.txt"), "a", encoding="utf-8", buffering=1)
            self.handle.writelines("\t".join(entry) + "\n" for entry in entries)
        except OSError:
            pass  # tracing must never break the process it watches

    def record_loaded(self) -> None:
        """Modules in sys.modules that the finder did not see: imported before it was installed, or loaded without
        the import system."""
        entries = []
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None)
            if origin and name not in self.seen and not _in_stdlib(origin):
                self.seen.add(name)
                entries.append((name, origin, "", "?"))
        self.write(entries)

    def tries(self, filename: str) -> list[ast.Try] | None:
        if filename not in self.trees:
            try:
                with open(filename, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
                self.trees[filename] = [n for n in ast.walk(tree) if isinstance(n, _TRY) and n.handlers]
            except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
                self.trees[filename] = None
        return self.trees[filename]

    def guard(self, frame) -> str:
        """`guarded` when the nearest enclosing handler of ImportError on the stack swallows it, else `unguarded`.
        Python unwinds through every frame, the standard library's too (pkgutil.walk_packages catches them)."""
        while frame is not None:
            line, tries = frame.f_lineno, self.tries(frame.f_code.co_filename)
            enclosing = [t for t in tries or () if t.body[0].lineno <= line <= (t.body[-1].end_lineno or 0)]
            for node in sorted(enclosing, key=lambda t: -t.body[0].lineno):  # innermost first
                for handler in node.handlers:
                    if _catches_import_error(handler):
                        reraises = any(isinstance(n, ast.Raise) for stmt in handler.body for n in ast.walk(stmt))
                        return "unguarded" if reraises else "guarded"
            frame = frame.f_back
        return "unguarded"

    @staticmethod
    def importer(frame) -> str:
        """The first file up the stack outside the standard library: the code that wanted the module."""
        while frame is not None:
            filename = frame.f_code.co_filename
            if not filename.startswith("<") and not _in_stdlib(filename):
                return filename
            frame = frame.f_back
        return ""

    def owner(self, path: str) -> str | None:
        """The installed distribution a file belongs to, by its top-level name under site-packages; None outside
        site-packages (the project) or where several distributions share the name (a namespace package)."""
        path = os.path.normpath(path)
        site = next((s for s in _SITE if path.startswith(s)), None)
        if site is None:
            return None
        if self._top_level is None:
            from importlib.metadata import packages_distributions

            self._top_level = packages_distributions()
        dists = self._top_level.get(path[len(site):].split(os.sep)[0].split(".")[0], [])
        return normalize(dists[0]) if len(dists) == 1 else None

    def hides(self, origin: str, importer: str, guard: str) -> bool:
        """A package of the image asks, ready to do without, for a distribution that the image lacks."""
        if self.image is None or guard != "guarded" or not importer:
            return False
        wanted, asking = self.owner(origin), self.owner(importer)
        return wanted is not None and asking is not None and wanted not in self.image and asking in self.image

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if self.busy or fullname in self.seen:
            return None
        frame = sys._getframe(1)
        if not any(f.f_code.co_name == "_find_and_load" for f in _frames(frame)):
            return None  # a look-up (importlib.util.find_spec), not an import: it loads nothing
        self.busy = True  # finders may import (zipimport, pkg_resources): those imports are recorded on their own
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                try:
                    spec = finder.find_spec(fullname, path, target)
                except Exception:  # a finder failing here fails again in the real import, where it belongs
                    return None
                if spec is None:
                    continue
                origin = spec.origin if spec.has_location else None
                if not origin or _in_stdlib(origin):
                    return None  # the standard library and namespace packages travel with any interpreter
                parent = sys.modules.get(fullname.rpartition(".")[0])
                if parent is not None and getattr(parent, "__file__", None) is not None:
                    self.seen.add(fullname)
                    self.write([(fullname, origin, "", "")])  # inside its parent's distribution
                    return None
                while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
                    frame = frame.f_back  # from the import statement (or import_module call) outwards
                importer, guard = self.importer(frame), self.guard(frame)
                if self.hides(origin, importer, guard):
                    self.write([(fullname, origin, importer, "hidden")])  # asked again later: judged again
                    raise ModuleNotFoundError(f"No module named {fullname!r} (hidden: not on the lent machine's "
                                              "image)", name=fullname)
                self.seen.add(fullname)
                self.write([(fullname, origin, importer, guard)])
                return None
        finally:
            self.busy = False
        return None


def _frames(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


def _image(path: str | None) -> set[str] | None:
    if not path:
        return None
    with open(path, encoding="utf-8") as handle:
        lines = (line.split("#")[0].strip() for line in handle)
        return {normalize(re.split(r"[=<>!~ ]", line)[0]) for line in lines if line}


def install(folder: str, image_list: str | None = None) -> ImportRecorder:
    """Start recording into `folder` in this interpreter (once); the processes it starts inherit the variables."""
    for finder in sys.meta_path:
        if type(finder).__name__ == "ImportRecorder":
            return finder  # type: ignore[return-value]
    os.makedirs(folder, exist_ok=True)
    recorder = ImportRecorder(folder, _image(image_list))
    recorder.record_loaded()
    sys.meta_path.insert(0, recorder)
    atexit.register(recorder.record_loaded)  # plugin modules that Hydra's scan executed without the import system
    return recorder


if os.environ.get(ENV):
    install(os.environ[ENV], os.environ.get(ENV_IMAGE))
