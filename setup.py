"""Package discovery, the one part of the build pyproject.toml cannot state.

`kernels/` and `pipelines/` install as `batchv4.kernels` and `batchv4.pipelines` (never as top-level
names, DESIGN.md section 2). setuptools' `packages.find` discovers packages by folder name only, so
under that mapping it finds neither (nor any subpackage of them); this finds every package under
each mapped folder, so a new subpackage installs from a wheel as it does in editable mode.
Everything else (metadata, dependencies, package data) is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

# import name -> folder
PACKAGE_DIR = {"batchv4": "batchv4", "batchv4.kernels": "kernels", "batchv4.pipelines": "pipelines"}


def packages() -> list[str]:
    # namespace discovery also lists data folders (batchv4/presets), which setuptools wants named
    # as packages so that their package data ships
    found = []
    for name, folder in PACKAGE_DIR.items():
        subs = find_namespace_packages(folder, exclude=["__pycache__", "*.__pycache__"])
        found += [name] + [f"{name}.{sub}" for sub in subs]
    return sorted(found)


setup(packages=packages(), package_dir=PACKAGE_DIR)
