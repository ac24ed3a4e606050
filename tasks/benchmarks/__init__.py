"""The benchmarks of the cross-domain suites (`tasks.suites`), with their graders: one module per
domain (`math`, `science`, `dialogue`), each registering its benchmarks and graders in
`tasks.data` when imported. Every module here is imported with the package, so a new domain's
benchmarks are one new file.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")
