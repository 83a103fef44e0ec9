"""Files shipped inside the package: recipes, DeepSpeed JSON, sbatch templates, model configs.

One home for where they are, so a module moved between wings never loses them. ds_configs/,
recipes/ and templates/ are symlinks to the repository's top-level folders, packaged in wheels.
"""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
RECIPES = PACKAGE / "recipes"
DS_CONFIGS = PACKAGE / "ds_configs"
TEMPLATES = PACKAGE / "templates"
MODEL_CONFIGS = PACKAGE / "model_configs"
