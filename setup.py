"""Package layout for setuptools (metadata lives in pyproject.toml).

Each component folder is a source root of the one namespace package `tether`
(`agent/tether/agent`, `controller/tether/controller`, ...); no component folder
has an `__init__.py` of its own, so `operator/` never shadows the standard
library's `operator` module. `examples/` ships as `tether.examples` so that
`tether demo` finds its example task in a wheel install too.
"""

from setuptools import find_namespace_packages, setup

SOURCE_ROOTS = ("protos", "common", "agent", "controller", "operator", "dashboard", "cli", "devtools")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in SOURCE_ROOTS:
    for pkg in find_namespace_packages(where=root, include=["tether.*"]):
        packages.append(pkg)
        package_dir[pkg] = f"{root}/{pkg.replace('.', '/')}"
packages.append("tether.examples")
package_dir["tether.examples"] = "examples"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={
        "": ["*.proto", "*.yaml", "*.json", "*.sql", "*.pyi"],
        "tether.dashboard": ["templates/*.html", "static/*.css", "static/*.js", "static/vendor/uplot/*"],
        "tether.examples": ["**/*.py", "**/*.yaml", "**/*.mnn", "**/*.onnx", "**/*.npz", "**/*.md", "**/*.safetensors"],
    },
    include_package_data=False,
)
