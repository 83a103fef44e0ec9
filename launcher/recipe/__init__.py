"""The recipe: one validated description of a run, read from YAML before anything heavy loads.

schema     the pydantic sections and the rules between keys (`Recipe`)
files      YAML reading, `base:` chains, relative paths, `key=value` overrides (`load_recipe`, `load_run`)
formats    the data-format registry: fields, tasks, eval metric of each format
objective  which objective (sft, dpo) a recipe trains, and what dpo refuses
reference  the reference table of every key, generated from the schema
catalog    the recipes shipped inside the package

Imports no other wing and no torch, so `launcher validate` stays light.
"""
