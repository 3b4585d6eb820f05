import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchv4.io.readers import RawRow
from batchv4.io.rows import (
    RowError,
    RowRequest,
    RowSpec,
    build_request,
    check_columns,
    content_hash,
    fill_template,
    openai_params,
    parse_template,
)


def row(data, index=0, raw=None):
    return RawRow(index, data, raw, None)


def test_prompt_column_with_system_id_and_keep():
    spec = check_columns(RowSpec(prompt_column="q", id_column="key", system="Be brief.", keep_columns=("meta",)), ["q", "key", "meta"])
    req = build_request(row({"q": "hello", "key": 7, "meta": {"a": 1}}, index=3), spec)
    assert isinstance(req, RowRequest)
    assert req.id == "7" and req.index == 3
    assert req.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert req.params == {} and req.keep == {"meta": {"a": 1}}
    assert req.content_hash == content_hash(req.messages, {})


def test_default_id_is_row_index_and_default_column_resolution():
    assert check_columns(RowSpec(), ["prompt", "x"]).prompt_column == "prompt"
    assert check_columns(RowSpec(), ["messages", "prompt"]).messages_column == "messages"
    spec = check_columns(RowSpec(), ["prompt"])
    assert build_request(row({"prompt": "p"}, index=41), spec).id == "41"


def test_check_columns_errors_list_available_columns():
    with pytest.raises(ValueError, match=r"column 'txt' \(from --prompt-column\) is not in the input; available columns: a, b"):
        check_columns(RowSpec(prompt_column="txt"), ["a", "b"])
    with pytest.raises(ValueError, match="from --keep-column"):
        check_columns(RowSpec(prompt_column="a", keep_columns=("zz",)), ["a"])
    with pytest.raises(ValueError, match="from --template"):
        check_columns(RowSpec(template="Q: {missing}"), ["a"])
    with pytest.raises(ValueError, match="no prompt column"):
        check_columns(RowSpec(), ["a"])
    with pytest.raises(ValueError, match="only one of"):
        check_columns(RowSpec(prompt_column="a", template="{a}"), ["a"])
    with pytest.raises(ValueError, match="do not apply to OpenAI"):
        check_columns(RowSpec(prompt_column="a"), ["custom_id", "body"], fmt="openai")


def test_template_substitution_is_plain():
    pieces = parse_template("Doc: {text}\nQ: {q} {{literal}} {a.b}")
    out = fill_template(pieces, {"text": "{q} {__class__}", "q": 5, "a.b": "dot"})
    assert out == "Doc: {q} {__class__}\nQ: 5 {literal} dot"
    for bad in ("{", "a}", "{}", "{ }"):
        with pytest.raises(ValueError, match="template"):
            parse_template(bad)


@given(st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3), st.text(max_size=20), min_size=1, max_size=4))
def test_template_round_trip_property(values):
    template = " | ".join("{" + k + "}" for k in values)
    assert fill_template(parse_template(template), values) == " | ".join(values.values())


@pytest.mark.parametrize(
    "spec, data, match",
    [
        (RowSpec(prompt_column="q"), {"q": None}, "missing or null"),
        (RowSpec(prompt_column="q"), {"other": 1}, "missing or null"),
        (RowSpec(prompt_column="q"), {"q": 12}, "expected a string, got int"),
        (RowSpec(prompt_column="q"), {"q": "   "}, "empty prompt"),
        (RowSpec(messages_column="m"), {"m": "hi"}, "expected a list"),
        (RowSpec(messages_column="m"), {"m": [{"role": "user"}]}, "missing content"),
        (RowSpec(messages_column="m"), {"m": [{"role": "robot", "content": "x"}]}, "unsupported role"),
        (RowSpec(template="Q: {q}"), {"x": 1}, "template column 'q' is missing"),
        (RowSpec(template="Q: {q}"), {"q": None}, "template column 'q' is null"),
        (RowSpec(prompt_column="q", id_column="id"), {"q": "x", "id": None}, "id column 'id' is missing or null"),
        (RowSpec(prompt_column="q", id_column="id"), {"q": "x", "id": 1.5}, "expected a string or integer"),
    ],
)
def test_row_errors(spec, data, match):
    err = build_request(row(data, index=5, raw='{"raw": 1}'), spec)
    assert isinstance(err, RowError), err
    assert match in err.error and "\n" not in err.error
    assert err.index == 5 and err.raw == '{"raw": 1}'
    rec = err.to_record()
    assert set(rec) == {"id", "row_index", "error", "raw"}


def test_reader_error_rows_pass_through():
    err = build_request(RawRow(9, None, "{bad", "x line 3: invalid JSON"), RowSpec(prompt_column="q"))
    assert isinstance(err, RowError) and err.error == "x line 3: invalid JSON" and err.raw == "{bad" and err.id is None


def test_openai_rows():
    spec = check_columns(RowSpec(), ["custom_id", "method", "url", "body"], fmt="openai")
    body = {
        "model": "deepseek-v4-flash",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_completion_tokens": 64,
        "max_tokens": 9,
        "temperature": 0.5,
        "top_p": 1,
        "seed": 3,
        "stop": "END",
        "n": 2,
        "thinking": {"type": "enabled"},
        "unknown": True,
    }
    req = build_request(row({"custom_id": "req-1", "body": body}), spec)
    assert isinstance(req, RowRequest) and req.id == "req-1"
    assert req.messages == [{"role": "user", "content": "hi"}]
    assert req.params == {"max_tokens": 64, "temperature": 0.5, "top_p": 1.0, "seed": 3, "stop": ["END"], "n": 2, "thinking": True}
    legacy = build_request(row({"custom_id": "r2", "body": {"prompt": "complete me"}}), spec)
    assert legacy.messages == [{"role": "user", "content": "complete me"}]
    assert build_request(row({"custom_id": 5, "body": {"prompt": "x"}}), spec).error == "custom_id: expected a string"
    assert "neither messages nor prompt" in build_request(row({"custom_id": "a", "body": {}}), spec).error
    emb = build_request(row({"custom_id": "e", "url": "/v1/embeddings", "body": {"input": "x"}}), spec)
    assert emb.error.startswith("url: unsupported endpoint '/v1/embeddings'") and emb.id == "e"
    assert "body.temperature" in build_request(row({"custom_id": "a", "body": {"prompt": "x", "temperature": "hot"}}), spec).error


def test_openai_params_validation():
    with pytest.raises(ValueError, match="body.max_tokens"):
        openai_params({"max_tokens": 0})
    with pytest.raises(ValueError, match="body.n"):
        openai_params({"n": True})
    with pytest.raises(ValueError, match="body.stop"):
        openai_params({"stop": ["", "x"]})


def test_content_hash_depends_on_messages_and_params():
    m = [{"role": "user", "content": "x"}]
    assert content_hash(m, {"a": 1, "b": 2}) == content_hash(m, {"b": 2, "a": 1})
    assert content_hash(m, {}) != content_hash(m, {"temperature": 0.0})
    assert content_hash(m, {}) != content_hash([{"role": "user", "content": "y"}], {})
