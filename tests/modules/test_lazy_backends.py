"""Optional back-ends stay unimported on runs that do not use them: a LoRA run does not import
bitsandbytes (nor print its messages), and a quantized LoRA model later in the same process still gets
peft's 4-bit LoRA layers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys, warnings
    warnings.simplefilter("error", FutureWarning)  # peft's is_gradient_checkpointing warning is filtered at the source
    import torch
    from transformers import AutoModelForCausalLM
    from lightning_tokens import TokenLM
    from lightning_tokens.models.presets import build_config
    from lightning_tokens.models.tokenizers import resolve_tokenizer
    from lightning_tokens.modules import LoRASettings

    lora = TokenLM(model="tiny-llama", tokenizer="char", lora=LoRASettings(r=4),
                   model_config={"num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64})
    lora.configure_model()
    print("after lora:", "bitsandbytes" in sys.modules)

    path = sys.argv[1]
    AutoModelForCausalLM.from_config(build_config("tiny-llama", 128)).save_pretrained(path)
    resolve_tokenizer("char").save_pretrained(path)
    qlora = TokenLM(model=path, quantization="nf4", lora=LoRASettings(r=4))
    qlora.configure_model()
    from peft.tuners.lora.bnb import Linear4bit
    print("4-bit lora layers:", sum(isinstance(m, Linear4bit) for m in qlora.modules()))
    """
)


def test_lora_without_quantization_does_not_import_bitsandbytes_and_qlora_still_works(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "after lora: False" in result.stdout
    layers = int(result.stdout.split("4-bit lora layers:")[1].split()[0])
    assert layers > 0
