"""The one JSONL reader (harness.jsonl) and its two users' messages: the run store's and the benchmark files'."""
import pytest

from harness import store
from harness.errors import HarnessError
from harness.jsonl import JsonlError, numbered_objects
from tasks.data import read_jsonl_rows


def test_objects_come_with_their_true_line_numbers_blank_lines_skipped():
    lines = [b'{"a": 1}\n', b"\n", b"  \n", b'{"b": [2]}\n']
    assert list(numbered_objects(lines)) == [(1, {"a": 1}), (4, {"b": [2]})]
    assert list(numbered_objects(['{"a": 1}', ""])) == [(1, {"a": 1})]


@pytest.mark.parametrize("bad, message", [
    (b"\xff\n", "line 2: not UTF-8 text"),
    (b"{oops\n", "line 2: malformed JSON (Expecting property name enclosed in double quotes)"),
    (b"[1, 2]\n", "line 2: expected an object, found a list"),
    (b'"x"\n', "line 2: expected an object, found a string"),
])
def test_the_first_bad_line_is_named(bad, message):
    with pytest.raises(JsonlError) as info:
        list(numbered_objects([b'{"ok": true}\n', bad, b"[3]\n"]))
    assert str(info.value) == message and info.value.lineno == 2


def test_the_store_and_the_benchmark_files_put_their_file_in_front(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"step": 1}\n[1]\n')
    with pytest.raises(store.StoreError) as info:
        store.read_jsonl(path)
    assert str(info.value) == f"{str(path)!r} line 2: expected an object, found a list"
    with pytest.raises(HarnessError) as info:
        read_jsonl_rows(path, "toy")
    assert str(info.value) == f"benchmark toy: {str(path)!r} line 2: expected a JSON object, found a list"
    path.write_bytes(b'{"step": 1}\n{"value": 2}\n')
    with pytest.raises(store.StoreError, match="line 2: lacks the key\\(s\\) step"):
        store.read_jsonl(path, keys=("step",))
