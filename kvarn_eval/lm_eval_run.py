"""lm-eval harness (0.4.x) with KVarN: the offline kvarn_* tasks, and a model class whose KV cache is KVarN.

lm-eval has no plugin hook for model classes, so this launcher imports what registers them and then runs lm-eval's
own command line:

    python -m kvarn_eval.lm_eval_run --model kvarn-hf \\
        --model_args pretrained=DIR,kv_cache=kvarn_k4v2_g128,kv_chunk=64 \\
        --tasks kvarn_gsm8k_cot,kvarn_mmlu --limit 50 --batch_size 1

What it adds before handing over to ``lm_eval``:

- ``import kvarn_hf``: ``attn_implementation="kvarn"`` and ``cache_implementation="kvarn"`` exist, so the stock
  ``--model hf --model_args pretrained=DIR,attn_implementation=kvarn --gen_kwargs cache_implementation=kvarn``
  works too (generation only: lm-eval's log-likelihood requests are one forward pass that never reads a cache);
- the model class ``kvarn-hf`` (an ``HFLM``): ``kv_cache=`` any method of ``kvarn eval`` (a KVarN preset, its
  ``sim:`` form, ablations, ``kivi-*``, ``quanto-*``, ``hf-fp8``, ``16-bit``), used by generation *and* by
  log-likelihood requests, whose input is fed through that cache ``kv_chunk`` tokens per forward (default 64);
- ``--include_path`` of the kvarn_* task YAMLs (``kvarn_gsm8k_cot``, ``kvarn_humaneval``, ``kvarn_mbpp``,
  ``kvarn_mmlu``, ``kvarn_arc_challenge``, ``kvarn_hellaswag``), written with the path of the offline data
  (``kvarn assets fetch``; nothing is read from the hub). ``--write-tasks DIR`` only writes them, for a plain
  ``lm_eval --include_path DIR`` (e.g. ``lm_eval --model vllm``, where the KVarN plugin loads itself).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "lm_eval_tasks"
PLACEHOLDER = "{KVARN_DATA}"
TASK_DATA = {
    "kvarn_gsm8k_cot": "gsm8k", "kvarn_humaneval": "humaneval", "kvarn_mbpp": "mbpp", "kvarn_mmlu": "mmlu",
    "kvarn_arc_challenge": "arc", "kvarn_hellaswag": "hellaswag",
}

__all__ = ["TASK_DATA", "write_tasks", "main"]


def write_tasks(out_dir: Path, data_root: Path | None = None, fetch: tuple[str, ...] = ()) -> Path:
    """Write the kvarn_* task YAMLs and their utils.py to ``out_dir`` with ``data_root`` (default: the kvarn
    cache's data folder) in place of the placeholder; fetch the data sets named in ``fetch`` first."""
    from .assets import cache_dir, fetch_dataset

    for name in fetch:
        fetch_dataset(name)
    root = Path(data_root) if data_root is not None else cache_dir() / "data"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for src in sorted(TEMPLATES.glob("*.yaml")):
        (out_dir / src.name).write_text(src.read_text().replace(PLACEHOLDER, str(root.resolve())))
    shutil.copyfile(TEMPLATES / "utils.py", out_dir / "utils.py")
    (out_dir / "kvarn_data.json").write_text(json.dumps({"data_root": str(root.resolve())}) + "\n")
    return out_dir


def register() -> None:
    """Register ``kvarn-hf`` with lm-eval (idempotent) and the "kvarn" attention/cache with transformers."""
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
    from lm_eval.models.huggingface import HFLM

    import kvarn_hf  # noqa: F401  (attn_implementation="kvarn", cache_implementation="kvarn")

    if "kvarn-hf" in MODEL_REGISTRY:
        return

    @register_model("kvarn-hf")
    class KVarNLM(HFLM):
        """An HFLM whose KV cache is one of the methods of `kvarn eval`, for generation and log-likelihood."""

        def __init__(self, kv_cache: str = "kvarn_k4v2_g128", kv_chunk: int | str = 64, **kwargs: Any) -> None:
            from .methods import resolve_methods

            self.kv_method = resolve_methods([kv_cache])[-1]
            self.kv_chunk = int(kv_chunk)
            if self.kv_chunk <= 0:
                raise ValueError(f"kv_chunk must be positive, got {kv_chunk}")
            kwargs.setdefault("attn_implementation", "kvarn")
            super().__init__(**kwargs)

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            import torch

            if attn_mask is not None or labels is not None:
                raise ValueError("kvarn-hf serves decoder-only models")
            rows = []
            with torch.no_grad():
                for row in inps:  # one cache per row: right padding sits after every scored position
                    cache = self.kv_method.make(self.model.config)
                    parts = [self.model(row[None, s : s + self.kv_chunk], past_key_values=cache, use_cache=True).logits
                             for s in range(0, row.shape[0], self.kv_chunk)]
                    rows.append(torch.cat(parts, dim=1))
            return torch.cat(rows, dim=0)

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **generation_kwargs: Any) -> Any:
            if context.shape[0] > 1 and self.kv_method.family not in ("16-bit", "kvarn", "quanto", "fp8"):
                raise ValueError(f"kv_cache={self.kv_method.name} simulates tiles without padding: use batch_size=1")
            generation_kwargs.setdefault("past_key_values", self.kv_method.make(self.model.config))
            return super()._model_generate(context, max_length, stop, **generation_kwargs)


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--write-tasks"]:
        if len(argv) < 2:
            print("usage: python -m kvarn_eval.lm_eval_run --write-tasks DIR [DATA_ROOT]", file=sys.stderr)
            return 2
        out = write_tasks(Path(argv[1]), Path(argv[2]) if len(argv) > 2 else None, tuple(TASK_DATA.values()))
        print(f"wrote the kvarn_* lm-eval tasks to {out}: lm_eval --include_path {out} --tasks kvarn_gsm8k_cot ...")
        return 0
    register()
    if not _has_flag(argv, "--include_path"):
        from .assets import cache_dir

        tasks_arg = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--tasks"), "")
        wanted = tuple(sorted({TASK_DATA[t] for t in tasks_arg.split(",") if t in TASK_DATA}))
        out = write_tasks(cache_dir() / "lm_eval_tasks", fetch=wanted)
        argv += ["--include_path", str(out)]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the kvarn_* tasks read local files only
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
