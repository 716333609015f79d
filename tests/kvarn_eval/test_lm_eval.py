"""lm-eval integration: the offline kvarn_* tasks load and score a tiny model on CPU, through the kvarn-hf class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from tiny_lm import save_tiny_model  # noqa: E402

from kvarn_eval import lm_eval_run  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lmeval")
    model = save_tiny_model(root / "model")
    data = root / "data"
    _write(data / "gsm8k/v1/test.jsonl",
           [{"id": i, "question": f"Tom has {i} apples and buys 4 more. How many?", "solution": "",
             "answer": str(i + 4)} for i in range(3)])
    _write(data / "gsm8k/v1/fewshot.jsonl",
           [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}. So the answer is {i + 1}."} for i in range(8)])
    _write(data / "humaneval/v1/test.jsonl",
           [{"task_id": f"HumanEval/{i}", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
             "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"} for i in range(3)])
    _write(data / "mmlu/v1/test.jsonl", [{"subject": "anatomy", "question": f"How many bones {i}?",
                                          "choices": ["one", "two", "three", "four"], "answer": i % 4}
                                         for i in range(3)])
    _write(data / "mmlu/v1/dev.jsonl", [{"subject": "anatomy", "question": f"Example {i}?",
                                         "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(6)])
    tasks = lm_eval_run.write_tasks(root / "tasks", data)
    lm_eval_run.register()
    return model, tasks


def test_write_tasks_fills_in_the_data_folder(setup: tuple[Path, Path]):
    _, tasks = setup
    names = sorted(p.name for p in tasks.glob("*.yaml"))
    assert names == sorted(f"{t}.yaml" for t in lm_eval_run.TASK_DATA)
    for path in tasks.glob("*.yaml"):
        text = path.read_text()
        assert lm_eval_run.PLACEHOLDER not in text and "dataset_path: json" in text
    assert str(tasks.parent / "data") in (tasks / "kvarn_gsm8k_cot.yaml").read_text()
    assert json.loads((tasks / "kvarn_data.json").read_text())["data_root"] == str((tasks.parent / "data").resolve())


def test_pass_at_1_metric_runs_the_program_in_the_sandbox(setup: tuple[Path, Path], monkeypatch):
    _, tasks = setup
    monkeypatch.syspath_prepend(str(tasks))
    import utils  # the copy beside the YAMLs, as lm-eval imports it

    ref = "def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)"
    assert utils.pass_at_1([ref], [["def add(a, b):\n    return a + b\n"]]) == 1.0
    assert utils.pass_at_1([ref], [["def add(a, b):\n    return a * b\n"]]) == 0.0
    assert utils.pass_at_1([ref], [["def add(a, b):\n    while True: pass\n"]]) == 0.0


def _evaluate(setup: tuple[Path, Path], model_name: str, model_args: dict, tasks: list[str], **kw) -> dict:
    from lm_eval.tasks import TaskManager

    model, task_dir = setup
    return lm_eval.simple_evaluate(model=model_name, model_args={"pretrained": str(model), "device": "cpu",
                                                                 "dtype": "float32", **model_args},
                                   tasks=tasks,
                                   task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                   confirm_run_unsafe_code=True, batch_size=1, log_samples=True, **kw)


def test_tasks_load_and_score_through_a_kvarn_cache(setup: tuple[Path, Path]):
    res = _evaluate(setup, "kvarn-hf", {"kv_cache": "sim:kvarn_k4v2_g128", "kv_chunk": 16},
                    ["kvarn_gsm8k_cot", "kvarn_humaneval", "kvarn_mmlu"], limit=2, gen_kwargs="max_gen_toks=6")
    r = res["results"]
    for task, metric in (("kvarn_gsm8k_cot", "exact_match,flexible-extract"),
                         ("kvarn_humaneval", "pass_at_1,create_test"), ("kvarn_mmlu", "acc,none")):
        assert 0.0 <= r[task][metric] <= 1.0
        assert {s["doc_id"] for s in res["samples"][task]} == {0, 1}  # (gsm8k logs each doc once per filter)
    prompt = res["samples"]["kvarn_gsm8k_cot"][0]["arguments"][0][0]
    assert prompt.count("Question: ") == 9 and prompt.endswith("Tom has 0 apples and buys 4 more. How many?\nAnswer:")
    assert "So the answer is 8." in prompt
    mmlu = res["samples"]["kvarn_mmlu"][0]["arguments"][0][0]
    assert mmlu.startswith("The following are multiple choice questions (with answers) about anatomy.\n\nExample 0?")
    assert mmlu.count("\nAnswer:") == 6  # five shots and the question


def test_kvarn_hf_with_a_16bit_cache_scores_like_stock_hf(setup: tuple[Path, Path]):
    ours = _evaluate(setup, "kvarn-hf", {"kv_cache": "16-bit", "kv_chunk": 7}, ["kvarn_mmlu"], limit=3)
    stock = _evaluate(setup, "hf", {}, ["kvarn_mmlu"], limit=3)
    a = [s["resps"] for s in ours["samples"]["kvarn_mmlu"]]
    b = [s["resps"] for s in stock["samples"]["kvarn_mmlu"]]
    for row_a, row_b in zip(a, b, strict=True):
        for (lp_a, _), (lp_b, _) in zip((x[0] for x in row_a), (x[0] for x in row_b), strict=True):
            assert lp_a == pytest.approx(lp_b, abs=1e-4)


def test_unknown_cache_method_is_refused(setup: tuple[Path, Path]):
    with pytest.raises(ValueError, match="method 'kvarn_k9v9' is unknown"):
        _evaluate(setup, "kvarn-hf", {"kv_cache": "kvarn_k9v9"}, ["kvarn_mmlu"], limit=1)
