"""The one build step pyproject.toml cannot declare: the study schema's single source is
workflow/schemas/config.schema.yaml (beside the workflow that validates with it); a wheel has no
workflow folder, so the schema is copied into the package as relora/config.schema.yaml, where
relora.config finds it when the source tree is absent."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"


class build_py_with_schema(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install reads the source tree's schema
            target = Path(self.build_lib) / "relora" / SCHEMA.name
            self.copy_file(str(SCHEMA), str(target))


setup(cmdclass={"build_py": build_py_with_schema})
