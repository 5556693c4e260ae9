"""The model card: README.md in every artifact, written from the job's report.

What a person who downloads the artifact needs without asking anyone: which model it came
from, the recipe exactly as run, what quantization cost (metrics before and after), what it
was calibrated on, and how to load it with the tools its format is for.
"""

from __future__ import annotations

import json
from typing import Any

LOADING = {
    "qforge": """```python
from quantcore import load_quantized
qm = load_quantized("{folder}")   # checks every file's sha256 against manifest.json
qm.model, qm.tokenizer
```""",
    "compressed-tensors": """transformers (with `compressed-tensors` installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder}")
tokenizer = AutoTokenizer.from_pretrained("{folder}")
```

vLLM:

```bash
vllm serve ./{folder}
```""",
    "gptq": """transformers (with `gptqmodel` installed: it reads this qweight/qzeros/scales/g_idx layout):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder}")
```

vLLM:

```bash
vllm serve ./{folder}
```""",
    "awq": """transformers (with `autoawq` installed) or vLLM, both read the AutoAWQ GEMM layout:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder}")
```

```bash
vllm serve ./{folder}
```""",
    "gguf": """llama.cpp:

```bash
llama-cli -m {folder}/{file} -p "Hello"
```

transformers (dequantizes to float on load):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder}", gguf_file="{file}")
```""",
}


def model_card(report: dict[str, Any], fmt: str, folder: str, file: str = "") -> str:
    model = report.get("model", {})
    request = report.get("request", {})
    metrics = report.get("metrics", {})
    lines = [
        f"# {model.get('name', 'model')}, quantized by qforge ({report.get('recipe', {}).get('name') or 'custom recipe'})",
        "",
        f"- Source model: `{model.get('ref', '?')}` ({model.get('class', '?')})",
        f"- Format: {fmt}",
        f"- Created: {report.get('created_at', '?')}, seed {report.get('seed', 0)}",
        "",
        "## Quality",
        "",
        "| metric | before (float) | after (quantized) |",
        "|---|---|---|",
    ]
    baseline, quantized = metrics.get("baseline", {}), metrics.get("quantized", {})
    for key in ("perplexity", "embedding_cosine", "accuracy"):
        if key in baseline or key in quantized:
            lines.append(f"| {key} | {_fmt(baseline.get(key))} | {_fmt(quantized.get(key))} |")
    if not (baseline or quantized):
        lines.append("| (evaluation was not requested) | | |")
    evaluation = request.get("evaluation") or {}
    calibration = request.get("calibration") or {}
    lines += [
        "",
        f"Evaluation: {_describe_evaluation(model.get('kind'), evaluation)}.",
        "",
        "## Calibration data",
        "",
        _describe_calibration(calibration),
        "",
        "## Recipe as run",
        "",
        "```json",
        json.dumps(report.get("recipe", {}), indent=2),
        "```",
        "",
        "## Size",
        "",
    ]
    sizes = report.get("sizes", {}).get("linear", {})
    if sizes:
        lines.append(f"Quantized linear layers: {sizes.get('layers')}, {sizes.get('quantized_bytes', 0) / 1e6:.1f} MB "
                     f"({sizes.get('ratio_to_float16')} of their fp16 size).")
    loading = LOADING["gguf" if fmt.startswith("gguf") else fmt]
    lines += ["", "## Loading", "", loading.format(folder=folder, file=file), ""]
    versions = report.get("versions", {})
    if versions:
        lines += ["## Made with", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _describe_evaluation(kind: str | None, evaluation: dict) -> str:
    if kind == "encoder":
        return f"mean cosine similarity of sentence embeddings to the float model's, {evaluation.get('embedding_paragraphs', '?')} paragraphs"
    return (f"perplexity over {evaluation.get('perplexity_tokens', '?')} tokens in windows of {evaluation.get('window', 512)}, "
            "on the held-out last 20 % of the Python documentation topics (`pydoc_data.topics`)")


def _describe_calibration(calibration: dict) -> str:
    if not calibration:
        return "No calibration data (the recipe needs none)."
    return (f"{calibration.get('num_samples', '?')} windows of {calibration.get('seq_len', '?')} tokens from the first 60 % of "
            f"the Python documentation topics (`pydoc_data.topics`, dataset `{calibration.get('dataset', 'pydoc-topics')}`); "
            "used only by recipe stages that calibrate.")
