"""The recipes: one `get_config(arg=None) -> ConfigDict` per file.

Installed as `jaxdml.configs`, so a recipe is found by its name as well as
by its path: `--config=sketchy_rtl:demo` or `--config=configs/sketchy_rtl.py:demo`
(`jaxdml.config.recipe_path`).
"""
