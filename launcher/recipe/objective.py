"""Which objective a recipe trains, what objective dpo refuses, and where its reference comes from.

The objective follows from the data formats (formats.py says which each trains) unless the recipe
names it; every train and eval source must suit it. Called by the recipe's own validation
(schema.Recipe); kept apart so the schema module stays a list of keys.
"""
from __future__ import annotations

from launcher.recipe.formats import FORMATS, formats_for_objective


def objective_rules(recipe: "Recipe") -> None:
    """One objective per run, from formats that train it; DPO's refusals, each with its fix."""
    data = recipe.data
    trained = {FORMATS[entry.format or data.format].objective for entry in [*data.entries(), *data.entries("eval")]}
    if len(trained) > 1:
        raise ValueError(f"data: the sources mix formats for objective sft and dpo; a run trains one objective "
                         f"(dpo reads {', '.join(formats_for_objective('dpo'))}, sft the other formats)")
    if recipe.objective is None:  # not by assignment: that would validate the recipe again
        object.__setattr__(recipe, "objective", trained.pop())
    elif recipe.objective not in trained:
        raise ValueError(f"objective {recipe.objective} cannot train on data.format {data.format}; use one of: "
                         f"{', '.join(formats_for_objective(recipe.objective))}")
    if recipe.dpo != type(recipe.dpo)() and recipe.objective != "dpo":
        raise ValueError("dpo: applies to objective dpo only; remove it or set objective: dpo")
    if recipe.objective != "dpo":
        return
    refused = [(data.packing, "data.packing", "each pair's chosen and rejected replies are scored as whole sequences; "
                "remove data.packing"),
               (recipe.train.loss_chunk_tokens, "train.loss_chunk_tokens", "DPO scores whole sequences; set it to 0"),
               (data.train_on_prompt, "data.train_on_prompt", "only reply tokens are compared; remove it")]
    for on, key, why in refused:
        if on:
            raise ValueError(f"{key} with objective dpo: {why}")


def reference_precomputed(recipe: "Recipe") -> bool:
    """DPO's reference without an adapter to disable (method full): each pair's reference log-probabilities are
    computed once, before training, by the initial model (data/reference_logps.py), instead of in every step."""
    return recipe.objective == "dpo" and recipe.method == "full"
