"""Fuzzing the safetensors reader: whatever the bytes, `header_length` / `parse_header` / `read_header` either
return a header whose every promise holds, or raise FormatError (an EngineError). Never another exception, never
a hang, never a buffer sized by what a header *claims* rather than by what the file holds.

Runs are bounded (max_examples, deadline, derandomized, no example database on disk) so the file takes a few
seconds. The bugs the fuzzers first found are pinned by the tests at the bottom.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from worker.engine.errors import EngineError, FormatError
from worker.engine.io import FileEntry, LocalDirSource
from worker.engine.safetensors_format import (
    DTYPES,
    MAX_HEADER_BYTES,
    FileHeader,
    build_header,
    header_length,
    parse_header,
)
from worker.engine.tensors import read_header

# Hypothesis keeps caches in ./.hypothesis by default; keep the checkout clean.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "lorafold-hypothesis"))

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(
    max_examples=200,
    deadline=2000,  # ms per example: a hang or a quadratic blow-up fails here
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# --- the contract of an accepted header -----------------------------------------------------------------------------


def check_header(h: FileHeader, file_size: int | None, header_len: int) -> None:
    """Everything a caller of parse_header relies on before it reads or allocates anything."""
    assert h.header_len == header_len
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in h.metadata.items())
    data_size = None if file_size is None else file_size - 8 - header_len
    if data_size is not None:
        assert data_size >= 0
    spans = []
    for name, t in h.tensors.items():
        assert name == t.name and name != "__metadata__"
        assert t.dtype in DTYPES
        assert isinstance(t.shape, tuple)
        assert all(type(d) is int and d >= 0 for d in t.shape), t.shape
        assert type(t.begin) is int and type(t.end) is int and 0 <= t.begin <= t.end
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype][0]
        if data_size is not None:
            assert t.end <= data_size, "a tensor reaches past the end of the file"
        if t.end > t.begin:
            spans.append((t.begin, t.end))
    spans.sort()
    for (_, e0), (b1, _) in itertools.pairwise(spans):
        assert e0 <= b1, "overlapping tensors accepted"


def parse_or_format_error(raw: bytes, file_size: int | None, header_len: int | None = None):
    header_len = len(raw) if header_len is None else header_len
    try:
        h = parse_header(raw, "fuzz.safetensors", file_size, header_len)
    except FormatError as exc:
        text = str(exc)
        assert text and "\n" not in text and "fuzz.safetensors" in text
        return None
    check_header(h, file_size, header_len)
    return h


# --- header_length --------------------------------------------------------------------------------------------------


@FUZZ
@given(prefix=st.binary(max_size=16), file_size=st.none() | st.integers(0, 2**70))
@example(prefix=struct.pack("<Q", 2**64 - 1), file_size=None)
@example(prefix=struct.pack("<Q", MAX_HEADER_BYTES), file_size=MAX_HEADER_BYTES + 8)
@example(prefix=struct.pack("<Q", MAX_HEADER_BYTES + 1), file_size=2**40)
@example(prefix=struct.pack("<Q", 100), file_size=107)
def test_header_length(prefix, file_size):
    try:
        n = header_length(prefix, "fuzz.safetensors", file_size)
    except FormatError as exc:
        assert "fuzz.safetensors" in str(exc)
        return
    assert len(prefix) >= 8
    assert n == struct.unpack("<Q", prefix[:8])[0]
    assert 0 <= n <= MAX_HEADER_BYTES
    assert file_size is None or 8 + n <= file_size


# --- parse_header on arbitrary bytes and arbitrary JSON ---------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(raw=st.binary(max_size=512), file_size=st.none() | st.integers(0, 4096))
@example(raw=b"\xef\xbb\xbf{}", file_size=None)
@example(raw=b"{}" + b"\x00" * 6, file_size=None)
@example(raw=b"  {}  ", file_size=14)
def test_parse_header_arbitrary_bytes(raw, file_size):
    if file_size is not None:
        file_size += 8 + len(raw)
    parse_or_format_error(raw, file_size)


@FUZZ
@given(obj=json_values, slack=st.none() | st.integers(0, 256))
@example(obj={"__metadata__": {"a": 1}}, slack=0)
@example(obj={"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "u": None}, slack=8)
def test_parse_header_arbitrary_json(obj, slack):
    raw = json.dumps(obj).encode()
    parse_or_format_error(raw, None if slack is None else 8 + len(raw) + slack)


# --- parse_header on structured, mostly-right headers ----------------------------------------------------------------

hashable_junk = st.none() | st.booleans() | st.integers(-5, 2**64) | st.floats(-1e3, 1e20) | st.text(max_size=6)
dims = st.integers(0, 6) | st.integers(-3, -1) | st.booleans() | st.floats(0, 6) | st.just(10**15) | st.just(2**63) | st.text(max_size=2)
dtypes = st.sampled_from(sorted(DTYPES)) | st.sampled_from(["f32", "F8", "F4", "I128", "", "F32 "]) | hashable_junk


@st.composite
def entries(draw, pos: list[int]):
    """One tensor entry: usually laid out right after the previous one, sometimes wrong in one or more fields."""
    dtype = draw(dtypes)
    shape = draw(st.lists(dims, max_size=3) | hashable_junk)
    item = DTYPES[dtype][0] if isinstance(dtype, str) and dtype in DTYPES else 4
    try:
        # a text dim would make math.prod repeat a string (10**15 times: MemoryError in the generator itself)
        numeric = isinstance(shape, list) and not any(isinstance(d, str) for d in shape)
        nbytes = math.prod(shape) * item if numeric else 0
        nbytes = int(nbytes) if isinstance(nbytes, (int, float)) and not isinstance(nbytes, bool) else 0
    except TypeError:
        nbytes = 0
    begin = pos[0] + draw(st.sampled_from([0, 0, 0, -1, 1, -4]))
    end = begin + nbytes + draw(st.sampled_from([0, 0, 0, 1, -1]))
    offsets = draw(
        st.just([begin, end])
        | st.just([end, begin])
        | st.lists(st.integers(-8, 2**64) | st.booleans() | st.floats(0, 100), max_size=3)
        | hashable_junk
    )
    pos[0] = max(pos[0], end if isinstance(end, int) else pos[0])
    entry = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets"]), max_size=1)):
        del entry[key]
    return entry


@st.composite
def headers(draw):
    pos = [0]
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__"), max_size=5, unique=True))
    obj: dict = {}
    if draw(st.booleans()):
        obj["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4) | hashable_junk, max_size=3)
            | st.lists(st.text(max_size=3), min_size=1, max_size=2)
        )
    for name in names:
        obj[name] = draw(entries(pos))
    data_size = max(0, pos[0]) + draw(st.sampled_from([0, 0, 0, -1, 3]))
    return obj, max(0, data_size)


@FUZZ
@given(spec=headers(), known_size=st.booleans())
def test_parse_header_structured(spec, known_size):
    obj, data_size = spec
    raw = json.dumps(obj).encode()
    raw += b" " * (-len(raw) % 8)
    h = parse_or_format_error(raw, 8 + len(raw) + data_size if known_size else None)
    if h is not None and known_size:
        assert sum(t.nbytes for t in h.tensors.values()) <= data_size


# --- a whole file through read_header and a LocalDirSource -------------------------------------------------------------

_counter = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("st_fuzz")


@st.composite
def valid_files(draw):
    tensors = []
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        tensors.append((draw(st.text(min_size=1, max_size=5).filter(lambda s: s != "__metadata__")) + f"#{i}", dtype, shape))
    metadata = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    head, _ = build_header(tensors, metadata)
    size = sum(math.prod(s) * DTYPES[d][0] for _, d, s in tensors)
    return tensors, head + draw(st.binary(min_size=size, max_size=size))


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1) | st.integers(0, 4096)),
    st.tuples(st.just("field"), st.integers(0, 10), st.sampled_from(["dtype", "shape", "data_offsets"]), hashable_junk | st.lists(st.integers(-2, 2**64), max_size=3)),
)


def apply(blob: bytes, op) -> bytes:
    kind = op[0]
    if kind == "flip" and blob:
        i = op[1] % len(blob)
        return blob[:i] + bytes([blob[i] ^ op[2]]) + blob[i + 1 :]
    if kind == "truncate":
        return blob[: op[1] % (len(blob) + 1)]
    if kind == "append":
        return blob + op[1]
    if kind == "insert":
        i = op[1] % (len(blob) + 1)
        return blob[:i] + op[2] + blob[i:]
    if kind == "length" and len(blob) >= 8:
        return struct.pack("<Q", op[1]) + blob[8:]
    if kind == "field" and len(blob) >= 8:
        (n,) = struct.unpack("<Q", blob[:8])
        try:
            obj = json.loads(blob[8 : 8 + n])
        except ValueError:
            return blob
        names = [k for k in obj if k != "__metadata__"] if isinstance(obj, dict) else []
        if not names or not isinstance(obj[names[op[1] % len(names)]], dict):
            return blob
        obj[names[op[1] % len(names)]][op[2]] = op[3]
        raw = json.dumps(obj).encode()
        return struct.pack("<Q", len(raw)) + raw + blob[8 + n :]
    return blob


def read_file(directory: Path, blob: bytes):
    """read_header through a LocalDirSource; returns the header or None (FormatError / SourceError)."""
    name = f"f{next(_counter)}.safetensors"
    (directory / name).write_bytes(blob)
    source = LocalDirSource(directory)
    tracemalloc.start()
    try:
        header = read_header(source, FileEntry(name, len(blob)))
    except EngineError as exc:
        assert str(exc) and "\n" not in str(exc)
        header = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        source.close()
        (directory / name).unlink()
    # what read_header allocates is bounded by the file (parsed JSON objects cost ~12x the text), never by what its
    # header claims: a header that claims 10^15 elements must not cost more than one that claims 1
    assert peak <= 32 * len(blob) + (1 << 20), f"read_header allocated {peak} bytes for a {len(blob)}-byte file"
    if header is not None:
        check_header(header, len(blob), header.header_len)
    return header


@FUZZ
@given(spec=valid_files(), ops=st.lists(mutations, max_size=3))
def test_read_header_mutated_files(fuzz_dir, spec, ops):
    tensors, blob = spec
    for op in ops:
        blob = apply(blob, op)
    header = read_file(fuzz_dir, blob)
    if not ops:  # positive control: an untouched file is read back exactly
        assert header is not None
        assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == {n: (d, s) for n, d, s in tensors}


@FUZZ
@given(blob=st.binary(max_size=300))
@example(blob=b"")
@example(blob=struct.pack("<Q", 2) + b"{}")
@example(blob=struct.pack("<Q", 2) + b"{")
def test_read_header_arbitrary_files(fuzz_dir, blob):
    read_file(fuzz_dir, blob)


def test_read_header_large_header_is_read_in_two_steps(fuzz_dir):
    """A header larger than the first read (100 kB) is read completely and still validated."""
    tensors = [(f"tensor-with-a-long-name-{i:06d}", "F32", (1,)) for i in range(3000)]
    head, _ = build_header(tensors, {"format": "pt"})
    assert len(head) > 100_000
    header = read_file(fuzz_dir, head + b"\x00" * 4 * len(tensors))
    assert header is not None and len(header.tensors) == 3000
    assert read_file(fuzz_dir, head + b"\x00" * (4 * len(tensors) - 1)) is None  # one byte short


# --- differential: what the reference implementation accepts, lorafold accepts too --------------------------------


@FUZZ
@given(spec=valid_files(), ops=st.lists(mutations.filter(lambda op: op[0] != "field"), max_size=2))
def test_accepts_what_the_reference_reader_accepts(fuzz_dir, spec, ops):
    from safetensors import safe_open

    _, blob = spec
    for op in ops:
        blob = apply(blob, op)
    path = fuzz_dir / f"ref{next(_counter)}.safetensors"
    path.write_bytes(blob)
    try:
        try:
            with safe_open(path, "numpy") as f:
                reference = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
        except Exception:  # noqa: BLE001 - the reference rejects it: nothing to compare
            return
        assume(all(d in DTYPES for d, _ in reference.values()))
        source = LocalDirSource(fuzz_dir)
        try:
            header = read_header(source, FileEntry(path.name, len(blob)))
        finally:
            source.close()
        assert {n: (t.dtype, t.shape) for n, t in header.tensors.items()} == reference
    finally:
        path.unlink()


# --- the huge claim, deterministically --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [[10**15], [10**8, 10**7], [2**62, 4], [0, 10**20]])
def test_huge_claimed_tensor_is_rejected_before_any_allocation(fuzz_dir, shape):
    nbytes = math.prod(shape) * 4
    raw = json.dumps({"big": {"dtype": "F32", "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    blob = struct.pack("<Q", len(raw)) + raw + b"\x00" * 64
    if nbytes:
        with pytest.raises(FormatError, match="big"):
            parse_header(raw, "huge.safetensors", len(blob), len(raw))
        assert read_file(fuzz_dir, blob) is None
    else:  # an empty tensor with a huge dimension is legal and costs nothing
        assert read_file(fuzz_dir, blob) is not None


def test_header_length_is_checked_before_reading_it(fuzz_dir):
    for n in (MAX_HEADER_BYTES + 1, 2**63, 2**64 - 1, 10**6):
        assert read_file(fuzz_dir, struct.pack("<Q", n) + b"{}" + b" " * 6) is None


# --- former bugs, now fixed: keep them fixed --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_deeply_nested_header_is_a_format_error(raw):
    with pytest.raises(FormatError):
        parse_header(raw, "deep.safetensors", None, len(raw))


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_unhashable_dtype_is_a_format_error(dtype):
    raw = json.dumps({"t": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    with pytest.raises(FormatError):
        parse_header(raw, "x.safetensors", None, len(raw))


@pytest.mark.parametrize("meta", [0, "", [], False])
def test_falsy_non_object_metadata_is_a_format_error(meta):
    raw = json.dumps({"__metadata__": meta}).encode()
    with pytest.raises(FormatError):
        parse_header(raw, "x.safetensors", None, len(raw))
