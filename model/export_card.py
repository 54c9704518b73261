"""README.md of an HF export (`kmoe export hf`): Hugging Face front matter, how to load it, and which tokenizer
it carries and how that was checked, or that it carries none."""

from __future__ import annotations

from pathlib import Path

import yaml


def tokenizer_section(how: str, path: Path | None, digest: str | None, ledger: Path | None) -> list[str]:
    if how == "none":
        return [
            "**No tokenizer.** This checkpoint was exported with `--no-tokenizer` (the way to export one whose "
            "tokenizer no training ledger vouches for), so `AutoTokenizer` cannot load this directory. Use it "
            "only with the exact tokenizer it was trained with; any other one maps ids to the wrong text.",
        ]
    checked = (
        f"Its identity `{digest}` equals the `tokenizer_hash` in the genesis record of the training ledger "
        f"`{ledger}`."
        if ledger
        else "No training ledger records a tokenizer for this checkpoint, so it was not checked against one."
    )
    origin = "found from the checkpoint's training run" if how == "run" else "given with `--tokenizer`"
    return [
        f"The tokenizer files beside the weights are the tokenizer the model was trained with ({origin}, "
        f"`{path}`). {checked}",
    ]


def export_card(dtype: str, total_params: int, tokenizer: list[str]) -> str:
    front = {
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "language": ["ko", "en", "ja"],
        "tags": ["kmoe", "moe", "glm4_moe"],
    }
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(),
            "---",
            "",
            f"# kmoe Glm4Moe ({total_params:,} parameters, {dtype})",
            "",
            "A kmoe mixture-of-experts model trained from scratch (Korean-first, multilingual), exported by "
            "`kmoe export hf` to the stock `Glm4MoeForCausalLM` layout (no remote code).",
            "",
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained(PATH)\ntok = AutoTokenizer.from_pretrained(PATH)\n```",
            "",
            "## Tokenizer",
            "",
            *tokenizer,
            "",
        ]
    )
